"""`offspec bench`: the offload throughput benchmark."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from offspec import console
from offspec.cli.app import app
from offspec.cli.common import (
    MODEL_PANEL, BitsOpt, DeviceMemoryOpt, DeviceOpt, DtypeOpt, HostMemoryOpt, MaxNewOpt, ModelOpt,
    TemperatureOpt, ThreadsOpt, WarmOpt, set_threads,
)


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

    set_threads(threads)
    with console.quiet_transformers():
        offspec.bench.bench_command(
            model=model, draft=draft, bits=bits, dtype=dtype, device=device, device_memory=device_memory,
            host_memory=host_memory, warm=warm, budgets=budgets, prompts=_str_or_none(prompts),
            max_new_tokens=max_new_tokens, repeats=repeats, peer=peer, json_path=_str_or_none(json_path),
            plot_path=_str_or_none(plot_path), no_spec=no_spec, temperature=temperature, drafters=drafters,
        )


def _str_or_none(path: Path | None) -> str | None:
    return str(path) if path is not None else None
