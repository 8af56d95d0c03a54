"""Real-time sleep staging: push wearable readings as they arrive, get a stage for every closed 30 s epoch.

    stager = StreamingStager.from_checkpoint("checkpoints/hybrid_causal/model.pth")
    for epoch_start_s, stage, probabilities in stager.push_heart_rate(t_s, bpm):   # any batch size
        ...
    stager.push_acceleration(t_s, x, y, z)   # raw g, ~50 Hz  (or push_counts(t_s, count): 15 s counts)
    stager.push_steps(t_s, steps)
    stager.flush(now_s)                      # a clock tick: close every epoch that ends at or before now_s

A stager serves one wearer and needs a causal checkpoint (an offline model reads future epochs).
It computes each epoch's aggregates exactly as `data_loader.night_from_arrays` does and the
epoch's feature row exactly as `night_features(night_so_far, causal=True)` gives for its last
row (running sums and ring buffers: O(1) work and memory per epoch), then predicts with the
window that ends at the epoch, as `make_windows` builds it. Replaying a recorded night therefore
gives the offline causal evaluation's predictions (tested; the model call differs only by batch
size, ~1e-7).

Rules (each one tested):
- Epoch k covers [start_s + 30k, start_s + 30(k+1)). The stream's clock is the largest timestamp
  of any valid reading so far (finite, plausible value; late ones too), on any signal, or flush's
  now_s. Epoch k closes when the clock reaches its end plus `max_delay_s` (default 0: a reading
  stamped exactly at the end belongs to the next epoch, so once it arrives the epoch is complete).
- Readings are processed in the order given, as if pushed one at a time, so the batch size never
  changes a result. Within a call, several signals must be pushed in time order (one call per run
  of one signal) because they share one clock.
- Late: a reading whose epoch has already closed (or a timestamp far in the past) is dropped and
  counted in `stats["late"]`; a reading before start_s is dropped as `before_start`.
- Out of order inside epochs still open: accepted (aggregates are computed in time order at close).
- Duplicates (same signal, same timestamp): the first one pushed is kept (`duplicates`).
- NaN/inf (`non_finite`) and impossible values (`out_of_range`: heart rate outside 25-250 bpm,
  |acceleration| > 16 g on any axis, negative counts or steps, a timestamp beyond +-1e12 s: Unix
  seconds are ~1.7e9, so Unix milliseconds passed as seconds are caught, long before float64
  seconds stop resolving 50 Hz near 1e14 s) are dropped and do not move the clock.
- Gaps (watch off): epochs without readings close when the clock passes them, with their signals
  flagged missing and filled as causal features do (forward fill; 60 bpm / 0 counts before any).
- A reading (or flush) more than `max_gap_s` (default 6 h) after max(clock, start of the night)
  starts a new night: the epochs up to the one holding the old clock are closed and emitted, the
  skipped epochs are not emitted (`gap_epochs` counts them), and a fresh night (expanding
  statistics, hours since start, window padding) starts at the epoch holding that reading, on the
  same 30 s grid (`new_nights`). An 8 h dead watch is a new night, not 960 epochs of filler.
- Windows: until seq_len epochs exist, positions before the first epoch repeat the first epoch
  (edge padding, as `window_indices`); the stage is read at checkpoint["target_pos"].
- Activity comes from raw acceleration when any arrives in the night (per-epoch Walch counts via
  `data_loader.motion_epoch_aggregates`; counts pushed after that are ignored, `ignored_counts`),
  else from pushed counts (mean of the epoch's 15 s counts).
- Steps: the epoch's sum; missing (NaN) when the epoch starts more than 10 min before the first or
  after the last steps reading seen so far (the offline rule applied to the night so far; offline
  whole-night features instead call a steps gap 0 when steps resume later).
- Memory: only the samples of open epochs, plus O(seq_len + 60) numbers of feature state (a
  whole-night model: its step state instead of the window, the past inputs of each conv block).

The revised stage (a model with a lookahead L, e.g. 20 epochs, and a revision span S): each epoch is
staged again once the L epochs after it have arrived, by the mean of the model calls that staged epochs
t + L - S + 1 .. t + L (every lag from each one call); at a night's end (flush, a clock jump, the end of
a replay) the epochs still waiting are revised from the windows of those the night has, else from its
last window at the shorter lag, as evaluation.revision_lags says offline. The push results stay the
immediate stages; take_revised() returns the revisions (see Revisions).

`StagerPool` batches the model call across many wearers; `StagerBatch` keeps many wearers in
lockstep with their state in numpy arrays (no Python work per wearer; for a server that ticks every
30 s); `predict_label_from_triplet` is the notebook API (one (hr, motion, steps) reading per epoch,
context kept per model and wearer).
"""
from __future__ import annotations

import math
import weakref
from collections import deque
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd
import torch

import data_loader as dl
import features
from checkpoint import load_model_from_checkpoint
from evaluation import (PREDICTION_COLUMNS, NightSteps, lookahead_of, predict_windows, prediction_frame, revision_lags,
                        revision_span_of)
from model import check_revision_span

EPOCH_S = features.EPOCH_S
KINDS = ("heart_rate", "motion", "counts", "steps")
N_VALUES = {"heart_rate": 1, "motion": 3, "counts": 1, "steps": 1}
DEFAULT_MAX_GAP_S = 6 * 3600.0
MAX_ABS_TIME_S = 1e12    # ~31,700 years of seconds (Unix time is ~1.7e9; milliseconds would be ~1.7e12)
# notebook API plausibility limits (per 30 s epoch)
MAX_ACTIVITY_COUNT = 10_000.0
MAX_STEPS_PER_EPOCH = 300.0


class StagedEpoch(NamedTuple):
    """One epoch's stage: its start (s), the stage (0 Wake, 1 Light, 2 Deep, 3 REM; -1 no data),
    probabilities (4,) (NaN for no data). The immediate stage of a closed epoch, or its revised stage
    (take_revised)."""
    epoch_start_s: float
    stage: int
    probabilities: np.ndarray


NO_DATA_PROBABILITIES = np.full(4, np.nan)


class _Closed(NamedTuple):
    """A closed epoch whose feature row is not computed yet (see StreamWindows.featurize)."""
    epoch_start_s: float
    k: int                  # epoch index in its night
    hours_since_start: float
    aggregates: dict


class FeatureState(NamedTuple):
    """Feature state and window rings (a whole-night model: its step state) that a StagerPool's stagers
    share, each at its own row."""
    features: features.IncrementalFeatures
    ring: features.WindowRing | NightSteps


def window_ring(model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict, n_rows: int
                ) -> features.WindowRing | NightSteps:
    """The model side of n_rows streams' state: the last seq_len feature rows, or for a whole-night model
    (seq_len 0) its step state."""
    if int(checkpoint["seq_len"]) == 0:
        return NightSteps(model, scaler, n_rows)
    return features.WindowRing(n_rows, int(checkpoint["seq_len"]), len(checkpoint["features"]), int(checkpoint["target_pos"]))


def new_stats() -> dict[str, int]:
    """A stream's counters, all zero."""
    return {"accepted": 0, "late": 0, "before_start": 0, "duplicates": 0, "non_finite": 0, "out_of_range": 0,
            "ignored_counts": 0, "epochs_closed": 0, "epochs_hr_missing": 0, "epochs_no_data": 0, "new_nights": 0,
            "gap_epochs": 0}


# ----------------------------------------------------------------------------- the stream's input rules

class _EpochBuffer:
    """Samples of one signal in one open epoch."""
    __slots__ = ("t", "v", "seen")

    def __init__(self):
        self.t: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.seen: set[float] = set()

    def __len__(self) -> int:
        return len(self.seen)


