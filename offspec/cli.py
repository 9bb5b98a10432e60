"""The offspec command line: thin typer commands that build configs and call the library.

Answer text goes to stdout, everything else to stderr. Every error becomes one line on stderr and a
non-zero exit in one place (`OffspecGroup.main`); OFFSPEC_DEBUG=1 shows the traceback instead.
Torch-heavy modules are imported inside the commands, so `offspec --help` stays fast.
"""

import contextlib
import os
import sys

from offspec import console

console.quiet_libraries()  # before transformers / bitsandbytes are imported

from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Optional  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from offspec import __version__  # noqa: E402
from offspec.config import parse_budget, parse_device_memory, parse_size  # noqa: E402
from offspec.errors import ConfigError, OffspecError, format_error  # noqa: E402

EXIT_INTERRUPTED = 130
CTX_TOKENS = 4096  # default --ctx-size: KV cache positions (capped at the model's context)
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
        console.error_line(f"interrupted: {exc}" if str(exc) else "interrupted")
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
    "--draft", "-md", "-d", metavar="MODEL|self|ngram", rich_help_panel=MODEL_PANEL,
    help="What drafts the trees: a draft model sharing the target's tokenizer; self (the target's own NF4 copy, "
    "resident, built once next to its store); or ngram (continuations of earlier text, no model). "
    "Default: the demo's draft for the demo model, ngram for any other --model.")]
NgramOpt = Annotated[Optional[bool], typer.Option(
    "--ngram/--no-ngram", rich_help_panel=MODEL_PANEL, show_default=False,
    help="Add n-gram continuations to a model or self draft's tree (one tree, one budget), or refuse them.")]
NgramCorpusOpt = Annotated[Optional[Path], typer.Option(
    "--ngram-corpus", metavar="FILE", rich_help_panel=MODEL_PANEL,
    help="A text file the n-gram index also matches against (tokenized once per run).")]
NoSpecOpt = Annotated[bool, typer.Option(
    "--no-spec", rich_help_panel=MODEL_PANEL, help="Plain decoding: no draft, one token per streamed pass.")]
BitsOpt = Annotated[Optional[int], typer.Option(
    "--bits", metavar="16|4", rich_help_panel=MODEL_PANEL, show_default=False,
    help="Target weights in the store: 16 (--dtype floats) or 4 (NF4). Default: NF4 for GGUFs quantized "
         "below 8 bits, else 16.")]
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
    "--max-new-tokens", "--max-tokens", "-n", metavar="N", rich_help_panel=SAMPLING_PANEL,
    help="At most N new tokens (a hard limit, whatever the draft tree accepts).")]
TemperatureOpt = Annotated[float, typer.Option(
    "--temp", "--temperature", metavar="T", rich_help_panel=SAMPLING_PANEL, help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option(
    "--top-p", metavar="P", rich_help_panel=SAMPLING_PANEL, help="Nucleus sampling mass (1 = off).")]
TopKOpt = Annotated[int, typer.Option(
    "--top-k", metavar="K", rich_help_panel=SAMPLING_PANEL, help="Sample among the K likeliest tokens (0 = off).")]
MinPOpt = Annotated[float, typer.Option(
    "--min-p", metavar="P", rich_help_panel=SAMPLING_PANEL,
    help="Drop tokens less likely than P times the likeliest one (0 = off).")]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", "-s", metavar="S", rich_help_panel=SAMPLING_PANEL,
    help="Sampling seed: the same seed gives the same text, with or without speculation "
         "(default: a random one, shown in the stats).")]
RepeatPenaltyOpt = Annotated[float, typer.Option(
    "--repeat-penalty", metavar="X", rich_help_panel=SAMPLING_PANEL,
    help="Penalise tokens seen in the last --repeat-last-n tokens (1 = off).")]
RepeatLastNOpt = Annotated[int, typer.Option(
    "--repeat-last-n", metavar="N", rich_help_panel=SAMPLING_PANEL,
    help="How many recent tokens the penalties look at (-1 = the whole context, 0 = none).")]
