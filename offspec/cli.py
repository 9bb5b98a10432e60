"""The offspec command line: thin typer commands that build configs and call the library.

Answer text goes to stdout, everything else to stderr. Every error becomes one line on stderr and a
non-zero exit in one place (`OffspecGroup.main`); OFFSPEC_DEBUG=1 shows the traceback instead.
Torch-heavy modules are imported inside the commands, so `offspec --help` stays fast.
"""

import logging
import os
import sys
import warnings


def _quiet_libraries() -> None:
    """Keep transformers / bitsandbytes import chatter off the user's screen (before they are imported)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
    # "Failed to load CPU gemm_4bit_forward from kernels-community" is logged at import and is harmless.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for module in (r"bitsandbytes(\..*)?", r"transformers(\..*)?", r"torch(\..*)?", r"accelerate(\..*)?"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


_quiet_libraries()

from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Optional  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from offspec import __version__, console  # noqa: E402
from offspec.config import parse_budget, parse_device_memory, parse_size  # noqa: E402
from offspec.errors import ConfigError, ContextError, OffspecError, format_error  # noqa: E402

EXIT_INTERRUPTED = 130
CACHE_TOKENS = 4096  # KV cache positions reserved up front (it grows if a conversation needs more)
DEBUG_ENV = "OFFSPEC_DEBUG"


def _click_exception_type() -> type:
    """click's ClickException as typer vendors it (found through a public typer class, not a private import)."""
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == "ClickException":
            return cls
    return Exception  # pragma: no cover


_ClickException = _click_exception_type()


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def exit_code_for(exc: BaseException) -> int | None:
    """Print one line for exc on stderr and return the exit code (None: let it propagate)."""
    if isinstance(exc, SystemExit):
        return None
    if isinstance(exc, _ClickException):  # usage errors: bad option values, unknown options, missing arguments
        if type(exc).__name__ == "NoArgsIsHelpError":
            console.error_line(exc.format_message())
            return 2
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        console.error_line(f"error: {exc.format_message()}{hint}")
        return int(getattr(exc, "exit_code", 2))
    if isinstance(exc, typer.Abort):
        console.error_line("aborted")
        return 1
    if isinstance(exc, KeyboardInterrupt):
        console.error_line("interrupted")
        return EXIT_INTERRUPTED
    if _debug():
        return None
    console.error_line(format_error(exc))
    return exc.exit_code if isinstance(exc, OffspecError) else 1


