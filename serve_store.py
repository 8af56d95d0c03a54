"""The service's database (SQLite, WAL): every accepted push and flush, every staged epoch and its revision.

Tables:
- events(wearer_id, seq, kind, received_s, data): each wearer's pushes in the order the stream
  processed them, one row per run of one signal (kind heart_rate, counts, motion, steps; data:
  float64 rows [t, value...] little-endian) or per flush (kind flush: a clock tick, or end_night: a
  flush that also revises what waits; data: [now]). Replaying a wearer's events through a fresh
  stream rebuilds its state exactly (the stream is deterministic).
- wearers(wearer_id, night_seq, next_seq): night_seq is the first event of the wearer's current
  night, so a restart replays only that night.
- epochs(wearer_id, epoch_start, stage, p_wake, p_light, p_deep, p_rem, revised_stage, r_wake,
  r_light, r_deep, r_rem): every staged epoch, once (the primary key refuses a second copy); stage -1
  and NULL probabilities for "no data". The revised stage (a model with a lookahead) is written into
  the epoch's row once it comes: NULL until then.

One writer (the service's batcher, `commit`: one transaction per batch, before any response);
readers open their own connection per thread (WAL: they never block the writer).

Schema versions (PRAGMA user_version): 0, the tables without the revision columns (serve.py before
the revised stage), is migrated in place on open; a version newer than SCHEMA_VERSION is refused.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from realtime import N_VALUES

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    wearer_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, received_s REAL NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (wearer_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS wearers (
    wearer_id TEXT PRIMARY KEY, night_seq INTEGER NOT NULL, next_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS epochs (
    wearer_id TEXT NOT NULL, epoch_start REAL NOT NULL, stage INTEGER NOT NULL,
    p_wake REAL, p_light REAL, p_deep REAL, p_rem REAL,
    revised_stage INTEGER, r_wake REAL, r_light REAL, r_deep REAL, r_rem REAL,
    PRIMARY KEY (wearer_id, epoch_start)) WITHOUT ROWID;
"""
REVISION_COLUMNS = {"revised_stage": "INTEGER", "r_wake": "REAL", "r_light": "REAL", "r_deep": "REAL", "r_rem": "REAL"}
COLUMNS = {"events": ("wearer_id", "seq", "kind", "received_s", "data"),
           "wearers": ("wearer_id", "night_seq", "next_seq"),
           "epochs": ("wearer_id", "epoch_start", "stage", "p_wake", "p_light", "p_deep", "p_rem", *REVISION_COLUMNS)}
FLUSH_KINDS = ("flush", "end_night")  # events holding [now] only


class Event(NamedTuple):
    """One stored push run or flush of a wearer."""
    wearer_id: str
    seq: int
    kind: str
    rows: np.ndarray   # (n, 1 + values): t, value...; a flush: [[now]]


class EpochRow(NamedTuple):
    """An epoch's stage as the batcher writes it: the immediate stage, or (commit's revised) its revision."""
    wearer_id: str
    epoch_start: float
    stage: int
    probabilities: tuple[float, float, float, float] | None


class StoredEpoch(NamedTuple):
    """A stored epoch: its immediate stage, and its revised stage once given (None until then)."""
    wearer_id: str
    epoch_start: float
    stage: int
    probabilities: tuple[float, float, float, float] | None
    revised_stage: int | None = None
    revised_probabilities: tuple[float, float, float, float] | None = None


class WearerRow(NamedTuple):
    wearer_id: str
    night_seq: int
    next_seq: int


