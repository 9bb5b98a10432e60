"""From user-level options to a ready Engine: resolve models into stores, plan, open, check tokenizers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from offspec.config import RuntimeConfig
from offspec.errors import ConfigError, ModelError, OffspecError
from offspec.generate import Engine

PROBE_TEXT = "def main():\n    print('Hello, world!')  # Über 100 tokens? 日本語 ✓\n"


DRAFT_KEYWORDS = ("ngram", "self", "auto")  # --draft values that name a drafter rather than a model
DEFAULT_SEQUENCES = 4  # sequences decoded at once when serving (fewer if the memory budget cannot hold their caches)
CURVE_CACHE_TOKENS = 512  # the target's own cache when it serves several sequences (each has a batch cache row)


@dataclass
class Loaded:
    engine: Engine
    target_store: Path
    draft_store: Path | None  # the draft model's store (the NF4 copy for --draft self; None for n-gram drafting)
    tokenizer: object
    drafter: str = ""  # the drafter's name ("" = plain decoding)
    plans: dict[str, DraftPlan] = field(default_factory=dict)  # drafters the plan left room for (reserve_for)
    sequences: int = 1  # sequences the memory plan holds KV caches for (load_engine's `sequences`)
    sequence_kv_bytes: int = 0  # KV cache bytes each of them takes (target and draft)

    def close(self) -> None:
        """Stop the reader threads of the target and of a draft model."""
        self.engine.close()


def draft_kind(model: str | None, draft: str | None, spec: bool = True) -> str:
    """What drafts: "none", "ngram", "self", "model" or "auto" (several drafters, the planner picks per tree: --draft
    auto, or a comma-separated list). Without --draft: the demo's draft model for the demo, n-gram drafting for any
    other --model (it costs milliseconds and falls back to plain steps)."""
    if not spec:
        return "none"
    if draft is None:
        return "model" if model is None else "ngram"
    if "," in draft:
        return "auto"
    if draft.partition(":")[0] == "self":  # self, or self:FORMAT
        return "self"
    return draft if draft in DRAFT_KEYWORDS else "model"


def self_format(draft: str | None, device: str) -> str:
    """The low-bit format of a self-draft: the one named in --draft self:FORMAT, else the fastest here."""
    from offspec.runtime.self_draft import check_self_format, default_self_format
    from offspec.runtime.device import resolve_device

    _, _, fmt = (draft or "self").partition(":")
    return check_self_format(fmt) if fmt else default_self_format(resolve_device(device))


def auto_members(draft: str, target_store: Path, demo: bool) -> list[str]:
    """The --draft values an auto drafter holds: a comma-separated list as given; for `auto`, n-grams, the target's
    own NF4 copy where it can have one (a 16-bit store whose source is still there) and, for the demo, its draft."""
    if draft != "auto":
        items = [d.strip() for d in draft.split(",") if d.strip()]
        if not items or "auto" in items or len(set(items)) < len(items):
            raise ConfigError(f"bad --draft '{draft}': list drafters (self, ngram or a model) once each")
        return items
    members = ["ngram"]
    try:
        self_draft_manifest(target_store, self_format(None, "cpu"))
        members.append("self")
    except OffspecError:
        pass
    if demo:
        members.append("demo")
    return members


def check_draft_options(model: str | None, draft: str | None, spec: bool, ngram: bool | None,
                        ngram_corpus: str | Path | None, bits: int | None = None) -> None:
    """ConfigError for combinations that make no sense (one line each)."""
    if not spec and (draft is not None or ngram or ngram_corpus is not None):
        raise ConfigError("--no-spec decodes plainly: it cannot be combined with --draft, --ngram or --ngram-corpus")
    kind = draft_kind(model, draft, spec)
    if kind == "self" and bits == 4:  # before anything converts
        raise ConfigError("--draft self needs a 16-bit target: this store is already NF4, so its NF4 copy would be "
                          "the target itself (use --bits 16)")
    if kind == "ngram" and ngram is False:
        raise ConfigError("--no-ngram leaves n-gram drafting nothing to draft with: "
                          "give --draft MODEL or self, or --no-spec for plain decoding")
    if ngram_corpus is not None and ngram is False:
        raise ConfigError("--ngram-corpus adds n-gram candidates: it cannot be combined with --no-ngram")


def check_family(model: str, progress: bool = True) -> None:
    """ModelError (one line) before anything converts when offspec cannot run the model's family: refused by its
    structure, or by the contract check run on the family's first use under the installed transformers."""
    from offspec.runtime.family_check import ensure_family
    from offspec.store.resolve import locate_model

    path, _ = locate_model(model)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            return  # resolve_model says what is wrong with it
        from offspec.transformers_contract import gguf_config

        try:
            config = gguf_config(path)
        except Exception:  # noqa: BLE001 - the conversion reports an unreadable GGUF with its own line
            return
    else:
        from offspec.models.registry import load_config

        if not (path / "config.json").is_file():
            return  # resolve_model says what is wrong with it
        config = load_config(path)
    ensure_family(config, progress=progress)