class OffspecGroup(TyperGroup):
    """Runs click in non-standalone mode so that every error, usage errors included, ends here as one line."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              windows_expand_args=windows_expand_args, **extra)
        except BaseException as exc:  # noqa: BLE001 - the one place exceptions become messages
            code = exit_code_for(exc)
            if code is None:
                raise
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OffspecGroup,
    name="offspec",
    help="Run LLMs larger than memory: decoder layers stream from disk, large-tree speculative decoding "
    "makes each streamed pass yield many tokens.",
    epilog="Examples:\n\n"
    "  offspec generate \"Write a haiku about disks\"\n\n"
    "  offspec chat --model ./Llama-3.1-8B-Instruct --draft ./Llama-3.2-1B-Instruct\n\n"
    "  offspec plan ./Llama-3.1-8B-Instruct --device-memory 4GiB\n\n"
    "Set OFFSPEC_HOME to move the store cache (default ~/.cache/offspec); OFFSPEC_DEBUG=1 shows tracebacks.",
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# ---------------------------------------------------------------------- shared options
MODEL_PANEL, RUNTIME_PANEL, SAMPLING_PANEL = "Model", "Memory and device", "Sampling"

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="MODEL", rich_help_panel=MODEL_PANEL,
    help="Target model: a Hugging Face folder, a .gguf file, an offspec store or a hub id "
    "(default: the packaged demo model, with its draft).")]
DraftOpt = Annotated[Optional[str], typer.Option(
    "--draft", "-d", metavar="MODEL", rich_help_panel=MODEL_PANEL,
    help="Draft model for speculative decoding; must share the target's tokenizer. "
    "With --model and no --draft, decoding is plain.")]
NoSpecOpt = Annotated[bool, typer.Option(
    "--no-spec", rich_help_panel=MODEL_PANEL, help="Plain decoding: no draft, one token per streamed pass.")]
BitsOpt = Annotated[int, typer.Option(
    "--bits", metavar="16|4", rich_help_panel=MODEL_PANEL,
    help="Target weights in the store: 16 (--dtype floats) or 4 (NF4).")]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", metavar="DTYPE", rich_help_panel=MODEL_PANEL, help="bfloat16, float16 or float32.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="cpu|cuda|auto", rich_help_panel=RUNTIME_PANEL, help="Where the model computes.")]
DeviceMemoryOpt = Annotated[Optional[str], typer.Option(
    "--device-memory", metavar="SIZE", rich_help_panel=RUNTIME_PANEL,
    help="Memory budget on the device (RAM on the CPU), e.g. 2GiB, or min+512MiB for the plan's minimum "
         "plus that much (default: from free memory).")]
HostMemoryOpt = Annotated[Optional[str], typer.Option(
    "--host-memory", metavar="SIZE", rich_help_panel=RUNTIME_PANEL,
    help="Pinned host RAM for layers and the staging ring (CUDA), e.g. 8GiB (default: from free memory).")]
WarmOpt = Annotated[bool, typer.Option(
    "--warm", rich_help_panel=RUNTIME_PANEL,
    help="Let the page cache keep streamed layers (default: drop them, so each pass really reads the disk).")]
MaxNewOpt = Annotated[int, typer.Option(
    "--max-new-tokens", "-n", metavar="N", rich_help_panel=SAMPLING_PANEL, help="Stop after N new tokens.")]
TemperatureOpt = Annotated[float, typer.Option(
    "--temperature", "-t", metavar="T", rich_help_panel=SAMPLING_PANEL, help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option(
    "--top-p", metavar="P", rich_help_panel=SAMPLING_PANEL, help="Nucleus sampling mass (1 = off).")]
TopKOpt = Annotated[int, typer.Option(
    "--top-k", metavar="K", rich_help_panel=SAMPLING_PANEL, help="Sample among the K likeliest tokens (0 = off).")]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", metavar="S", rich_help_panel=SAMPLING_PANEL, help="Random seed for sampling.")]
BudgetOpt = Annotated[str, typer.Option(
    "--budget", metavar="auto|N", rich_help_panel=SAMPLING_PANEL,
    help="Draft tree size per target pass: auto (fitted to measured pass and draft times) or 1..4096.")]
TreeOpt = Annotated[str, typer.Option(
    "--tree", metavar="specexec|sequoia", rich_help_panel=SAMPLING_PANEL,
    help="How the draft tree is grown: specexec (best-first, verified by sample-and-match) or sequoia "
         "(DP-optimal shape; children sampled without replacement when --temperature > 0).")]
SystemOpt = Annotated[Optional[str], typer.Option(
    "--system", "-s", metavar="TEXT", help="System message put before the conversation.")]


def _runtime_config(device: str, device_memory: str | None, host_memory: str | None, warm: bool, bits: int,
                    dtype: str):
    """A validated RuntimeConfig (pure parsing: no torch import, so flag typos fail fast)."""
    from offspec.config import RuntimeConfig

    return RuntimeConfig.from_flags(device, device_memory, host_memory, warm, bits, dtype)


def _check_device(device: str) -> None:
    """ConfigError for --device cuda without CUDA, or an unknown device, before any model is touched."""
    from offspec.runtime.device import resolve_device

    resolve_device(device)


def _generation_config(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                       budget: str, spec: bool, tree: str = "specexec"):
    if max_new_tokens < 1:
        raise ConfigError(f"bad --max-new-tokens {max_new_tokens}: must be at least 1")
    if temperature < 0:
        raise ConfigError(f"bad --temperature {temperature}: must be 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise ConfigError(f"bad --top-p {top_p}: must be in (0, 1]")
    if top_k < 0:
        raise ConfigError(f"bad --top-k {top_k}: must be 0 (off) or more")
    if tree not in ("specexec", "sequoia"):
        raise ConfigError(f"bad --tree '{tree}': use specexec or sequoia")
    parsed_budget = parse_budget(budget)
    from offspec.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, budget=parsed_budget, spec=spec, tree=tree)


def _load(model: str | None, draft: str | None, spec: bool, rc, budget_auto: bool):
    """Resolve (converting if needed), open and wire the models; a spinner on a terminal."""
    from offspec.loader import load_engine

    _quiet_transformers()
    progress = console.stderr_is_tty()
    with console.phase("loading model", enabled=progress):
        return load_engine(model, draft, spec=spec, rc=rc, cache_tokens=CACHE_TOKENS, progress=progress,
                           budget_auto=budget_auto)


def _close(loaded) -> None:
    """Stop the reader threads of both models."""
    engine = getattr(loaded, "engine", None)
    for m in (getattr(engine, "target", None), getattr(engine, "draft", None)):
        if m is not None and hasattr(m, "close"):
            m.close()


def _quiet_transformers() -> None:
    """transformers may have been imported before us (tests, notebooks): lower its verbosity too."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def _read_prompt(prompt: str | None) -> str:
    """PROMPT, or stdin for '-' or when it is absent and stdin is a pipe."""
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and console.stdin_is_tty():
        raise ConfigError("no prompt: pass PROMPT, or pipe text on stdin (use - to read stdin explicitly)")
    text = sys.stdin.read()
    if not text.strip():
        raise ConfigError("empty prompt on stdin")
    return text