class ServiceStore:
    """The database at `path` (created with its tables if missing)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # the writer is used by one thread at a time (the batcher's), not always the same one
        self._writer = self._connect(check_same_thread=False)
        self._migrate()
        # the writer never checkpoints (copying the WAL into the database file would stall the commit
        # that happens to trigger it); checkpoint() does it from another connection, off the event loop
        self._writer.execute("PRAGMA wal_autocheckpoint=0")
        self._local = threading.local()

    def _connect(self, check_same_thread: bool = True) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self.path, check_same_thread=check_same_thread, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as error:
            raise ValueError(f"cannot open the database {self.path}: {error}") from None
        # NORMAL in WAL mode: a commit survives the process being killed (the OS has the write);
        # only a power cut can lose the last transactions
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=10000")
        return connection

    def _migrate(self) -> None:
        """Create the tables, or bring a database of an earlier serve.py to SCHEMA_VERSION (one transaction);
        a newer version, or tables that are not this service's, are refused with a ValueError."""
        db = self._writer
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ValueError(f"the database {self.path} has schema version {version}, newer than this serve.py "
                             f"knows ({SCHEMA_VERSION}): run the serve.py that wrote it, or use another --db")
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, SCHEMA.split(";")):  # not executescript: it would COMMIT first
                db.execute(statement)
            found = {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in COLUMNS}
            if version < 1:  # version 0: epochs without the revision (added as NULL: no epoch revised yet)
                for name, kind in REVISION_COLUMNS.items():
                    if name not in found["epochs"]:
                        db.execute(f"ALTER TABLE epochs ADD COLUMN {name} {kind}")
                        found["epochs"].append(name)
            for table, columns in COLUMNS.items():
                missing = [c for c in columns if c not in found[table]]
                if missing:
                    raise ValueError(f"the database {self.path} is not a serve.py database: its table {table} "
                                     f"lacks {', '.join(missing)}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _reader(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        return connection

    def close(self) -> None:
        self._writer.close()

    # ------------------------------------------------------------------ writing (the batcher only)

    def commit(self, events: Iterable[Event], epochs: Iterable[EpochRow], wearers: Iterable[WearerRow],
               revised: Iterable[EpochRow] = ()) -> int:
        """Store one batch in one transaction: all of it or (after a crash) none of it. revised: revisions
        of epochs stored before or in this batch, each written once (an epoch already revised keeps its
        first). Returns how many revisions found no epoch still waiting for one (0 unless the caller
        sends an epoch's revision twice or one of an epoch never stored)."""
        received = time.time()
        db = self._writer
        db.execute("BEGIN")
        try:
            db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                           [(e.wearer_id, e.seq, e.kind, received,
                             np.ascontiguousarray(e.rows, dtype="<f8").tobytes()) for e in events])
            db.executemany("INSERT INTO epochs (wearer_id, epoch_start, stage, p_wake, p_light, p_deep, p_rem) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(e.wearer_id, e.epoch_start, e.stage, *(e.probabilities or (None,) * 4))
                            for e in epochs])
            revised = [(e.stage, *(e.probabilities or (None,) * 4), e.wearer_id, e.epoch_start) for e in revised]
            updated = db.executemany(
                "UPDATE epochs SET revised_stage = ?, r_wake = ?, r_light = ?, r_deep = ?, r_rem = ? "
                "WHERE wearer_id = ? AND epoch_start = ? AND revised_stage IS NULL", revised).rowcount
            db.executemany("INSERT INTO wearers VALUES (?, ?, ?) ON CONFLICT(wearer_id) DO UPDATE SET "
                           "night_seq = excluded.night_seq, next_seq = excluded.next_seq", list(wearers))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(revised) - max(updated, 0)

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file without blocking the writer (PASSIVE)."""
        self._reader().execute("PRAGMA wal_checkpoint(PASSIVE)")

    # ------------------------------------------------------------------ reading (any thread)

    def wearers(self) -> list[WearerRow]:
        return [WearerRow(*row) for row in self._reader().execute(
            "SELECT wearer_id, night_seq, next_seq FROM wearers ORDER BY wearer_id")]

    def events(self, wearer_id: str, from_seq: int = 0) -> Iterator[Event]:
        """The wearer's events from from_seq on, in order."""
        for seq, kind, data in self._reader().execute(
                "SELECT seq, kind, data FROM events WHERE wearer_id = ? AND seq >= ? ORDER BY seq",
                (wearer_id, from_seq)):
            width = 1 if kind in FLUSH_KINDS else 1 + N_VALUES[kind]  # t, then the signal's values
            yield Event(wearer_id, seq, kind, np.frombuffer(data, dtype="<f8").reshape(-1, width))

    def epochs(self, wearer_id: str, since_s: float = -np.inf, until_s: float = np.inf) -> list[StoredEpoch]:
        """The wearer's stored epochs starting at or after since_s (and before until_s), in time order,
        each with its revision where one was stored."""
        rows = self._reader().execute(
            "SELECT epoch_start, stage, p_wake, p_light, p_deep, p_rem, revised_stage, r_wake, r_light, r_deep, "
            "r_rem FROM epochs WHERE wearer_id = ? AND epoch_start >= ? AND epoch_start < ? ORDER BY epoch_start",
            (wearer_id, max(since_s, -1e300), min(until_s, 1e300)))
        return [StoredEpoch(wearer_id, row[0], row[1], _probabilities(row[2:6]), row[6], _probabilities(row[7:11]))
                for row in rows]

    def epoch_counts(self) -> dict[str, tuple[int, float]]:
        """Per wearer: (stored epochs, start of the last one)."""
        return {w: (n, last) for w, n, last in self._reader().execute(
            "SELECT wearer_id, COUNT(*), MAX(epoch_start) FROM epochs GROUP BY wearer_id")}


def _probabilities(values: tuple) -> tuple[float, float, float, float] | None:
    return None if values[0] is None else tuple(values)
