"""The store commands: convert, plan, verify, models, rm, prune and logs."""

from pathlib import Path
from typing import Annotated

import typer

from offspec import console
from offspec.cli.app import app
from offspec.cli.common import (
    CTX_TOKENS, RUNTIME_PANEL, BitsOpt, CtxSizeOpt, DeviceMemoryOpt, DraftOpt, DtypeOpt, HostMemoryOpt,
    plan_device_kind, say_interrupted,
)
from offspec.cli.format import logs_table, plan_table
from offspec.config import parse_device_memory, parse_size
from offspec.errors import ConfigError, OffspecError


@app.command(epilog="Examples:\n\n"
             "  offspec convert ./Llama-3.1-8B-Instruct ./llama8b-nf4 --bits 4\n\n"
             "  offspec convert ./qwen2.5-1.5b-instruct-q4_k_m.gguf ./qwen1.5b --dtype bfloat16")
def convert(
    src: Annotated[str, typer.Argument(metavar="SRC", help="A Hugging Face folder (safetensors) or a .gguf file "
                                       "(the first part of a split GGUF).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="The store folder to write.")],
    bits: BitsOpt = None,
    dtype: DtypeOpt = "bfloat16",
) -> None:
    """Convert a model into a layer store (one aligned blob per decoder layer, checksummed)."""
    from offspec.loader import check_family
    from offspec.store.convert import ConversionInterrupted, convert as convert_store, format_size

    with say_interrupted(ConversionInterrupted), console.quiet_transformers():
        check_family(src)  # refused in one line before anything is written
        result = convert_store(src, out, bits=bits, dtype=dtype, progress=console.stderr_is_tty(),
                               on_choice=console.status_line)
    verb = "converted" if result.converted else "already converted"
    console.status_line(f"{verb}: {format_size(result.size_bytes)}")
    console.out.print(str(result.path), markup=False)


@app.command(epilog="Examples:\n\n"
             "  offspec plan ./Llama-3.1-8B-Instruct --device-memory 4GiB\n\n"
             "  offspec plan ./Qwen2.5-14B-Instruct --device cuda --device-memory 6GiB --host-memory 16GiB "
             "--draft ./Qwen2.5-0.5B-Instruct --bits 4")
def plan(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A folder, .gguf file, store, store name or hub id.")],
    device_memory: DeviceMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    draft: DraftOpt = None,
    bits: BitsOpt = None,
    dtype: DtypeOpt = "bfloat16",
    device: Annotated[str, typer.Option(
        "--device", metavar="cpu|cuda|auto", rich_help_panel=RUNTIME_PANEL,
        help="Plan for this device (cuda can be planned without CUDA if both budgets are given).")] = "auto",
    ctx_size: CtxSizeOpt = CTX_TOKENS,
) -> None:
    """Show which layers stay in memory and which stream from disk, and the smallest budget that runs.

    A dry run: sized from the model's metadata (config.json, safetensors headers, GGUF header); nothing is
    converted or written."""
    from offspec.config import check_bits_dtype

    check_bits_dtype(bits, dtype)
    dev_budget, over_min = parse_device_memory(device_memory)
    host_budget = parse_size(host_memory) if host_memory is not None else None
    kind = plan_device_kind(device)
    from offspec.runtime.sizing import context_tokens, model_bytes, plan_for_store
    from offspec.store.resolve import plan_inputs

    if dev_budget is None and over_min is None or (kind == "cuda" and host_budget is None):
        import torch

        from offspec.runtime.memory import default_budgets

        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError("planning for cuda without CUDA here: give both --device-memory and --host-memory")
        d_default, h_default = default_budgets(torch.device(kind))
        dev_budget = d_default if dev_budget is None else dev_budget
        host_budget = h_default if host_budget is None else host_budget
    if ctx_size < 1:
        raise ConfigError(f"bad --ctx-size {ctx_size}: must be at least 1 token")
    if kind == "cpu" and host_memory is not None:
        console.status_line("warning: --host-memory does nothing on the CPU (it sizes pinned RAM for CUDA)")
    host_budget = host_budget or 0
    dev_budget = dev_budget or 0
    from offspec.loader import check_family

    check_family(model)  # the family checked on its first use, as generate does
    target = plan_inputs(model, bits, dtype)
    name, man, what = target.name, target.manifest, target.what
    ctx_tokens = context_tokens(target.store_dir, ctx_size, target.config)
    reserved = 0
    draft_label = "draft model (resident)"
    if draft is not None and draft.partition(":")[0] == "self":  # sized from the (estimated) manifest, not built
        from offspec.loader import self_format
        from offspec.runtime.sizing import self_draft_bytes

        if man.bits == 4:
            raise ConfigError("--draft self needs a 16-bit target: this one is NF4, so its NF4 copy would be the "
                              "target itself (use --bits 16)")
        fmt = self_format(draft, kind)
        reserved = self_draft_bytes(target.store_dir, man, ctx_tokens, kind, config=target.config, fmt=fmt)
        draft_label = f"self-draft: {fmt} copy (resident)"
    elif draft is not None and draft != "ngram":
        check_family(draft)
        d = plan_inputs(draft, 16, dtype)
        reserved = model_bytes(d.store_dir, ctx_tokens, kind, manifest=d.manifest, config=d.config)
    residency, minimum = plan_for_store(target.store_dir, man, kind, dev_budget, host_budget, reserved, ctx_tokens,
                                        over_min=over_min, config=target.config)
    dev_budget = dev_budget if over_min is None else minimum + over_min
    from offspec.models.registry import family_label

    title = (f"{name} ({what}): {man.num_layers} layers, {family_label(man.model_type)}, "
             f"{'NF4' if man.bits == 4 else man.dtype}, on {kind} (KV cache for {ctx_tokens} tokens)")
    console.print_table(plan_table(residency, title, minimum, dev_budget, host_budget, draft_label))
    for note in residency.notes:
        console.status_line(f"note: {note}")
    if draft == "self":
        console.status_line("note: the self-draft shares the target's embeddings, norm, lm_head and resident layers; "
                            "its size counts every layer in NF4 (an upper bound)")
    elif draft == "ngram":
        console.status_line("note: n-gram drafting needs no model memory")



@app.command(epilog="Examples:\n\n"
             "  offspec verify ~/.cache/offspec/stores/my-model-bf16-0123456789ab\n\n"
             "  offspec verify my-model-bf16-0123456789ab   (a name from `offspec models`)")
def verify(
    store: Annotated[str, typer.Argument(
        metavar="STORE", help="A store folder, or a store name from `offspec models`.")],
) -> None:
    """Recompute the checksum of every blob of a store; name the first corrupt layer."""
    from offspec.runtime.plan import format_bytes
    from offspec.store.integrity import verify_store
    from offspec.store.resolve import locate_store

    path = locate_store(store)
    if path is None:
        raise OffspecError(f"store not found: {store} (see `offspec models`)")
    m = verify_store(path, progress=console.stderr_is_tty())
    total = m.resident.size + sum(m.layer_bytes)
    console.out.print(f"ok: {path}: {m.num_layers} layers and the resident blob match their checksums "
                      f"({format_bytes(total)})", markup=False)


@app.command(epilog="Examples:\n\n  offspec models\n\n  OFFSPEC_HOME=/data/offspec offspec models --json")
def models(
    json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List everything offspec keeps ($OFFSPEC_HOME): stores, demo files, peer copies, curves, shapes, logs.

    Names work wherever a model is accepted (generate -m, chat -m, plan, verify) and with `offspec rm`."""
    from offspec.paths import offspec_home
    from offspec.store.cache import list_items

    items = list_items()
    if json_out:
        import json

        console.write_text(json.dumps([i.as_dict() for i in items], indent=1) + "\n")
        return
    if not items:
        console.status_line(f"nothing kept in {offspec_home()}")
        return
    _print_items(items)
    console.out.print(f"total {_fmt(sum(i.size_bytes for i in items))} in {offspec_home()}", markup=False,
                      highlight=False)


def _fmt(n: int) -> str:
    from offspec.runtime.plan import format_bytes

    return format_bytes(n)


def _print_items(items) -> None:
    """One line per item: size, kind, then the name last and unwrapped (copy-paste safe), then details."""
    for i in items:
        detail = f"  ({i.detail})" if i.detail else ""
        console.out.print(f"{_fmt(i.size_bytes):>10}  {i.kind:<7} {i.name}{detail}", markup=False,
                          highlight=False, soft_wrap=True)


YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def _remove(items, yes: bool, verb: str) -> None:
    from offspec.store.cache import remove_item

    total = sum(i.size_bytes for i in items)
    _print_items(items)
    if not yes and not typer.confirm(f"{verb} {len(items)} item{'s' if len(items) != 1 else ''} "
                                     f"({_fmt(total)})?", default=False, err=True):
        raise typer.Abort()
    held = [i.name for i in items if not remove_item(i)]
    freed = sum(i.size_bytes for i in items if i.name not in held)
    console.status_line(f"removed {len(items) - len(held)} item{'s' if len(items) - len(held) != 1 else ''}, "
                        f"{_fmt(freed)} freed")
    if held:
        raise OffspecError(f"left {', '.join(held)}: in use by another process")


@app.command(epilog="Examples:\n\n  offspec rm my-model-bf16-0123456789ab\n\n  offspec rm curves logs --yes")
def rm(
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Names as `offspec models` prints them.")],
    yes: YesOpt = False,
) -> None:
    """Remove stores (or other things offspec keeps) by name, after one confirmation."""
    from offspec.store.cache import find_items

    _remove(find_items(names), yes, "remove")


@app.command(epilog="Examples:\n\n  offspec prune\n\n  offspec prune --yes")
def prune(yes: YesOpt = False) -> None:
    """Remove stale things: interrupted conversions, unused locks, outdated stores, copies in other dtypes.

    Outdated stores are those whose source changed since; of copies of one model in several dtypes the
    newest stays. Nothing another process is using is removed."""
    from offspec.store.cache import prune_candidates

    items = prune_candidates()
    if not items:
        console.status_line("nothing to prune")
        return
    _remove(items, yes, "prune")


@app.command(epilog="Examples:\n\n"
             "  offspec logs\n\n"
             "  offspec logs -n 1 --json\n\n"
             "  offspec logs --off")
def logs(
    count: Annotated[int, typer.Option("--count", "-n", metavar="N", help="Show the N latest (0: all).")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False,
    off: Annotated[bool, typer.Option("--off", help="Stop logging conversations (until --on).")] = False,
    on: Annotated[bool, typer.Option("--on", help="Log conversations again (the default).")] = False,
) -> None:
    """List logged conversations, newest first ($OFFSPEC_HOME/logs.db); `chat --continue` resumes the latest."""
    from offspec.conversations import ConversationLog

    log = ConversationLog()
    if off and on:
        raise ConfigError("--on and --off contradict each other: give one")
    if off or on:
        log.set_enabled(on)
        console.status_line(f"conversation logging {'on' if on else 'off'} ({log.path})")
        return
    if count < 0:
        raise ConfigError(f"bad --count {count}: must be 0 (all) or more")
    convs = log.list(count or None)
    if json_out:
        import json

        console.write_text(json.dumps([c.to_dict() for c in convs], indent=1, ensure_ascii=False) + "\n")
        return
    if not convs:
        console.status_line(f"no logged conversations in {log.path}" + ("" if log.enabled else " (logging is off)"))
        return
    table = logs_table(convs)
    table.caption = str(log.path) + ("" if log.enabled else " (logging is off: offspec logs --on)")
    console.print_table(table)
