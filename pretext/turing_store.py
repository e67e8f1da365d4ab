"""Protocol and storage of the colorization Turing test (:mod:`pretext.turing` serves it, :mod:`pretext.turing_report`
analyses it).

The protocol is Zhang et al. 2016, Sec. 3.1: 10 practice pairs with feedback, then 40 test pairs without, 10% of the
test pairs sentinels, each pair shown for one second at 256x256 (PROVENANCE.md "Turing test"). A session's whole plan
is drawn when it starts and written to the database with it; every answer then fills in its trial's row in one
transaction, committed before the server replies with the next pair. SQLite runs in WAL mode with synchronous=FULL, so
a commit survives a killed server (and a power cut).
"""
from __future__ import annotations

import math
import random
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .runtime import UserError

# Protocol defaults (Zhang et al. 2016, Sec. 3.1; see PROVENANCE.md "Turing test").
N_PRACTICE = 10
N_TEST = 40
SENTINEL_FRACTION = 0.1
DISPLAY_MS = 1000
SIZE = 256
GAP_MS = 500  # blank between pairs (crosschannel choice; the paper does not say)

SCHEMA_VERSION = 1
DB_KIND = "crosschannel-turing-test"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    participant TEXT NOT NULL UNIQUE,       -- at most one session per participant (Zhang et al. Sec. 3.1)
    algorithm TEXT NOT NULL,
    real_dir TEXT NOT NULL,
    fake_dir TEXT NOT NULL,
    n_practice INTEGER NOT NULL,
    n_test INTEGER NOT NULL,
    display_ms INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    completion_code TEXT NOT NULL,
    user_agent TEXT
);
CREATE TABLE trials (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    idx INTEGER NOT NULL,                   -- 0-based position in the session (practice first)
    phase TEXT NOT NULL CHECK (phase IN ('practice', 'test')),
    kind TEXT NOT NULL CHECK (kind IN ('algorithm', 'sentinel')),
    image TEXT NOT NULL,                    -- matched name: path relative to the folders, without extension
    donor TEXT,                             -- sentinel: the photo whose colours the fake copies
    fake_side TEXT NOT NULL CHECK (fake_side IN ('left', 'right')),
    choice TEXT CHECK (choice IN ('left', 'right')),   -- the side the participant called fake
    fooled INTEGER CHECK (fooled IN (0, 1)),           -- 1: the real photo was called fake
    rt_ms INTEGER,                          -- response time from the onset of the pair (client clock)
    views INTEGER NOT NULL DEFAULT 0,       -- times the pair was sent (more than 1 after a reload)
    shown_at REAL,
    answered_at REAL,
    PRIMARY KEY (session_id, idx)
);
"""


# --------------------------------------------------------------------------------------------- protocol
@dataclass(frozen=True)
class Protocol:
    n_practice: int = N_PRACTICE
    n_test: int = N_TEST
    sentinel_fraction: float = SENTINEL_FRACTION
    display_ms: int = DISPLAY_MS
    gap_ms: int = GAP_MS
    size: int = SIZE

    @property
    def n_sentinel(self) -> int:
        return int(math.floor(self.n_test * self.sentinel_fraction + 0.5))

    def check(self) -> "Protocol":
        if not 0 <= self.n_practice <= 1000 or not 1 <= self.n_test <= 1000:
            raise UserError(f"--practice must be 0..1000 and --test 1..1000 (got {self.n_practice}, {self.n_test})")
        if not 0.0 <= self.sentinel_fraction < 1.0:
            raise UserError(f"--sentinel-fraction must be in [0, 1) (got {self.sentinel_fraction})")
        if self.n_sentinel >= self.n_test:
            raise UserError("--sentinel-fraction leaves no test pair for the algorithm")
        if not 1 <= self.display_ms <= 60_000 or not 0 <= self.gap_ms <= 60_000:
            raise UserError("--display-ms must be 1..60000 and --gap-ms 0..60000")
        if not 16 <= self.size <= 2048:
            raise UserError(f"--size must be 16..2048 (got {self.size})")
        return self


@dataclass(frozen=True)
class Trial:
    idx: int
    phase: str
    kind: str
    image: str
    donor: str | None
    fake_side: str


def plan_session(names: list[str], proto: Protocol, rng: random.Random) -> list[Trial]:
    """Draw a session: ``n_test`` test pairs (``n_sentinel`` of them sentinels, at random positions), preceded by
    ``n_practice`` practice pairs. Test images are distinct, and practice images differ from them, while the folder
    has enough photos; otherwise photos repeat (the server warns at start-up). The fake's side is random."""
    need = proto.n_test + proto.n_practice
    pool: list[str] = []
    while len(pool) < need:
        pool.extend(rng.sample(names, len(names)))
    test, practice = pool[:proto.n_test], pool[proto.n_test:need]
    sentinel_at = set(rng.sample(range(proto.n_test), proto.n_sentinel))
    trials = []
    for i, image in enumerate(practice + test):
        j = i - proto.n_practice
        sentinel = j in sentinel_at
        donor = rng.choice([n for n in names if n != image]) if sentinel else None
        trials.append(Trial(i, "practice" if j < 0 else "test", "sentinel" if sentinel else "algorithm", image, donor,
                            rng.choice(("left", "right"))))
    return trials