class StreamIntake:
    """The input rules of one stream and their bookkeeping (module docstring, "Rules"): which readings
    count, the clock, the epoch grid, the samples held for the open epochs, the counters (`stats`).

    It tells its StreamingStager where the clock jumps (a new night starts) and how many epochs may
    close; the stager closes them (epoch_aggregates) and hands them to the model side (StreamWindows).
    """

    def __init__(self, start_s: float | None, max_delay_s: float, max_gap_s: float):
        self.initial_start_s = None if start_s is None else float(start_s)
        self.max_delay_s, self.max_gap_s = float(max_delay_s), float(max_gap_s)
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next reading starts a new night at the initial start_s."""
        self.start_s = self.initial_start_s
        self.clock: float | None = None
        self.stats = new_stats()
        self.reset_night()

    def reset_night(self) -> None:
        self.n_closed = 0
        self.buffers: dict[str, dict[int, _EpochBuffer]] = {kind: {} for kind in KINDS}
        self.motion_source: str | None = None
        self.steps_span: list[float] | None = None

    def epoch_start(self, k: int) -> float:
        return self.start_s + float(EPOCH_S * k)

    def buffered_samples(self) -> dict[str, int]:
        return {kind: sum(len(b) for b in buffers.values()) for kind, buffers in self.buffers.items()}

    def open_epochs(self) -> list[int]:
        return sorted({e for buffers in self.buffers.values() for e in buffers})

    # ------------------------------------------------------------------ readings

    def valid(self, kind: str, t_s, values: tuple) -> tuple[np.ndarray, np.ndarray]:
        """The finite, plausible readings of one push (t (n,), values (n, k)); the others are counted."""
        t, v = self._as_arrays(kind, t_s, values)
        if len(t) == 0:
            return t, v
        finite = np.isfinite(t) & np.isfinite(v).all(axis=1)
        with np.errstate(invalid="ignore"):
            plausible = dl.plausible(kind, v) & (np.abs(t) <= MAX_ABS_TIME_S)
        self.stats["non_finite"] += int((~finite).sum())
        self.stats["out_of_range"] += int((finite & ~plausible).sum())
        valid = finite & plausible
        return (t, v) if valid.all() else (t[valid], v[valid])

    @staticmethod
    def _as_arrays(kind: str, t_s, values: tuple) -> tuple[np.ndarray, np.ndarray]:
        if kind not in KINDS:
            raise ValueError(f"unknown signal {kind!r}; known: {KINDS}")
        if len(values) != N_VALUES[kind]:
            raise ValueError(f"{kind} readings take {N_VALUES[kind]} value(s) per timestamp, got {len(values)}")
        try:
            arrays = np.broadcast_arrays(*(np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (t_s, *values)))
        except ValueError:
            raise ValueError(f"{kind}: timestamps and values must have the same length "
                             f"(got shapes {[np.shape(a) for a in (t_s, *values)]})") from None
        if arrays[0].ndim != 1:
            raise ValueError(f"{kind}: timestamps and values must be scalars or 1-D arrays")
        return arrays[0], np.stack(arrays[1:], axis=1)

    def next_segment(self, t: np.ndarray) -> tuple[int, np.ndarray]:
        """(n, clock_before): the first n valid readings t come before the clock's next jump (n = 0: t[0]
        itself jumps, a new night starts at it); clock_before[i]: the clock when reading i arrives."""
        if self.start_s is None:
            self.start_s = float(math.floor(t[0] / EPOCH_S) * EPOCH_S)
        clock0 = self.clock if self.clock is not None else -math.inf
        clock_before = np.maximum.accumulate(np.concatenate([[clock0], t[:-1]]))
        jumps = np.flatnonzero(t - np.maximum(clock_before, self.start_s) > self.max_gap_s)
        stop = int(jumps[0]) if jumps.size else len(t)
        return stop, clock_before[:stop]

    def store(self, kind: str, t: np.ndarray, v: np.ndarray, clock_before: np.ndarray) -> None:
        """Valid readings without a jump (clock_before: next_segment's): those of closed epochs or
        before the start are dropped and counted, the others held for their epochs; the clock moves."""
        stats = self.stats
        epoch = np.floor((t - self.start_s) / EPOCH_S).astype(np.int64)
        if t[0] >= max(clock_before[0], self.start_s) and (len(t) == 1 or bool((t[1:] >= t[:-1]).all())):
            # in time order from the clock on (the usual live push): none is before the start or late, as
            # an epoch closes only once the clock passes its end
            before = late = np.zeros(len(t), dtype=bool)
        else:
            with np.errstate(invalid="ignore"):
                closed = np.floor((clock_before - self.max_delay_s - self.start_s) / EPOCH_S)
            closed = np.maximum(np.nan_to_num(closed, neginf=0.0), self.n_closed).astype(np.int64)
            before = epoch < 0
            late = ~before & (epoch < closed)
            stats["before_start"] += int(before.sum())
            stats["late"] += int(late.sum())
        if kind == "steps":  # the steps span counts every valid reading, as offline the whole file
            lo, hi = float(t.min()), float(t.max())
            self.steps_span = [lo, hi] if self.steps_span is None else [min(self.steps_span[0], lo),
                                                                          max(self.steps_span[1], hi)]
        keep = ~before & ~late
        if kind == "counts" and self.motion_source == "raw":
            stats["ignored_counts"] += int(keep.sum())
            keep[:] = False
        if keep.any():
            if kind == "motion" and self.motion_source != "raw":
                self.motion_source = "raw"  # raw motion wins, as offline: counts held so far are dropped
                stats["ignored_counts"] += self.buffered_samples()["counts"]
                self.buffers["counts"].clear()
            elif kind == "counts" and self.motion_source is None:
                self.motion_source = "counts"
            self._hold(kind, t[keep], v[keep], epoch[keep])
        latest = float(t.max())
        self.clock = latest if self.clock is None else max(self.clock, latest)

    def _hold(self, kind: str, t: np.ndarray, v: np.ndarray, epoch: np.ndarray) -> None:
        buffers = self.buffers[kind]
        if epoch[0] == epoch[-1] and (len(t) == 1 or bool((t[1:] > t[:-1]).all())):
            first, epochs = np.ones(len(t), dtype=bool), epoch[:1]  # one epoch, no timestamp twice
        else:
            first = np.zeros(len(t), dtype=bool)
            first[np.unique(t, return_index=True)[1]] = True  # within the call, the first of equal timestamps
            epochs = np.unique(epoch)
        for e in epochs:
            sel = epoch == e
            buffer = buffers.get(int(e))
            if buffer is None:
                buffer = buffers[int(e)] = _EpochBuffer()
            times = t[sel]
            ok = first[sel]
            as_list = times.tolist()
            if buffer.seen and not buffer.seen.isdisjoint(as_list):
                ok &= np.array([x not in buffer.seen for x in as_list])
            self.stats["duplicates"] += int((~ok).sum())
            if ok.any():
                buffer.t.append(times[ok])
                buffer.v.append(v[sel][ok])
                buffer.seen.update(times[ok].tolist())
                self.stats["accepted"] += int(ok.sum())
            elif not buffer:
                del buffers[int(e)]

    # ------------------------------------------------------------------ the clock and the grid

    def closable(self, through_s: float) -> int:
        """Number of epochs (from 0) that end at or before through_s."""
        return max(self.n_closed, math.floor((through_s - self.start_s) / EPOCH_S))

    def check_now(self, now_s: float) -> float:
        """A clock tick's time, checked; it starts the grid when nothing came yet."""
        now = float(now_s)
        if not (math.isfinite(now) and abs(now) <= MAX_ABS_TIME_S):
            raise ValueError(f"now_s must be finite (|now_s| <= {MAX_ABS_TIME_S:g} s), got {now_s}")
        if self.start_s is None:
            self.start_s = float(math.floor(now / EPOCH_S) * EPOCH_S)
        return now

    def jumps(self, now: float) -> bool:
        """Whether a tick at now starts a new night."""
        reference = self.start_s if self.clock is None else max(self.clock, self.start_s)
        return now - reference > self.max_gap_s

    def move_clock(self, now: float, wait_delay: bool) -> float:
        """Advance the clock to now; the time through which epochs may close."""
        self.clock = now if self.clock is None else max(self.clock, now)
        return (self.clock - self.max_delay_s) if wait_delay else max(now, self.clock - self.max_delay_s)

    def epochs_through_clock(self) -> int:
        """Number of epochs up to the one holding the clock (those a night that ends now closes)."""
        if self.clock is None or self.clock < self.start_s:
            return self.n_closed
        return math.floor((self.clock - self.start_s) / EPOCH_S) + 1

    def new_night(self, t_new: float) -> None:
        """Start the grid's next night at t_new's epoch (the stager has finished the night so far)."""
        new_epoch = math.floor((t_new - self.start_s) / EPOCH_S)
        self.stats["gap_epochs"] += max(new_epoch - self.n_closed, 0)
        self.stats["new_nights"] += 1
        self.start_s = self.epoch_start(new_epoch)
        self.reset_night()

    # ------------------------------------------------------------------ closing

    def take(self, kind: str, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The samples held for epoch k of one signal, in time order, taken out."""
        buffer = self.buffers[kind].pop(k, None)
        if buffer is None:
            return None
        t, v = np.concatenate(buffer.t), np.concatenate(buffer.v)
        order = np.argsort(t, kind="stable")
        return t[order], v[order]

    def close(self, k: int, aggregates: dict[str, float]) -> _Closed:
        """Count epoch k closed with these aggregates; the record that waits for its feature row."""
        start = self.epoch_start(k)
        self.n_closed = k + 1
        self.stats["epochs_closed"] += 1
        self.stats["epochs_hr_missing"] += int(math.isnan(aggregates["heart_rate_bpm"]))
        return _Closed(start, k, (start - self.start_s) / 3600.0,
                       {name: aggregates[name] for name in features.FEATURE_AGGREGATES})


def checked_resting_hr(resting_hr_bpm):
    """Resting heart rates given to streams, a scalar (float) or one per wearer (array): NaN for none
    (None or NaN), else within the heart-rate input rules."""
    values = np.asarray(math.nan if resting_hr_bpm is None else resting_hr_bpm, np.float64)  # [None] -> NaN
    bad = ~(np.isnan(values) | ((values >= dl.HR_MIN_BPM) & (values <= dl.HR_MAX_BPM)))
    if bad.any():
        where = f" (wearer {int(np.flatnonzero(bad)[0])})" if values.ndim else ""
        raise ValueError(f"resting_hr_bpm must be None or {dl.HR_MIN_BPM:g}-{dl.HR_MAX_BPM:g} bpm, "
                         f"got {values[bad].flat[0]:g}{where}")
    return float(values) if values.ndim == 0 else values


def epoch_aggregates(intake: StreamIntake, k: int) -> dict[str, float]:
    """Epoch k's aggregates from the samples the intake held for it (taken out), with the formulas
    data_loader.night_from_arrays uses for a whole night."""
    start = intake.epoch_start(k)
    agg = {name: math.nan for name in features.AGGREGATES}
    hr = intake.take("heart_rate", k)
    if hr is not None:
        mean, std, _ = features.epoch_mean_std(np.zeros(len(hr[0]), np.int64), hr[1][:, 0], 1)
        agg["heart_rate_bpm"], agg["heart_rate_std_bpm"] = float(mean[0]), float(std[0])
    motion = intake.take("motion", k)
    counts = intake.take("counts", k)
    if motion is not None:
        aggs = dl.motion_epoch_aggregates(np.column_stack([motion[0], motion[1]]), np.array([start]))
        for name, values in aggs.items():
            agg[name] = float(values[0])
    elif counts is not None:
        agg["activity_count"] = float(features.epoch_mean_std(np.zeros(len(counts[0]), np.int64),
                                                              counts[1][:, 0], 1)[0][0])
    steps = intake.take("steps", k)
    span = intake.steps_span
    if span is not None and span[0] - dl.STEPS_MARGIN_S <= start <= span[1] + dl.STEPS_MARGIN_S:
        values = steps[1][:, 0] if steps is not None else np.zeros(0)
        agg["steps"] = float(features.epoch_sum(np.zeros(len(values), np.int64), values, 1)[0])
    return agg


# ----------------------------------------------------------------------------- the model side: windows, revisions

class _EpochRevision:
    """One epoch's revision while its windows' outputs come in: their sum at its lags, and how many."""
    __slots__ = ("epoch_start_s", "no_data", "total", "count")

    def __init__(self, epoch_start_s: float, no_data: bool):
        self.epoch_start_s, self.no_data = epoch_start_s, no_data
        self.total, self.count = np.zeros(4), 0

    def staged(self) -> StagedEpoch:
        if self.no_data:  # the windows that would revise it may not have been run
            return StagedEpoch(self.epoch_start_s, -1, NO_DATA_PROBABILITIES.copy())
        probabilities = self.total / self.count
        return StagedEpoch(self.epoch_start_s, int(features.stages_of(probabilities[None])[0]), probabilities)


class _Revision:
    """What one window's model output revises: the (epoch, lag) it adds to and the epochs it completes
    (their last window). Applied once the output is known (stage_pending), or at once when it already
    is (a night that ends after its last window was staged)."""
    __slots__ = ("reads", "completes", "probabilities", "staged", "owner")

    def __init__(self, owner: "Revisions"):
        self.reads: list[tuple[_EpochRevision, int]] = []
        self.completes: list[_EpochRevision] = []
        self.probabilities: np.ndarray | None = None
        self.staged = False
        self.owner = owner

    def add(self, reads: list[tuple[_EpochRevision, int]], completes: list[_EpochRevision]) -> None:
        if self.staged:
            self._apply(reads, completes)
        else:
            self.reads += reads
            self.completes += completes

    def settle(self, probabilities: np.ndarray | None) -> None:
        """The window's output (1 + lookahead, 4); None: it was not run (every epoch it revises has no data)."""
        self.staged, self.probabilities = True, probabilities
        self._apply(self.reads, self.completes)
        self.reads, self.completes = [], []

    def _apply(self, reads: list[tuple[_EpochRevision, int]], completes: list[_EpochRevision]) -> None:
        if self.probabilities is not None:
            for epoch, lag in reads:
                epoch.total += self.probabilities[lag]
                epoch.count += 1
        self.owner.revised += [epoch.staged() for epoch in completes]


class Revisions:
    """The revised stage of one stream (a model with a lookahead L > 0 and a revision span S).

    Epoch t is revised by the mean of the model calls on the windows that end at epochs
    t + L - S + 1 .. t + L (at those lags), or, when the night ends sooner (flush, a new night), by
    those of them the night has, else by the night's last window at the shorter lag: the rule of
    evaluation.revision_lags, so a replayed night gives predict_night(revised=True). An epoch without
    an immediate stage (no data) gets a no-data revision. Which windows revise what is decided when
    the windows are made (add, end_night); the revisions come out when their last model call is done,
    in epoch order, into `revised` (take them with take_revised).
    """

    def __init__(self, lookahead: int, span: int = 1):
        self.lookahead, self.span = int(lookahead), int(span)
        check_revision_span(self.lookahead, self.span)
        first, last = revision_lags(self.lookahead, self.span)
        self._lags = range(first, last + 1)                  # the lags a window reads while the night goes on
        self.revised: list[StagedEpoch] = []
        self._waiting: deque[_EpochRevision] = deque()      # the night's epochs not revised yet
        self._waiting_with_data = 0                          # how many of them have data
        self._last: _Revision | None = None                  # the night's latest window

    def add(self, epoch_start_s: float, no_data: bool) -> tuple[_Revision, bool]:
        """The window that ends at this epoch: what it revises, and whether its model call is needed
        (some epoch it stages or may still revise has data)."""
        self._waiting.append(_EpochRevision(epoch_start_s, bool(no_data)))
        self._waiting_with_data += not no_data
        needed = self._waiting_with_data > 0
        revision = self._last = _Revision(self)
        n = len(self._waiting)  # the epoch lag j back is at n - 1 - j
        revision.reads = [(self._waiting[n - 1 - lag], lag) for lag in self._lags if lag < n]
        if n > self.lookahead:
            done = self._waiting.popleft()
            self._waiting_with_data -= not done.no_data
            revision.completes.append(done)
        return revision, needed

    def end_night(self) -> None:
        """The night ends: each epoch still waiting is revised by the windows it has (revision_lags), or
        by the night's last window at the shorter lag."""
        n = len(self._waiting)
        if n:
            reads = []
            for i, epoch in enumerate(self._waiting):
                later = n - 1 - i
                if later < self._lags.start:  # no window of the span yet: the last one
                    reads.append((epoch, later))
            self._last.add(reads, list(self._waiting))
        self._waiting.clear()
        self._waiting_with_data = 0
        self._last = None

    def take(self) -> list[StagedEpoch]:
        out = self.revised[:]
        self.revised.clear()  # in place: windows not staged yet release into this list
        return out

    def latest_window(self) -> _Revision | None:
        """The night's latest window while epochs wait (a night's end revises them from it), else None."""
        return self._last if self._waiting else None

    def still_needed(self, revision: _Revision) -> bool:
        """Whether a window's output still matters once what it completes was revised (a service's
        replay after a restart): it is the night's latest window while epochs wait, or it adds to the
        revision of an epoch still waiting."""
        waiting = {id(epoch) for epoch in self._waiting}
        return revision is self.latest_window() or any(id(epoch) in waiting for epoch, _ in revision.reads)


class PendingEpoch(NamedTuple):
    """A closed epoch waiting for the model call (StagerPool.take_pending, then stage_pending)."""
    epoch_start_s: float
    window: np.ndarray | None        # raw feature window; None: not run (no data, and nothing to revise)
    no_data: bool                    # no immediate stage (features.no_data)
    revision: _Revision | None = None  # what this window's output revises (a model with a lookahead)
    output: np.ndarray | None = None  # a whole-night model: its step's every-lag probabilities (no window)


NIGHT_END = None  # in StreamWindows.closed: the night ends here (its last window revises what still waits)


class StreamWindows:
    """The model side of one stream: its row of the feature state (shared in a StagerPool), the closed
    epochs waiting for their feature rows, the windows waiting for the model call, the revisions.

    Feature rows and windows are made when the epochs are taken (`take`; a pool makes them for all its
    wearers at once, `featurize_many`), so closing an epoch costs nothing here. The wearer's resting
    heart rate (NaN: none) is the wearer's, not a night's: every night of the stream starts with it.
    """

    def __init__(self, state: FeatureState, row: int, lookahead: int, record_features: bool,
                 resting_hr_bpm: float = math.nan, revision_span: int = 1):
        self.state, self.row = state, int(row)
        self.lookahead, self.revision_span, self.record_features = int(lookahead), int(revision_span), record_features
        self.reset(new_stats())
        self.state.features.set_resting([self.row], resting_hr_bpm)  # a reused pool row: this wearer's

    def reset(self, stats: dict[str, int]) -> None:
        """Forget everything (closed and pending epochs, revisions) and start the feature row's night."""
        self.stats = stats  # the intake's counters: epochs_no_data is counted here
        self.feature_rows: list[np.ndarray] = []
        self.closed: list[_Closed | None] = []
        self.pending: list[PendingEpoch] = []
        self.revisions = Revisions(self.lookahead, self.revision_span) if self.lookahead else None
        self.state.features.reset([self.row])

    @property
    def resting_hr_bpm(self) -> float:
        return float(self.state.features.resting_hr_bpm[self.row])

    def set_resting(self, resting_hr_bpm: float) -> None:
        """The resting heart rate for the epochs closed from now on (those closed before keep theirs)."""
        self.featurize()
        self.state.features.set_resting([self.row], resting_hr_bpm)

    @property
    def n_waiting(self) -> int:
        return sum(c is not NIGHT_END for c in self.closed) + len(self.pending)

    def end_night(self) -> None:
        """The night ends after the epochs closed so far: the revisions still due come from its last window."""
        if self.revisions is None:
            return
        if not self.closed:
            self.revisions.end_night()
        elif self.closed[-1] is not NIGHT_END:
            self.closed.append(NIGHT_END)

    def new_night(self) -> None:
        """Finish the night (its closed epochs read its feature state, its revisions end), start the next."""
        self.end_night()
        self.featurize()
        self.state.features.reset([self.row])

    def featurize(self) -> None:
        StreamWindows.featurize_many([self])

    @staticmethod
    def featurize_many(streams: list["StreamWindows"]) -> None:
        """Feature rows and windows of the closed epochs of streams that share one feature state, into
        their pending lists: the d-th closed epoch of every stream at once, each stream in its order."""
        waiting = [s for s in streams if s.closed]
        depth = 0
        while waiting:
            items = [s.closed[depth] for s in waiting]
            closing = [i for i, c in enumerate(items) if c is not NIGHT_END]
            if len(closing) == len(items):
                StreamWindows._add(waiting, items)
            else:
                if closing:
                    StreamWindows._add([waiting[i] for i in closing], [items[i] for i in closing])
                for s, c in zip(waiting, items):
                    if c is NIGHT_END:
                        s.revisions.end_night()
            depth += 1
            waiting = [s for s in waiting if len(s.closed) > depth]
        for s in streams:
            s.closed = []

    @staticmethod
    def _add(streams: list["StreamWindows"], closed: list[_Closed]) -> None:
        """One closed epoch for each of several streams sharing one feature state."""
        state = streams[0].state
        rows = np.array([s.row for s in streams], np.int64)
        aggregates = {name: np.array([c.aggregates[name] for c in closed]) for name in features.FEATURE_AGGREGATES}
        feature_rows, no_data = state.features.update(np.array([c.hours_since_start for c in closed]),
                                                      rows=rows, **aggregates)
        windows, _ = state.ring.push(np.array([c.k for c in closed], np.int64), feature_rows, rows)
        stepped = isinstance(state.ring, NightSteps)  # the model ran in push: its outputs, not windows
        for i, (s, c) in enumerate(zip(streams, closed)):
            if s.record_features:
                s.feature_rows.append(feature_rows[i])
            s.stats["epochs_no_data"] += int(no_data[i])
            revision, needed = None, not no_data[i]
            if s.revisions is not None:  # a no-data epoch's window may still revise an earlier epoch
                revision, needed = s.revisions.add(c.epoch_start_s, no_data[i])
            s.pending.append(PendingEpoch(c.epoch_start_s, windows[i] if needed and not stepped else None,
                                          bool(no_data[i]), revision, windows[i] if needed and stepped else None))

    def take(self) -> list[PendingEpoch]:
        """The epochs closed since the last call, with their windows."""
        self.featurize()
        pending, self.pending = self.pending, []
        return pending

    def take_revised(self) -> list[StagedEpoch]:
        return [] if self.revisions is None else self.revisions.take()


def stage_pending(model: torch.nn.Module, scaler: dl.FeatureScaler, target_pos: int,
                  pending: list[PendingEpoch], batch_size: int = 1024) -> list[StagedEpoch]:
    """The immediate StagedEpochs of pending epochs, in order: one model call for their windows. With a
    lookahead, the same call gives the revisions the windows hold: they go to their streams' revised
    epochs (take_revised), in order."""
    called = [i for i, item in enumerate(pending) if item.window is not None]
    lookahead = lookahead_of(model)
    probs = np.zeros((0, 1 + lookahead, 4))
    if called:
        windows = scaler.transform(np.stack([pending[i].window for i in called]))
        if lookahead:
            probs = predict_windows(model, windows, target_pos, batch_size, every_lag=True)
        else:
            probs = predict_windows(model, windows, target_pos, batch_size)[:, None]
    stepped = [i for i, item in enumerate(pending) if item.output is not None]  # a whole-night model's
    if stepped:
        called, probs = called + stepped, np.concatenate([probs, np.stack([pending[i].output for i in stepped])])
    out = [StagedEpoch(item.epoch_start_s, -1, NO_DATA_PROBABILITIES.copy()) for item in pending]
    for i, p, stage in zip(called, probs, features.stages_of(probs[:, 0])):
        if not pending[i].no_data:
            out[i] = StagedEpoch(pending[i].epoch_start_s, int(stage), p[0])
    if lookahead:
        by_item = dict(zip(called, probs))
        for i, item in enumerate(pending):  # in order: a stream's revisions come out in epoch order
            if item.revision is not None:
                item.revision.settle(by_item.get(i))
    return out


# ----------------------------------------------------------------------------- the streaming predictor

class StreamingStager:
    """Sleep stages of one wearer from readings pushed as they arrive; see the module docstring for the rules.

    model, scaler, checkpoint: as `checkpoint.load_model_from_checkpoint` returns them; the checkpoint
    must be causal. start_s: start of epoch 0 in the readings' time base (None: the first reading's
    time floored to a multiple of 30 s). max_delay_s: how long past an epoch's end to wait for late
    readings. max_gap_s: a jump of the clock larger than this starts a new night.
    record_features: keep every emitted epoch's raw feature row in `feature_rows` (tests, debugging;
    grows with the night). shared, row: a StagerPool's shared feature state and this wearer's row in it
    (default: a state of its own). resting_hr_bpm: the wearer's resting heart rate before the night
    (data_loader.resting_heart_rate of their earlier readings; None: none), which the features
    hr_minus_resting_bpm and resting_hr_missing read; kept across nights and reset(), changed by
    set_resting_hr.

    Three pieces: `intake` (StreamIntake: the input rules, the clock, the samples of open epochs, the
    counters), epoch_aggregates (closing an epoch), `windows` (StreamWindows: feature rows, windows
    waiting for the model call, revisions). This class orders them: what a push, a tick or a night's
    end does. Push, flush and tick return the immediate stages; a model with a lookahead also revises
    each epoch once its look-ahead has arrived: take_revised().
    """

    def __init__(self, model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict,
                 start_s: float | None = 0.0, *, max_delay_s: float = 0.0,
                 max_gap_s: float = DEFAULT_MAX_GAP_S, record_features: bool = False,
                 shared: FeatureState | None = None, row: int = 0, resting_hr_bpm: float | None = None):
        if not checkpoint.get("causal"):
            raise ValueError("StreamingStager needs a causal checkpoint (trained with --causal, e.g. "
                             "checkpoints/hybrid_causal/model.pth): an offline model reads epochs after the one "
                             "it predicts, which a live stream does not have yet")
        unknown = [f for f in checkpoint["features"] if f not in features.FEATURES]
        if unknown:
            raise ValueError(f"checkpoint uses feature(s) {unknown} that the stream cannot compute")
        if not (max_delay_s >= 0 and math.isfinite(max_delay_s)):
            raise ValueError(f"max_delay_s must be a finite number >= 0, got {max_delay_s}")
        if not max_gap_s > max_delay_s + EPOCH_S:
            raise ValueError(f"max_gap_s must exceed max_delay_s + {EPOCH_S} s, got {max_gap_s}")
        if start_s is not None and not (math.isfinite(start_s) and abs(start_s) <= MAX_ABS_TIME_S):
            raise ValueError(f"start_s must be finite (|start_s| <= {MAX_ABS_TIME_S:g} s) or None, got {start_s}")
        self.model, self.scaler, self.checkpoint = model, scaler, checkpoint
        self.features = tuple(checkpoint["features"])
        self.seq_len, self.target_pos = int(checkpoint["seq_len"]), int(checkpoint["target_pos"])
        self.lookahead = lookahead_of(model)
        if self.lookahead and self.seq_len and self.target_pos != self.seq_len - 1:
            raise ValueError("a model with a lookahead revises from a window's last position: target_pos must be "
                             f"seq_len - 1 = {self.seq_len - 1}, got {self.target_pos}")
        self.intake = StreamIntake(start_s, max_delay_s, max_gap_s)
        self.windows = StreamWindows(
            shared or FeatureState(features.IncrementalFeatures(1, self.features), window_ring(model, scaler, checkpoint, 1)),
            row, self.lookahead, record_features, checked_resting_hr(resting_hr_bpm), revision_span_of(model))
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "StreamingStager":
        """Load a causal checkpoint and make a stager for one wearer (kwargs: start_s, max_delay_s, ...)."""
        model, scaler, checkpoint = load_model_from_checkpoint(path)
        return cls(model, scaler, checkpoint, **kwargs)

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget everything (readings, features, counters, revisions): the next reading starts a new night at start_s."""
        self.intake.reset()
        self.windows.reset(self.intake.stats)

    start_s = property(lambda self: self.intake.start_s, doc="Start of epoch 0 of the current night (s).")
    clock = property(lambda self: self.intake.clock, doc="Largest valid timestamp so far (or flush's now_s).")
    stats = property(lambda self: self.intake.stats, doc="The stream's counters (new_stats).")
    n_closed = property(lambda self: self.intake.n_closed, doc="Epochs closed in the current night.")
    initial_start_s = property(lambda self: self.intake.initial_start_s)
    max_delay_s = property(lambda self: self.intake.max_delay_s)
    max_gap_s = property(lambda self: self.intake.max_gap_s)
    feature_rows = property(lambda self: self.windows.feature_rows,
                            doc="Raw feature rows of the emitted epochs (record_features=True).")

    def buffered_samples(self) -> dict[str, int]:
        """Readings held per signal (only those of open epochs)."""
        return self.intake.buffered_samples()

    def open_epochs(self) -> list[int]:
        """Indices (in the current night) of the epochs holding readings, all >= n_closed."""
        return self.intake.open_epochs()

    @property
    def n_waiting(self) -> int:
        """Epochs closed but not returned yet (a StagerPool returns them from predict / take_pending)."""
        return self.windows.n_waiting

    def epoch_start(self, k: int) -> float:
        return self.intake.epoch_start(k)

    def __repr__(self) -> str:
        return (f"StreamingStager(start_s={self.start_s}, clock={self.clock}, epochs_closed={self.n_closed}, "
                f"buffered={self.buffered_samples()})")

    # ------------------------------------------------------------------ pushing readings

    def push_heart_rate(self, t_s, bpm) -> list[StagedEpoch]:
        """Heart-rate readings (s, bpm); returns the epochs this closed."""
        self._ingest("heart_rate", t_s, bpm)
        return self._emit()

    def push_acceleration(self, t_s, x, y, z) -> list[StagedEpoch]:
        """Raw wrist acceleration (s, g on each axis, ~50 Hz); returns the epochs this closed."""
        self._ingest("motion", t_s, x, y, z)
        return self._emit()

    def push_counts(self, t_s, count) -> list[StagedEpoch]:
        """15 s activity counts (Walch), an alternative to raw acceleration; returns the epochs this closed."""
        self._ingest("counts", t_s, count)
        return self._emit()

    def push_steps(self, t_s, steps) -> list[StagedEpoch]:
        """Step counts (s, steps since the previous reading); returns the epochs this closed."""
        self._ingest("steps", t_s, steps)
        return self._emit()

    def push(self, kind: str, t_s, *values) -> list[StagedEpoch]:
        """push_<kind> by name: kind in heart_rate, motion (x, y, z), counts, steps."""
        self._ingest(kind, t_s, *values)
        return self._emit()

    def flush(self, now_s: float, *, revise: bool = True) -> list[StagedEpoch]:
        """Advance the clock to now_s and close every epoch that ends at or before now_s.

        The caller states that nothing older than now_s will come (end of a recording, or a
        clock tick while the watch is off): max_delay_s is not waited for. Later readings in
        these epochs are late. revise: also the night's end for the revised stage (every epoch
        still waiting for its look-ahead is revised from the latest window); False: a clock tick only.
        """
        self._flush(now_s, revise)
        return self._emit()

    def tick(self, now_s: float) -> list[StagedEpoch]:
        """Advance the clock to now_s under the normal rule: closes epochs ending at or before now_s - max_delay_s."""
        self._advance(now_s, wait_delay=True)
        return self._emit()

    @property
    def resting_hr_bpm(self) -> float:
        """The wearer's resting heart rate the features read (NaN: none)."""
        return self.windows.resting_hr_bpm

    def set_resting_hr(self, resting_hr_bpm: float | None) -> None:
        """The wearer's resting heart rate (bpm; None or NaN: none) for the epochs closed from now on."""
        self.windows.set_resting(checked_resting_hr(resting_hr_bpm))

    def take_revised(self) -> list[StagedEpoch]:
        """The revised stages given since the last call, in epoch order: StagedEpoch(start of the earlier
        epoch, revised stage or -1 for no data, probabilities). Epoch t's comes with the immediate stage
        of epoch t + lookahead (the same model call), or at the night's end (flush, a new night) from
        the night's last window; [] for a model without a lookahead. Until taken they are kept (one per
        epoch)."""
        return self.windows.take_revised()

    def push_epoch_aggregates(self, heart_rate_bpm: float = math.nan, activity_count: float = math.nan,
                              steps: float = math.nan, *, heart_rate_std_bpm: float | None = None,
                              motion_mag_mean_g: float = math.nan, motion_mag_std_g: float = math.nan
                              ) -> list[StagedEpoch]:
        """Close the next epoch with given per-epoch aggregates (NaN = missing) instead of raw readings.

        For callers that already reduce each 30 s epoch (the notebook API). heart_rate_std_bpm
        defaults to 0 (one reading) when the heart rate is given. Cannot be mixed with raw readings
        of open epochs.
        """
        intake = self.intake
        if any(intake.buffers[kind] for kind in KINDS):
            raise ValueError("push_epoch_aggregates cannot be mixed with raw readings still held for open epochs")
        if intake.start_s is None:
            intake.start_s = 0.0
        hr = float(heart_rate_bpm)
        if heart_rate_std_bpm is None:
            heart_rate_std_bpm = math.nan if math.isnan(hr) else 0.0
        k = intake.n_closed
        self.windows.closed.append(intake.close(k, {
            "heart_rate_bpm": hr, "heart_rate_std_bpm": float(heart_rate_std_bpm),
            "activity_count": float(activity_count), "motion_mag_mean_g": float(motion_mag_mean_g),
            "motion_mag_std_g": float(motion_mag_std_g), "steps": float(steps)}))
        end = intake.epoch_start(k + 1)
        intake.clock = end if intake.clock is None else max(intake.clock, end)
        return self._emit()

    # ------------------------------------------------------------------ internals: the order of things

    def _ingest(self, kind: str, t_s, *values) -> None:
        intake = self.intake
        t, v = intake.valid(kind, t_s, values)
        while len(t):
            stop, clock_before = intake.next_segment(t)
            if stop == 0:
                self._start_new_night(float(t[0]))
                continue
            intake.store(kind, t[:stop], v[:stop], clock_before)
            self._close_until(intake.closable(intake.clock - intake.max_delay_s))
            t, v = t[stop:], v[stop:]

    def _advance(self, now_s: float, wait_delay: bool) -> None:
        now = self.intake.check_now(now_s)
        if self.intake.jumps(now):
            self._start_new_night(now)
        self._close_until(self.intake.closable(self.intake.move_clock(now, wait_delay)))

    def _flush(self, now_s: float, revise: bool) -> None:
        self._advance(now_s, wait_delay=False)
        if revise:
            self.windows.end_night()

    def _start_new_night(self, t_new: float) -> None:
        """The clock jumps by more than max_gap_s: finish the night so far, start a new one at t_new's epoch."""
        self._close_until(self.intake.epochs_through_clock())
        self.windows.new_night()
        self.intake.new_night(t_new)

    def _close_until(self, n_target: int) -> None:
        intake = self.intake
        while intake.n_closed < n_target:
            k = intake.n_closed
            self.windows.closed.append(intake.close(k, epoch_aggregates(intake, k)))

    def _emit(self) -> list[StagedEpoch]:
        return stage_pending(self.model, self.scaler, self.target_pos, self.windows.take())


# ----------------------------------------------------------------------------- many wearers, one model call

class StagerPool:
    """One StreamingStager per wearer sharing one model; `predict()` runs it on all of them at once
    (one call up to 64 windows, a few power-of-two calls above: see predict_windows).

        pool = StagerPool(model, scaler, checkpoint)
        pool.push("watch-17", "heart_rate", t, bpm)        # queues the epochs this closes
        pool.push("watch-42", "counts", t, count)
        results = pool.predict()                          # {wearer: [StagedEpoch, ...]}, one batched call
        revised = pool.take_revised()                     # {wearer: [StagedEpoch, ...]}: a model with a lookahead

    The wearers' feature state lives in one IncrementalFeatures (a row per wearer), so predict()
    computes the feature rows of every wearer's closed epochs with a few array operations.
    """

    def __init__(self, model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict,
                 batch_size: int = 1024, **stager_kwargs):
        self.model, self.scaler, self.checkpoint = model, scaler, checkpoint
        self.batch_size, self.stager_kwargs = batch_size, stager_kwargs
        self.stagers: dict = {}
        probe = StreamingStager(model, scaler, checkpoint, **stager_kwargs)  # fail early on a bad checkpoint
        self.state = FeatureState(features.IncrementalFeatures(0, probe.features), window_ring(model, scaler, checkpoint, 0))
        self._free_rows: list[int] = []

    def __getitem__(self, wearer) -> StreamingStager:
        if wearer not in self.stagers:
            if not self._free_rows:  # grow by doubling: adding wearers one by one stays linear
                count = max(16, self.state.features.n_wearers)
                self._free_rows = self.state.features.add_rows(count).tolist()[::-1]
                self.state.ring.add_rows(count)
            self.stagers[wearer] = StreamingStager(self.model, self.scaler, self.checkpoint, shared=self.state,
                                                   row=self._free_rows.pop(), **self.stager_kwargs)
        return self.stagers[wearer]

    def __len__(self) -> int:
        return len(self.stagers)

    def push(self, wearer, kind: str, t_s, *values) -> None:
        """Queue readings of one wearer; closed epochs wait for predict()."""
        self[wearer]._ingest(kind, t_s, *values)

    def flush(self, now_s: float, wearers: Iterable | None = None, *, revise: bool = True) -> None:
        """StreamingStager.flush for these wearers (default all); the epochs wait for predict()."""
        for wearer in (self.stagers if wearers is None else wearers):
            self[wearer]._flush(now_s, revise)

    def set_resting_hr(self, wearer, resting_hr_bpm: float | None) -> None:
        """One wearer's resting heart rate (StreamingStager.set_resting_hr); the default is stager_kwargs'
        resting_hr_bpm, or none."""
        self[wearer].set_resting_hr(resting_hr_bpm)

    def remove(self, wearer) -> None:
        """Forget a wearer; a StreamingStager of it still held elsewhere keeps working on a state of its own."""
        stager = self.stagers.pop(wearer, None)
        if stager is not None:
            windows = stager.windows
            windows.featurize()
            windows.state = FeatureState(self.state.features.take_row(windows.row), self.state.ring.take_row(windows.row))
            self._free_rows.append(windows.row)
            windows.row = 0

    def predict(self) -> dict:
        """Stages of every epoch closed since the last call, by wearer: one batched model call."""
        owners, pending = self.take_pending()
        results: dict = {}
        staged = stage_pending(self.model, self.scaler, int(self.checkpoint["target_pos"]), pending, self.batch_size)
        for wearer, epoch in zip(owners, staged):
            results.setdefault(wearer, []).append(epoch)
        return results

    def take_pending(self) -> tuple[list, list[PendingEpoch]]:
        """The feature windows of every epoch closed since the last call, not yet staged: (owner wearer of
        each, [PendingEpoch]), in each wearer's order; stage_pending stages them (predict() does both; a
        server runs the model call off its event loop)."""
        StreamWindows.featurize_many([s.windows for s in self.stagers.values()])
        owners, pending = [], []
        for wearer, stager in self.stagers.items():
            for item in stager.windows.take():
                owners.append(wearer)
                pending.append(item)
        return owners, pending

    def take_replayed(self) -> tuple[list, list[PendingEpoch]]:
        """take_pending after replaying readings whose stages, immediate and revised, were delivered before
        (a service rebuilding its streams after a restart): their epochs are not staged again and what their
        windows revised is not revised again. Returns the windows still needed, as take_pending does: those
        that add to the revision of an epoch still waiting, and each stream's latest window while epochs
        of its night wait (should the night end before the next window, they are revised from it).
        stage_pending on them gives nothing new (its immediate stages were delivered) but settles what
        later windows and a night's end will take from them."""
        owners, pending = self.take_pending()
        needed_owners, needed = [], []
        for wearer, item in zip(owners, pending):
            if item.revision is None:
                continue
            item.revision.completes = []  # revised before the restart
            revisions = self.stagers[wearer].windows.revisions
            if revisions is not None and revisions.still_needed(item.revision):
                needed_owners.append(wearer)
                needed.append(item)
        return needed_owners, needed

    def take_revised(self, wearers: Iterable | None = None) -> dict:
        """The revised stages staged since the last call, by wearer (StreamingStager.take_revised); of these
        wearers only (default all: a server with many wearers asks those it just staged)."""
        out = {}
        for wearer in (self.stagers if wearers is None else wearers):
            revised = self.stagers[wearer].take_revised()
            if revised:
                out[wearer] = revised
        return out


# ----------------------------------------------------------------------------- replaying recorded nights

def recorded_readings(data_dir: str | Path, subject_id: str) -> dict[str, np.ndarray]:
    """A subject's raw rows by signal (heart_rate, motion, counts, steps), each sorted by time (stable).

    Non-finite rows are already gone (read_signal); the stream applies the other input rules.
    """
    files = dl.subject_files(data_dir, subject_id)
    readings = {}
    for kind in KINDS:
        if kind in files:
            rows = dl.read_signal(files[kind], dl.FILE_KINDS[kind][2])
            readings[kind] = rows[np.argsort(rows[:, 0], kind="stable")]
    if "motion" in readings:
        readings.pop("counts", None)  # raw motion wins, as offline
    return readings


def time_ordered_runs(readings: dict[str, np.ndarray], lo_s: float = -math.inf, hi_s: float = math.inf,
                      epoch_grid_s: float | None = None):
    """(kind, rows) runs of one signal each, all signals merged by timestamp, rows with lo_s <= t < hi_s.

    Pushing the runs in this order is what a live stream of these readings looks like.
    epoch_grid_s: the start of any epoch of the stager they are pushed into. Then readings are merged
    by epoch instead (within an epoch, one run per signal, each in time order), in two or three pushes
    per epoch instead of one per alternation of the signals. The stager gives exactly the same result
    as long as no reading can start a new night (none more than max_gap_s after its clock): an epoch
    closes only once the clock passes its end (later epochs' readings), and the order of readings
    inside an open epoch does not matter. A jump, though, is found at whichever reading comes first.
    """
    kinds = [k for k in KINDS if k in readings and len(readings[k])]
    if not kinds:
        return
    if epoch_grid_s is not None and lo_s == -math.inf and hi_s == math.inf:
        span = [(float(readings[k][:, 0].min()), float(readings[k][:, 0].max())) for k in kinds]
        first, last = (math.floor((x - epoch_grid_s) / EPOCH_S) for x in (min(a for a, _ in span), max(b for _, b in span)))
        if first == last:  # one epoch (a live push): one run per signal, no merge needed
            for k in kinds:
                rows = readings[k]
                yield k, rows if (np.diff(rows[:, 0]) >= 0).all() else rows[np.argsort(rows[:, 0], kind="stable")]
            return
    t = np.concatenate([readings[k][:, 0] for k in kinds])
    code = np.concatenate([np.full(len(readings[k]), i) for i, k in enumerate(kinds)])
    row = np.concatenate([np.arange(len(readings[k])) for k in kinds])
    if epoch_grid_s is None:
        order = np.argsort(t, kind="stable")
    else:
        order = np.lexsort((t, code, np.floor((t - epoch_grid_s) / EPOCH_S)))
    order = order[(t[order] >= lo_s) & (t[order] < hi_s)]
    code, row = code[order], row[order]
    bounds = np.flatnonzero(np.diff(code)) + 1
    for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(code)]])):
        if b > a:
            yield kinds[code[a]], readings[kinds[code[a]]][row[a:b]]


