"""What the commands share: typed options, config builders, model loading, thread and interruption handling."""

import contextlib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from offspec import console
from offspec.config import parse_budget
from offspec.errors import ConfigError

EXIT_INTERRUPTED = 130
CTX_TOKENS = 4096  # default --ctx-size: KV cache positions (capped at the model's context)
MODEL_PANEL, RUNTIME_PANEL, SAMPLING_PANEL = "Model", "Memory and device", "Sampling"

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="MODEL", rich_help_panel=MODEL_PANEL,
    help="Target model: a Hugging Face folder, a .gguf file, an offspec store or a hub id "
    "(default: the packaged demo model, with its draft).")]
DraftOpt = Annotated[Optional[str], typer.Option(
    "--draft", "-md", "-d", metavar="MODEL|self|ngram|auto", rich_help_panel=MODEL_PANEL,
    help="What drafts the trees: a draft model sharing the target's tokenizer; self (the target's own low-bit copy, "
    "resident); ngram (continuations of earlier text, no model); or several, comma-separated (self,ngram), or auto "
    "(n-grams, self where the target is 16-bit, the demo's draft for the demo): the planner picks, per tree, the "
    "one with the most tokens per second. Default: the demo's draft for the demo model, ngram for any other --model.")]
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
ExpertPrefetchOpt = Annotated[str, typer.Option(
    "--expert-prefetch", metavar="off|previous|gate", rich_help_panel=RUNTIME_PANEL,
    help="A mixture of experts: while a layer computes, read the next layer's likely experts: previous (what it "
         "routed to last time) or gate (its router applied early).")]
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


def runtime_config(device: str, device_memory: str | None, host_memory: str | None, warm: bool, bits: int,
                    dtype: str, expert_prefetch: str = "off"):
    """A validated RuntimeConfig (pure parsing: no torch import, so flag typos fail fast)."""
    from offspec.config import RuntimeConfig

    return RuntimeConfig.from_flags(device, device_memory, host_memory, warm, bits, dtype, expert_prefetch)


def check_device(device: str) -> None:
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
    if rc.host_memory_bytes is not None and plan_device_kind(rc.device) == "cpu":
        console.status_line("warning: --host-memory does nothing on the CPU (it sizes pinned RAM for CUDA); "
                            "use --device-memory")
    unused = [f"--{n}" for n in ("budget", "tree") if _given(ctx, n)]
    if unused and no_spec:  # --draft with --no-spec is an error (loader.check_draft_options)
        console.status_line(f"warning: {'/'.join(unused)} do nothing without speculation (--no-spec)")


def generation_config(budget: str, spec: bool, tree: str, stop: list[str] | None, **sampling: Any):
    """A validated GenerationConfig (its checks, and SamplingParams', are the only ones)."""
    parsed_budget = parse_budget(budget)
    from offspec.generate import GenerationConfig

    return GenerationConfig(budget=parsed_budget, spec=spec, tree=tree, stop=tuple(stop or ()), **sampling)


def load_models(model: str | None, draft: str | None, spec: bool, rc, budget_auto: bool, ctx_size: int = CTX_TOKENS,
                quiet: bool = False, ngram: bool | None = None, ngram_corpus: Path | None = None,
                sequences: int | None = 1, max_budget: int | None = None):
    """Resolve (converting if needed), open and wire the models and the drafter; a spinner on a terminal
    (not with --quiet). sequences: KV caches for that many sequences at once (None: as many as fit); max_budget:
    a fixed --budget (the memory plan holds the workspace of a tree that size)."""
    from offspec.loader import check_draft_options, load_engine

    if ctx_size < 1:
        raise ConfigError(f"bad --ctx-size {ctx_size}: must be at least 1 token")
    check_draft_options(model, draft, spec, ngram, ngram_corpus, rc.bits)  # before anything slow
    from offspec.store.convert import ConversionInterrupted

    progress = console.stderr_is_tty() and not quiet
    with say_interrupted(ConversionInterrupted), console.quiet_transformers(), \
            console.phase("loading model", enabled=progress):
        return load_engine(model, draft, spec=spec, rc=rc, cache_tokens=ctx_size, progress=progress,
                           budget_auto=budget_auto, ngram=ngram, ngram_corpus=ngram_corpus, sequences=sequences,
                           max_budget=max_budget)


def set_threads(threads: str | None) -> None:
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
def say_interrupted(kind: type):
    """Ctrl-C inside: print the interruption's own line and exit 130 (typer would exit in silence)."""
    try:
        yield
    except kind as exc:
        console.error_line(f"interrupted: {exc}")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def check_output_flags(quiet: bool, verbose: bool) -> None:
    if quiet and verbose:
        raise ConfigError("--quiet and --verbose contradict each other: give one")


def plan_device_kind(device: str) -> str:
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