def _model_name(given: str | None, store) -> str | None:
    if store is None:
        return None
    return given or Path(store).name


# ---------------------------------------------------------------------- commands
@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.out.print(f"offspec {__version__}", markup=False)
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        console.out.print(ctx.get_help(), markup=False, end="")
        raise typer.Exit(0)


@app.command(epilog="Examples:\n\n"
             "  offspec generate \"Explain KV caches in one paragraph\"\n\n"
             "  cat question.txt | offspec generate --model ./Qwen2.5-7B-Instruct --draft ./Qwen2.5-0.5B-Instruct\n\n"
             "  offspec generate --json --temperature 0 \"2+2=\" > answer.json\n\n"
             "  offspec generate --raw --no-spec --max-new-tokens 32 \"def fib(n):\"")
def generate(
    prompt: Annotated[Optional[str], typer.Argument(
        metavar="PROMPT", show_default=False, help="The prompt; - or absent (with a pipe) reads stdin.")] = None,
    model: ModelOpt = None,
    draft: DraftOpt = None,
    no_spec: NoSpecOpt = False,
    bits: BitsOpt = 16,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    device_memory: DeviceMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    warm: WarmOpt = False,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    seed: SeedOpt = None,
    budget: BudgetOpt = "auto",
    tree: TreeOpt = "specexec",
    system: SystemOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (text, token ids, stats) on stdout instead of streaming.")] = False,
) -> None:
    """Complete one prompt, streaming the answer to stdout and the speed to stderr."""
    rc = _runtime_config(device, device_memory, host_memory, warm, bits, dtype)
    cfg = _generation_config(max_new_tokens, temperature, top_p, top_k, seed, budget, not no_spec, tree)
    _check_device(rc.device)
    text = _read_prompt(prompt)
    from offspec.chat import encode_prompt, render_prompt, uses_template
    from offspec.generate import GenerationStats, finalize_stats, stream_text

    loaded = _load(model, draft, not no_spec, rc, cfg.budget is None)
    try:
        tok, engine = loaded.tokenizer, loaded.engine
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        prompt_ids = encode_prompt(tok, render_prompt(tok, messages, raw), uses_template(tok, raw))
        cfg = replace(cfg, stop_ids=tuple(engine.eos_ids))
        stats, token_ids, pieces, interrupted = GenerationStats(), [], [], False
        try:
            for ev in stream_text(engine, prompt_ids, cfg, stats):
                token_ids.extend(ev.step.tokens)
                pieces.append(ev.text)
                if not json_out:
                    console.write_text(ev.text)
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            if pieces and not json_out:
                console.write_text("\n")  # end the partial answer before the error line
            raise
        final = finalize_stats(stats)
        if json_out:
            import json

            obj = {"text": "".join(pieces), "prompt_ids": prompt_ids, "token_ids": token_ids,
                   "stats": final.to_dict(), "model": _model_name(model, loaded.target_store),
                   "draft": _model_name(draft, loaded.draft_store)}
            if interrupted:
                obj["interrupted"] = True
            console.write_text(json.dumps(obj, ensure_ascii=False) + "\n")
        else:
            console.write_text("\n")
        console.status_line(console.format_stats(final, interrupted))
    finally:
        _close(loaded)
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command(epilog="Examples:\n\n"
             "  offspec chat\n\n"
             "  offspec chat --model ./Llama-3.1-8B-Instruct --draft ./Llama-3.2-1B-Instruct --system \"Be brief.\"\n\n"
             "  printf 'Hi\\nWhat did I just say?\\n' | offspec chat --temperature 0\n\n"
             "In the chat: /reset, /stats, /save FILE, /exit (or Ctrl-D); Ctrl-C stops the current answer.")
