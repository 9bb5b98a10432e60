"""`offspec generate` and `offspec chat`: one prompt, or a conversation, streamed to stdout."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from offspec import console
from offspec.cli.app import app
from offspec.cli.common import (
    CTX_TOKENS, EXIT_INTERRUPTED, SAMPLING_PANEL, BitsOpt, BudgetOpt, CtxSizeOpt, DeviceMemoryOpt, DeviceOpt,
    DraftOpt, DtypeOpt, ExpertPrefetchOpt, FrequencyPenaltyOpt, HostMemoryOpt, MaxNewOpt, MinPOpt, ModelOpt,
    NgramCorpusOpt, NgramOpt, NoLogOpt, NoSpecOpt, NoTemplateOpt, PresencePenaltyOpt, QuietOpt, RepeatLastNOpt, RepeatPenaltyOpt, SeedOpt,
    StopOpt, SystemOpt, TemperatureOpt, ThreadsOpt, TopKOpt, TopPOpt, TreeOpt, VerboseOpt, WarmOpt, check_device,
    check_output_flags, generation_config, load_models, runtime_config, set_threads, warn_ignored_flags,
)
from offspec.cli.format import StepPrinter, context_full_line, format_stats
from offspec.errors import ConfigError


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
    expert_prefetch: ExpertPrefetchOpt = "off",
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
    check_output_flags(quiet, verbose)
    rc = runtime_config(device, device_memory, host_memory, warm, bits, dtype, expert_prefetch)
    cfg = generation_config(budget, not no_spec, tree, stop, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, repeat_penalty=repeat_penalty,
                             repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty, logprobs=logprobs)
    check_device(rc.device)
    set_threads(threads)
    warn_ignored_flags(ctx, model, draft, no_spec, rc)
    text = _read_prompt(prompt, prompt_opt, file)
    if logprobs and not json_out:
        console.status_line("warning: --logprobs shows only in --json output")
    from offspec.chat import INTERRUPTED, encode_prompt
    from offspec.conversations import Conversation
    from offspec.generate import GenerationStats, stream_text

    loaded = load_models(model, draft, not no_spec, rc, cfg.budget is None, ctx_size, quiet, ngram, ngram_corpus,
                         max_budget=cfg.budget)
    try:
        tok, engine = loaded.tokenizer, loaded.engine
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        prompt_ids = encode_prompt(tok, messages, raw)
        stats, token_ids, pieces, token_logprobs, interrupted = GenerationStats(), [], [], [], False
        on_step = StepPrinter() if verbose else None
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
            console.error_line(context_full_line(engine.context_tokens))
        if not quiet:
            console.status_line(format_stats(stats, interrupted))
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
    expert_prefetch: ExpertPrefetchOpt = "off",
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
    check_output_flags(quiet, verbose)
    if load is not None and resume:
        raise ConfigError("--load and --continue both pick the conversation: give one")
    rc = runtime_config(device, device_memory, host_memory, warm, bits, dtype, expert_prefetch)
    cfg = generation_config(budget, not no_spec, tree, stop, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, repeat_penalty=repeat_penalty,
                             repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty)
    check_device(rc.device)
    set_threads(threads)
    warn_ignored_flags(ctx, model, draft, no_spec, rc)
    from offspec.chat import ChatSession
    from offspec.chat_terminal import PipeInput, TerminalInput, run_chat
    from offspec.conversations import ConversationLog, load_conversation

    log = _conversation_log(no_log)
    previous = load_conversation(load, ConversationLog()) if (load is not None or resume) else None
    loaded = load_models(model, draft, not no_spec, rc, cfg.budget is None, ctx_size, quiet, ngram, ngram_corpus,
                         max_budget=cfg.budget)
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
        run_chat(session, reader, interactive, quiet, StepPrinter() if verbose else None)
    finally:
        loaded.close()