def load_tokenizer(store: Path):
    """The tokenizer saved beside a store's config (offline only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(store, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{store}: no usable tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def check_same_tokenizer(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """The draft must map the same text to the same ids as the target; otherwise speculation is meaningless."""
    same_vocab = target_tok.get_vocab() == draft_tok.get_vocab()
    same_ids = target_tok.encode(PROBE_TEXT) == draft_tok.encode(PROBE_TEXT)
    if not (same_vocab and same_ids):
        raise ModelError(
            f"draft {draft_name} does not share the target's tokenizer ({target_name}): "
            "speculative decoding needs the same vocabulary and token ids"
        )


END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")  # ChatML/Qwen, GPT-style, Llama 3: each ends a text


def stop_ids(tokenizer, config=None) -> tuple[int, ...]:
    """End-of-text ids: the tokenizer's eos, the model config's, and the end-of-turn tokens the vocabulary has."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.update(int(vocab[name]) for name in END_OF_TURN if name in vocab)
    return tuple(sorted(ids))


def generation_eos(store: Path) -> tuple[int, ...]:
    """eos ids from generation_config.json, if any."""
    import json

    path = store / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


@dataclass
class DraftPlan:
    """A drafter chosen but not opened yet: its kind, its model's store and the memory it will hold."""

    kind: str  # "none" | "ngram" | "self" | "model" | "auto"
    store: Path | None = None  # the draft model's store (the NF4 copy for self)
    reserved_bytes: int = 0
    ngram: bool = False  # n-gram candidates next to a model or self draft (a hybrid)
    members: tuple[DraftPlan, ...] = ()  # auto: the drafters the planner picks from
    fmt: str = ""  # self: the low-bit format of the copy


def plan_draft(kind: str, draft: str | None, target_store: Path, tokenizer, rc: RuntimeConfig, cache_tokens: int,
               progress: bool, ngram: bool | None = None, corpus: bool = False, store: Path | None = None) -> DraftPlan:
    """Resolve (converting once if needed) and size a drafter before the target is opened under what is left."""
    from offspec.store.resolve import resolve_model

    hybrid = kind in ("model", "self") and bool(ngram or corpus)
    if kind == "auto":
        members = []
        for d in auto_members(draft or "auto", target_store, store is not None):
            base = d.removesuffix("+ngram")
            member_store = store if base == "demo" else None
            sub = "model" if base == "demo" else draft_kind("-", base)
            members.append(plan_draft(sub, base, target_store, tokenizer, rc, cache_tokens, progress,
                                      ngram=d != base, store=member_store))
        return DraftPlan(kind, None, sum(m.reserved_bytes for m in members), members=tuple(members))
    if kind == "model":
        if store is None:
            check_family(draft, progress)
        store = store or resolve_model(draft, 16, rc.dtype, progress=progress)
        check_same_tokenizer(tokenizer, load_tokenizer(store), str(target_store.name), str(store.name))
        from offspec.runtime.sizing import model_bytes

        return DraftPlan(kind, store, model_bytes(store, cache_tokens, rc.device), hybrid)
    if kind == "self":
        from offspec.runtime.sizing import self_draft_bytes

        fmt = self_format(draft, rc.device)
        man = self_draft_manifest(target_store, fmt)
        # nf4: the NF4 store of the target's source, converted once before the target takes memory; the other
        # formats are quantized from the target's own store when the copy opens
        store = self_draft_store(target_store, progress) if fmt == "nf4" else target_store
        reserved = self_draft_bytes(target_store, man, cache_tokens, rc.device, fmt=fmt)
        return DraftPlan(kind, store, reserved, hybrid, fmt=fmt)
    return DraftPlan(kind)