def replay(stager: StreamingStager, readings: dict[str, np.ndarray], end_s: float | None = None,
           batch_sizes: Iterable[int] | None = None) -> list[StagedEpoch]:
    """Push recorded readings through the stager in time order, as a live stream would deliver them.

    All signals are merged by timestamp and pushed one run of one signal at a time (at most
    `batch_sizes` readings per call, cycled; default: whole runs). Readings at or after end_s are
    left out, then flush(end_s) closes the last epoch. Returns every emitted epoch.
    """
    sizes = iter(()) if batch_sizes is None else _cycle(batch_sizes)
    out: list[StagedEpoch] = []
    for kind, rows in time_ordered_runs(readings, hi_s=math.inf if end_s is None else end_s):
        pos = 0
        while pos < len(rows):
            size = next(sizes, None) or len(rows)
            chunk = rows[pos:pos + size]
            out.extend(stager.push(kind, chunk[:, 0], *chunk[:, 1:].T))
            pos += size
    if end_s is not None:
        out.extend(stager.flush(end_s))
    return out


def _cycle(values: Iterable[int]):
    values = list(values)
    while True:
        yield from values


# replay_nights' columns of the revised stage (a model with a lookahead): pred_revised, p_wake_revised, ...
REVISED_COLUMNS = [f"{name}_revised" for name in PREDICTION_COLUMNS[PREDICTION_COLUMNS.index("pred"):]]