PresencePenaltyOpt = Annotated[float, typer.Option(
    "--presence-penalty", metavar="X", rich_help_panel=SAMPLING_PANEL,
    help="Subtract X from tokens seen in the window (0 = off).")]
FrequencyPenaltyOpt = Annotated[float, typer.Option(
    "--frequency-penalty", metavar="X", rich_help_panel=SAMPLING_PANEL,
    help="Subtract X per occurrence in the window (0 = off).")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", "-r", metavar="TEXT", rich_help_panel=SAMPLING_PANEL,
    help="Stop before this text (repeatable); it is not printed.")]
BudgetOpt = Annotated[str, typer.Option(
    "--budget", metavar="auto|N", rich_help_panel=SAMPLING_PANEL,
    help="Draft tree size per target pass: auto (fitted to measured pass and draft times) or 1..4096.")]
TreeOpt = Annotated[str, typer.Option(
    "--tree", metavar="specexec|sequoia", rich_help_panel=SAMPLING_PANEL,
    help="How the draft tree is grown: specexec (best-first over the draft's probabilities) or sequoia "
         "(DP-optimal shape from measured acceptance). Either way the text is the target's own.")]
SystemOpt = Annotated[Optional[str], typer.Option(
    "--system", "--system-prompt", "-sys", metavar="TEXT", help="System message put before the conversation.")]
ThreadsOpt = Annotated[Optional[str], typer.Option(
    "--threads", "-t", metavar="N", rich_help_panel=RUNTIME_PANEL,
    help="CPU threads for torch (default: torch's own choice).")]
CtxSizeOpt = Annotated[int, typer.Option(
    "--ctx-size", "-c", metavar="N", rich_help_panel=RUNTIME_PANEL,
    help="KV cache size in tokens: prompt plus answer (plus the chat so far) must fit; capped at the model's "
         "context.")]
