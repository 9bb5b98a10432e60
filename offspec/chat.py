"""A multi-turn chat session: the history, the chat template, turn -> prompt ids, slash commands, Ctrl-C safety.

Each turn passes the whole templated conversation to the engine; the engine keeps the ids its KV
caches hold and only prefills what is new. No terminal is needed here: the CLI wires input/output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from offspec.errors import ConfigError
from offspec.generate import GenerationConfig, GenerationStats, finalize_stats, stream_text

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


def encode_prompt(tokenizer, text: str, templated: bool) -> list[int]:
    """Token ids for a prompt; a templated prompt already carries its special tokens (no extra BOS)."""
    return list(tokenizer.encode(text, add_special_tokens=not templated))


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
    """History plus an engine; `ask` streams one answer and records it, also when interrupted."""

    engine: object
    tokenizer: object
    cfg: GenerationConfig = field(default_factory=GenerationConfig)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    turns: list[TurnResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cfg.stop_ids and getattr(self.engine, "eos_ids", None):
            self.cfg = replace(self.cfg, stop_ids=tuple(self.engine.eos_ids))
        if not self.messages and self.system:
            self.messages.append({"role": "system", "content": self.system})

    # ------------------------------------------------------------------ prompts
    def prompt_text(self, messages: list[dict] | None = None) -> str:
        return render_prompt(self.tokenizer, self.messages if messages is None else messages)

    def prompt_ids(self, messages: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation (plus the assistant generation prompt)."""
        return encode_prompt(self.tokenizer, self.prompt_text(messages), uses_template(self.tokenizer))

    # ------------------------------------------------------------------ turns
    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> TurnResult:
        """Add a user message, stream the answer through on_text, record it in the history.

        Ctrl-C (KeyboardInterrupt) while answering stops the answer; the partial answer stays in the
        history, marked interrupted, and the session can go on. Errors before any token (e.g. the
        conversation no longer fits the context) remove the user message again and propagate.
        """
        self.messages.append({"role": "user", "content": text})
        stats = GenerationStats()
        pieces: list[str] = []
        interrupted = False
        try:
            ids = self.prompt_ids()
            for ev in stream_text(self.engine, ids, self.cfg, stats):
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
        self.messages.append(msg)
        result = TurnResult(text, finalize_stats(stats), interrupted)
        self.turns.append(result)
        return result

    def reset(self) -> None:
        """Forget the conversation (keeps the system message); the KV caches are reused by prefix."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turns = []

    # ------------------------------------------------------------------ reports
    def totals(self) -> GenerationStats:
        """Session-wide sums (tokens, passes, seconds) and the means they imply."""
        t = GenerationStats()
        for r in self.turns:
            s = r.stats
            t.tokens += s.tokens
            t.passes += s.passes
            t.target_pass_s += s.target_pass_s * s.passes
            t.draft_s += s.draft_s
            t.decode_s += s.decode_s
            t.prefill_s += s.prefill_s
            t.prefill_tokens += s.prefill_tokens
            t.streamed_bytes += s.streamed_bytes
            t.budget += s.budget * s.passes
        p = max(t.passes, 1)
        t.tokens_per_pass = t.tokens / p
        t.tok_per_s = t.tokens / t.decode_s if t.decode_s > 0 else 0.0
        t.streamed_gbps = t.streamed_bytes / t.target_pass_s / 1e9 if t.target_pass_s > 0 else 0.0
        t.target_pass_s /= p
        t.budget /= p
        return t

    def save(self, path: str | Path) -> Path:
        """Write the messages as JSON (interrupted answers carry "interrupted": true)."""
        path = Path(path).expanduser()
        try:
            path.write_text(json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path

    def command(self, line: str, format_stats: Callable[[GenerationStats], str] | None = None) -> CommandResult:
        """Run a slash command: /reset, /stats, /save FILE, /exit (also /quit, /help)."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        fmt = format_stats or (lambda s: str(s.to_dict()))
        if name in ("/exit", "/quit"):
            return CommandResult(leave=True)
        if name == "/reset":
            self.reset()
            return CommandResult("conversation cleared")
        if name == "/stats":
            if not self.turns:
                return CommandResult("no answers yet")
            return CommandResult(f"last answer: {fmt(self.turns[-1].stats)}\n"
                                 f"session ({len(self.turns)} answers): {fmt(self.totals())}")
        if name == "/save":
            if not arg:
                raise ConfigError("/save needs a file name, e.g. /save chat.json")
            return CommandResult(f"saved {len(self.messages)} messages to {self.save(arg)}")
        if name == "/help":
            return CommandResult("/reset  forget the conversation\n/stats  speed of the last answer and the session\n"
                                 "/save FILE  write the messages as JSON\n/exit  leave (or Ctrl-D)")
        raise ConfigError(f"unknown command {name}; try /help")


def is_command(line: str) -> bool:
    return line.startswith("/") and len(line) > 1 and not line.startswith("//")

