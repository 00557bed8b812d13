"""Conversations in SQLite: a versioned schema, images kept by content hash in the data directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from mm1_mlx.errors import MM1Error

DB_NAME = "chat.db"
ENV_DATA_DIR = "MM1_CHAT_DATA_DIR"
BUSY_TIMEOUT_S = 10.0  # wait this long for another writer before reporting "locked"

# each entry upgrades the schema by one version; never edit a released one, append a new one
MIGRATIONS = [
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL,
        model TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        finish TEXT,
        created REAL NOT NULL
    );
    CREATE TABLE images (
        hash TEXT PRIMARY KEY,
        filename TEXT NOT NULL,
        original_path TEXT
    );
    CREATE TABLE message_images (
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        hash TEXT NOT NULL REFERENCES images(hash),
        PRIMARY KEY (message_id, position)
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]


def data_dir() -> Path:
    """$MM1_CHAT_DATA_DIR, or the platform's user data directory."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("mm1-chat", appauthor=False))


@dataclass
class Conversation:
    id: int
    title: str
    model: str | None = None


@dataclass
class StoredMessage:
    role: str
    content: str
    images: list[str] = field(default_factory=list)  # paths of the stored copies
    finish: str | None = None
    id: int | None = None


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StoreError(MM1Error):
    """The data directory or database cannot be used (locked, read-only, not creatable)."""


def damaged(e: sqlite3.DatabaseError) -> bool:
    """A database that is really corrupt, as opposed to busy, locked or read-only."""
    text = str(e).lower()
    return isinstance(e, Damaged) or any(s in text for s in (
        "not a database", "malformed", "corrupt", "file is encrypted"))


class Damaged(sqlite3.DatabaseError):
    pass


class Store:
    """One SQLite file plus an ``images/`` folder. ``recovered`` names a corrupted file moved aside.

    A database locked by another writer is waited for (``BUSY_TIMEOUT_S``), then reported
    (StoreError); only a damaged one (not a database, malformed, failing its integrity check) is
    moved aside."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.dir = Path(directory) if directory is not None else data_dir()
        self.images_dir = self.dir / "images"
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the chat data directory {self.images_dir}: "
                             f"{e.strerror or e}") from None
        if not os.access(self.dir, os.W_OK):
            raise StoreError(f"the chat data directory {self.dir} is read-only; choose another "
                             "with --data-dir")
        self.path = self.dir / DB_NAME
        self.recovered: Path | None = None
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            if not damaged(e):
                raise self._error(e) from None
            self.recovered = self._move_aside()
            self.db = self._open()

    def _error(self, e: sqlite3.DatabaseError) -> StoreError:
        text = str(e).lower()
        if "locked" in text or "busy" in text:
            return StoreError(f"the chat database {self.path} is locked by another program "
                              f"(waited {BUSY_TIMEOUT_S:.0f} s); close it and try again")
        return StoreError(f"cannot open the chat database {self.path}: {e}")

    # ---- schema ----
    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False,
                             isolation_level=None)
        db.text_factory = lambda b: b.decode("utf-8", "replace")  # bytes another tool wrote
        try:
            db.execute("PRAGMA foreign_keys = ON")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise Damaged("integrity check failed")
            self._migrate(db)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.path.with_name(f"{DB_NAME}.corrupt-{stamp}")
        os.replace(self.path, dest)
        for suffix in ("-wal", "-shm", "-journal"):
            side = self.path.with_name(DB_NAME + suffix)
            if side.exists():
                os.replace(side, dest.with_name(dest.name + suffix))
        return dest

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, applied REAL)")
        done = db.execute("SELECT COALESCE(MAX(version), 0) FROM migrations").fetchone()[0]
        for version, script in enumerate(MIGRATIONS[done:], start=done + 1):
            db.executescript(f"BEGIN; {script}; INSERT INTO migrations VALUES ({version}, "
                             f"{time.time()}); COMMIT;")

    @property
    def version(self) -> int:
        return self.db.execute("SELECT MAX(version) FROM migrations").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    # ---- conversations ----
    def new_conversation(self, title: str = "New chat", model: str | None = None) -> Conversation:
        now = time.time()
        cur = self.db.execute("INSERT INTO conversations (title, model, created, updated) "
                              "VALUES (?, ?, ?, ?)", (title, model, now, now))
        return Conversation(cur.lastrowid, title, model)

    def conversations(self) -> list[Conversation]:
        rows = self.db.execute("SELECT id, title, model FROM conversations ORDER BY updated DESC, id DESC")
        return [Conversation(*r) for r in rows]

    def conversation(self, conv_id: int) -> Conversation | None:
        row = self.db.execute("SELECT id, title, model FROM conversations WHERE id = ?",
                              (conv_id,)).fetchone()
        return Conversation(*row) if row else None

    def rename(self, conv_id: int, title: str) -> None:
        self.db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conv_id))

    def delete(self, conv_id: int) -> None:
        self.db.execute("DELETE FROM conversations WHERE id = ?", (conv_id,))

    # ---- messages ----
    def add_message(self, conv_id: int, role: str, content: str, images: list[str] = (),
                    finish: str | None = None) -> StoredMessage:
        """Save a message; ``images`` are paths returned by ``add_image``."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute("INSERT INTO messages (conversation_id, role, content, finish, created) "
                                  "VALUES (?, ?, ?, ?, ?)", (conv_id, role, content, finish, now))
            for i, path in enumerate(images):
                self.db.execute("INSERT INTO message_images VALUES (?, ?, ?)",
                                (cur.lastrowid, i, Path(path).stem))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conv_id))
        return StoredMessage(role, content, list(images), finish, cur.lastrowid)

    def update_message(self, msg_id: int, content: str, finish: str | None) -> None:
        self.db.execute("UPDATE messages SET content = ?, finish = ? WHERE id = ?",
                        (content, finish, msg_id))

    def messages(self, conv_id: int) -> list[StoredMessage]:
        rows = self.db.execute("SELECT id, role, content, finish FROM messages WHERE conversation_id = ? "
                               "ORDER BY id", (conv_id,)).fetchall()
        out = []
        for mid, role, content, finish in rows:
            imgs = self.db.execute(
                "SELECT i.filename FROM message_images m JOIN images i ON i.hash = m.hash "
                "WHERE m.message_id = ? ORDER BY m.position", (mid,))
            out.append(StoredMessage(role, content, [str(self.images_dir / f) for (f,) in imgs],
                                     finish, mid))
        return out

    # ---- images ----
    def add_image(self, path: str | os.PathLike) -> str:
        """Copy an image into the data directory under its content hash; returns the copy's path."""
        digest = file_hash(path)
        name = digest + Path(path).suffix.lower()
        dest = self.images_dir / name
        if not dest.exists():
            tmp = dest.with_name(f".{name}.{os.getpid()}.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        self.db.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?)",
                        (digest, name, os.path.abspath(path)))
        return str(dest)

    # ---- settings ----
    def get_setting(self, key: str, default=None):
        """The stored value, or ``default`` if absent or not valid JSON (a hand-edited row)."""
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        try:
            return json.loads(row[0]) if row else default
        except (ValueError, TypeError, RecursionError):
            return default

    def get_strings(self, key: str) -> list[str]:
        """A stored list of strings (anything else in the row reads as empty)."""
        value = self.get_setting(key, [])
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    def set_setting(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, json.dumps(value)))