NoTemplateOpt = Annotated[bool, typer.Option(
    "--no-chat-template", "--raw", help="Send the text as is, without the tokenizer's chat template.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", help="No progress and no statistics on stderr (warnings and errors still print).")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Also one line per target pass on stderr (tree size, accepted tokens, times).")]
NoLogOpt = Annotated[bool, typer.Option(
    "--no-log", help="Do not log this conversation (see `offspec logs`).")]


def _runtime_config(device: str, device_memory: str | None, host_memory: str | None, warm: bool, bits: int,
                    dtype: str):
    """A validated RuntimeConfig (pure parsing: no torch import, so flag typos fail fast)."""
    from offspec.config import RuntimeConfig

    return RuntimeConfig.from_flags(device, device_memory, host_memory, warm, bits, dtype)


def _check_device(device: str) -> None:
    """ConfigError for --device cuda without CUDA, or an unknown device, before any model is touched."""
    from offspec.runtime.device import resolve_device

    resolve_device(device)


def _given(ctx: typer.Context, name: str) -> bool:
    """True if the user passed this option (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def warn_ignored_flags(ctx: typer.Context, model: str | None, draft: str | None, no_spec: bool, rc) -> None:
    """One stderr line per flag that would do nothing here (the run goes on)."""
    from offspec.store.resolve import is_store, locate_store

    store = locate_store(model) if model is not None else None
    given = [f"--{n}" for n in ("bits", "dtype") if _given(ctx, n)]
    if store is not None and is_store(store) and given:
        console.status_line(f"warning: {'/'.join(given)} do nothing with a store: {model} keeps the weights "
                            "it was converted with")
    if rc.host_memory_bytes is not None and _plan_device_kind(rc.device) == "cpu":
        console.status_line("warning: --host-memory does nothing on the CPU (it sizes pinned RAM for CUDA); "
                            "use --device-memory")
    unused = [f"--{n}" for n in ("budget", "tree") if _given(ctx, n)]
    if unused and no_spec:  # --draft with --no-spec is an error (loader.check_draft_options)
        console.status_line(f"warning: {'/'.join(unused)} do nothing without speculation (--no-spec)")


def _generation_config(budget: str, spec: bool, tree: str, stop: list[str] | None, **sampling: Any):
    """A validated GenerationConfig (its checks, and SamplingParams', are the only ones)."""
    parsed_budget = parse_budget(budget)
    from offspec.generate import GenerationConfig

    return GenerationConfig(budget=parsed_budget, spec=spec, tree=tree, stop=tuple(stop or ()), **sampling)


def _load(model: str | None, draft: str | None, spec: bool, rc, budget_auto: bool, ctx_size: int = CTX_TOKENS,
          quiet: bool = False, ngram: bool | None = None, ngram_corpus: Path | None = None):
    """Resolve (converting if needed), open and wire the models and the drafter; a spinner on a terminal
    (not with --quiet)."""
    from offspec.loader import check_draft_options, load_engine

    if ctx_size < 1:
        raise ConfigError(f"bad --ctx-size {ctx_size}: must be at least 1 token")
    check_draft_options(model, draft, spec, ngram, ngram_corpus, rc.bits)  # before anything slow
    from offspec.store.convert import ConversionInterrupted

    progress = console.stderr_is_tty() and not quiet
    with _say_interrupted(ConversionInterrupted), console.quiet_transformers(), \
            console.phase("loading model", enabled=progress):
        return load_engine(model, draft, spec=spec, rc=rc, cache_tokens=ctx_size, progress=progress,
                           budget_auto=budget_auto, ngram=ngram, ngram_corpus=ngram_corpus)


def _set_threads(threads: str | None) -> None:
    """--threads N: torch's CPU threads. `-t 0.8` (llama-cli's -t is threads, not temperature) gets a pointer."""
    if threads is None:
        return
    try:
        n = int(threads)
    except ValueError:
        try:
            float(threads)
        except ValueError:
            raise ConfigError(f"bad --threads '{threads}': a whole number of CPU threads") from None
        raise ConfigError(f"-t/--threads takes a number of CPU threads, as in llama-cli; for the temperature "
                          f"use --temp {threads}") from None
    if n < 1:
        raise ConfigError(f"bad --threads {n}: must be at least 1")
    import torch

    torch.set_num_threads(n)


@contextlib.contextmanager
def _say_interrupted(kind: type):
    """Ctrl-C inside: print the interruption's own line and exit 130 (typer would exit in silence)."""
    try:
        yield
    except kind as exc:
        console.error_line(f"interrupted: {exc}")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _check_output_flags(quiet: bool, verbose: bool) -> None:
    if quiet and verbose:
        raise ConfigError("--quiet and --verbose contradict each other: give one")


def _read_prompt(prompt: str | None, prompt_opt: str | None = None, file: Path | None = None) -> str:
    """The prompt from PROMPT, -p TEXT or -f FILE (one of them); stdin for '-' (also -f -) or a pipe."""
    given = [x for x in (prompt, prompt_opt, file) if x is not None]
    if len(given) > 1:
        raise ConfigError("give the prompt once: PROMPT, -p/--prompt TEXT or -f/--file FILE")
    if file is not None and str(file) != "-":
        try:
            data = Path(file).expanduser().read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --file {file}: {exc.strerror or exc}") from None
        text = decode_prompt(data, f"--file {file}")
        if not text.strip():
            raise ConfigError(f"--file {file} is empty")
        return text
    prompt = prompt if prompt is not None else prompt_opt
    if prompt is not None and prompt != "-":
        return _check_utf8(prompt, "the PROMPT argument" if prompt_opt is None else "--prompt")
    if prompt is None and file is None and console.stdin_is_tty():
        raise ConfigError("no prompt: pass PROMPT, -p TEXT or -f FILE, or pipe text on stdin (- reads stdin)")
    buffer = getattr(sys.stdin, "buffer", None)
    text = decode_prompt(buffer.read(), "stdin") if buffer is not None else _check_utf8(sys.stdin.read(), "stdin")
    if not text.strip():
        raise ConfigError("empty prompt on stdin")
    return text


def _conversation_log(no_log: bool):
    """The conversation log, or None with --no-log or after `offspec logs --off`."""
    from offspec.conversations import ConversationLog

    log = ConversationLog()
    return log if (log.enabled and not no_log) else None


def _recorder(no_log: bool):
    from offspec.conversations import Recorder

    return Recorder(_conversation_log(no_log), console.error_line)


def _options(cfg) -> dict:
    """The generation settings a logged conversation records (budget None is auto)."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if k != "stop_ids"}


def decode_prompt(data: bytes, source: str) -> str:
    """Prompt bytes (stdin, a file) as text; one clear error when they are not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the prompt from {source} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at "
                          f"offset {exc.start}); convert it first, e.g. with iconv -t UTF-8") from None


def _check_utf8(text: str, source: str) -> str:
    """Text that came through the OS as undecodable bytes (surrogate escapes) is an error, not a traceback."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ConfigError(f"the prompt from {source} is not valid UTF-8") from None
    return decode_prompt(data, source)


def _logprob_json(tokenizer, lp) -> dict:
    """One generated token's log-probabilities for --json --logprobs."""
    def text(t: int) -> str:
        return tokenizer.decode([t]) if tokenizer is not None else ""

    return {"token": lp.token, "text": text(lp.token), "logprob": lp.logprob,
            "top": [{"token": t, "text": text(t), "logprob": v} for t, v in lp.top]}


def _model_name(given: str | None, store) -> str | None:
    if store is None:
        return None
    return given or Path(store).name


def _draft_name(given: str | None, loaded) -> str | None:
    """--draft as given (a model, self or ngram), the demo draft's store name, or None for plain decoding."""
    if not loaded.drafter:
        return None
    return given or (Path(loaded.draft_store).name if loaded.draft_store else loaded.drafter)


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
             "  offspec generate -f question.txt -c 8192 -t 8\n\n"
             "  offspec generate --json --temp 0 \"2+2=\" > answer.json\n\n"
             "  offspec generate --no-chat-template --no-spec --max-tokens 32 \"def fib(n):\"")
