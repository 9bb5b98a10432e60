"""The contract check: does offspec's streamed forward of a family equal transformers' own forward?

A family (a `model_type`) that is not known to work under the installed transformers is checked the first time it
is used: a tiny random model of the same config (`models/tiny.py`) is saved, converted into a store and run by
offspec with some layers streamed from disk, and compared with transformers' own forward of the same model:
a whole prompt (the layer forward and the head), the same prompt decoded a few tokens at a time (the cache) and a
tree pass against each path decoded alone (the mask). The verdict is kept per transformers version: shipped for the
versions the test suite passed on (`offspec/data/families.json`), else in `$OFFSPEC_HOME/families/`.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from offspec.errors import ModelError
from offspec.transformers_contract import transformers_version

PARTS = ("layer forward", "mask", "head", "cache")
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "families.json"
PROMPT = [5, 17, 33, 90, 12, 7, 64, 3, 41, 29, 77, 8]  # longer than the tiny windows (models/tiny.py)
SPLIT = 5  # the cached decode: this many tokens first, then one at a time
ATOL = 1e-4


@dataclass(frozen=True)
class Verdict:
    """Whether a family's streamed forward equals transformers' own under one transformers version."""

    model_type: str
    transformers: str
    ok: bool
    part: str | None = None  # the part that differs: one of PARTS
    detail: str = ""
    seconds: float = 0.0

    def refusal(self) -> str:
        return (f"unsupported architecture '{self.model_type}': offspec's streamed forward differs from "
                f"transformers {self.transformers} in the {self.part} ({self.detail})")


class _Differs(Exception):
    def __init__(self, part: str, detail: str) -> None:
        super().__init__(detail)
        self.part, self.detail = part, detail


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200]


def _reference(tiny):
    """transformers' own model of the tiny config: the checkpoint's class (a multimodal one for a multimodal
    config), or its text decoder's causal LM where that class cannot be built here (a vision tower's extra
    dependency)."""
    from offspec.transformers_contract import checkpoint_model

    torch.manual_seed(0)
    return checkpoint_model(tiny).float().eval()


def _layers_of(model, layer_cls: type, n: int) -> torch.nn.ModuleList:
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and all(isinstance(m, layer_cls) for m in mod):
            return mod
    raise _Differs("layer forward", f"transformers' model has no stack of {n} {layer_cls.__name__}")


def _capture(layers) -> tuple[list, list]:
    """Forward hooks that record each layer's output hidden states; (outputs, hook handles)."""
    outs: list = [None] * len(layers)

    def hook(i):
        def record(_m, _a, out):
            outs[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return record

    return outs, [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]


def _differs(got: torch.Tensor, want: torch.Tensor) -> float | None:
    """The max difference if it is beyond float32 noise, else None."""
    if got.shape != want.shape:
        return float("inf")
    diff = (got.float() - want.float()).abs().max().item()
    scale = max(1.0, want.float().abs().max().item())
    return diff if not diff <= ATOL * scale else None


def _compare(ref, model) -> None:
    """Raise _Differs naming the first part where offspec's forward of `model` differs from `ref`'s."""
    ids = torch.tensor([PROMPT])
    n = model.num_layers
    ref_layers = _layers_of(ref, type(model.layers[0]), n)
    want_h, handles = _capture(ref_layers)
    try:
        with torch.no_grad():
            want = ref(ids).logits.float()
    finally:
        for h in handles:
            h.remove()
    got_h, handles = _capture(model.layers)
    try:
        model.reset()
        got = model.forward(ids)
    except Exception as exc:  # noqa: BLE001 - any failure of offspec's forward is a finding, named by its part
        raise _Differs("layer forward", _first_line(exc)) from None
    finally:
        for h in handles:
            h.remove()
    for i in range(n):
        d = _differs(got_h[i], want_h[i]) if got_h[i] is not None else float("inf")
        if d is not None:
            raise _Differs(*_layer_or_mask(ref, model, i, d))
    d = _differs(got, want)
    if d is not None:
        raise _Differs("head", f"logits differ by {d:.2e} where every layer's output agrees")
    model.reset()
    try:  # the cache: a prefix, then one token at a time
        rows = [model.forward(ids[:, :SPLIT])]
        rows += [model.forward(ids[:, t : t + 1]) for t in range(SPLIT, len(PROMPT))]
    except Exception as exc:  # noqa: BLE001
        raise _Differs("cache", _first_line(exc)) from None
    d = _differs(torch.cat(rows, 1), want)
    if d is not None:
        raise _Differs("cache", f"decoding over the cache differs by {d:.2e} from one pass")
    model.reset()
    tokens, parents = _comb_tree()
    try:
        model.forward(ids[:, :SPLIT])
        logits = _tree_pass(model, tokens, parents)
    except Exception as exc:  # noqa: BLE001
        raise _Differs("mask", _first_line(exc)) from None
    for node in range(len(tokens)):
        path = _path(tokens, parents, node)
        with torch.no_grad():
            alone = ref(torch.tensor([PROMPT[:SPLIT] + path])).logits[0, -1].float()
        d = _differs(logits[node], alone)
        if d is not None:
            raise _Differs("mask", f"a tree pass differs by {d:.2e} from the path of node {node} decoded alone")


def _layer_or_mask(ref, model, i: int, d: float) -> tuple[str, str]:
    """A layer whose output differs over the whole prompt: the mask if it agrees over a prompt shorter than every
    window (where masks cannot differ), else the layer forward."""
    from offspec.models.tiny import TINY_WINDOW

    short = torch.tensor([PROMPT[: TINY_WINDOW - 1]])
    want_h, handles = _capture(_layers_of(ref, type(model.layers[0]), model.num_layers))
    try:
        with torch.no_grad():
            ref(short)
    finally:
        for h in handles:
            h.remove()
    got_h, handles = _capture(model.layers)
    try:
        model.reset()
        model.forward(short)
    except Exception as exc:  # noqa: BLE001
        return "layer forward", _first_line(exc)
    finally:
        for h in handles:
            h.remove()
    if all(_differs(g, w) is None for g, w in zip(got_h, want_h) if g is not None):
        return "mask", f"layer {i} differs by {d:.2e} once the prompt is longer than its window"
    return "layer forward", f"layer {i}'s output differs by {d:.2e}"


def _comb_tree(depth: int = 6) -> tuple[list[int], list[int]]:
    """(tokens, parents) of a chain `depth` deep (deeper than the tiny windows) with a second child at every level,
    children listed level by level, so chain nodes sit far from their positions; parent -1 is the committed prefix."""
    tokens, parents, node = [], [], -1
    for d in range(depth):
        first = len(tokens)
        for j in range(2):
            tokens.append((11 * d + 5 * j) % 200 + 3)
            parents.append(node)
        node = first
    return tokens, parents


def _path(tokens: list[int], parents: list[int], node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(tokens[node])
        node = parents[node]
    return out[::-1]


def _tree_pass(model, tokens: list[int], parents: list[int]) -> torch.Tensor:
    """One forward over the whole tree on top of the cache (a tree mask, positions by depth): logits [N, V]."""
    from offspec.runtime.masks import tree_mask

    n, start = len(tokens), model.cache.length
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    depth = [0] * n
    for i, p in enumerate(parents):
        ancestors[i, i] = True
        if p >= 0:
            ancestors[i] |= ancestors[p]
            depth[i] = depth[p] + 1
    pos = torch.tensor([[start + d for d in depth]])
    return model.forward(torch.tensor([tokens]), pos, tree_mask(start, ancestors, model.dtype))[0].float()


def check_family(config) -> Verdict:
    """Run the contract check for config's family now (a few seconds at most); the verdict, not stored."""
    from offspec.models.tiny import tiny_config
    from offspec.runtime.model import OffloadedModel
    from offspec.runtime.plan import DEVICE, DISK, ResidencyPlan
    from offspec.store.convert import convert_model
    from offspec.store.manifest import read_manifest

    t0 = time.perf_counter()
    version = transformers_version()
    model_type = str(config.model_type)
    try:
        with tempfile.TemporaryDirectory(prefix="offspec-family-check-") as tmp:
            ref = _reference(tiny_config(config))
            ref.save_pretrained(Path(tmp) / "src")
            store = convert_model(Path(tmp) / "src", Path(tmp) / "store", bits=16, dtype="float32", progress=False)
            man = read_manifest(store)
            tiers = tuple(DISK if i % 2 == 0 else DEVICE for i in range(man.num_layers))  # layer 0 streamed
            plan = ResidencyPlan(tiers, tuple(man.layer_bytes), man.resident.size, 0, 0, 2, max(man.layer_bytes))
            model = OffloadedModel(store, plan, cache_tokens=64)
            try:
                _compare(ref, model)
            finally:
                model.close()
    except _Differs as exc:
        return Verdict(model_type, version, False, exc.part, exc.detail, time.perf_counter() - t0)
    except ModelError as exc:  # the store or the model refuses the tiny copy: its layout
        return Verdict(model_type, version, False, "layer forward", str(exc)[:200], time.perf_counter() - t0)
    return Verdict(model_type, version, True, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- verdicts
_MEMO: dict[tuple[str, str], Verdict] = {}


def shipped_verdicts(version: str | None = None) -> dict[str, Verdict]:
    """The verdicts shipped with offspec for a transformers version (those the test suite passed on)."""
    version = version or transformers_version()
    try:
        data = json.loads(SHIPPED.read_text()).get(version) or {}
    except (OSError, ValueError):
        return {}
    out = {t: Verdict(t, version, True) for t in data.get("ok", [])}
    for t, why in (data.get("refused") or {}).items():
        part, _, detail = why.partition(": ")
        out[t] = Verdict(t, version, False, part, detail)
    return out


def _home_file(version: str, writing: bool = False) -> Path | None:
    from offspec.paths import home_path_for_writing, offspec_home

    if writing:
        return home_path_for_writing("families", f"transformers-{version}.json", what="family check verdicts")
    return offspec_home() / "families" / f"transformers-{version}.json"


def _read_home(version: str) -> dict:
    path = _home_file(version)
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}


def stored_verdict(model_type: str, version: str | None = None) -> Verdict | None:
    """The verdict known for a family under a transformers version: in this process, shipped, or kept in the home."""
    version = version or transformers_version()
    if (model_type, version) in _MEMO:
        return _MEMO[(model_type, version)]
    found = shipped_verdicts(version).get(model_type)
    if found is None and model_type in (home := _read_home(version)):
        try:
            found = Verdict(**home[model_type])
        except TypeError:
            found = None
    if found is not None:
        _MEMO[(model_type, version)] = found
    return found


def keep_verdict(verdict: Verdict) -> None:
    """Remember a verdict in this process and in $OFFSPEC_HOME/families/ (skipped on a read-only home)."""
    import os

    _MEMO[(verdict.model_type, verdict.transformers)] = verdict
    path = _home_file(verdict.transformers, writing=True)
    if path is None:
        return
    data = _read_home(verdict.transformers)
    data[verdict.model_type] = asdict(verdict)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def ensure_family(config, progress: bool = True) -> Verdict:
    """The family's verdict, checked on first use under the installed transformers; ModelError (one line naming the
    part that differs) when offspec cannot run it. Structural refusals (experts, encoders, ...) come first."""
    from offspec import console
    from offspec.models.registry import check_supported

    check_supported(config)
    model_type = str(config.model_type)
    verdict = stored_verdict(model_type)
    if verdict is None:
        version = transformers_version()
        with console.phase(f"checking the {model_type} family against transformers {version} (first use)",
                           enabled=progress), console.quiet_transformers():
            verdict = check_family(config)
        keep_verdict(verdict)
        if progress:
            what = "runs" if verdict.ok else f"refused (the {verdict.part} differs)"
            console.status_line(f"checked the {model_type} family against transformers {version} on first use: "
                                f"{what} ({verdict.seconds:.1f} s; kept for later runs)")
    if not verdict.ok:
        raise ModelError(verdict.refusal())
    return verdict