def replay_nights(model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict, data_dir: str | Path,
                  nights: list[dl.Night], **stager_kwargs) -> pd.DataFrame:
    """The offline evaluation's frame (evaluation.PREDICTION_COLUMNS), computed by streaming each night's files.

    A model with a lookahead adds REVISED_COLUMNS (pred_revised, p_wake_revised, ...): the revised stage
    of each epoch, as predict_nights(..., revised=True) gives it. Each stream gets its night's resting heart rate.
    """
    frames = []
    for night in nights:
        stager = StreamingStager(model, scaler, checkpoint, start_s=float(night.epoch_start_s[0]),
                                 resting_hr_bpm=night.resting_hr_bpm, **stager_kwargs)
        end_s = float(night.epoch_start_s[-1] + EPOCH_S)
        epochs = replay(stager, recorded_readings(data_dir, night.subject_id), end_s)
        frame = prediction_frame(night, _night_probabilities(night, epochs, "closed"))
        if stager.lookahead:
            revised = prediction_frame(night, _night_probabilities(night, stager.take_revised(), "revised"))
            for name, column in zip(PREDICTION_COLUMNS[PREDICTION_COLUMNS.index("pred"):], REVISED_COLUMNS):
                frame[column] = revised[name]
        frames.append(frame)
    if frames:
        return pd.concat(frames, ignore_index=True)
    return pd.DataFrame(columns=PREDICTION_COLUMNS + (REVISED_COLUMNS if lookahead_of(model) else []))


