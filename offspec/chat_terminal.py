"""The chat loop on a terminal or a pipe: reading messages (line editing, history, bracketed paste, !multi)
and running them through a ChatSession, answers on stdout and everything else on stderr.

On a terminal, input comes from prompt_toolkit: arrow keys edit and recall history (kept in
$OFFSPEC_HOME/chat_history while logging is on), a paste of several lines arrives as one message
(bracketed paste), Esc Enter inserts a newline, and `!multi` ... `!end` types a message over several
lines. From a pipe, each line is one message (and `!multi` ... `!end` joins lines).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from offspec import console
from offspec.chat import ChatSession, is_command
from offspec.cli.format import context_full_line, format_stats
from offspec.errors import ContextError, OffspecError, format_error

PROMPT, MORE = ">>> ", "... "
MULTI, END = "!multi", "!end"


def _join_multi(lines: Iterator[str | None]) -> str:
    """After a `!multi` line: the lines up to `!end` (or the end of input), joined by newlines."""
    parts: list[str] = []
    for line in lines:
        if line is None or line.strip() == END:
            break
        parts.append(line)
    return "\n".join(parts)


class PipeInput:
    """Messages from a pipe: one per line; `!multi` ... `!end` joins the lines between."""

    def __init__(self, stream=None) -> None:
        self.stream = stream

    def _line(self) -> str | None:
        line = (self.stream or sys.stdin).readline()
        return line.rstrip("\n") if line else None

    def read_message(self) -> str | None:
        line = self._line()
        if line is not None and line.strip() == MULTI:
            return _join_multi(iter(self._line, object()))
        return line

    def confirm(self, question: str) -> bool:
        return False  # nobody to ask: never overwrite


class TerminalInput:
    """Messages typed on a terminal, through prompt_toolkit (line editing, history, bracketed paste)."""

    def __init__(self, history_file: Path | None = None, input=None, output=None) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        history = InMemoryHistory()
        if history_file is not None:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                history_file.touch()
                history = FileHistory(str(history_file))
            except OSError:
                pass  # a read-only home: history for this session only
        keys = KeyBindings()

        @keys.add("escape", "enter")
        def _newline(event) -> None:  # Esc Enter (or Alt-Enter) adds a line instead of sending
            event.current_buffer.insert_text("\n")

        if output is None and not console.stdout_is_tty():
            from prompt_toolkit.output import create_output

            output = create_output(stdout=sys.stderr)  # answers go to a file: the prompt stays on the terminal
        self.session = PromptSession(history=history, key_bindings=keys, input=input, output=output)

    def _line(self, prompt: str) -> str | None:
        try:
            return self.session.prompt(prompt)
        except EOFError:
            return None

    def read_message(self) -> str | None:
        """One message; None at Ctrl-D. Ctrl-C raises KeyboardInterrupt (also inside !multi, which it cancels)."""
        line = self._line(PROMPT)
        if line is not None and line.strip() == MULTI:
            return _join_multi(iter(lambda: self._line(MORE), object()))
        if line is None:
            console.status_line("")
        return line

    def confirm(self, question: str) -> bool:
        from prompt_toolkit import PromptSession

        try:
            answer = PromptSession(output=self.session.output, input=self.session.input).prompt(f"{question} [y/N] ")
        except (EOFError, KeyboardInterrupt):
            return False
        return answer.strip().lower() in ("y", "yes")


def run_chat(session: ChatSession, reader, interactive: bool, quiet: bool = False,
             on_step: Callable | None = None) -> None:
    """Read messages until the end of input or /exit; answer each. Piped input stops at the first error."""
    while True:
        try:
            line = reader.read_message()
        except KeyboardInterrupt:
            if not interactive:
                raise
            console.status_line("\n(Ctrl-D or /exit to leave)")
            continue
        if line is None:
            break
        message = line.strip()
        if not message:
            continue
        if is_command(message):
            try:
                res = session.command(message, format_stats, reader.confirm)
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
            result = session.ask(message, console.write_text, on_step)
        except OffspecError as exc:
            if len(session.turns) > turns:
                console.write_text("\n")  # a partial answer was shown (and kept): end its line
            if not interactive:
                raise
            hint = " (/clear starts a new conversation)" if isinstance(exc, ContextError) else ""
            console.error_line(format_error(exc) + hint)
            continue
        console.write_text("\n")
        if result.stats.context_full:
            console.error_line(context_full_line(session.engine.context_tokens))
        if result.interrupted:
            console.status_line("(answer interrupted; kept in the history)")
        elif interactive and not quiet:
            console.status_line(format_stats(result.stats))