def generate(
    ctx: typer.Context,
    prompt: Annotated[Optional[str], typer.Argument(
        metavar="PROMPT", show_default=False, help="The prompt; - or absent (with a pipe) reads stdin.")] = None,
    prompt_opt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", metavar="TEXT", show_default=False, help="The prompt, as an option (as in llama-cli).")]
    = None,
    file: Annotated[Optional[Path], typer.Option(
        "--file", "-f", metavar="FILE", show_default=False, help="Read the prompt from FILE (- for stdin).")] = None,
    model: ModelOpt = None,
    draft: DraftOpt = None,
    no_spec: NoSpecOpt = False,
    ngram: NgramOpt = None,
    ngram_corpus: NgramCorpusOpt = None,
    bits: BitsOpt = None,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    device_memory: DeviceMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    warm: WarmOpt = False,
    threads: ThreadsOpt = None,
    ctx_size: CtxSizeOpt = CTX_TOKENS,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    repeat_last_n: RepeatLastNOpt = 64,
    presence_penalty: PresencePenaltyOpt = 0.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    stop: StopOpt = None,
    logprobs: Annotated[int, typer.Option(
        "--logprobs", metavar="N", rich_help_panel=SAMPLING_PANEL,
        help="With --json: each token's log-probability and the N likeliest alternatives, from the model's raw "
             "distribution (before penalties, temperature and truncation).")] = 0,
    budget: BudgetOpt = "auto",
    tree: TreeOpt = "specexec",
    system: SystemOpt = None,
    raw: NoTemplateOpt = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (text, token ids, stats) on stdout instead of streaming.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    no_log: NoLogOpt = False,
) -> None:
    """Complete one prompt, streaming the answer to stdout and the speed to stderr."""
    _check_output_flags(quiet, verbose)
    rc = _runtime_config(device, device_memory, host_memory, warm, bits, dtype)
    cfg = _generation_config(budget, not no_spec, tree, stop, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, repeat_penalty=repeat_penalty,
                             repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty, logprobs=logprobs)
    _check_device(rc.device)
    _set_threads(threads)
    warn_ignored_flags(ctx, model, draft, no_spec, rc)
    text = _read_prompt(prompt, prompt_opt, file)
    if logprobs and not json_out:
        console.status_line("warning: --logprobs shows only in --json output")
    from offspec.chat import INTERRUPTED, encode_prompt
    from offspec.conversations import Conversation
    from offspec.generate import GenerationStats, stream_text

    loaded = _load(model, draft, not no_spec, rc, cfg.budget is None, ctx_size, quiet, ngram, ngram_corpus)
    try:
        tok, engine = loaded.tokenizer, loaded.engine
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        prompt_ids = encode_prompt(tok, messages, raw)
        stats, token_ids, pieces, token_logprobs, interrupted = GenerationStats(), [], [], [], False
        on_step = console.StepPrinter() if verbose else None
        try:
            for ev in stream_text(engine, prompt_ids, cfg, stats):
                token_ids.extend(ev.step.tokens)
                token_logprobs.extend(ev.step.logprobs)
                pieces.append(ev.text)
                if not json_out:
                    console.write_text(ev.text)
                if on_step is not None:
                    on_step(ev.step, stats)
        except KeyboardInterrupt:
            interrupted = True
            stats.finish = "interrupted"
        except BaseException:
            if pieces and not json_out:
                console.write_text("\n")  # end the partial answer before the error line
            raise
        model_name, draft_name = _model_name(model, loaded.target_store), _draft_name(draft, loaded)
        if json_out:
            import json

            obj = {"text": "".join(pieces), "prompt_ids": prompt_ids, "token_ids": token_ids,
                   "stats": stats.to_dict(), "model": model_name, "draft": draft_name,
                   "drafter": loaded.drafter}
            if engine.stats.passes:
                obj["acceptance"] = engine.stats.as_dict()
            if cfg.logprobs:
                obj["logprobs"] = [_logprob_json(tok, lp) for lp in token_logprobs]
            if interrupted:
                obj["interrupted"] = True
            console.write_text(json.dumps(obj, ensure_ascii=False) + "\n")
        else:
            console.write_text("\n")
        if stats.context_full:
            console.error_line(console.context_full_line(engine.context_tokens))
        if not quiet:
            console.status_line(console.format_stats(stats, interrupted))
        answer = {"role": "assistant", "content": "".join(pieces)} | ({INTERRUPTED: True} if interrupted else {})
        _recorder(no_log)(Conversation(messages + [answer], "generate", model_name, draft_name, _options(cfg)))
    finally:
        loaded.close()
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command(epilog="Examples:\n\n"
             "  offspec chat\n\n"
             "  offspec chat --model ./Llama-3.1-8B-Instruct --draft ./Llama-3.2-1B-Instruct --system \"Be brief.\"\n\n"
             "  offspec chat --continue\n\n"
             "  printf 'Hi\\nWhat did I just say?\\n' | offspec chat --temp 0\n\n"
             "In the chat: /system TEXT, /clear, /save FILE, /load FILE, /stats, /help, /exit (or Ctrl-D); "
             "!multi ... !end for several lines; Ctrl-C stops the current answer.")