def chat(
    model: ModelOpt = None,
    draft: DraftOpt = None,
    no_spec: NoSpecOpt = False,
    bits: BitsOpt = 16,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    device_memory: DeviceMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    warm: WarmOpt = False,
    max_new_tokens: MaxNewOpt = 512,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    seed: SeedOpt = None,
    budget: BudgetOpt = "auto",
    tree: TreeOpt = "specexec",
    system: SystemOpt = None,
) -> None:
    """Talk with a model over several turns (reads one message per line from a pipe)."""
    rc = _runtime_config(device, device_memory, host_memory, warm, bits, dtype)
    cfg = _generation_config(max_new_tokens, temperature, top_p, top_k, seed, budget, not no_spec, tree)
    _check_device(rc.device)
    from offspec.chat import ChatSession, is_command

    loaded = _load(model, draft, not no_spec, rc, cfg.budget is None)
    interactive = console.stdin_is_tty()
    session = ChatSession(loaded.engine, loaded.tokenizer, cfg, system)
    try:
        if interactive:
            name = _model_name(model, loaded.target_store)
            with_draft = f" with draft {_model_name(draft, loaded.draft_store)}" if loaded.draft_store else ""
            console.status_line(f"chatting with {name}{with_draft}; /help for commands, Ctrl-D to leave")
        while True:
            try:
                line = _read_line(interactive)
            except KeyboardInterrupt:
                if not interactive:
                    raise
                console.status_line("\n(Ctrl-D or /exit to leave)")
                continue
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if is_command(line):
                try:
                    res = session.command(line, console.format_stats)
                except OffspecError as exc:
                    if not interactive:
                        raise
                    console.error_line(format_error(exc))
                    continue
                if res.message:
                    console.err.print(res.message, markup=False, highlight=False)
                if res.leave:
                    break
                continue
            turns = len(session.turns)
            try:
                result = session.ask(line, console.write_text)
            except OffspecError as exc:
                if len(session.turns) > turns:
                    console.write_text("\n")  # a partial answer was shown (and kept): end its line
                if not interactive:
                    raise
                hint = " (/reset starts a new conversation)" if isinstance(exc, ContextError) else ""
                console.error_line(format_error(exc) + hint)
                continue
            console.write_text("\n")
            if result.interrupted:
                console.status_line("(answer interrupted; kept in the history)")
            elif interactive:
                console.status_line(console.format_stats(result.stats))
    finally:
        _close(loaded)


def _read_line(interactive: bool) -> str | None:
    """One user message; None at end of input. A prompt marker only on a terminal."""
    if not interactive:
        line = sys.stdin.readline()
        return line if line else None
    try:
        if console.stdout_is_tty():
            return input(">>> ")
        sys.stderr.write(">>> ")
        sys.stderr.flush()
        return input()
    except EOFError:
        console.status_line("")
        return None