def open_drafter(dp: DraftPlan, target, target_store: Path, tokenizer, rc: RuntimeConfig, cache_tokens: int,
                 ngram_corpus: str | Path | None = None):
    """The drafter of a plan, opened next to the (already open) target; None for plain decoding."""
    from offspec.paths import offspec_home
    from offspec.speculative.drafters import HybridDrafter, ModelDrafter, NgramDrafter

    if dp.kind == "none":
        return None
    if dp.kind == "auto":
        from offspec.speculative.drafters import AutoDrafter

        return AutoDrafter([open_drafter(m, target, target_store, tokenizer, rc, cache_tokens, ngram_corpus)
                            for m in dp.members])
    index = None
    if dp.kind == "ngram" or dp.ngram:
        from offspec.speculative.ngram import NgramIndex

        index = NgramIndex()
        if ngram_corpus is not None:
            index.add_datastore(corpus_ids(ngram_corpus, tokenizer))
    if dp.kind == "ngram":
        return NgramDrafter(index)
    if dp.kind == "self":
        from offspec.runtime.self_draft import open_self_draft

        model = open_self_draft(target, dp.fmt, dp.store if dp.fmt == "nf4" else None, cache_tokens)
    else:
        from offspec.runtime.model import open_model

        model = open_model(dp.store, rc.device, device_memory_bytes=dp.reserved_bytes + 1, cache_tokens=cache_tokens,
                           warm=True)
    shapes = offspec_home() / "sequoia" / f"{target_store.name}--{dp.store.name}.json"
    drafter = ModelDrafter(model, name=dp.kind, shapes_path=shapes)
    return drafter if index is None else HybridDrafter(drafter, NgramDrafter(index))


