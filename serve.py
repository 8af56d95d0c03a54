"""Real-time sleep staging as a service: HTTP + WebSocket API, a live page, every reading kept in SQLite.

    python serve.py                                   # http://127.0.0.1:8000, causal hybrid, ./sleep.db
    python serve.py --host 0.0.0.0 --token SECRET     # reachable from other machines: needs a token

API (docs/service.md has curl examples):
    POST /v1/wearers/{id}/readings  {"heart_rate": [[t, bpm]...], "counts": [[t, count]...],
                                     "acceleration": [[t, x, y, z]...], "steps": [[t, steps]...]}
    POST /v1/readings               {"<id>": {same body}, ...}
    POST /v1/wearers/{id}/flush     {"now": t}  (a clock tick; "revise": true at the night's end)
    GET  /v1/wearers                GET /v1/wearers/{id}/epochs?since=t    GET /v1/wearers/{id}/summary
    WS   /v1/wearers/{id}/live      GET /  (live page)    GET /healthz    GET /metrics
t: Unix seconds (number) or an ISO-8601 string with a UTC offset. An unknown wearer is a 404 (live: close
code 4404). Limits: body size, nesting, wearers per request and per process (docs/service.md#limits).

Each wearer is one realtime.StreamingStager (the stream's rules unchanged: late, duplicate and
implausible readings are dropped and counted in "stats"), all of them in one StagerPool. Within one
push, all readings of all signals are taken in timestamp order (as `inference_hybrid.py --realtime`
replays a recorded night). Requests queue for a batcher that ingests everything queued, stages
every epoch this closed in one model call, writes the readings and epochs to the database in one
transaction and only then answers: an answered push is stored. A model with a lookahead also revises
earlier epochs in that call: the revisions are answered ("revised", beside "epochs"), stored in the same
transaction and sent on the live feed. On start the stream of each wearer is rebuilt by replaying its
stored events of the current night, so after a crash the next pushes give what an uninterrupted run
gives, revisions included.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np
import orjson
import torch
from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

import data_loader as dl
import features
from checkpoint import ARCHITECTURES, load_model_from_checkpoint
from evaluation import NO_DATA_COLOR, STAGE_COLORS, single_thread
from realtime import (StagedEpoch, StagerPool, StreamingStager, lookahead_of, new_stats, stage_pending,
                      time_ordered_runs)
from serve_store import FLUSH_KINDS, EpochRow, Event, ServiceStore, StoredEpoch, WearerRow
from sleep_metrics import night_metrics

log = logging.getLogger("serve")

PAGE = Path(__file__).resolve().parent / "static" / "live.html"
DEFAULT_CHECKPOINT = ARCHITECTURES["hybrid"].shipped(causal=True)
WEARER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SIGNALS = {"heart_rate": ("heart_rate", ("bpm",)), "counts": ("counts", ("count",)),
           "acceleration": ("motion", ("x", "y", "z")), "steps": ("steps", ("steps",))}  # API name: (stream kind, values)
MIN_TIME_S, MAX_TIME_S = 0.0, 1e10   # Unix seconds, 1970 to 2286: milliseconds (~1.7e12) are refused
MAX_AHEAD_S = 24 * 3600.0            # and anything more than a day ahead of this server's clock
STAGE_NAMES = {-1: "no data", **dict(enumerate(dl.STAGE_NAMES))}
DROP_REASONS = ("late", "before_start", "duplicates", "non_finite", "out_of_range", "ignored_counts")
TOKEN_ENV = "SLEEP_STAGING_TOKEN"
PALETTE = {"stages": STAGE_COLORS, "no_data": NO_DATA_COLOR}  # the live page draws in the PNG reports' colours
MAX_JSON_DEPTH = 8                  # a body nests arrays and objects 4 deep at most; deeper is refused unparsed
MAX_REQUEST_WEARERS = 5000          # wearers one gateway request may name (--max-request-wearers)
MAX_WEARERS = 50_000                # wearers one process holds a stream for (--max-wearers)


# ----------------------------------------------------------------------------- input

class BadInput(HTTPException):
    def __init__(self, detail: str, status_code: int = 422):
        super().__init__(status_code=status_code, detail=detail)


def parse_time(value: Any, where: str) -> float:
    """Unix seconds from a number or an ISO-8601 string with a UTC offset."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise BadInput(f"{where}: {value[:40]!r} is not an ISO-8601 time") from None
        if parsed.tzinfo is None:
            raise BadInput(f"{where}: {value[:40]!r} has no UTC offset (add Z or +hh:mm)")
        seconds = parsed.timestamp()
    elif type(value) in (int, float):
        seconds = float(value)
    else:
        raise BadInput(f"{where}: expected Unix seconds (a number) or an ISO-8601 string, got {_show(value)}")
    if not MIN_TIME_S <= seconds <= MAX_TIME_S:
        hint = " (milliseconds? send seconds)" if seconds > MAX_TIME_S else ""
        raise BadInput(f"{where}: {value!r} is not a plausible time in Unix seconds{hint}")
    if seconds > time.time() + MAX_AHEAD_S:  # would start a night in the future and stall the wearer's stream
        raise BadInput(f"{where}: {value!r} is more than {MAX_AHEAD_S / 3600:g} h ahead of this server's clock")
    return seconds


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_wearer_id(wearer_id: str) -> str:
    if not WEARER_ID.fullmatch(wearer_id):
        raise BadInput(f"wearer id {_show(wearer_id)} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return wearer_id


def parse_readings(body: Any, where: str = "") -> list[tuple[str, np.ndarray]]:
    """A readings body → [(stream kind, rows (n, 1 + values): t, value...)], one entry per signal given."""
    if not isinstance(body, dict):
        raise BadInput(f"{where.rstrip('.') or 'body'}: expected a JSON object with any of {', '.join(SIGNALS)}")
    out = []
    for name, value in body.items():
        if name not in SIGNALS:
            raise BadInput(f"{where}{name}: unknown field; known: {', '.join(SIGNALS)}")
        kind, values = SIGNALS[name]
        shape = "[t, " + ", ".join(values) + "]"
        if not isinstance(value, list):
            raise BadInput(f"{where}{name}: expected a list of {shape} rows, got {_show(value)}")
        rows = np.empty((len(value), 1 + len(values)))
        for i, row in enumerate(value):
            if type(row) is not list or len(row) != 1 + len(values):
                raise BadInput(f"{where}{name}[{i}]: expected {shape}, got {_show(row)}")
            rows[i, 0] = parse_time(row[0], f"{where}{name}[{i}][0]")
            for j in range(1, len(row)):
                x = row[j]
                if type(x) not in (int, float) or not math.isfinite(x):
                    raise BadInput(f"{where}{name}[{i}][{j}] ({values[j - 1]}): expected a finite number, "
                                   f"got {_show(x)}")
                rows[i, j] = x
        out.append((kind, rows))
    return out


def parse_flush(body: Any) -> tuple[float, bool]:
    """A flush body → (now, revise): {"now": t} is a clock tick; "revise": true also ends the night for
    the revised stage (every epoch still waiting for its look-ahead is revised now)."""
    if not isinstance(body, dict) or "now" not in body:
        raise BadInput('body: expected {"now": t} or {"now": t, "revise": true}')
    unknown = sorted(set(body) - {"now", "revise"})
    if unknown:
        raise BadInput(f"{unknown[0]}: unknown field; known: now, revise")
    revise = body.get("revise", False)
    if type(revise) is not bool:
        raise BadInput(f"revise: expected true or false, got {_show(revise)}")
    return parse_time(body["now"], "now"), revise


def _object(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice in one object")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number in JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a float")
    return value


_BRACKETS = np.zeros(256, np.int8)
_BRACKETS[[ord("["), ord("{")]], _BRACKETS[[ord("]"), ord("}")]] = 1, -1


def json_depth(raw: bytes) -> int:
    """How deep a JSON text nests arrays and objects, found without parsing it (the parser recurses
    once per level: thousands of levels end in a RecursionError). Exact for valid JSON; for invalid
    JSON some number, and the parser refuses the text anyway."""
    # escapes first, left to right as JSON reads them: an escaped quote neither opens nor closes a string
    data = np.frombuffer(raw.replace(b"\\\\", b"__").replace(b'\\"', b"__"), np.uint8)
    step = _BRACKETS[data]
    at = np.flatnonzero(step)
    outside = np.searchsorted(np.flatnonzero(data == ord('"')), at) % 2 == 0  # brackets inside strings do not nest
    return int(np.cumsum(step[at][outside], dtype=np.int64).max(initial=0))


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request's JSON body (Content-Type application/json), refusing bodies over max_bytes before
    reading them whole, bodies nested deeper than MAX_JSON_DEPTH before parsing them, and objects with
    a key twice (the standard library parser: it can say so)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        # also keeps other web sites' pages from posting readings (a form post cannot send this type)
        raise BadInput(f"Content-Type must be application/json, got {content_type or 'none'!r}", 415)
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise BadInput(f"Content-Length {declared[:20]!r} is not a number", 400)
    if declared is not None and int(declared) > max_bytes:
        raise BadInput(f"body of {declared} bytes is over the limit of {max_bytes} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadInput(f"body is over the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise BadInput(f"malformed JSON: nested {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed "
                       f"(a gateway body needs 4)", 400)
    try:
        return json.loads(raw, object_pairs_hook=_object, parse_constant=_no_constant, parse_float=_finite)
    except ValueError as error:  # JSONDecodeError, bad UTF-8, a duplicate key, NaN, 1e400
        raise BadInput(f"malformed JSON: {error}", 400) from None
    except RecursionError:  # only invalid JSON gets past json_depth this deep; still the client's error
        raise BadInput(f"malformed JSON: nested more than {MAX_JSON_DEPTH} levels deep", 400) from None


# ----------------------------------------------------------------------------- the service

class Work(NamedTuple):
    """One wearer's part of a request: its readings by signal (parse_readings), or a flush (revise: the
    night's end for the revised stage)."""
    wearer_id: str
    runs: list[tuple[str, np.ndarray]]
    flush_s: float | None = None
    revise: bool = False


class Job(NamedTuple):
    """A request waiting for the batcher: per work, (wearer, epochs it closed, its stats)."""
    results: list[tuple[str, int, dict]]
    future: asyncio.Future


LIVE_QUEUE = 1000  # messages a live client may fall behind before it is dropped (it resumes with ?since=)
UNKNOWN_WEARER = 4404  # WebSocket close code: no such wearer (yet); the page asks again later


def end_feed(queue: asyncio.Queue) -> None:
    """End a live feed: drop what it holds, then the end marker."""
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(None)


def stage_json(epoch_start: float, stage: int, probabilities) -> dict:
    """One answered epoch (immediate or revised): its start, stage, stage name and probabilities (null: no data)."""
    stage = int(stage)
    probabilities = None if stage < 0 or probabilities is None else [float(p) for p in probabilities]
    return {"epoch_start": float(epoch_start), "stage": stage, "stage_name": STAGE_NAMES[stage],
            "probabilities": probabilities}


def epoch_json(epoch: StagedEpoch) -> dict:
    return stage_json(epoch.epoch_start_s, epoch.stage, epoch.probabilities)


def epoch_rows(by_wearer: dict[str, list[StagedEpoch]]) -> list[EpochRow]:
    """Staged epochs (immediate or revised), by wearer, as the store takes them."""
    return [EpochRow(w, e.epoch_start_s, int(e.stage), None if e.stage < 0 else tuple(map(float, e.probabilities)))
            for w, epochs in by_wearer.items() for e in epochs]


def stored_json(row: StoredEpoch) -> dict:
    """A stored epoch as GET .../epochs gives it: the latest stage (the revision once it came), whether it
    is revised, and the immediate stage beside it."""
    revised = row.revised_stage is not None
    immediate = stage_json(row.epoch_start, row.stage, row.probabilities)
    latest = stage_json(row.epoch_start, row.revised_stage, row.revised_probabilities) if revised else immediate
    return {**latest, "revised": revised, "immediate_stage": immediate["stage"],
            "immediate_probabilities": immediate["probabilities"]}


def live_backlog(rows: list[StoredEpoch]) -> list[dict]:
    """Stored epochs as the live feed sends them: each immediate epoch, then one {"revised": [...]} message
    with the revisions stored so far (the order live messages came in)."""
    messages = [stage_json(r.epoch_start, r.stage, r.probabilities) for r in rows]
    revised = [stage_json(r.epoch_start, r.revised_stage, r.revised_probabilities)
               for r in rows if r.revised_stage is not None]
    return messages + ([{"revised": revised}] if revised else [])


def merged_runs(runs: list[tuple[str, np.ndarray]], stager: StreamingStager) -> list[tuple[str, np.ndarray]]:
    """All signals of one push in timestamp order (stable), as runs of one signal each, for this stager.

    When no reading can start a new night (none more than max_gap_s after the stager's clock), the runs
    are grouped by epoch instead, which gives the same result in fewer stream calls
    (realtime.time_ordered_runs); the service's epochs are on the 30 s grid."""
    times = [t for _, rows in runs for t in rows[:, 0].tolist()]
    if not times:
        return []
    known = [x for x in (stager.clock, stager.start_s) if x is not None]
    reference = max(known) if known else math.floor(min(times) / features.EPOCH_S) * features.EPOCH_S
    grouped = max(times) - reference <= stager.max_gap_s
    return list(time_ordered_runs(dict(runs), epoch_grid_s=0.0 if grouped else None))


class Metrics:
    def __init__(self):
        disable_created_metrics()  # the *_created series only add noise here
        self.registry = CollectorRegistry()
        self.wearers = Gauge("sleep_staging_wearers", "Wearers with a stream", registry=self.registry)
        self.accepted = Counter("sleep_staging_readings_accepted", "Readings accepted", registry=self.registry)
        self.dropped = Counter("sleep_staging_readings_dropped", "Readings dropped, by reason", ["reason"],
                               registry=self.registry)
        self.epochs = Counter("sleep_staging_epochs_staged", "Epochs closed and staged, by stage", ["stage"],
                              registry=self.registry)
        self.revised = Counter("sleep_staging_epochs_revised", "Epochs revised (a model with a lookahead), by "
                               "revised stage", ["stage"], registry=self.registry)
        self.batch = Histogram("sleep_staging_batch_epochs", "Epochs staged per model call", registry=self.registry,
                               buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384))
        self.batch_seconds = Histogram("sleep_staging_batch_seconds", "Time to stage and store one batch",
                                       registry=self.registry,
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.latency = Histogram("sleep_staging_request_seconds", "Request latency, by route", ["route"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for stage in STAGE_NAMES.values():
            self.epochs.labels(stage)
            self.revised.labels(stage)


class Service:
    """The wearers' streams (one StagerPool), the database and the batcher that joins them."""

    def __init__(self, checkpoint: str | Path, db: str | Path, *, max_delay_s: float = 0.0,
                 max_body_bytes: int = 8 << 20, batch_interval_s: float = 0.02, max_wearers: int = MAX_WEARERS,
                 max_request_wearers: int = MAX_REQUEST_WEARERS, on_failure=None):
        model, scaler, ckpt = load_model_from_checkpoint(checkpoint)
        self.pool = StagerPool(model, scaler, ckpt, batch_size=128, start_s=None, max_delay_s=max_delay_s)
        self.lookahead = lookahead_of(model)  # epochs after which an epoch is revised (0: never)
        self.store = ServiceStore(db)
        self.max_body_bytes, self.batch_interval_s = max_body_bytes, batch_interval_s
        self.max_wearers, self.max_request_wearers = max_wearers, max_request_wearers
        self.metrics = Metrics()
        self.next_seq: dict[str, int] = {}
        self.night_seq: dict[str, int] = {}
        self.subscribers: dict[str, set[asyncio.Queue]] = {}
        self._jobs: list[Job] = []
        self._events: list[Event] = []
        self._touched: set[str] = set()
        self.failed: str | None = None
        self.on_failure = on_failure
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._checkpointer: asyncio.Task | None = None
        self.rebuild()

    def rebuild(self) -> None:
        """Each stored wearer's stream, replayed from the first event of its current night. Those epochs and
        their revisions were staged and stored before the restart: they are not staged again. A model with
        a lookahead runs once more on the windows that add to a waiting epoch's revision and on each
        stream's latest window while epochs wait, for the later windows and a night's end to revise them."""
        wearers, started, n_events = self.store.wearers(), time.perf_counter(), 0
        for i, wearer in enumerate(wearers):
            for event in self.store.events(wearer.wearer_id, wearer.night_seq):
                self._apply(event.wearer_id, event.kind, event.rows)
                n_events += 1
            self.next_seq[wearer.wearer_id], self.night_seq[wearer.wearer_id] = wearer.next_seq, wearer.night_seq
            if (i + 1) % 100 == 0:
                self._settle_replayed()
                log.info("rebuilding streams: %d of %d wearers", i + 1, len(wearers))
        self._settle_replayed()
        self.metrics.wearers.set(len(self.pool))
        if wearers:
            log.info("rebuilt %d wearers' streams (%d stored events) from %s in %.1f s", len(wearers), n_events,
                     self.store.path, time.perf_counter() - started)
        if len(wearers) >= self.max_wearers:  # stored wearers are all kept; only new ones are refused
            log.warning("the database holds %d wearers, --max-wearers is %d: new wearers are refused",
                        len(wearers), self.max_wearers)

    def _settle_replayed(self) -> None:
        with single_thread():  # a whole-night model steps in take_replayed (as in take_pending below)
            _, needed = self.pool.take_replayed()
            if needed:
                stage_pending(self.pool.model, self.pool.scaler, int(self.pool.checkpoint["target_pos"]), needed,
                              self.pool.batch_size)  # the immediate stages were stored before

    def _apply(self, wearer_id: str, kind: str, rows: np.ndarray) -> None:
        if kind in FLUSH_KINDS:  # flush: a clock tick; end_night: a flush that also revises what waits
            self.pool.flush(float(rows[0, 0]), [wearer_id], revise=kind == "end_night")
        else:
            self.pool.push(wearer_id, kind, rows[:, 0], *rows[:, 1:].T)

    # ------------------------------------------------------------------ the batcher

    async def start(self) -> None:
        # Everything loaded so far (torch, pandas, the model, the rebuilt streams) lives as long as the
        # process: keep it out of the collector's full passes, which otherwise stall the loop (docs/service.md)
        gc.collect()
        gc.freeze()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run())
        self._checkpointer = asyncio.create_task(self._checkpoint_every(5.0))

    async def _checkpoint_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await asyncio.to_thread(self.store.checkpoint)
            except Exception as error:  # the log just grows until the next try
                log.warning("WAL checkpoint failed: %s", error)

    async def stop(self) -> None:
        for queues in self.subscribers.values():  # end the live feeds
            for queue in queues:
                end_feed(queue)
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(HTTPException(503, "the service is shutting down"))
        for task in (self._task, self._checkpointer):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self.store.close()

    async def submit(self, works: list[Work]) -> list[dict]:
        """Ingest works now (in arrival order), then wait for the batcher: {"epochs", "revised", "stats"} per
        work, once its readings, epochs and revisions are stored."""
        if self.failed is not None:
            raise HTTPException(503, f"the service stopped accepting readings after a storage failure "
                                     f"({self.failed}); restart it: it rebuilds from the database")
        new = {work.wearer_id for work in works} - self.pool.stagers.keys()
        if new and len(self.pool) + len(new) > self.max_wearers:
            # each stream stays in memory for good: past the limit, one client could exhaust it
            raise HTTPException(503, f"this service holds {len(self.pool)} wearers and its limit is "
                                     f"{self.max_wearers} (--max-wearers); this request names {len(new)} new "
                                     f"wearer(s): raise the limit or send them to another replica")
        try:
            results = [self._ingest(work) for work in works]
        except Exception as error:  # a stream half-updated: only a rebuild from the database is sure
            self._fail(error)
            raise HTTPException(503, f"staging failed: {self.failed}") from None
        future = asyncio.get_running_loop().create_future()
        self._jobs.append(Job(results, future))
        self._wake.set()
        return await future

    def _ingest(self, work: Work) -> tuple[str, int, dict]:
        wearer = work.wearer_id
        stager = self.pool[wearer]
        before_stats, before_waiting = dict(stager.stats), stager.n_waiting
        first_seq = seq = self.next_seq.get(wearer, 0)
        for kind, rows in merged_runs(work.runs, stager):
            self._apply(wearer, kind, rows)
            self._events.append(Event(wearer, seq, kind, rows))
            seq += 1
        if work.flush_s is not None:
            rows, kind = np.array([[work.flush_s]]), "end_night" if work.revise else "flush"
            self._apply(wearer, kind, rows)
            self._events.append(Event(wearer, seq, kind, rows))
            seq += 1
        self.next_seq[wearer] = seq
        if stager.stats["new_nights"] > before_stats["new_nights"] or wearer not in self.night_seq:
            # replaying from this push's first event rebuilds the new night (see docs/service.md)
            self.night_seq[wearer] = first_seq
        self._touched.add(wearer)
        return wearer, stager.n_waiting - before_waiting, {k: stager.stats[k] - before_stats[k] for k in before_stats}

    async def _run(self) -> None:
        last = -math.inf
        while True:
            await self._wake.wait()
            # at most one model call per batch_interval_s: a call has a fixed cost of about a millisecond,
            # so a batch of one window per request would spend most of the CPU on it
            await asyncio.sleep(max(last + self.batch_interval_s - time.perf_counter(), 0.0))
            last = time.perf_counter()
            self._wake.clear()
            # everything ingested so far, taken at once (no await in between)
            jobs, self._jobs = self._jobs, []
            events, self._events = self._events, []
            touched, self._touched = self._touched, set()
            if not jobs:
                continue
            t0 = time.perf_counter()
            try:
                with single_thread():  # a whole-night model steps while the feature rows are made: on this core
                    owners, pending = self.pool.take_pending()
                wearer_rows = [WearerRow(w, self.night_seq[w], self.next_seq[w]) for w in touched]
                await self._stage_and_store(jobs, events, owners, pending, wearer_rows, touched)
                self.metrics.batch_seconds.observe(time.perf_counter() - t0)
            except Exception as error:
                self._fail(error, jobs)

    def _fail(self, error: Exception, jobs: list[Job] = ()) -> None:
        """The streams in memory are now ahead of the database: refuse further readings and let a restart
        rebuild them from what was stored (on_failure: serve.py ends the process; /healthz says 503)."""
        if self.failed is None:
            self.failed = f"{type(error).__name__}: {error}"
            log.critical("staging or storing failed, no more readings accepted: %s", self.failed)
        for job in [*jobs, *self._jobs]:
            if not job.future.done():
                job.future.set_exception(HTTPException(503, f"staging or storing failed: {self.failed}"))
        self._jobs = []
        if self.on_failure is not None:
            self.on_failure()

    async def _stage_and_store(self, jobs: list[Job], events: list[Event], owners: list, pending: list,
                               wearer_rows: list[WearerRow], touched: set[str]) -> None:
        pool = self.pool
        # a small batch runs on one torch thread (idle intra-op threads would spin on the cores the web
        # server needs); a large one is split across threads (evaluation.in_parallel)
        with single_thread() if len(pending) < 2 * pool.batch_size else contextlib.nullcontext():
            staged = stage_pending(pool.model, pool.scaler, int(pool.checkpoint["target_pos"]), pending,
                                   pool.batch_size) if pending else []
        # revisions come from this call's windows or a night's end in this batch: only touched wearers have any
        revised = pool.take_revised(touched) if self.lookahead else {}
        by_wearer: dict[str, list[StagedEpoch]] = {}
        for wearer, epoch in zip(owners, staged):
            by_wearer.setdefault(wearer, []).append(epoch)
        unmatched = self.store.commit(events, epoch_rows(by_wearer), wearer_rows, epoch_rows(revised))
        if unmatched:  # the stream gives one revision per epoch, of an epoch it staged: a bug if not
            log.error("%d revision(s) of this batch found no stored epoch waiting for one", unmatched)
        # stored: now answer, publish and count; each epoch's JSON is built once, for the answer and the feeds
        staged_json = {w: [epoch_json(e) for e in epochs] for w, epochs in by_wearer.items()}
        revised_json = {w: [epoch_json(e) for e in epochs] for w, epochs in revised.items()}
        answers = [[] for _ in jobs]
        taken: dict[str, int] = {}
        closed_by: dict[tuple[str, float], dict] = {}  # (wearer, epoch start): the answer of the work that closed it
        last_answer: dict[str, dict] = {}                 # wearer: the answer of its last work in this batch
        for job, job_answers in zip(jobs, answers):
            for wearer, n, stats in job.results:
                first = taken.get(wearer, 0)
                epochs = by_wearer.get(wearer, [])[first:first + n]
                taken[wearer] = first + n
                stats["epochs_no_data"] = sum(e.stage < 0 for e in epochs)  # counted when staged
                answer = {"epochs": staged_json.get(wearer, [])[first:first + n], "revised": [], "stats": stats}
                job_answers.append(answer)
                last_answer[wearer] = answer
                if self.lookahead:
                    closed_by.update(((wearer, e.epoch_start_s), answer) for e in epochs)
        ahead_s = self.lookahead * features.EPOCH_S
        for wearer, epochs in revised.items():
            for e, e_json in zip(epochs, revised_json[wearer]):
                # with the work that closed the epoch whose window revised it, else (a night's end) the wearer's last
                answer = closed_by.get((wearer, e.epoch_start_s + ahead_s)) or last_answer.get(wearer)
                if answer is not None:
                    answer["revised"].append(e_json)
        for job, job_answers in zip(jobs, answers):
            if not job.future.done():
                job.future.set_result(job_answers)
        self._count(jobs, staged, revised)
        self._publish(staged_json, revised_json)

    def _count(self, jobs: list[Job], staged: list[StagedEpoch], revised: dict[str, list[StagedEpoch]]) -> None:
        metrics = self.metrics
        metrics.wearers.set(len(self.pool))
        totals = new_stats()
        for job in jobs:
            for _, _, stats in job.results:
                for key, value in stats.items():
                    totals[key] += value
        metrics.accepted.inc(totals["accepted"])
        for reason in DROP_REASONS:
            if totals[reason]:
                metrics.dropped.labels(reason).inc(totals[reason])
        if staged:
            metrics.batch.observe(len(staged))
        for counter, epochs in ((metrics.epochs, staged), (metrics.revised, [e for es in revised.values() for e in es])):
            stages, counts = np.unique([int(e.stage) for e in epochs], return_counts=True)
            for stage, count in zip(stages, counts):
                counter.labels(STAGE_NAMES[int(stage)]).inc(int(count))

    def _publish(self, staged_json: dict[str, list[dict]], revised_json: dict[str, list[dict]]) -> None:
        """Each live feed gets its wearer's new epochs (as answered), one message each, then {"revised": [...]}."""
        for wearer in staged_json.keys() | revised_json.keys():
            queues = self.subscribers.get(wearer)
            if not queues:
                continue
            messages = list(staged_json.get(wearer, ()))
            if wearer in revised_json:
                messages.append({"revised": revised_json[wearer]})
            for queue in list(queues):
                for message in messages:
                    try:
                        queue.put_nowait(message)
                    except asyncio.QueueFull:  # a client that stopped reading: end its feed
                        self.unsubscribe(wearer, queue)
                        end_feed(queue)
                        break

    def subscribe(self, wearer_id: str, queue: asyncio.Queue) -> None:
        self.subscribers.setdefault(wearer_id, set()).add(queue)

    def unsubscribe(self, wearer_id: str, queue: asyncio.Queue) -> None:
        queues = self.subscribers.get(wearer_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self.subscribers[wearer_id]

    # ------------------------------------------------------------------ reading back

    def knows(self, wearer_id: str) -> bool:
        """Whether the wearer has a stream: any push or flush taken, now or before a restart."""
        return wearer_id in self.pool.stagers

    def summary(self, wearer_id: str) -> dict:
        """Sleep metrics of the wearer's current (or last) night, its epochs since the last gap, by the
        reports' rule (sleep_metrics.night_metrics: no-data epochs left out, their minutes in no_data_min),
        on the latest stages: each epoch's revision once it came, else its immediate stage."""
        epochs = self.store.epochs(wearer_id)
        if not epochs:
            return {"wearer_id": wearer_id, "night_start": None, "epochs": 0, "revised_epochs": 0, "metrics": None}
        starts = np.array([e.epoch_start for e in epochs])
        breaks = np.flatnonzero(np.diff(starts) > features.EPOCH_S + 1e-6)
        first = int(breaks[-1]) + 1 if breaks.size else 0
        night = epochs[first:]
        stages = np.array([e.stage if e.revised_stage is None else e.revised_stage for e in night])
        metrics = {k: (None if not math.isfinite(v) else float(v)) for k, v in night_metrics(stages).items()}
        return {"wearer_id": wearer_id, "night_start": float(starts[first]),
                "night_end": float(starts[-1] + features.EPOCH_S), "epochs": len(stages),
                "revised_epochs": sum(e.revised_stage is not None for e in night), "metrics": metrics}


# ----------------------------------------------------------------------------- the app

def page_html() -> str:
    """The live page with the palette filled in."""
    return PAGE.read_text(encoding="utf-8").replace("__PALETTE__", json.dumps(PALETTE), 1)


def favicon_svg() -> bytes:
    """A small hypnogram in the stage colours."""
    steps = (("Wake", 0, 3), ("Light", 3, 4), ("Deep", 7, 3), ("REM", 10, 3), ("Light", 13, 3))  # stage, x, width
    row = {"Wake": 0, "REM": 1, "Light": 2, "Deep": 3}  # top to bottom, as the hypnograms draw them
    bars = "".join(f'<rect x="{x}" y="{1 + 4 * row[stage]}" width="{w}" height="3" fill="{STAGE_COLORS[stage]}"/>'
                   for stage, x, w in steps)
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">{bars}</svg>'.encode()


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


class Timing:
    """ASGI middleware: request latency by route into the Prometheus histogram."""

    def __init__(self, app, histogram: Histogram, paths: dict):
        self.app, self.histogram, self.paths = app, histogram, paths  # paths: plain routes' endpoint -> path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            path = route.path if route is not None else self.paths.get(scope.get("endpoint"), "other")
            self.histogram.labels(path).observe(time.perf_counter() - start)


def create_app(service: Service, token: str | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The FastAPI app around a service; with a token, every API and WebSocket request needs it.
    allowed_hosts: the Host headers served (others get 400), against DNS rebinding when there is no token."""

    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="sleep-staging", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    plain_routes: dict = {}
    app.add_middleware(Timing, histogram=service.metrics.latency, paths=plain_routes)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    expected = f"Bearer {token}".encode() if token else None

    def authorized(header: str | None) -> bool:
        return expected is None or (header is not None and hmac.compare_digest(header.encode(), expected))

    def require_token(request: Request) -> None:
        if not authorized(request.headers.get("authorization")):
            raise HTTPException(401, "missing or wrong token: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return Response(orjson.dumps({"detail": error.detail}), status_code=error.status_code,
                        media_type="application/json", headers=getattr(error, "headers", None))

    @app.get("/healthz")
    async def healthz():
        if service.failed is not None:
            return json_response({"status": "failed", "error": service.failed}, 503)
        return json_response({"status": "ok", "wearers": len(service.pool)})

    html, icon = page_html(), favicon_svg()

    @app.get("/")
    async def page():
        return HTMLResponse(html)

    @app.get("/favicon.ico")
    async def favicon():  # browsers ask for it on every page; open, like the page
        return Response(icon, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/metrics")
    async def metrics(request: Request):
        require_token(request)
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # the three hot endpoints are plain Starlette routes: FastAPI's parameter machinery would cost
    # more than the rest of the request (they parse their JSON themselves, with field-level messages)
    async def push(request: Request):
        require_token(request)
        wearer_id = check_wearer_id(request.path_params["wearer_id"])
        runs = parse_readings(await read_json(request, service.max_body_bytes))
        (answer,) = await service.submit([Work(wearer_id, runs)])
        return json_response(answer)

    async def push_many(request: Request):
        require_token(request)
        body = await read_json(request, service.max_body_bytes)
        if not isinstance(body, dict):
            raise BadInput('body: expected {"<wearer_id>": {readings}, ...}')
        if len(body) > service.max_request_wearers:
            raise BadInput(f"body: names {len(body)} wearers, more than the {service.max_request_wearers} one "
                           f"request may (--max-request-wearers); split it", 413)
        works = []
        for wearer_id, readings in body.items():
            check_wearer_id(wearer_id)
            works.append(Work(wearer_id, parse_readings(readings, f"{wearer_id}.")))
        answers = await service.submit(works) if works else []
        return json_response({work.wearer_id: answer for work, answer in zip(works, answers)})

    async def flush(request: Request):
        require_token(request)
        wearer_id = check_wearer_id(request.path_params["wearer_id"])
        now, revise = parse_flush(await read_json(request, service.max_body_bytes))
        (answer,) = await service.submit([Work(wearer_id, [], now, revise)])
        return json_response(answer)

    for path, endpoint in (("/v1/wearers/{wearer_id}/readings", push), ("/v1/readings", push_many),
                           ("/v1/wearers/{wearer_id}/flush", flush)):
        app.add_route(path, endpoint, methods=["POST"])
        plain_routes[endpoint] = path

    @app.get("/v1/wearers")
    def wearers(request: Request):
        require_token(request)
        counts = service.store.epoch_counts()
        return json_response({"wearers": [{"wearer_id": w, "epochs": counts.get(w, (0, None))[0],
                                           "last_epoch_start": counts.get(w, (0, None))[1]}
                                          for w in sorted(set(service.pool.stagers) | set(counts))],
                              "lookahead": service.lookahead})

    def require_wearer(wearer_id: str) -> None:
        check_wearer_id(wearer_id)
        if not service.knows(wearer_id):  # a typo must not look like a wearer with no epochs yet
            raise HTTPException(404, f"unknown wearer {wearer_id!r}: no readings or flush taken for it")

    @app.get("/v1/wearers/{wearer_id}/epochs")
    def epochs(wearer_id: str, request: Request, since: str | None = None):
        require_token(request)
        since_s = -math.inf if since is None else parse_time(_number_or_text(since), "since")
        require_wearer(wearer_id)
        return json_response({"epochs": [stored_json(e) for e in service.store.epochs(wearer_id, since_s)]})

    @app.get("/v1/wearers/{wearer_id}/summary")
    def summary(wearer_id: str, request: Request):
        require_token(request)
        require_wearer(wearer_id)
        return json_response(service.summary(wearer_id))

    @app.websocket("/v1/wearers/{wearer_id}/live")
    async def live(websocket: WebSocket, wearer_id: str):
        header = websocket.headers.get("authorization")
        query_token = websocket.query_params.get("token")
        if not (authorized(header) or (query_token is not None and authorized(f"Bearer {query_token}"))):
            await websocket.close(code=1008, reason="missing or wrong token")
            return
        if not WEARER_ID.fullmatch(wearer_id):
            await websocket.close(code=1008, reason="bad wearer id")
            return
        try:
            since = websocket.query_params.get("since")
            since_s = None if since is None else parse_time(_number_or_text(since), "since")
        except BadInput as error:
            await websocket.close(code=1008, reason=str(error.detail)[:120])
            return
        origin = websocket.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != websocket.headers.get("host"):
            await websocket.close(code=1008, reason="cross-origin live feeds are refused")  # another site's page
            return
        await websocket.accept()
        if not service.knows(wearer_id):  # accepted first: a browser sees a close code, not a refused handshake
            await websocket.close(code=UNKNOWN_WEARER, reason=f"unknown wearer {wearer_id}")
            return
        queue: asyncio.Queue = asyncio.Queue(maxsize=LIVE_QUEUE)
        service.subscribe(wearer_id, queue)

        async def watch_for_close() -> None:  # a client that goes away ends its feed now, not at the next epoch
            try:
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass
            except (WebSocketDisconnect, RuntimeError):
                pass
            end_feed(queue)

        watcher = asyncio.create_task(watch_for_close())
        try:
            last, sent_revised = -math.inf, set()
            if since_s is not None:  # the backlog first; subscribed already, so nothing falls in between
                rows = await asyncio.to_thread(service.store.epochs, wearer_id, since_s)
                for message in live_backlog(rows):
                    await websocket.send_text(orjson.dumps(message).decode())
                last = rows[-1].epoch_start if rows else last
                sent_revised = {r.epoch_start for r in rows if r.revised_stage is not None}
            while True:
                message = await queue.get()
                if message is None:  # gone, too slow a reader, or the server stopping
                    if not watcher.done():
                        await websocket.close(code=1013, reason="try again later, with ?since=")
                    return
                if "revised" in message:  # the backlog may have had some; before since_s was not asked for
                    revised = [e for e in message["revised"] if e["epoch_start"] not in sent_revised
                               and (since_s is None or e["epoch_start"] >= since_s)]
                    if revised:
                        await websocket.send_text(orjson.dumps({"revised": revised}).decode())
                elif message["epoch_start"] > last:
                    await websocket.send_text(orjson.dumps(message).decode())
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            watcher.cancel()
            service.unsubscribe(wearer_id, queue)

    return app


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


# ----------------------------------------------------------------------------- command line

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help=f"a causal checkpoint (default: the shipped {DEFAULT_CHECKPOINT})")
    parser.add_argument("--db", default="sleep.db", help="SQLite database (created if missing)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                        help=f"require Authorization: Bearer <token> on the API (default: ${TOKEN_ENV})")
    parser.add_argument("--max-delay", type=float, default=0.0,
                        help="seconds to wait past an epoch's end for late readings (default 0)")
    parser.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (default 8 MB)")
    parser.add_argument("--max-wearers", type=int, default=MAX_WEARERS,
                        help=f"wearers this process holds a stream for; new ones past it get 503 "
                             f"(default {MAX_WEARERS:,}; each stream stays in memory)")
    parser.add_argument("--max-request-wearers", type=int, default=MAX_REQUEST_WEARERS,
                        help=f"wearers one POST /v1/readings may name; more get 413 (default {MAX_REQUEST_WEARERS:,})")
    parser.add_argument("--batch-ms", type=float, default=20.0,
                        help="at most one model call per this many ms (default 20): bigger batches, less CPU, "
                             "up to that much added latency")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for batches of 256+ epochs (default 1; smaller batches always use one: "
                             "idle intra-op threads spin on the cores the web server needs)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    import uvicorn
    parser = build_parser()
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not args.token:
        parser.error(f"--host {args.host} is reachable from other machines: set --token (or ${TOKEN_ENV})")
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not a port number")
    for flag in ("max_wearers", "max_request_wearers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected at least 1")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    def end_process() -> None:  # a supervisor (Docker's restart policy, systemd) starts it again
        print("serve.py: stopping after a staging or storage failure; restart it to rebuild the streams from "
              f"{args.db}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        service = Service(args.checkpoint, args.db, max_delay_s=args.max_delay,
                          max_body_bytes=int(args.max_body_mb * (1 << 20)), batch_interval_s=args.batch_ms / 1000.0,
                          max_wearers=args.max_wearers, max_request_wearers=args.max_request_wearers,
                          on_failure=end_process)
    except (OSError, ValueError, KeyError) as error:
        print(f"serve.py: {error}", file=sys.stderr)
        return 2
    # without a token, answer only to this machine's names: a web page elsewhere cannot rebind a DNS name to us
    hosts = None if args.token else sorted({"127.0.0.1", "localhost", args.host})
    app = create_app(service, args.token, hosts)
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port} (database {args.db})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=5)  # live pages keep their WebSockets open
    return 0


if __name__ == "__main__":
    sys.exit(main())