@app.command(epilog="Examples:\n\n"
             "  offspec convert ./Llama-3.1-8B-Instruct ./llama8b-nf4 --bits 4\n\n"
             "  offspec convert ./qwen2.5-1.5b-instruct-q4_k_m.gguf ./qwen1.5b --dtype bfloat16")
def convert(
    src: Annotated[str, typer.Argument(metavar="SRC", help="A Hugging Face folder (safetensors) or a .gguf file.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="The store folder to write.")],
    bits: BitsOpt = 16,
    dtype: DtypeOpt = "bfloat16",
) -> None:
    """Convert a model into a layer store (one aligned blob per decoder layer, checksummed)."""
    from offspec.store.convert import convert_model

    _quiet_transformers()
    path = convert_model(src, out, bits=bits, dtype=dtype, progress=console.stderr_is_tty())
    console.out.print(str(path), markup=False)


@app.command(epilog="Examples:\n\n"
             "  offspec plan ./Llama-3.1-8B-Instruct --device-memory 4GiB\n\n"
             "  offspec plan ./Qwen2.5-14B-Instruct --device cuda --device-memory 6GiB --host-memory 16GiB "
             "--draft ./Qwen2.5-0.5B-Instruct --bits 4")
def plan(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A folder, .gguf file, store or hub id.")],
    device_memory: DeviceMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    draft: DraftOpt = None,
    bits: BitsOpt = 16,
    dtype: DtypeOpt = "bfloat16",
    device: Annotated[str, typer.Option(
        "--device", metavar="cpu|cuda|auto", rich_help_panel=RUNTIME_PANEL,
        help="Plan for this device (cuda can be planned without CUDA if both budgets are given).")] = "auto",
) -> None:
    """Show which layers stay in memory and which stream from disk, and the smallest budget that runs."""
    from offspec.config import RuntimeConfig

    rc = RuntimeConfig(bits=bits, dtype=dtype)  # validates --bits / --dtype
    dev_budget, over_min = parse_device_memory(device_memory)
    host_budget = parse_size(host_memory) if host_memory is not None else None
    kind = _plan_device_kind(device)
    from offspec.runtime.sizing import model_bytes, plan_for_store
    from offspec.store.manifest import read_manifest
    from offspec.store.resolve import resolve_model

    if dev_budget is None or host_budget is None:
        import torch

        from offspec.runtime.memory import default_budgets

        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError("planning for cuda without CUDA here: give both --device-memory and --host-memory")
        d_default, h_default = default_budgets(torch.device(kind))
        dev_budget = d_default if dev_budget is None else dev_budget
        host_budget = h_default if host_budget is None else host_budget
    _quiet_transformers()
    progress = console.stderr_is_tty()
    store = resolve_model(model, rc.bits, rc.dtype, progress=progress)
    man = read_manifest(store)
    reserved = 0
    if draft is not None:
        reserved = model_bytes(resolve_model(draft, 16, rc.dtype, progress=progress), CACHE_TOKENS, kind)
    residency, minimum = plan_for_store(store, man, kind, dev_budget, host_budget, reserved, CACHE_TOKENS,
                                        over_min=over_min)
    dev_budget = dev_budget if over_min is None else minimum + over_min
    title = (f"{store.name}: {man.num_layers} layers, {man.model_type}, "
             f"{'NF4' if man.bits == 4 else man.dtype}, on {kind} (KV cache for {CACHE_TOKENS} tokens)")
    console.print_table(console.plan_table(residency, title, minimum, dev_budget, host_budget))
    for note in residency.notes:
        console.status_line(f"note: {note}")


def _plan_device_kind(device: str) -> str:
    """'cpu' or 'cuda' (auto picks CUDA when present); planning needs no device of that kind."""
    device = device.strip().lower()
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        return "cuda"
    raise ConfigError(f"unknown device '{device}' (use cpu, cuda or auto)")


@app.command(epilog="Examples:\n\n"
             "  offspec verify ~/.cache/offspec/stores/my-model-16bit-bfloat16-0123456789ab\n\n"
             "  offspec verify my-model-16bit-bfloat16-0123456789ab   (a name from `offspec models`)")
def verify(
    store: Annotated[str, typer.Argument(
        metavar="STORE", help="A store folder, or a store name from `offspec models`.")],
) -> None:
    """Recompute the checksum of every blob of a store; name the first corrupt layer."""
    from offspec.runtime.plan import format_bytes
    from offspec.store.integrity import verify_store
    from offspec.store.resolve import stores_dir

    path = Path(store).expanduser()
    if not path.exists() and (stores_dir() / store).is_dir():
        path = stores_dir() / store
    if not path.exists():
        raise OffspecError(f"store not found: {store}")
    m = verify_store(path, progress=console.stderr_is_tty())
    total = m.resident.size + sum(m.layer_bytes)
    console.out.print(f"ok: {path}: {m.num_layers} layers and the resident blob match their checksums "
                      f"({format_bytes(total)})", markup=False)


@app.command(epilog="Examples:\n\n  offspec models\n\n  OFFSPEC_HOME=/data/offspec offspec models --json")
def models(
    json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List the converted models in the store cache ($OFFSPEC_HOME/stores)."""
    from offspec.store.resolve import list_cache, stores_dir

    rows = list_cache()
    if json_out:
        import json

        console.write_text(json.dumps(rows, indent=1) + "\n")
        return
    if not rows:
        console.status_line(f"no converted models in {stores_dir()}")
        return
    table = console.models_table(rows)
    table.caption = str(stores_dir())
    console.print_table(table)


@app.command(epilog="Examples:\n\n"
             "  offspec bench --budgets auto,16,64,256 --max-new-tokens 64 --repeats 3\n\n"
             "  offspec bench --model ./Llama-3.1-8B-Instruct --draft ./Llama-3.2-1B-Instruct "
             "--peer accelerate --json bench.json --plot bench.png\n\n"
             "  offspec bench --no-spec --device-memory 2GiB")
def bench(
    model: ModelOpt = None,
    draft: DraftOpt = None,
    bits: BitsOpt = 16,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    device_memory: DeviceMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    warm: WarmOpt = False,
    budgets: Annotated[str, typer.Option(
        "--budgets", metavar="LIST", help="Comma-separated tree budgets to compare (auto or numbers).")]
    = "auto,16,64,256,1024",
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", metavar="FILE", help="Prompts to run, one per line (default: a built-in set).")] = None,
    max_new_tokens: MaxNewOpt = 64,
    repeats: Annotated[int, typer.Option("--repeats", metavar="N", help="Runs per setting (medians reported).")] = 1,
    peer: Annotated[Optional[str], typer.Option(
        "--peer", metavar="NAME", help="Also time another offloading runtime, e.g. accelerate.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", metavar="FILE", help="Write the results as JSON.")]
    = None,
    plot_path: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="FILE.png", help="Plot tokens/s against budget (needs matplotlib).")] = None,
    no_spec: Annotated[bool, typer.Option(
        "--no-spec", help="Only plain decoding and the raw streaming bandwidth.")] = False,
    temperature: TemperatureOpt = 0.0,
) -> None:
    """Measure offloaded throughput: plain decoding, speculative decoding per budget, disk bandwidth."""
    import offspec.bench

    _quiet_transformers()
    offspec.bench.bench_command(
        model=model, draft=draft, bits=bits, dtype=dtype, device=device, device_memory=device_memory,
        host_memory=host_memory, warm=warm, budgets=budgets, prompts=_str_or_none(prompts),
        max_new_tokens=max_new_tokens, repeats=repeats, peer=peer, json_path=_str_or_none(json_path),
        plot_path=_str_or_none(plot_path), no_spec=no_spec, temperature=temperature,
    )


def _str_or_none(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def main() -> None:
    """Console entry point (`offspec`)."""
    from offspec.transformers_contract import warn_if_untested

    warn_if_untested()
    app(prog_name="offspec")


if __name__ == "__main__":
    main()
