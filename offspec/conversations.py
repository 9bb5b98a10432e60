"""Conversation records: one JSON shape for `/save` files and the SQLite log, and the one loader both read back.

The log is `$OFFSPEC_HOME/logs.db` (one row per conversation, the record as JSON). It is on by default,
as in `llm`; `--no-log` skips it for one run and `offspec logs --off` until `offspec logs --on`.
Nothing here imports torch.
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from offspec.errors import ConfigError
from offspec.paths import offspec_home

FORMAT = "offspec-conversation/1"
ROLES = ("system", "user", "assistant")
LOG_FILE = "logs.db"
OFF_MARKER = "logs-off"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Conversation:
    """Messages plus where they came from; `/save` writes `to_dict()` and the log stores the same."""

    messages: list[dict] = field(default_factory=list)
    command: str = "chat"  # "chat" | "generate"
    model: str | None = None
    draft: str | None = None
    options: dict = field(default_factory=dict)  # sampling settings the answers were made with
    id: str = field(default_factory=new_id)
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)

    @property
    def system(self) -> str | None:
        return next((m["content"] for m in self.messages if m["role"] == "system"), None)

    @property
    def answers(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: object, source: str) -> Conversation:
        """A record from a saved file or the log; also a bare {"messages": [...]} or message list. ConfigError if malformed."""
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ConfigError(f"{source}: not a conversation (expected a JSON object with \"messages\")")
        messages = []
        for i, m in enumerate(data["messages"]):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ConfigError(f"{source}: message {i} needs a role ({', '.join(ROLES)}) and a text content")
            messages.append(dict(m))
        keep = {k: data[k] for k in ("command", "model", "draft", "id", "created", "updated")
                if isinstance(data.get(k), str)}
        options = data.get("options") if isinstance(data.get("options"), dict) else {}
        return cls(messages=messages, options=options, **keep)


def save_conversation(conv: Conversation, path: str | Path) -> Path:
    """Write the record as JSON (interrupted answers carry "interrupted": true)."""
    path = Path(path).expanduser()
    try:
        path.write_text(json.dumps(conv.to_dict(), indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def load_conversation(path: str | Path | None = None, log: ConversationLog | None = None) -> Conversation:
    """The one loader: a saved file (`--load`, `/load`), or the latest logged conversation (`--continue`)."""
    if path is not None:
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {p}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{p}: not JSON ({exc})") from None
        return Conversation.from_dict(data, str(p))
    log = log or ConversationLog()
    rows = log.list(1)
    if not rows:
        raise ConfigError(f"no logged conversation to continue in {log.path}")
    return rows[0]


class ConversationLog:
    """The SQLite log under OFFSPEC_HOME: `write` upserts a record by id; `list` gives the newest first."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home or offspec_home()
        self.path = self.home / LOG_FILE

    @property
    def enabled(self) -> bool:
        return not (self.home / OFF_MARKER).exists()

    def set_enabled(self, on: bool) -> None:
        marker = self.home / OFF_MARKER
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            marker.unlink(missing_ok=True) if on else marker.touch()
        except OSError as exc:
            raise ConfigError(f"cannot change logging in {self.home}: {exc.strerror or exc}") from None

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if not create and not self.path.exists():
            return None
        if create:
            self.home.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path)
        db.execute("CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, command TEXT, model TEXT, "
                   "created TEXT, updated TEXT, record TEXT NOT NULL)")
        return db

    def write(self, conv: Conversation) -> None:
        """Insert or update the conversation (raises OSError / sqlite3.Error when the folder is not writable)."""
        conv.updated = now_iso()
        db = self._connect(create=True)
        with db:
            db.execute("INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?, ?, ?)",
                       (conv.id, conv.command, conv.model, conv.created, conv.updated,
                        json.dumps(conv.to_dict(), ensure_ascii=False)))
        db.close()

    def list(self, limit: int | None = None) -> list[Conversation]:
        try:
            db = self._connect(create=False)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot read the log {self.path}: {exc}") from None
        if db is None:
            return []
        sql = "SELECT record FROM conversations ORDER BY updated DESC, rowid DESC"
        rows = db.execute(sql + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
        db.close()
        return [Conversation.from_dict(json.loads(r[0]), f"{self.path}") for r in rows]


class Recorder:
    """Writes a conversation to the log after each answer; if the log cannot be written, warns once and stops."""

    def __init__(self, log: ConversationLog | None, warn) -> None:
        self.log, self.warn = log, warn

    def __call__(self, conv: Conversation) -> None:
        if self.log is None:
            return
        try:
            self.log.write(conv)
        except (OSError, sqlite3.Error) as exc:
            self.warn(f"warning: not logging this conversation: cannot write {self.log.path} "
                      f"({getattr(exc, 'strerror', None) or exc}); --no-log skips the log")
            self.log = None