def _night_probabilities(night: dl.Night, epochs: list[StagedEpoch], what: str) -> np.ndarray:
    """(n_epochs, 4) of a replayed night's epochs, checked against the night's grid."""
    starts = np.array([e.epoch_start_s for e in epochs])
    if len(epochs) != len(night) or not np.allclose(starts, night.epoch_start_s):
        raise RuntimeError(f"subject {night.subject_id}: the stream {what} {len(epochs)} epochs, "
                           f"the night has {len(night)}")
    return np.stack([e.probabilities for e in epochs])


# ----------------------------------------------------------------------------- notebook API

DEFAULT_WEARER = "default"


class Loaded(NamedTuple):
    """What load_model registers for a model: its checkpoint (without the weights) and its file."""
    checkpoint: dict
    path: str


# Registries, weakly keyed by model (a deleted model takes its entries with it): what load_model
# loaded it from, and per wearer the StreamingStager that holds the context.
_LOADED: "weakref.WeakKeyDictionary[torch.nn.Module, Loaded]" = weakref.WeakKeyDictionary()
_CONTEXTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def load_model(checkpoint: str | Path, arch: str | None = None) -> tuple[torch.nn.Module, dl.FeatureScaler]:
    """(model, scaler) of a causal checkpoint for predict_label_from_triplet; `loaded(model)` tells where from."""
    model, scaler, ckpt = load_model_from_checkpoint(checkpoint, expected_arch=arch)
    if not ckpt["causal"]:
        raise ValueError(f"checkpoint {checkpoint} is an offline model; real-time staging needs a causal one "
                         f"(checkpoints/{ckpt['arch']}_causal/model.pth, trained with --causal)")
    _LOADED[model] = Loaded({k: v for k, v in ckpt.items() if k != "state_dict"}, str(checkpoint))
    return model, scaler


