"""A multi-turn chat session: the history, the chat template, turn -> prompt ids, slash commands, Ctrl-C safety,
saving and loading the conversation record.

Each turn passes the whole templated conversation to the engine; the engine keeps the ids its KV
caches hold and only prefills what is new. No terminal is needed here: the CLI wires input/output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from offspec.console import plural
from offspec.conversations import Conversation, load_conversation, new_id, now_iso, save_conversation
from offspec.errors import ConfigError
from offspec.generate import GenerationConfig, GenerationStats, StepEvent, stream_text

INTERRUPTED = "interrupted"  # key set to True on an assistant message cut short by Ctrl-C


def render_prompt(tokenizer, messages: list[dict], raw: bool = False) -> str:
    """The prompt text for messages: the tokenizer's chat template (with the generation prompt), else plain text.

    Without a template, a single question (after an optional system text) is passed verbatim; a longer
    conversation becomes "User: ... / Assistant: ..." lines ending in "Assistant:".
    """
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    if uses_template(tokenizer, raw):
        return tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
    if sum(m["role"] != "system" for m in clean) == 1:
        return "\n\n".join(m["content"] for m in clean)
    lines = [m["content"] if m["role"] == "system" else f"{m['role'].capitalize()}: {m['content']}" for m in clean]
    return "\n".join(lines) + "\nAssistant:"


def encode_prompt(tokenizer, messages: list[dict], raw: bool = False) -> list[int]:
    """Token ids of messages rendered by `render_prompt`; a templated prompt already carries its special
    tokens (no extra BOS)."""
    text = render_prompt(tokenizer, messages, raw)
    return list(tokenizer.encode(text, add_special_tokens=not uses_template(tokenizer, raw)))


def uses_template(tokenizer, raw: bool = False) -> bool:
    return not raw and bool(getattr(tokenizer, "chat_template", None))


@dataclass
class TurnResult:
    """One assistant answer: its text, stats (finalized) and whether Ctrl-C cut it short."""

    text: str
    stats: GenerationStats
    interrupted: bool = False


@dataclass
class CommandResult:
    """What a slash command says back, and whether the session should end."""

    message: str = ""
    leave: bool = False


@dataclass
class ChatSession:
    """History plus an engine; `ask` streams one answer and records it, also when interrupted.

    `conversation` carries the record's identity (id, model, options); `on_change` (the log) gets the
    record after every answer and every change of the history.
    """

    engine: object
    tokenizer: object
    cfg: GenerationConfig = field(default_factory=GenerationConfig)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    turns: list[TurnResult] = field(default_factory=list)
    raw: bool = False  # no chat template: the conversation as plain text
    conversation: Conversation = field(default_factory=Conversation)
    on_change: Callable[[Conversation], None] | None = None

    def __post_init__(self) -> None:
        if not self.messages and self.system:
            self.messages.append({"role": "system", "content": self.system})
        elif self.system is None:
            self.system = next((m["content"] for m in self.messages if m["role"] == "system"), None)

    # ------------------------------------------------------------------ prompts
    def prompt_text(self, messages: list[dict] | None = None) -> str:
        return render_prompt(self.tokenizer, self.messages if messages is None else messages, self.raw)

    def prompt_ids(self, messages: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation (plus the assistant generation prompt)."""
        return encode_prompt(self.tokenizer, self.messages if messages is None else messages, self.raw)

    # ------------------------------------------------------------------ turns
    def ask(self, text: str, on_text: Callable[[str], None] | None = None,
            on_step: Callable[[StepEvent, GenerationStats], None] | None = None) -> TurnResult:
        """Add a user message, stream the answer through on_text, record it in the history.

        Ctrl-C (KeyboardInterrupt) while answering stops the answer; the partial answer stays in the
        history, marked interrupted, and the session can go on. Errors before any token (e.g. the
        conversation no longer fits the context) remove the user message again and propagate.
        on_step(step, running stats) sees each target pass.
        """
        self.messages.append({"role": "user", "content": text})
        stats = GenerationStats()
        pieces: list[str] = []
        interrupted = False
        try:
            ids = self.prompt_ids()
            for ev in stream_text(self.engine, ids, self.cfg, stats):
                if on_step is not None:
                    on_step(ev.step, stats)
                if ev.text:
                    pieces.append(ev.text)
                    if on_text is not None:
                        on_text(ev.text)
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            if not pieces:
                self.messages.pop()
                raise
            interrupted = True  # an error mid-answer: keep what was said, like an interrupt
            self._record("".join(pieces), stats, interrupted)
            raise
        return self._record("".join(pieces), stats, interrupted)

    def _record(self, text: str, stats: GenerationStats, interrupted: bool) -> TurnResult:
        msg: dict = {"role": "assistant", "content": text}
        if interrupted:
            msg[INTERRUPTED] = True
            stats.finish = "interrupted"
        self.messages.append(msg)
        result = TurnResult(text, stats, interrupted)
        self.turns.append(result)
        self._changed()
        return result

    def _changed(self) -> None:
        if self.on_change is not None and any(m["role"] != "system" for m in self.messages):
            self.on_change(self.record())

    def reset(self) -> None:
        """Forget the conversation (keeps the system message) and start a new record; the KV caches are
        reused by prefix."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turns = []
        self.conversation = replace(self.conversation, id=new_id(), created=now_iso(), messages=[])

    def set_system(self, text: str | None) -> None:
        """Replace (or with None, drop) the system message; the conversation goes on under it."""
        self.system = text or None
        self.messages = [m for m in self.messages if m["role"] != "system"]
        if self.system:
            self.messages.insert(0, {"role": "system", "content": self.system})
        self._changed()

    def record(self) -> Conversation:
        """The conversation as saved and logged."""
        self.conversation.messages = [dict(m) for m in self.messages]
        return self.conversation

    def load(self, conv: Conversation) -> None:
        """Continue a saved or logged conversation (its record id too, so the log goes on updating it)."""
        self.conversation = conv
        self.messages = [dict(m) for m in conv.messages]
        self.system = conv.system
        self.turns = []

    # ------------------------------------------------------------------ reports
    def totals(self) -> GenerationStats:
        """Session-wide sums (tokens, passes, seconds) and the means they imply."""
        return GenerationStats.total(r.stats for r in self.turns)

    def save(self, path: str | Path) -> Path:
        """Write the conversation record as JSON (the same record the log keeps)."""
        return save_conversation(self.record(), path)

    def command(self, line: str, format_stats: Callable[[GenerationStats], str] | None = None,
                confirm: Callable[[str], bool] | None = None) -> CommandResult:
        """Run a slash command (see HELP). confirm(question) is asked before /save overwrites a file."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        fmt = format_stats or (lambda s: str(s.to_dict()))
        if name in ("/exit", "/quit", "/bye"):
            return CommandResult(leave=True)
        if name in ("/clear", "/reset"):
            self.reset()
            return CommandResult("conversation cleared" + (" (the system message stays)" if self.system else ""))
        if name == "/system":
            self.set_system(arg)
            return CommandResult("system message set" if arg else "system message removed")
        if name == "/stats":
            if not self.turns:
                return CommandResult("no answers yet")
            n = len(self.turns)
            return CommandResult(f"last answer: {fmt(self.turns[-1].stats)}\n"
                                 f"session ({plural(n, 'answer')}): {fmt(self.totals())}")
        if name == "/save":
            if not arg:
                raise ConfigError("/save needs a file name, e.g. /save chat.json")
            target = Path(arg).expanduser()
            if target.exists() and not (confirm is not None and confirm(f"{target} exists; overwrite it?")):
                return CommandResult(f"not saved: {target} exists")
            return CommandResult(f"saved {plural(len(self.messages), 'message')} to {self.save(target)}")
        if name == "/load":
            if not arg:
                raise ConfigError("/load needs a file name, e.g. /load chat.json")
            self.load(load_conversation(arg))
            self._changed()
            return CommandResult(f"loaded {plural(len(self.messages), 'message')} from {arg}")
        if name == "/help":
            return CommandResult(HELP)
        raise ConfigError(f"unknown command {name}; try /help")


HELP = """/system TEXT  set the system message (no TEXT: remove it)
/clear        forget the conversation (also /reset; the system message stays)
/save FILE    write the conversation as JSON (asks before overwriting)
/load FILE    continue a saved conversation
/stats        speed of the last answer and of the session
/exit         leave (also /quit, Ctrl-D)
!multi        type a message over several lines, ending with !end (Esc Enter also adds a line)
Ctrl-C stops an answer; pasting several lines sends them as one message."""


def is_command(line: str) -> bool:
    return line.startswith("/") and len(line) > 1 and not line.startswith("//")

