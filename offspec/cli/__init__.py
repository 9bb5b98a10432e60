"""The offspec command line: thin typer commands that build configs and call the library.

Answer text goes to stdout, everything else to stderr. Every error becomes one line on stderr and a
non-zero exit in one place (`app.OffspecGroup.main`); OFFSPEC_DEBUG=1 shows the traceback instead.
Torch-heavy modules are imported inside the commands, so `offspec --help` stays fast. One module per
command group registers its commands on the one app: `generate` (generate, chat), `serve`, `store` (convert, plan,
verify, models, rm, prune, logs), `bench`.
"""

from offspec import console

console.quiet_libraries()  # before transformers / bitsandbytes are imported

# Each command module registers its commands on the app; the import order is the order of `offspec --help`.
from offspec.cli import generate  # noqa: E402,F401,I001
from offspec.cli import serve  # noqa: E402,F401
from offspec.cli import store  # noqa: E402,F401
from offspec.cli import bench  # noqa: E402,F401
from offspec.cli.app import app, exit_code_for, main  # noqa: E402
from offspec.cli.common import CTX_TOKENS  # noqa: E402

__all__ = ["CTX_TOKENS", "app", "exit_code_for", "main"]
