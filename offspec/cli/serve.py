"""`offspec serve`: the OpenAI-compatible server; concurrent requests share each streamed pass."""

import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from offspec import console
from offspec.cli.app import app
from offspec.cli.common import (
    CTX_TOKENS, MODEL_PANEL, SAMPLING_PANEL, BitsOpt, BudgetOpt, CtxSizeOpt, DeviceMemoryOpt, DeviceOpt, DraftOpt,
    DtypeOpt, ExpertPrefetchOpt, FrequencyPenaltyOpt, HostMemoryOpt, MinPOpt, ModelOpt, NgramCorpusOpt, NgramOpt,
    NoSpecOpt, PresencePenaltyOpt, QuietOpt, RepeatLastNOpt, RepeatPenaltyOpt, TemperatureOpt, ThreadsOpt, TopKOpt, TopPOpt,
    TreeOpt, WarmOpt, check_device, generation_config, load_models, runtime_config, set_threads, warn_ignored_flags,
)
from offspec.errors import ConfigError

SERVER_PANEL = "Server"
DEFAULT_QUEUE = 16


@app.command(epilog="Examples:\n\n"
             "  offspec serve\n\n"
             "  offspec serve -m ./Qwen2.5-7B-Instruct -md ./Qwen2.5-0.5B-Instruct --port 8080 --parallel 8\n\n"
             "  offspec serve -m model.gguf --draft ngram --host 0.0.0.0 --api-key secret\n\n"
             "Then point any OpenAI client at http://127.0.0.1:8080/v1, e.g.\n\n"
             "  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' "
             "-d '{\"model\": \"MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'\n\n"
             "GET /v1/models names MODEL; Ctrl-C stops the server.")
def serve(
    ctx: typer.Context,
    model: ModelOpt = None,
    draft: DraftOpt = None,
    no_spec: NoSpecOpt = False,
    ngram: NgramOpt = None,
    ngram_corpus: NgramCorpusOpt = None,
    bits: BitsOpt = None,
    dtype: DtypeOpt = "bfloat16",
    alias: Annotated[Optional[str], typer.Option(
        "--alias", "-a", metavar="NAME", rich_help_panel=MODEL_PANEL,
        help="The model's id in the API (default: the --model argument's name, or the demo store's).")] = None,
    device: DeviceOpt = "auto",
    device_memory: DeviceMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    warm: WarmOpt = False,
    expert_prefetch: ExpertPrefetchOpt = "off",
    threads: ThreadsOpt = None,
    ctx_size: CtxSizeOpt = CTX_TOKENS,
    host: Annotated[str, typer.Option(
        "--host", metavar="ADDR", rich_help_panel=SERVER_PANEL,
        help="Address to listen on (0.0.0.0: every interface; give --api-key then).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", rich_help_panel=SERVER_PANEL,
                                      help="TCP port to listen on.")] = 8080,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", metavar="KEY", envvar="OFFSPEC_API_KEY", rich_help_panel=SERVER_PANEL, show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on /v1 requests.")] = None,
    parallel: Annotated[Optional[int], typer.Option(
        "--parallel", "-np", metavar="N", rich_help_panel=SERVER_PANEL,
        help="Requests decoded at once, sharing each target pass (default: as many KV caches as the memory "
             "budget holds, up to 4).")] = None,
    queue: Annotated[int, typer.Option(
        "--queue", metavar="N", rich_help_panel=SERVER_PANEL,
        help="Requests that may wait for a free slot; more get HTTP 429.")] = DEFAULT_QUEUE,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", "-n", metavar="N", rich_help_panel=SAMPLING_PANEL,
        help="Default answer length limit when a request gives none (default: until the context is full).")]
    = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    repeat_last_n: RepeatLastNOpt = 64,
    presence_penalty: PresencePenaltyOpt = 0.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    budget: BudgetOpt = "auto",
    tree: TreeOpt = "specexec",
    quiet: QuietOpt = False,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat and completions, streamed or not).

    Concurrent requests share each target pass: the weights are read once per pass for all of them.
    The sampling options here are the defaults for requests that do not set them."""
    rc = runtime_config(device, device_memory, host_memory, warm, bits, dtype, expert_prefetch)
    defaults = generation_config(budget, not no_spec, tree, None, temperature=temperature, top_p=top_p, top_k=top_k,
                                 min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    if parallel is not None and parallel < 1:
        raise ConfigError(f"bad --parallel {parallel}: must be at least 1")
    if queue < 0:
        raise ConfigError(f"bad --queue {queue}: must be 0 or more")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"bad --max-tokens {max_tokens}: must be at least 1")
    check_device(rc.device)
    set_threads(threads)
    warn_ignored_flags(ctx, model, draft, no_spec, rc)
    listener = _listen(host, port)  # before loading: a port in use fails in a second, not after minutes
    from dataclasses import replace

    from offspec.batch import BatchEngine
    from offspec.runtime.plan import format_bytes
    from offspec.scheduler import Scheduler
    from offspec.server import ServeState, make_server, serving

    loaded = load_models(model, draft, not no_spec, rc, defaults.budget is None, ctx_size, quiet, ngram, ngram_corpus,
                         sequences=parallel)
    batch = None
    try:
        engine = loaded.engine
        batch = BatchEngine(engine, loaded.sequences)
        model_id = alias or _model_id(model, loaded.target_store)
        defaults = replace(defaults, max_new_tokens=max_tokens or engine.context_tokens)
        state = ServeState(Scheduler(batch, queue), loaded.tokenizer, model_id, engine.context_tokens, defaults,
                           aliases=tuple(a for a in (model,) if a), api_key=api_key,
                           on_request=None if quiet else _log_request)
        with serving(state) as asgi:
            server = make_server(asgi, host, port, state.scheduler.request_stop)
            shown = f"[{host}]" if ":" in host else host
            drafting = f", drafting with {loaded.drafter}" if loaded.drafter else ", plain decoding"
            console.status_line(f"serving {model_id}{drafting} at http://{shown}:{listener.getsockname()[1]}/v1")
            console.status_line(
                f"{loaded.sequences} requests at once (--parallel), each with {engine.context_tokens} tokens of "
                f"context ({format_bytes(loaded.sequence_kv_bytes)} of KV cache); up to {queue} more wait "
                f"(--queue){'; API key required' if api_key else ''}; Ctrl-C stops")
            if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
                console.status_line(f"warning: listening on {host} without --api-key: anyone who reaches this "
                                    "port can use the model")
            try:
                server.run(sockets=[listener])
            except KeyboardInterrupt:  # uvicorn hands Ctrl-C back once it has shut down cleanly
                pass
        console.status_line("stopped")
    finally:
        listener.close()
        if batch is not None:
            batch.close()
        loaded.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or one ConfigError line (port in use, bad address)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad --port {port}: must be between 0 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _model_id(given: str | None, store) -> str:
    """The model's API id: the --model argument's last path part (a hub id stays whole), or the store's name."""
    if given is None:
        return Path(store).name
    path = Path(given)
    return path.name if path.exists() else given


def _log_request(record: dict) -> None:
    console.status_line(f"{record['status']}: {record['prompt_tokens']} + {record['completion_tokens']} tokens in "
                        f"{record['latency_s']:.2f} s (queued {record['queued_s']:.2f} s, {record['passes']} passes)")