def chat(
    ctx: typer.Context,
    model: ModelOpt = None,
    draft: DraftOpt = None,
    no_spec: NoSpecOpt = False,
    ngram: NgramOpt = None,
    ngram_corpus: NgramCorpusOpt = None,
    bits: BitsOpt = None,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    device_memory: DeviceMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    warm: WarmOpt = False,
    threads: ThreadsOpt = None,
    ctx_size: CtxSizeOpt = CTX_TOKENS,
    max_new_tokens: MaxNewOpt = 512,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    repeat_last_n: RepeatLastNOpt = 64,
    presence_penalty: PresencePenaltyOpt = 0.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    stop: StopOpt = None,
    budget: BudgetOpt = "auto",
    tree: TreeOpt = "specexec",
    system: SystemOpt = None,
    raw: NoTemplateOpt = False,
    load: Annotated[Optional[Path], typer.Option(
        "--load", metavar="FILE", help="Continue a conversation saved with /save.")] = None,
    resume: Annotated[bool, typer.Option(
        "--continue", help="Continue the last logged conversation (see `offspec logs`).")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    no_log: NoLogOpt = False,
) -> None:
    """Talk with a model over several turns (reads one message per line from a pipe)."""
    _check_output_flags(quiet, verbose)
    if load is not None and resume:
        raise ConfigError("--load and --continue both pick the conversation: give one")
    rc = _runtime_config(device, device_memory, host_memory, warm, bits, dtype)
    cfg = _generation_config(budget, not no_spec, tree, stop, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, repeat_penalty=repeat_penalty,
                             repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty)
    _check_device(rc.device)
    _set_threads(threads)
    warn_ignored_flags(ctx, model, draft, no_spec, rc)
    from offspec.chat import ChatSession
    from offspec.chat_terminal import PipeInput, TerminalInput, run_chat
    from offspec.conversations import ConversationLog, load_conversation

    log = _conversation_log(no_log)
    previous = load_conversation(load, ConversationLog()) if (load is not None or resume) else None
    loaded = _load(model, draft, not no_spec, rc, cfg.budget is None, ctx_size, quiet, ngram, ngram_corpus)
    interactive = console.stdin_is_tty()
    session = ChatSession(loaded.engine, loaded.tokenizer, cfg, system, raw=raw, on_change=_recorder(no_log))
    name, draft_name = _model_name(model, loaded.target_store), _draft_name(draft, loaded)
    if previous is not None:
        session.load(previous)
        if system is not None:
            session.set_system(system)
    session.conversation.model, session.conversation.draft = name, draft_name
    session.conversation.options = _options(cfg)
    try:
        if interactive and not quiet:
            with_draft = f" drafting with {loaded.drafter}" if loaded.drafter else ""
            resumed = f", continuing {len(session.messages)} messages" if previous is not None else ""
            console.status_line(f"chatting with {name}{with_draft}{resumed}; /help for commands, Ctrl-D to leave")
        reader = TerminalInput(log.home / "chat_history" if log else None) if interactive else PipeInput()
        run_chat(session, reader, interactive, quiet, console.StepPrinter() if verbose else None)
    finally:
        loaded.close()


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
    from offspec.store.convert import ConversionInterrupted, convert as convert_store, format_size

    with _say_interrupted(ConversionInterrupted), console.quiet_transformers():
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
    kind = _plan_device_kind(device)
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
    target = plan_inputs(model, bits, dtype)
    name, man, what = target.name, target.manifest, target.what
    ctx_tokens = context_tokens(target.store_dir, ctx_size, target.config)
    reserved = 0
    draft_label = "draft model (resident)"
    if draft == "self":  # sized from the (estimated) manifest: plan never builds the NF4 copy
        from offspec.runtime.sizing import nf4_copy_bytes

        if man.bits == 4:
            raise ConfigError("--draft self needs a 16-bit target: this one is NF4, so its NF4 copy would be the "
                              "target itself (use --bits 16)")
        reserved = nf4_copy_bytes(target.store_dir, man, ctx_tokens, kind, config=target.config)
        draft_label = "self-draft: NF4 copy (resident)"
    elif draft is not None and draft != "ngram":
        d = plan_inputs(draft, 16, dtype)
        reserved = model_bytes(d.store_dir, ctx_tokens, kind, manifest=d.manifest, config=d.config)
    residency, minimum = plan_for_store(target.store_dir, man, kind, dev_budget, host_budget, reserved, ctx_tokens,
                                        over_min=over_min, config=target.config)
    dev_budget = dev_budget if over_min is None else minimum + over_min
    from offspec.models.registry import family_label

    title = (f"{name} ({what}): {man.num_layers} layers, {family_label(man.model_type)}, "
             f"{'NF4' if man.bits == 4 else man.dtype}, on {kind} (KV cache for {ctx_tokens} tokens)")
    console.print_table(console.plan_table(residency, title, minimum, dev_budget, host_budget, draft_label))
    for note in residency.notes:
        console.status_line(f"note: {note}")
    if draft == "self":
        console.status_line("note: the self-draft shares the target's embeddings, norm, lm_head and resident layers; "
                            "its size counts every layer in NF4 (an upper bound)")
    elif draft == "ngram":
        console.status_line("note: n-gram drafting needs no model memory")


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
    table = console.logs_table(convs)
    table.caption = str(log.path) + ("" if log.enabled else " (logging is off: offspec logs --on)")
    console.print_table(table)


@app.command(epilog="Examples:\n\n"
             "  offspec bench --budgets auto,16,64,256 --max-new-tokens 64 --repeats 3\n\n"
             "  offspec bench --model ./Llama-3.1-8B-Instruct --draft ./Llama-3.2-1B-Instruct "
             "--peer accelerate --json bench.json --plot bench.png\n\n"
             "  offspec bench --no-spec --device-memory 2GiB\n\n"
             "  offspec bench --drafters ngram,self,self+ngram --budgets auto,256 --device-memory min+512MiB")
def bench(
    model: ModelOpt = None,
    draft: Annotated[Optional[str], typer.Option(  # no -d: llama-bench's -d is the context depth
        "--draft", "-md", metavar="MODEL", rich_help_panel=MODEL_PANEL,
        help="Draft model for the speculative sections; must share the target's tokenizer.")] = None,
    bits: BitsOpt = None,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    device_memory: DeviceMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    warm: WarmOpt = False,
    threads: ThreadsOpt = None,
    budgets: Annotated[str, typer.Option(
        "--budgets", metavar="LIST", help="Comma-separated tree budgets to compare (auto or numbers).")]
    = "auto,16,64,256,1024",
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", metavar="FILE", help="Prompts to run, one per line (default: a built-in set).")] = None,
    max_new_tokens: MaxNewOpt = 64,
    repeats: Annotated[int, typer.Option(
        "--repeats", "--repetitions", "-r", metavar="N", help="Runs per setting (medians reported).")] = 1,
    peer: Annotated[Optional[str], typer.Option(
        "--peer", metavar="NAME", help="Also time another offloading runtime, e.g. accelerate.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", metavar="FILE", help="Write the results as JSON.")]
    = None,
    plot_path: Annotated[Optional[Path], typer.Option(
        "--plot", metavar="FILE.png", help="Plot tokens/s against budget (needs matplotlib).")] = None,
    no_spec: Annotated[bool, typer.Option(
        "--no-spec", help="Only plain decoding and the raw streaming bandwidth.")] = False,
    temperature: TemperatureOpt = 0.0,
    drafters: Annotated[Optional[str], typer.Option(
        "--drafters", metavar="LIST",
        help="Compare drafters side by side on one target plan, e.g. ngram,self,self+ngram,./draft-model "
             "(each at every budget of --budgets).")] = None,
) -> None:
    """Measure offloaded throughput: plain decoding, speculative decoding per budget, disk bandwidth."""
    import offspec.bench

    _set_threads(threads)
    with console.quiet_transformers():
        offspec.bench.bench_command(
            model=model, draft=draft, bits=bits, dtype=dtype, device=device, device_memory=device_memory,
            host_memory=host_memory, warm=warm, budgets=budgets, prompts=_str_or_none(prompts),
            max_new_tokens=max_new_tokens, repeats=repeats, peer=peer, json_path=_str_or_none(json_path),
            plot_path=_str_or_none(plot_path), no_spec=no_spec, temperature=temperature, drafters=drafters,
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