def loaded(model: torch.nn.Module) -> Loaded | None:
    """The checkpoint (without weights) and path load_model read this model from; None for other models."""
    return _LOADED.get(model)


def get_context(model: torch.nn.Module, scaler: dl.FeatureScaler | None = None,
                wearer=DEFAULT_WEARER) -> StreamingStager:
    """The StreamingStager that holds `wearer`'s context for this model (made with `scaler` on first use)."""
    contexts = _CONTEXTS.setdefault(model, {})
    if wearer not in contexts:
        info = loaded(model)
        if info is None or scaler is None:
            raise ValueError("this model has no context yet and no checkpoint info: load it with load_model(), "
                             "or pass context=StreamingStager(model, scaler, checkpoint)")
        contexts[wearer] = StreamingStager(model, scaler, info.checkpoint)
    return contexts[wearer]


def reset_context(model: torch.nn.Module, wearer=None) -> None:
    """Forget the context of one wearer of this model, or of all its wearers (wearer=None)."""
    contexts = _CONTEXTS.get(model)
    if contexts is None:
        return
    if wearer is None:
        contexts.clear()
    else:
        contexts.pop(wearer, None)


def _check_reading(name: str, value, low: float, high: float, what: str):
    if value is None:
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number ({what})") from None
    if math.isnan(number) or not low <= number <= high:
        raise ValueError(f"{name}={value!r} is outside the plausible range {low:g}-{high:g} ({what}); "
                         f"pass None for a missing reading")
    return number