# --------------------------------------------------------------------------------------------- storage
class Conflict(Exception):
    """An answer that does not fit the session's state (replayed, out of order, finished): HTTP 409."""


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """Open a Turing-test database (created if missing unless ``readonly``): WAL journal, synchronous=FULL (a commit
    survives a crash of the process and of the machine), foreign keys on. A file that is not one is a one-line
    :class:`UserError`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a database file")
    if readonly and not path.is_file():
        raise UserError(f"{path}: no such database")
    if not readonly:
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = None
    try:
        if readonly:
            conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False, timeout=10.0)
        else:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        conn.row_factory = sqlite3.Row
        if conn.execute("SELECT name FROM sqlite_master WHERE name='meta'").fetchone():
            row = conn.execute("SELECT value FROM meta WHERE key='kind'").fetchone()
            if row is None or row[0] != DB_KIND:
                raise UserError(f"{path}: not a crosschannel turing-test database")
        elif readonly or conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise UserError(f"{path}: not a crosschannel turing-test database (no turing-test tables)")
        else:
            conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} INSERT INTO meta VALUES ('kind', '{DB_KIND}'), "
                               f"('schema_version', '{SCHEMA_VERSION}'); COMMIT;")
    except (sqlite3.DatabaseError, UserError) as e:
        if conn is not None:
            conn.close()
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: cannot open as a turing-test database ({e})") from None
    return conn


class Store:
    """The database behind the server: one connection, one lock, every write one transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.conn = connect(self.path)
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def session(self, sid: str) -> sqlite3.Row | None:
        with self.lock:
            return self.conn.execute("SELECT * FROM sessions WHERE id=?", (sid,)).fetchone()

    def session_of(self, participant: str) -> sqlite3.Row | None:
        with self.lock:
            return self.conn.execute("SELECT * FROM sessions WHERE participant=?", (participant,)).fetchone()

    def sessions_per_algorithm(self) -> dict[str, int]:
        with self.lock:
            return dict(self.conn.execute("SELECT algorithm, count(*) FROM sessions GROUP BY algorithm").fetchall())

    def create(self, participant: str, algorithm: str, real_dir: str, fake_dir: str, proto: Protocol,
               trials: list[Trial], user_agent: str | None) -> str:
        sid = secrets.token_urlsafe(18)
        with self.lock, self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "INSERT INTO sessions (id, participant, algorithm, real_dir, fake_dir, n_practice, n_test, display_ms,"
                " size, created_at, completion_code, user_agent) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (sid, participant, algorithm, real_dir, fake_dir, proto.n_practice, proto.n_test, proto.display_ms,
                 proto.size, time.time(), secrets.token_hex(4).upper(), (user_agent or "")[:300]))
            self.conn.executemany(
                "INSERT INTO trials (session_id, idx, phase, kind, image, donor, fake_side) VALUES (?,?,?,?,?,?,?)",
                [(sid, t.idx, t.phase, t.kind, t.image, t.donor, t.fake_side) for t in trials])
        return sid

    def next_trial(self, sid: str) -> sqlite3.Row | None:
        """The first unanswered trial (None when the session is complete)."""
        with self.lock:
            return self.conn.execute("SELECT * FROM trials WHERE session_id=? AND choice IS NULL ORDER BY idx LIMIT 1",
                                     (sid,)).fetchone()

    def mark_shown(self, sid: str, idx: int) -> None:
        with self.lock, self.conn:
            self.conn.execute("UPDATE trials SET views = views + 1, shown_at = ? WHERE session_id=? AND idx=?",
                              (time.time(), sid, idx))

    def answer(self, sid: str, idx: int, choice: str, rt_ms: int) -> sqlite3.Row:
        """Record the answer to trial ``idx``, which must be the session's next one; committed when this returns."""
        with self.lock, self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            nxt = self.conn.execute("SELECT * FROM trials WHERE session_id=? AND choice IS NULL ORDER BY idx LIMIT 1",
                                    (sid,)).fetchone()
            if nxt is None:
                raise Conflict("this session is complete")
            if idx != nxt["idx"]:
                what = "already answered" if idx < nxt["idx"] else "not reached yet"
                raise Conflict(f"trial {idx} is {what}; the next trial is {nxt['idx']}")
            fooled = int(choice != nxt["fake_side"])
            now = time.time()
            self.conn.execute("UPDATE trials SET choice=?, fooled=?, rt_ms=?, answered_at=? "
                              "WHERE session_id=? AND idx=? AND choice IS NULL", (choice, fooled, rt_ms, now, sid, idx))
            if idx == self.conn.execute("SELECT max(idx) FROM trials WHERE session_id=?", (sid,)).fetchone()[0]:
                self.conn.execute("UPDATE sessions SET finished_at=? WHERE id=?", (now, sid))
            return nxt