def parse_drafters(text: str) -> list[tuple[str, str | None, bool]]:
    """--drafters 'ngram,self,MODEL,self+ngram,auto' -> [(kind, --draft value, hybrid)], in order; `auto` is the
    planner choosing per tree among the other entries listed."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    out = []
    for item in items:
        if item == "auto":
            others = [i for i in items if i != "auto"]
            if len(others) < 2:
                raise ConfigError("--drafters auto picks among the other drafters listed: list at least two")
            out.append(("auto", ",".join(others), False))
            continue
        hybrid = item.endswith("+ngram")
        base = item[: -len("+ngram")] if hybrid else item
        if base == "ngram" and hybrid:
            raise ConfigError(f"bad --drafters entry '{item}': ngram already drafts with n-grams")
        if not base:
            raise ConfigError(f"bad --drafters entry '{item}'")
        out.append((draft_kind("-", base), base, hybrid))
    if not out:
        raise ConfigError("--drafters needs at least one of ngram, self or a draft model")
    return out


def check_budget_fits_machine(rc: RuntimeConfig) -> None:
    """ConfigError when --device-memory asks for more than the machine has (the plan would promise memory that
    is not there)."""
    if rc.device_memory_bytes is None:
        return
    from offspec.runtime.device import resolve_device
    from offspec.runtime.memory import machine_memory
    from offspec.runtime.plan import format_bytes

    total, what = machine_memory(resolve_device(rc.device))
    if rc.device_memory_bytes > total:
        raise ConfigError(f"bad --device-memory {format_bytes(rc.device_memory_bytes)}: this machine has "
                          f"{format_bytes(total)} of {what} (omit it to fit the budget to free memory)")


def load_engine(model: str | None, draft: str | None = None, spec: bool = True,
                rc: RuntimeConfig = RuntimeConfig(), cache_tokens: int = 4096, progress: bool = True,
                budget_auto: bool = True, ngram: bool | None = None,
                ngram_corpus: str | Path | None = None, reserve_for: tuple[str, ...] = (),
                sequences: int | None = 1, max_budget: int | None = None) -> Loaded:
    """Resolve the target (and the draft), open them under the budgets, build the drafter, wire an Engine.

    draft: a model, "self" (the target's NF4 copy) or "ngram"; ngram: add (True) or refuse (False) n-gram candidates
    next to a model or self draft (None: only with --ngram-corpus); ngram_corpus: a text file for the index.
    reserve_for: more --draft values the target's plan leaves room for (bench compares drafters on one plan);
    their plans are in Loaded.plans. cache_tokens (--ctx-size) sizes the KV caches, capped at the target's
    context; the engine stops there. sequences: the plan also holds KV caches for that many sequences decoded
    together (a server's batch; see batch.BatchEngine), None for as many as the budget allows, up to
    DEFAULT_SEQUENCES. max_budget: the largest fixed tree budget that will be asked for (the memory plan holds the
    workspace of a tree that size; by default that of the largest auto budget, runtime/sizing.DEFAULT_TREE_TOKENS)."""
    from offspec.runtime.model import open_model
    from offspec.runtime.sizing import DEFAULT_TREE_TOKENS
    from offspec.store.resolve import resolve_model

    check_budget_fits_machine(rc)
    check_draft_options(model, draft, spec, ngram, ngram_corpus, rc.bits)
    kind = draft_kind(model, draft, spec)
    demo_draft_store: Path | None = None
    if model is None:
        from offspec.store.demo import demo_draft, demo_target

        target_store = demo_target(rc.bits, rc.dtype, progress=progress)
        if (kind == "model" and draft is None) or (kind == "auto" and draft == "auto"):  # the demo's own draft
            demo_draft_store = demo_draft(rc.dtype, progress=progress)
    else:
        check_family(model, progress)
        target_store = resolve_model(model, rc.bits, rc.dtype, progress=progress)
    from offspec.runtime.sizing import context_tokens

    cache_tokens = context_tokens(target_store, cache_tokens)
    tokenizer = load_tokenizer(target_store)
    dp = plan_draft(kind, draft, target_store, tokenizer, rc, cache_tokens, progress, ngram,
                    ngram_corpus is not None, demo_draft_store)
    plans = {d: plan_draft(draft_kind(model, d), d, target_store, tokenizer, rc, cache_tokens, progress)
             for d in reserve_for}
    reserved = max([dp.reserved_bytes] + [p.reserved_bytes for p in plans.values()])
    own_cache, per_sequence = cache_tokens, 0
    if sequences != 1:  # a batch cache row per sequence, and a draft cache per sequence beyond the draft's own
        from offspec.runtime.sizing import store_kv_bytes_per_token

        target_kv = store_kv_bytes_per_token(target_store, rc.device) * (cache_tokens + 1)
        draft_kv = store_kv_bytes_per_token(dp.store, rc.device) * cache_tokens if dp.store is not None else 0
        per_sequence = target_kv + draft_kv
        own_cache = min(cache_tokens, CURVE_CACHE_TOKENS)
        if sequences is None:
            sequences = _sequences_that_fit(target_store, rc, reserved - draft_kv, per_sequence, own_cache)
        reserved += sequences * per_sequence - draft_kv
    target = open_model(target_store, rc.device, rc.device_memory_bytes, rc.host_memory_bytes,
                        reserved_bytes=reserved, cache_tokens=own_cache, warm=rc.warm,
                        device_memory_over_min=rc.device_memory_over_min, expert_prefetch=rc.expert_prefetch,
                        tree_tokens=max_budget + 1 if max_budget else DEFAULT_TREE_TOKENS)
    drafter = open_drafter(dp, target, target_store, tokenizer, rc, cache_tokens, ngram_corpus)
    planner = None
    if drafter is not None and budget_auto:
        from offspec.speculative.tree_size import make_planner

        planner = make_planner(target, cost=drafter.cost)
    eos = set(stop_ids(tokenizer, target.config)) | set(generation_eos(target_store))
    engine = Engine(target, None, tokenizer, planner, context_tokens=cache_tokens, eos_ids=eos, drafter=drafter)
    return Loaded(engine, target_store, dp.store, tokenizer, engine.drafter_name, plans, sequences, per_sequence)


def _sequences_that_fit(target_store: Path, rc: RuntimeConfig, reserved: int, per_sequence: int,
                        cache_tokens: int) -> int:
    """The most sequences, up to DEFAULT_SEQUENCES, whose KV caches the device budget holds beside the minimum
    the target needs (a `min+SIZE` budget grows with them: DEFAULT_SEQUENCES)."""
    from offspec.runtime.device import resolve_device
    from offspec.runtime.sizing import plan_for_store
    from offspec.store.manifest import read_manifest

    if rc.device_memory_over_min is not None:
        return DEFAULT_SEQUENCES
    dev = resolve_device(rc.device)
    budget = rc.device_memory_bytes
    if budget is None:
        from offspec.runtime.memory import default_budgets

        budget = default_budgets(dev)[0]
    _, minimum = plan_for_store(target_store, read_manifest(target_store), dev.type, 0, rc.host_memory_bytes or 0,
                                reserved, cache_tokens, over_min=0)
    return max(1, min(DEFAULT_SEQUENCES, (budget - minimum) // max(per_sequence, 1)))


def self_draft_manifest(target_store: Path, fmt: str = "nf4"):
    """The target's manifest, if its low-bit copy can be built: a 16-bit store (whose source still exists, for the
    NF4 copy, which is converted from it)."""
    from offspec.store.manifest import read_manifest

    man = read_manifest(target_store)
    if man.bits == 4:
        raise ConfigError("--draft self needs a 16-bit target: this store is already NF4, so its NF4 copy would be "
                          "the target itself (use --bits 16)")
    if fmt == "nf4" and not Path(man.source).exists():
        raise ModelError(f"--draft self builds the target's NF4 copy from its source, and {man.source} is gone")
    return man


def self_draft_store(target_store: Path, progress: bool = True) -> Path:
    """The NF4 store of the target's source (converted once, cached next to the target's store)."""
    from offspec.store.resolve import resolve_model

    man = self_draft_manifest(target_store)
    try:
        return resolve_model(man.source, 4, man.dtype, progress=progress)
    except OffspecError:
        raise
    except Exception as exc:  # noqa: BLE001 - a quantization failure is a model problem for the user
        raise ModelError(f"--draft self: cannot quantize {man.source} to NF4 ({type(exc).__name__}: {exc})") from None


def corpus_ids(path: str | Path, tokenizer) -> list[int]:
    """The token ids of an --ngram-corpus file (tokenized once per run); ConfigError if missing or empty."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--ngram-corpus {path}: no such file")
    text = p.read_text(encoding="utf-8", errors="replace")
    ids = list(tokenizer.encode(text, add_special_tokens=False)) if text.strip() else []
    if len(ids) < 2:
        raise ConfigError(f"--ngram-corpus {path} is empty: it needs some text to match against")
    return ids
