"""The typer app, its root callback, and the one place where every error becomes one line and an exit code."""

import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from offspec import __version__, console
from offspec.cli.common import EXIT_INTERRUPTED
from offspec.errors import OffspecError, format_error

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


def main() -> None:
    """Console entry point (`offspec`)."""
    from offspec.transformers_contract import warn_if_untested

    warn_if_untested()
    app(prog_name="offspec")


    main()