def predict_label_from_triplet(model: torch.nn.Module, scaler: dl.FeatureScaler, hr=70.0, motion=0.05, steps=0.0,
                               *, wearer=DEFAULT_WEARER, context: StreamingStager | None = None
                               ) -> tuple[int, np.ndarray]:
    """Stage of the next 30 s epoch from one reading per epoch; context is kept between calls.

    hr: mean heart rate over the epoch (bpm, 25-250). motion: activity count per 15 s bin as in
    the counts files (Walch counts, typically 0 to a few hundred; 0-10000 accepted). steps: steps
    in the epoch (0-300). None means missing (the watch was off): filled as the model was trained.
    Each call is the epoch after the previous call's. The context (expanding statistics, the last
    seq_len epochs or a whole-night model's step state) lives per (model, wearer): use one `wearer` key per person, or pass your own
    `context=StreamingStager(...)`; reset_context(model[, wearer]) starts a new night.
    Returns (stage 0 Wake / 1 Light / 2 Deep / 3 REM, probabilities (4,)).
    """
    hr = _check_reading("hr", hr, dl.HR_MIN_BPM, dl.HR_MAX_BPM, "mean heart rate over the epoch in bpm")
    motion = _check_reading("motion", motion, 0.0, MAX_ACTIVITY_COUNT,
                            "activity count per 15 s bin as in the counts files")
    steps = _check_reading("steps", steps, 0.0, MAX_STEPS_PER_EPOCH, "steps in the 30 s epoch")
    stager = context if context is not None else get_context(model, scaler, wearer)
    if stager.scaler is not scaler and not (np.array_equal(stager.scaler.mean, scaler.mean)
                                            and np.array_equal(stager.scaler.scale, scaler.scale)):
        raise ValueError(f"wearer {wearer!r}'s context was made with another scaler; pass the scaler load_model "
                         "returned with this model, or reset_context(model, wearer) first")
    (epoch,) = stager.push_epoch_aggregates(hr, motion, steps)
    return epoch.stage, epoch.probabilities
