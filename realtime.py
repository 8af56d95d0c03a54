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
- Memory: only the samples of open epochs, plus O(seq_len + 60) numbers of feature state.

`StagerPool` batches the model call across many wearers; `StagerBatch` keeps many wearers in
lockstep with their state in numpy arrays (no Python work per wearer; for a server that ticks every
30 s); `predict_label_from_triplet` is the notebook API (one (hr, motion, steps) reading per epoch,
context kept per model and wearer).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
import weakref
import concurrent.futures
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, TypeVar

import numpy as np
import torch

import data_loader as dl

EPOCH_S = dl.EPOCH_S
KINDS = ("heart_rate", "motion", "counts", "steps")
_N_VALUES = {"heart_rate": 1, "motion": 3, "counts": 1, "steps": 1}
STEPS_MARGIN_S = 600.0   # as night_from_arrays: steps are unknown 10 min beyond the readings
DEFAULT_MAX_GAP_S = 6 * 3600.0
SPLIT_ABOVE = 64         # predict_windows: more windows than this go to the model in power-of-two calls
MAX_ABS_TIME_S = 1e12    # ~31,700 years of seconds (Unix time is ~1.7e9; milliseconds would be ~1.7e12)
# notebook API plausibility limits (per 30 s epoch)
MAX_ACTIVITY_COUNT = 10_000.0
MAX_STEPS_PER_EPOCH = 300.0
T, R = TypeVar("T"), TypeVar("R")


class StagedEpoch(NamedTuple):
    """One closed epoch: its start (s), the predicted stage (0 Wake, 1 Light, 2 Deep, 3 REM), probabilities (4,)."""
    epoch_start_s: float
    stage: int
    probabilities: np.ndarray


@torch.inference_mode()
def predict_windows(model: torch.nn.Module, windows: np.ndarray, target_pos: int,
                    batch_size: int = 1024) -> np.ndarray:
    """Stage probabilities (n, 4) of scaled windows (n, seq_len, n_features), read at target_pos.

    The same computation as evaluation.predict_night, for windows gathered from any wearers. Up to
    SPLIT_ABOVE windows go to the model in one call; more go in power-of-two calls of at most
    batch_size (1000 = 512 + 256 + 128 + 64 + 32 + 8): a pool's batch size changes every call,
    and every new input shape leaves allocator fragmentation and cached kernels behind (a
    200-wearer soak grew ~60 MiB per simulated hour with one call of any size; with power-of-two
    shapes it stays flat). Outputs are per window: only the last bits depend on the split.
    Reading the last position of a model with forward_last (both architectures) runs that instead:
    the same logits (~1e-6), without the work that only the other positions' outputs need.
    On CPU with several torch threads, more than SPLIT_ABOVE windows are split into one part per
    thread (each chunked as above) and the parts run side by side (in_parallel).
    """
    if model.training:
        model.eval()
    windows = np.asarray(windows, dtype=np.float32)
    if len(windows) == 0:
        return np.zeros((0, 4))
    device = next(model.parameters()).device
    last_only = target_pos in (-1, windows.shape[1] - 1) and hasattr(model, "forward_last")

    def predict_part(part: np.ndarray) -> np.ndarray:
        out, start = [], 0
        while start < len(part):
            rest = len(part) - start
            size = min(batch_size, rest if len(windows) <= SPLIT_ABOVE else 1 << (rest.bit_length() - 1))
            batch = torch.from_numpy(np.ascontiguousarray(part[start:start + size])).to(device)
            logits = model.forward_last(batch) if last_only else model(batch)[:, target_pos]
            out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
            start += size
        return np.concatenate(out)

    parts = [windows[part] for part in thread_parts(len(windows), SPLIT_ABOVE, device)]
    return np.concatenate(in_parallel(predict_part, parts)).astype(np.float64)


def thread_parts(n: int, min_size: int, device: torch.device) -> list[slice]:
    """Split n items into one part per torch thread on CPU, each at least min_size (one part on GPU)."""
    n_parts = max(min(torch.get_num_threads(), n // min_size), 1) if device.type == "cpu" else 1
    bounds = np.linspace(0, n, n_parts + 1).astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


_WORKERS: ThreadPoolExecutor | None = None


def in_parallel(fn: Callable[[T], R], parts: list[T]) -> list[R]:
    """[fn(part) for part in parts] (in inference mode), each part on its own worker thread running
    torch on one thread; a single part runs here with the caller's settings.

    For a model made of many small ops (a chunk of ~100 windows through the encoder), splitting the
    windows across threads holds up better than splitting every op across OpenMP threads, where
    each op waits for the slowest thread (compare `python benchmark.py --threads 1` and 2).
    """
    if len(parts) <= 1:
        return [fn(part) for part in parts]
    global _WORKERS
    if _WORKERS is None:
        _WORKERS = ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2), thread_name_prefix="realtime")
    threads = torch.get_num_threads()

    def run(part: T) -> R:
        torch.set_num_threads(1)  # this worker's OpenMP and MKL threads (per-thread settings)
        with torch.inference_mode():
            return fn(part)

    futures = [_WORKERS.submit(run, part) for part in parts]
    try:
        concurrent.futures.wait(futures)  # every part has finished before a failure is raised
        return [f.result() for f in futures]
    finally:  # set_num_threads also sets the default that new threads start from: put it back
        torch.set_num_threads(threads)


def _forget_workers() -> None:
    global _WORKERS
    _WORKERS = None  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_workers)


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block: a stream calls the model on one window at a time,
    where intra-op threads only add overhead (and stall badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- causal features, one epoch at a time

class CausalFeatures:
    """`night_features(night, causal=True)` one epoch at a time, O(1) time and memory per epoch.

    Expanding heart-rate statistics are running sums; trailing windows (up to 60 epochs) keep
    the last 61 values of the running cumulative sums, so every number is computed with the
    same float64 operations as the offline code (equal to ~1e-12, tested row by row).
    """

    def __init__(self, epoch0_start_s: float):
        self.epoch0_start_s = float(epoch0_start_s)
        self.n = 0
        self.hr_last: float | None = None      # last observed heart rate (forward fill)
        self.count_last: float | None = None   # last observed activity count
        self.n_seen, self.s1, self.s2 = 0, 0.0, 0.0
        self.prev_hr: float | None = None
        self.hr_c1, self.hr_c2 = deque([0.0], maxlen=61), deque([0.0], maxlen=61)
        self.la_c1 = deque([0.0], maxlen=21)
        self.last_move = -1

    @staticmethod
    def _rolling(c1: deque, c2: deque | None, window: int, n: int) -> tuple[float, float]:
        """Mean (and std) of the last `window` values, from cumulative sums, as data_loader._rolling."""
        count = min(window, n)
        mean = (c1[-1] - c1[-1 - count]) / count
        if c2 is None:
            return mean, float("nan")
        var = (c2[-1] - c2[-1 - count]) / count - mean * mean
        return mean, math.sqrt(var) if var > 0 else 0.0

    def update(self, epoch_start_s: float, aggregates: dict) -> dict[str, float]:
        """Append one epoch's aggregates (Night fields, NaN = missing); its feature columns (float64)."""
        k = self.n
        hr_raw = float(aggregates["heart_rate_bpm"])
        hr_observed = not math.isnan(hr_raw)
        if hr_observed:
            self.hr_last = hr_raw
            self.n_seen += 1
            self.s1 += hr_raw
            self.s2 += hr_raw * hr_raw
        hr = self.hr_last if self.hr_last is not None else dl.HR_PRIOR_BPM
        count_raw = float(aggregates["activity_count"])
        if not math.isnan(count_raw):
            self.count_last = count_raw
        counts = self.count_last if self.count_last is not None else 0.0
        if self.n_seen > 0:
            night_mean = self.s1 / self.n_seen
        else:
            night_mean = hr
        var = self.s2 / self.n_seen - night_mean * night_mean if self.n_seen > 1 else 0.0
        night_std = math.sqrt(var) if var > 0 else 0.0
        self.n = k + 1
        self.hr_c1.append(self.hr_c1[-1] + hr)
        self.hr_c2.append(self.hr_c2[-1] + hr * hr)
        log_counts = float(np.log1p(counts))
        self.la_c1.append(self.la_c1[-1] + log_counts)
        if counts > dl.MOVE_COUNT:
            self.last_move = k
        since_move = k - self.last_move if self.last_move >= 0 else k + 1
        hr_mean_30, _ = self._rolling(self.hr_c1, None, 60, self.n)
        _, hrv5 = self._rolling(self.hr_c1, self.hr_c2, 5, self.n)
        _, hrv10 = self._rolling(self.hr_c1, self.hr_c2, 10, self.n)
        _, hrv20 = self._rolling(self.hr_c1, self.hr_c2, 20, self.n)
        la5, _ = self._rolling(self.la_c1, None, 5, self.n)
        la20, _ = self._rolling(self.la_c1, None, 20, self.n)
        hr_std = float(aggregates["heart_rate_std_bpm"])
        columns = {
            "heart_rate_bpm": hr,
            "heart_rate_std_bpm": 0.0 if math.isnan(hr_std) else hr_std,
            "hr_night_z": (hr - night_mean) / max(night_std, 1.0),
            "hr_minus_30min_mean": hr - hr_mean_30,
            "hr_delta_bpm": hr - (self.prev_hr if self.prev_hr is not None else hr),
            "hrv_2_5min_bpm": hrv5,
            "hrv_5min_bpm": hrv10,
            "hrv_10min_bpm": hrv20,
            "log_activity": log_counts,
            "log_activity_2_5min": la5,
            "log_activity_10min": la20,
            "log_epochs_since_move": float(np.log1p(since_move)),
            "hours_since_start": (float(epoch_start_s) - self.epoch0_start_s) / 3600.0,
            "hr_missing": 0.0 if hr_observed else 1.0,
            "motion_missing": 1.0 if math.isnan(count_raw) else 0.0,
            "motion_mag_mean_g": float(np.nan_to_num(aggregates["motion_mag_mean_g"])),
            "motion_mag_std_g": float(np.nan_to_num(aggregates["motion_mag_std_g"])),
            "steps": float(np.nan_to_num(aggregates["steps"])),
            "steps_missing": 1.0 if math.isnan(float(aggregates["steps"])) else 0.0,
        }
        self.prev_hr = hr
        return columns


# ----------------------------------------------------------------------------- the streaming predictor

class _EpochBuffer:
    """Samples of one signal in one open epoch."""
    __slots__ = ("t", "v", "seen")

    def __init__(self):
        self.t: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.seen: set[float] = set()

    def __len__(self) -> int:
        return len(self.seen)


def _new_stats() -> dict[str, int]:
    return {"accepted": 0, "late": 0, "before_start": 0, "duplicates": 0, "non_finite": 0, "out_of_range": 0,
            "ignored_counts": 0, "epochs_closed": 0, "epochs_hr_missing": 0, "new_nights": 0, "gap_epochs": 0}


class StreamingStager:
    """Sleep stages of one wearer from readings pushed as they arrive; see the module docstring for the rules.

    model, scaler, checkpoint: as `checkpoint.load_model_from_checkpoint` returns them; the checkpoint
    must be causal. start_s: start of epoch 0 in the readings' time base (None: the first reading's
    time floored to a multiple of 30 s). max_delay_s: how long past an epoch's end to wait for late
    readings. max_gap_s: a jump of the clock larger than this starts a new night.
    record_features: keep every emitted epoch's raw feature row in `feature_rows` (tests, debugging;
    grows with the night).
    """

    def __init__(self, model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict,
                 start_s: float | None = 0.0, *, max_delay_s: float = 0.0,
                 max_gap_s: float = DEFAULT_MAX_GAP_S, record_features: bool = False):
        if not checkpoint.get("causal"):
            raise ValueError("StreamingStager needs a causal checkpoint (trained with --causal, e.g. "
                             "checkpoints/hybrid_causal/model.pth): an offline model reads epochs after the one "
                             "it predicts, which a live stream does not have yet")
        unknown = [f for f in checkpoint["features"] if f not in dl.FEATURES]
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
        self.initial_start_s = None if start_s is None else float(start_s)
        self.max_delay_s, self.max_gap_s = float(max_delay_s), float(max_gap_s)
        self.record_features = record_features
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "StreamingStager":
        """Load a causal checkpoint and make a stager for one wearer (kwargs: start_s, max_delay_s, ...)."""
        from checkpoint import load_model_from_checkpoint
        model, scaler, checkpoint = load_model_from_checkpoint(path)
        return cls(model, scaler, checkpoint, **kwargs)

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget everything (readings, features, counters): the next reading starts a new night at start_s."""
        self.start_s = self.initial_start_s
        self.clock: float | None = None
        self.stats = _new_stats()
        self.feature_rows: list[np.ndarray] = []
        self._pending: list[tuple[float, np.ndarray]] = []
        self._reset_night()

    def _reset_night(self) -> None:
        self.n_closed = 0
        self._buffers: dict[str, dict[int, _EpochBuffer]] = {kind: {} for kind in KINDS}
        self._features: CausalFeatures | None = None
        self._rows: deque[np.ndarray] = deque(maxlen=self.seq_len)
        self._first_row: np.ndarray | None = None
        self._motion_source: str | None = None
        self._steps_span: list[float] | None = None

    def buffered_samples(self) -> dict[str, int]:
        """Readings held per signal (only those of open epochs)."""
        return {kind: sum(len(b) for b in buffers.values()) for kind, buffers in self._buffers.items()}

    def open_epochs(self) -> list[int]:
        """Indices (in the current night) of the epochs holding readings, all >= n_closed."""
        return sorted({e for buffers in self._buffers.values() for e in buffers})

    def epoch_start(self, k: int) -> float:
        return self.start_s + float(EPOCH_S * k)

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

    def flush(self, now_s: float) -> list[StagedEpoch]:
        """Advance the clock to now_s and close every epoch that ends at or before now_s.

        The caller states that nothing older than now_s will come (end of a recording, or a
        clock tick while the watch is off): max_delay_s is not waited for. Later readings in
        these epochs are late.
        """
        self._advance(now_s, wait_delay=False)
        return self._emit()

    def tick(self, now_s: float) -> list[StagedEpoch]:
        """Advance the clock to now_s under the normal rule: closes epochs ending at or before now_s - max_delay_s."""
        self._advance(now_s, wait_delay=True)
        return self._emit()

    def push_epoch_aggregates(self, heart_rate_bpm: float = math.nan, activity_count: float = math.nan,
                              steps: float = math.nan, *, heart_rate_std_bpm: float | None = None,
                              motion_mag_mean_g: float = math.nan, motion_mag_std_g: float = math.nan
                              ) -> list[StagedEpoch]:
        """Close the next epoch with given per-epoch aggregates (NaN = missing) instead of raw readings.

        For callers that already reduce each 30 s epoch (the notebook API). heart_rate_std_bpm
        defaults to 0 (one reading) when the heart rate is given. Cannot be mixed with raw readings
        of open epochs.
        """
        if any(self._buffers[kind] for kind in KINDS):
            raise ValueError("push_epoch_aggregates cannot be mixed with raw readings still held for open epochs")
        if self.start_s is None:
            self.start_s = 0.0
        hr = float(heart_rate_bpm)
        if heart_rate_std_bpm is None:
            heart_rate_std_bpm = math.nan if math.isnan(hr) else 0.0
        k = self.n_closed
        self._close_epoch(k, {"heart_rate_bpm": hr, "heart_rate_std_bpm": float(heart_rate_std_bpm),
                              "activity_count": float(activity_count), "motion_mag_mean_g": float(motion_mag_mean_g),
                              "motion_mag_std_g": float(motion_mag_std_g), "steps": float(steps)})
        end = self.epoch_start(k + 1)
        self.clock = end if self.clock is None else max(self.clock, end)
        return self._emit()

    # ------------------------------------------------------------------ internals

    def _as_arrays(self, kind: str, t_s, values: tuple) -> tuple[np.ndarray, np.ndarray]:
        if kind not in KINDS:
            raise ValueError(f"unknown signal {kind!r}; known: {KINDS}")
        if len(values) != _N_VALUES[kind]:
            raise ValueError(f"{kind} readings take {_N_VALUES[kind]} value(s) per timestamp, got {len(values)}")
        try:
            arrays = np.broadcast_arrays(*(np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (t_s, *values)))
        except ValueError:
            raise ValueError(f"{kind}: timestamps and values must have the same length "
                             f"(got shapes {[np.shape(a) for a in (t_s, *values)]})") from None
        if arrays[0].ndim != 1:
            raise ValueError(f"{kind}: timestamps and values must be scalars or 1-D arrays")
        return arrays[0], np.stack(arrays[1:], axis=1)

    def _ingest(self, kind: str, t_s, *values) -> None:
        t, v = self._as_arrays(kind, t_s, values)
        if len(t) == 0:
            return
        finite = np.isfinite(t) & np.isfinite(v).all(axis=1)
        with np.errstate(invalid="ignore"):
            plausible = dl.plausible(kind, v) & (np.abs(t) <= MAX_ABS_TIME_S)
        self.stats["non_finite"] += int((~finite).sum())
        self.stats["out_of_range"] += int((finite & ~plausible).sum())
        valid = finite & plausible
        if not valid.all():
            t, v = t[valid], v[valid]
        while len(t):
            if self.start_s is None:
                self.start_s = float(math.floor(t[0] / EPOCH_S) * EPOCH_S)
            clock0 = self.clock if self.clock is not None else -math.inf
            clock_before = np.maximum.accumulate(np.concatenate([[clock0], t[:-1]]))
            reference = np.maximum(clock_before, self.start_s)
            jumps = np.flatnonzero(t - reference > self.max_gap_s)
            if jumps.size and jumps[0] == 0:
                self._start_new_night(float(t[0]))
                continue
            stop = int(jumps[0]) if jumps.size else len(t)
            self._ingest_segment(kind, t[:stop], v[:stop], clock_before[:stop])
            t, v = t[stop:], v[stop:]

    def _ingest_segment(self, kind: str, t: np.ndarray, v: np.ndarray, clock_before: np.ndarray) -> None:
        """Valid readings without a jump; clock_before[i]: the clock when reading i arrives."""
        stats = self.stats
        epoch = np.floor((t - self.start_s) / EPOCH_S).astype(np.int64)
        with np.errstate(invalid="ignore"):
            closed = np.floor((clock_before - self.max_delay_s - self.start_s) / EPOCH_S)
        closed = np.maximum(np.nan_to_num(closed, neginf=0.0), self.n_closed).astype(np.int64)
        before = epoch < 0
        late = ~before & (epoch < closed)
        stats["before_start"] += int(before.sum())
        stats["late"] += int(late.sum())
        if kind == "steps":  # the steps span counts every valid reading, as offline the whole file
            lo, hi = float(t.min()), float(t.max())
            self._steps_span = [lo, hi] if self._steps_span is None else [min(self._steps_span[0], lo),
                                                                            max(self._steps_span[1], hi)]
        keep = ~before & ~late
        if kind == "counts" and self._motion_source == "raw":
            stats["ignored_counts"] += int(keep.sum())
            keep[:] = False
        if keep.any():
            if kind == "motion" and self._motion_source != "raw":
                self._motion_source = "raw"  # raw motion wins, as offline: counts held so far are dropped
                stats["ignored_counts"] += self.buffered_samples()["counts"]
                self._buffers["counts"].clear()
            elif kind == "counts" and self._motion_source is None:
                self._motion_source = "counts"
            self._store(kind, t[keep], v[keep], epoch[keep])
        latest = float(t.max())
        self.clock = latest if self.clock is None else max(self.clock, latest)
        self._close_until(self._closable(self.clock - self.max_delay_s))

    def _store(self, kind: str, t: np.ndarray, v: np.ndarray, epoch: np.ndarray) -> None:
        buffers = self._buffers[kind]
        first = np.zeros(len(t), dtype=bool)
        first[np.unique(t, return_index=True)[1]] = True  # within the call, the first of equal timestamps
        for e in np.unique(epoch):
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

    def _closable(self, through_s: float) -> int:
        """Number of epochs (from 0) that end at or before through_s."""
        return max(self.n_closed, math.floor((through_s - self.start_s) / EPOCH_S))

    def _advance(self, now_s: float, wait_delay: bool) -> None:
        now = float(now_s)
        if not (math.isfinite(now) and abs(now) <= MAX_ABS_TIME_S):
            raise ValueError(f"now_s must be finite (|now_s| <= {MAX_ABS_TIME_S:g} s), got {now_s}")
        if self.start_s is None:
            self.start_s = float(math.floor(now / EPOCH_S) * EPOCH_S)
        reference = self.start_s if self.clock is None else max(self.clock, self.start_s)
        if now - reference > self.max_gap_s:
            self._start_new_night(now)
        self.clock = now if self.clock is None else max(self.clock, now)
        through = (self.clock - self.max_delay_s) if wait_delay else max(now, self.clock - self.max_delay_s)
        self._close_until(self._closable(through))

    def _start_new_night(self, t_new: float) -> None:
        """The clock jumps by more than max_gap_s: finish the night so far, start a new one at t_new's epoch."""
        if self.clock is not None and self.clock >= self.start_s:
            self._close_until(math.floor((self.clock - self.start_s) / EPOCH_S) + 1)
        new_epoch = math.floor((t_new - self.start_s) / EPOCH_S)
        self.stats["gap_epochs"] += max(new_epoch - self.n_closed, 0)
        self.stats["new_nights"] += 1
        self.start_s = self.epoch_start(new_epoch)
        self._reset_night()

    def _close_until(self, n_target: int) -> None:
        while self.n_closed < n_target:
            self._close_epoch(self.n_closed, self._aggregate(self.n_closed))

    def _take(self, kind: str, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        buffer = self._buffers[kind].pop(k, None)
        if buffer is None:
            return None
        t, v = np.concatenate(buffer.t), np.concatenate(buffer.v)
        order = np.argsort(t, kind="stable")
        return t[order], v[order]

    def _aggregate(self, k: int) -> dict[str, float]:
        """Epoch k's aggregates, computed as data_loader.night_from_arrays computes them."""
        start = self.epoch_start(k)
        agg = {name: math.nan for name in ("heart_rate_bpm", "heart_rate_std_bpm", "activity_count",
                                           "motion_mag_mean_g", "motion_mag_std_g", "steps")}
        hr = self._take("heart_rate", k)
        if hr is not None:
            mean, std, _ = dl._per_epoch_mean_std(np.zeros(len(hr[0]), np.int64), hr[1][:, 0], 1)
            agg["heart_rate_bpm"], agg["heart_rate_std_bpm"] = float(mean[0]), float(std[0])
        motion = self._take("motion", k)
        counts = self._take("counts", k)
        if motion is not None:
            aggs = dl.motion_epoch_aggregates(np.column_stack([motion[0], motion[1]]), np.array([start]))
            for name, values in aggs.items():
                agg[name] = float(values[0])
        elif counts is not None:
            agg["activity_count"] = float(dl._per_epoch_mean_std(np.zeros(len(counts[0]), np.int64),
                                                                 counts[1][:, 0], 1)[0][0])
        steps = self._take("steps", k)
        span = self._steps_span
        if span is not None and span[0] - STEPS_MARGIN_S <= start <= span[1] + STEPS_MARGIN_S:
            values = steps[1][:, 0] if steps is not None else np.zeros(0)
            agg["steps"] = float(np.bincount(np.zeros(len(values), np.int64), weights=values, minlength=1)[0])
        return agg

    def _close_epoch(self, k: int, aggregates: dict[str, float]) -> None:
        start = self.epoch_start(k)
        if self._features is None:
            self._features = CausalFeatures(self.start_s)
        columns = self._features.update(start, aggregates)
        row = np.array([columns[name] for name in self.features], dtype=np.float64).astype(np.float32)
        if self.record_features:
            self.feature_rows.append(row)
        if self._first_row is None:
            self._first_row = row
        self._rows.append(row)
        # as window_indices on the night so far: positions before epoch 0 repeat epoch 0, positions
        # after epoch k repeat epoch k (a causal model's output at target_pos never reads them)
        base = k - len(self._rows) + 1
        idx = np.clip(k - self.target_pos + np.arange(self.seq_len), 0, k)
        window = np.stack([self._first_row if j == 0 else self._rows[j - base] for j in idx])
        self._pending.append((start, window))
        self.n_closed = k + 1
        self.stats["epochs_closed"] += 1
        self.stats["epochs_hr_missing"] += int(math.isnan(aggregates["heart_rate_bpm"]))

    def _take_pending(self) -> list[tuple[float, np.ndarray]]:
        pending, self._pending = self._pending, []
        return pending

    def _emit(self) -> list[StagedEpoch]:
        pending = self._take_pending()
        if not pending:
            return []
        windows = self.scaler.transform(np.stack([w for _, w in pending]))
        probs = predict_windows(self.model, windows, self.target_pos)
        return [StagedEpoch(start, int(p.argmax()), p) for (start, _), p in zip(pending, probs)]


# ----------------------------------------------------------------------------- many wearers, one model call

class StagerPool:
    """One StreamingStager per wearer sharing one model; `predict()` runs it on all of them at once
    (one call up to 64 windows, a few power-of-two calls above: see predict_windows).

        pool = StagerPool(model, scaler, checkpoint)
        pool.push("watch-17", "heart_rate", t, bpm)        # queues the epochs this closes
        pool.push("watch-42", "counts", t, count)
        results = pool.predict()                          # {wearer: [StagedEpoch, ...]}, one batched call
    """

    def __init__(self, model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict,
                 batch_size: int = 1024, **stager_kwargs):
        self.model, self.scaler, self.checkpoint = model, scaler, checkpoint
        self.batch_size, self.stager_kwargs = batch_size, stager_kwargs
        self.stagers: dict = {}
        StreamingStager(model, scaler, checkpoint, **stager_kwargs)  # fail early on a bad checkpoint

    def __getitem__(self, wearer) -> StreamingStager:
        if wearer not in self.stagers:
            self.stagers[wearer] = StreamingStager(self.model, self.scaler, self.checkpoint, **self.stager_kwargs)
        return self.stagers[wearer]

    def __len__(self) -> int:
        return len(self.stagers)

    def push(self, wearer, kind: str, t_s, *values) -> None:
        """Queue readings of one wearer; closed epochs wait for predict()."""
        self[wearer]._ingest(kind, t_s, *values)

    def flush(self, now_s: float, wearers: Iterable | None = None) -> None:
        for wearer in (self.stagers if wearers is None else wearers):
            self[wearer]._advance(now_s, wait_delay=False)

    def remove(self, wearer) -> None:
        self.stagers.pop(wearer, None)

    def predict(self) -> dict:
        """Stages of every epoch closed since the last call, by wearer: one batched model call."""
        owners, starts, windows = [], [], []
        for wearer, stager in self.stagers.items():
            for start, window in stager._take_pending():
                owners.append(wearer)
                starts.append(start)
                windows.append(window)
        results: dict = {}
        if not windows:
            return results
        probs = predict_windows(self.model, self.scaler.transform(np.stack(windows)),
                                int(self.checkpoint["target_pos"]), self.batch_size)
        for wearer, start, p in zip(owners, starts, probs):
            results.setdefault(wearer, []).append(StagedEpoch(start, int(p.argmax()), p))
        return results


class StagerBatch:
    """Many wearers in lockstep, vectorised: one epoch closes for every wearer at once, one model call.

        batch = StagerBatch(model, scaler, checkpoint, n_wearers=1000)
        aggregates = batch.aggregate(hr_wearer, hr_bpm, count_wearer, counts)   # this epoch's readings
        epoch_start_s, stages, probabilities = batch.step(**aggregates)         # (n,), (n,), (n, 4)

    For a server that ticks every 30 s: the state of all wearers (the CausalFeatures running sums
    and ring buffers, the last seq_len scaled feature rows) lives in numpy arrays, so closing an
    epoch costs a few array operations for everyone instead of Python work per wearer. Each
    wearer gets what a StreamingStager (start_s = start_s[w]) fed the same readings gives: the
    same float64 operations per number (feature rows equal; tested), the same windows, and the
    same model (probabilities equal to a lone stager's to ~1e-6: float rounding only; tested).
    What it does not do: timestamps, late or duplicate readings, clock jumps, raw motion
    filtering and the steps span rule. Readings are already assigned to the epoch; a wearer
    without readings in an epoch passes NaN (missing), as the stream's empty epoch. Raw motion
    and steps: reduce them per wearer (data_loader.motion_epoch_aggregates, the stream's steps
    rule) and pass the aggregates. The model runs on chunks of batch_size windows (128: the
    activations of a chunk stay in cache), the wearers split into one part per torch thread
    (in_parallel).
    With the hybrid model, each wearer's conv outputs of its last seq_len epochs are kept
    (`conv`, n_wearers x seq_len x channels float32): a conv output at window position
    j >= model.receptive_field depends only on the epochs at j - receptive_field .. j, so it is
    the one computed when that epoch closed (the last position of its own window, built the same
    way: edge padding included). Each step runs the convolutions at the first receptive_field
    positions (replicate padding) and at the new epoch only, then the encoder on whole windows.
    """

    def __init__(self, model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict, n_wearers: int,
                 start_s=0.0, batch_size: int = 128):
        StreamingStager(model, scaler, checkpoint)  # the same checks: causal, known features
        self.model, self.scaler, self.checkpoint = model, scaler, checkpoint
        self.features = tuple(checkpoint["features"])
        self.seq_len, self.target_pos = int(checkpoint["seq_len"]), int(checkpoint["target_pos"])
        self.n_wearers, self.batch_size = int(n_wearers), int(batch_size)
        self.start_s = np.broadcast_to(np.asarray(start_s, np.float64), (self.n_wearers,)).copy()
        self._wearers = np.arange(self.n_wearers)
        self._positions = np.arange(self.seq_len) - self.target_pos
        config = getattr(model, "config", None)
        self.conv: torch.Tensor | None = None  # conv outputs by epoch % seq_len (see the class docstring)
        if (hasattr(model, "encode_last") and getattr(config, "causal", False)
                and self.target_pos == self.seq_len - 1 and self.seq_len > model.receptive_field):
            device = next(model.parameters()).device
            self.conv = torch.zeros(self.n_wearers, self.seq_len, config.channels, device=device)
        self.reset()

    def reset(self, wearers=None) -> None:
        """A new night for the given wearers (indices or boolean mask; None: all)."""
        w = self._wearers if wearers is None else np.asarray(wearers)
        if not hasattr(self, "n"):
            n, f = self.n_wearers, len(self.features)
            self.n = np.zeros(n, np.int64)
            self.hr_last, self.count_last, self.prev_hr = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
            self.n_seen, self.s1, self.s2 = np.zeros(n, np.int64), np.zeros(n), np.zeros(n)
            self.hr_c1, self.hr_c2, self.la_c1 = np.zeros((n, 61)), np.zeros((n, 61)), np.zeros((n, 21))
            self.last_move = np.full(n, -1, np.int64)
            self.rows = np.zeros((n, self.seq_len, f), np.float32)  # scaled rows, epoch e at e % seq_len
        self.n[w] = 0
        self.hr_last[w], self.count_last[w], self.prev_hr[w] = np.nan, np.nan, np.nan
        self.n_seen[w], self.s1[w], self.s2[w] = 0, 0.0, 0.0
        self.hr_c1[w], self.hr_c2[w], self.la_c1[w] = 0.0, 0.0, 0.0
        self.last_move[w] = -1
        # self.conv needs no reset: a window reads only epochs of its night, each written when it closed

    def aggregate(self, hr_wearer=None, hr_bpm=None, count_wearer=None, counts=None) -> dict[str, np.ndarray]:
        """Per-wearer heart-rate mean/std and activity count of one epoch from flat reading arrays.

        hr_wearer / count_wearer: wearer index of each reading; readings of one wearer in time order
        (as the stream sorts an epoch's samples). Non-finite and implausible values are dropped as
        the stream drops them. Wearers without readings get NaN (missing).
        """
        n = self.n_wearers
        out = {"heart_rate_bpm": np.full(n, np.nan), "heart_rate_std_bpm": np.full(n, np.nan),
               "activity_count": np.full(n, np.nan)}
        if hr_wearer is not None and len(hr_wearer):
            idx, v = np.asarray(hr_wearer, np.int64), np.asarray(hr_bpm, np.float64)
            ok = np.isfinite(v) & dl.plausible("heart_rate", v[:, None])
            out["heart_rate_bpm"], out["heart_rate_std_bpm"], _ = dl._per_epoch_mean_std(idx[ok], v[ok], n)
        if count_wearer is not None and len(count_wearer):
            idx, v = np.asarray(count_wearer, np.int64), np.asarray(counts, np.float64)
            ok = np.isfinite(v) & dl.plausible("counts", v[:, None])
            out["activity_count"] = dl._per_epoch_mean_std(idx[ok], v[ok], n)[0]
        return out

    def feature_rows(self, heart_rate_bpm, heart_rate_std_bpm=None, activity_count=None, steps=None,
                     motion_mag_mean_g=None, motion_mag_std_g=None) -> tuple[np.ndarray, np.ndarray]:
        """Close one epoch for every wearer: (epoch_start_s (n,), raw feature rows (n, n_features) float32).

        CausalFeatures.update for all wearers at once, the same float64 operations per number.
        NaN marks a missing aggregate; heart_rate_std_bpm defaults to 0 where the heart rate is given.
        """
        nan = np.full(self.n_wearers, np.nan)
        hr_raw = np.asarray(heart_rate_bpm, np.float64)
        hr_std = (np.where(np.isnan(hr_raw), np.nan, 0.0) if heart_rate_std_bpm is None
                  else np.asarray(heart_rate_std_bpm, np.float64))
        count_raw = nan if activity_count is None else np.asarray(activity_count, np.float64)
        steps = nan if steps is None else np.asarray(steps, np.float64)
        mag_mean = nan if motion_mag_mean_g is None else np.asarray(motion_mag_mean_g, np.float64)
        mag_std = nan if motion_mag_std_g is None else np.asarray(motion_mag_std_g, np.float64)
        k = self.n
        hr_observed = ~np.isnan(hr_raw)
        self.hr_last = np.where(hr_observed, hr_raw, self.hr_last)
        self.n_seen = self.n_seen + hr_observed
        self.s1 = np.where(hr_observed, self.s1 + hr_raw, self.s1)
        self.s2 = np.where(hr_observed, self.s2 + hr_raw * hr_raw, self.s2)
        hr = np.where(np.isnan(self.hr_last), dl.HR_PRIOR_BPM, self.hr_last)
        self.count_last = np.where(np.isnan(count_raw), self.count_last, count_raw)
        counts = np.where(np.isnan(self.count_last), 0.0, self.count_last)
        seen = np.maximum(self.n_seen, 1)
        night_mean = np.where(self.n_seen > 0, self.s1 / seen, hr)
        var = np.where(self.n_seen > 1, self.s2 / seen - night_mean * night_mean, 0.0)
        night_std = np.sqrt(np.where(var > 0, var, 0.0))
        n1 = k + 1
        w = self._wearers
        self.hr_c1[w, n1 % 61] = self.hr_c1[w, k % 61] + hr
        self.hr_c2[w, n1 % 61] = self.hr_c2[w, k % 61] + hr * hr
        log_counts = np.log1p(counts)
        self.la_c1[w, n1 % 21] = self.la_c1[w, k % 21] + log_counts
        self.last_move = np.where(counts > dl.MOVE_COUNT, k, self.last_move)
        since_move = np.where(self.last_move >= 0, k - self.last_move, k + 1)

        def rolling(c1, c2, window, size):
            count = np.minimum(window, n1)
            end, begin = n1 % size, (n1 - count) % size
            mean = (c1[w, end] - c1[w, begin]) / count
            if c2 is None:
                return mean
            var = (c2[w, end] - c2[w, begin]) / count - mean * mean
            return np.sqrt(np.where(var > 0, var, 0.0))

        epoch_start = self.start_s + (dl.EPOCH_S * k).astype(np.float64)
        columns = {
            "heart_rate_bpm": hr,
            "heart_rate_std_bpm": np.where(np.isnan(hr_std), 0.0, hr_std),
            "hr_night_z": (hr - night_mean) / np.maximum(night_std, 1.0),
            "hr_minus_30min_mean": hr - rolling(self.hr_c1, None, 60, 61),
            "hr_delta_bpm": hr - np.where(np.isnan(self.prev_hr), hr, self.prev_hr),
            "hrv_2_5min_bpm": rolling(self.hr_c1, self.hr_c2, 5, 61),
            "hrv_5min_bpm": rolling(self.hr_c1, self.hr_c2, 10, 61),
            "hrv_10min_bpm": rolling(self.hr_c1, self.hr_c2, 20, 61),
            "log_activity": log_counts,
            "log_activity_2_5min": rolling(self.la_c1, None, 5, 21),
            "log_activity_10min": rolling(self.la_c1, None, 20, 21),
            "log_epochs_since_move": np.log1p(since_move.astype(np.float64)),
            "hours_since_start": (epoch_start - self.start_s) / 3600.0,
            "hr_missing": (~hr_observed).astype(np.float64),
            "motion_missing": np.isnan(count_raw).astype(np.float64),
            "motion_mag_mean_g": np.nan_to_num(mag_mean),
            "motion_mag_std_g": np.nan_to_num(mag_std),
            "steps": np.nan_to_num(steps),
            "steps_missing": np.isnan(steps).astype(np.float64),
        }
        self.prev_hr = hr
        self.n = n1
        return epoch_start, np.stack([columns[name] for name in self.features], axis=1).astype(np.float32)

    def step(self, heart_rate_bpm, heart_rate_std_bpm=None, activity_count=None, steps=None,
             motion_mag_mean_g=None, motion_mag_std_g=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Close one epoch for every wearer and stage it: (epoch_start_s (n,), stage (n,), probabilities (n, 4))."""
        k = self.n.copy()
        epoch_start, rows = self.feature_rows(heart_rate_bpm, heart_rate_std_bpm, activity_count, steps,
                                              motion_mag_mean_g, motion_mag_std_g)
        self.rows[self._wearers, k % self.seq_len] = self.scaler.transform(rows)  # elementwise: as on windows
        # as window_indices on each night so far: positions before epoch 0 repeat it, after epoch k repeat k
        epochs = np.clip(k[:, None] + self._positions[None, :], 0, k[:, None])
        windows = self.rows[self._wearers[:, None], epochs % self.seq_len]
        if self.conv is None:
            probs = predict_windows(self.model, windows, self.target_pos, self.batch_size)
        else:
            probs = self._predict_cached(windows, epochs % self.seq_len)
        return epoch_start, probs.argmax(axis=1), probs

    @torch.inference_mode()
    def _predict_cached(self, windows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """predict_windows for the hybrid model, reusing the conv outputs of earlier epochs.

        slots: (n, seq_len) ring position (epoch % seq_len) of each window position. On CPU the
        wearers are split into one part per torch thread, each run on its own thread (see in_parallel).
        """
        if self.model.training:
            self.model.eval()
        device = self.conv.device
        x = torch.from_numpy(windows).to(device)
        w, slots = torch.from_numpy(self._wearers).to(device), torch.from_numpy(slots).to(device)
        parts = [(x[part], w[part], slots[part]) for part in thread_parts(len(x), self.batch_size, device)]
        logits = torch.cat(in_parallel(self._logits_cached, parts))
        return torch.softmax(logits.float(), dim=-1).cpu().numpy().astype(np.float64)

    def _logits_cached(self, part: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Last-position logits of some wearers' windows (x, wearer index, slots), in chunks of batch_size.

        The new epoch's conv output goes into the cache first: early in a night, edge padding repeats it.
        """
        x, w, slots = part
        model, r = self.model, self.model.receptive_field
        self.conv[w, slots[:, -1]] = model.embed(x[:, -(r + 1):], pad=False)[:, 0]
        h = torch.cat([model.embed(x[:, :r]), self.conv[w[:, None], slots[:, r:]]], dim=1)
        return torch.cat([model.encode_last(h[i:i + self.batch_size]) for i in range(0, len(h), self.batch_size)])


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


def time_ordered_runs(readings: dict[str, np.ndarray], lo_s: float = -math.inf, hi_s: float = math.inf):
    """(kind, rows) runs of one signal each, all signals merged by timestamp, rows with lo_s <= t < hi_s.

    Pushing the runs in this order is what a live stream of these readings looks like.
    """
    kinds = [k for k in KINDS if k in readings and len(readings[k])]
    if not kinds:
        return
    t = np.concatenate([readings[k][:, 0] for k in kinds])
    code = np.concatenate([np.full(len(readings[k]), i) for i, k in enumerate(kinds)])
    row = np.concatenate([np.arange(len(readings[k])) for k in kinds])
    order = np.argsort(t, kind="stable")
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


def replay_nights(model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict, data_dir: str | Path,
                  nights: list[dl.Night], **stager_kwargs):
    """The offline evaluation's frame (evaluation.PREDICTION_COLUMNS), computed by streaming each night's files."""
    import pandas as pd
    from evaluation import PREDICTION_COLUMNS, prediction_frame
    frames = []
    for night in nights:
        stager = StreamingStager(model, scaler, checkpoint, start_s=float(night.epoch_start_s[0]), **stager_kwargs)
        end_s = float(night.epoch_start_s[-1] + EPOCH_S)
        epochs = replay(stager, recorded_readings(data_dir, night.subject_id), end_s)
        starts = np.array([e.epoch_start_s for e in epochs])
        if len(epochs) != len(night) or not np.allclose(starts, night.epoch_start_s):
            raise RuntimeError(f"subject {night.subject_id}: the stream closed {len(epochs)} epochs, "
                               f"the night has {len(night)}")
        frames.append(prediction_frame(night, np.stack([e.probabilities for e in epochs])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PREDICTION_COLUMNS)


# ----------------------------------------------------------------------------- following growing files (live demo)

_KIND_ALIASES = {"heart_rate": "heart_rate", "hr": "heart_rate", "heartrate": "heart_rate",
                 "motion": "motion", "acceleration": "motion", "acc": "motion",
                 "counts": "counts", "count": "counts", "steps": "steps", "step": "steps"}


class FollowedFile:
    """A growing CSV (`t,bpm`, `t,x,y,z`, `t,count`, `t,steps`; comma or space separated), read as it grows.

    spec: PATH, or KIND=PATH with KIND one of heart_rate (hr), motion (acceleration), counts, steps.
    Without a kind it comes from the name (heartrate/acceleration/counts/steps) or else the
    columns (4: motion, 2: heart rate).
    """

    def __init__(self, spec: str):
        kind, sep, path = spec.partition("=")
        if sep and kind.lower() in _KIND_ALIASES:
            self.kind, self.path = _KIND_ALIASES[kind.lower()], Path(path)
        else:
            self.kind, self.path = None, Path(spec)
            name = self.path.name.lower()
            tokens = set(re.split(r"[^a-z0-9]+", name))
            for word, kind_ in (("count", "counts"), ("step", "steps"), ("accel", "motion"), ("motion", "motion"),
                                ("heart", "heart_rate")):
                if word in name:
                    self.kind = kind_
                    break
            else:
                if "hr" in tokens:
                    self.kind = "heart_rate"
        self.offset, self.partial, self.line_no, self.bad_lines = 0, b"", 0, 0

    def read_new(self, warn=None) -> list[tuple[str, np.ndarray]]:
        """Rows appended since the last call: (kind, [t, values...]); an incomplete last line waits."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:  # truncated or replaced: start over
            self.offset, self.partial = 0, b""
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        rows = []
        for raw in lines:
            self.line_no += 1
            fields = raw.decode("utf-8", "replace").replace(",", " ").split()
            if not fields:
                continue
            try:
                values = np.array([float(x) for x in fields])
            except ValueError:
                if self.line_no > 1:  # a header on the first line is fine
                    self._bad(warn, raw, "not a number")
                continue
            if self.kind is None:
                self.kind = "motion" if len(values) == 4 else "heart_rate"
            if len(values) != _N_VALUES[self.kind] + 1:
                self._bad(warn, raw, f"expected {_N_VALUES[self.kind] + 1} fields for {self.kind}")
                continue
            rows.append((self.kind, values))
        return rows

    def _bad(self, warn, raw: bytes, reason: str) -> None:
        self.bad_lines += 1
        if warn is not None:
            warn(f"{self.path}, line {self.line_no}: {reason}: {raw[:80]!r} (skipped)")


def format_epoch(epoch: StagedEpoch, start_s: float) -> str:
    """One printed line: epoch start (s), time since the night's start, stage, probabilities."""
    since = max(epoch.epoch_start_s - start_s, 0.0)
    hms = f"{int(since // 3600):02d}:{int(since % 3600 // 60):02d}:{int(since % 60):02d}"
    p = epoch.probabilities
    return (f"{epoch.epoch_start_s:12.1f} s  {hms}  {dl.STAGE_NAMES[epoch.stage]:<5}  "
            f"wake {p[0]:.3f}  light {p[1]:.3f}  deep {p[2]:.3f}  rem {p[3]:.3f}")


def follow(stager: StreamingStager, specs: list[str], *, timeout_s: float | None = None, poll_s: float = 0.2,
           out=None, err=None) -> int:
    """Tail growing files, push new rows (merged by time) and print one line per closed epoch.

    Stops after timeout_s seconds without new data (None: never) or on Ctrl-C. Returns the
    number of epochs printed.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    warn = lambda message: print(f"warning: {message}", file=err, flush=True)  # noqa: E731
    files = [FollowedFile(spec) for spec in specs]
    printed, last_data = 0, time.monotonic()
    try:
        while True:
            rows = [row for f in files for row in f.read_new(warn)]
            if rows:
                last_data = time.monotonic()
                rows.sort(key=lambda r: r[1][0])  # stable: files in the given order at equal times
                i = 0
                while i < len(rows):  # one push per run of one signal, in time order
                    j = i
                    while j < len(rows) and rows[j][0] == rows[i][0]:
                        j += 1
                    block = np.stack([r[1] for r in rows[i:j]])
                    for epoch in stager.push(rows[i][0], block[:, 0], *block[:, 1:].T):
                        print(format_epoch(epoch, stager.start_s), file=out, flush=True)
                        printed += 1
                    i = j
            elif timeout_s is not None and time.monotonic() - last_data >= timeout_s:
                break
            else:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    summary = ", ".join(f"{k} {v}" for k, v in stager.stats.items() if v)
    print(f"stopped: {printed} epoch(s) staged; {summary or 'no readings'}", file=err, flush=True)
    return printed


# ----------------------------------------------------------------------------- notebook API

# per model (weakly: a deleted model takes its contexts with it), per wearer: the StreamingStager
_CONTEXTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
DEFAULT_WEARER = "default"


def load_model(checkpoint: str | Path, arch: str | None = None) -> tuple[torch.nn.Module, dl.FeatureScaler]:
    """(model, scaler) of a causal checkpoint for predict_label_from_triplet.

    The model carries what the stream needs as `model.checkpoint` (the checkpoint dict without
    its weights: features, seq_len, target_pos, causal, ...) and `model.checkpoint_path`.
    """
    from checkpoint import load_model_from_checkpoint
    model, scaler, ckpt = load_model_from_checkpoint(checkpoint, expected_arch=arch)
    if not ckpt["causal"]:
        raise ValueError(f"checkpoint {checkpoint} is an offline model; real-time staging needs a causal one "
                         f"(checkpoints/{ckpt['arch']}_causal/model.pth, trained with --causal)")
    model.checkpoint = {k: v for k, v in ckpt.items() if k != "state_dict"}
    model.checkpoint_path = str(checkpoint)
    return model, scaler


def get_context(model: torch.nn.Module, scaler: dl.FeatureScaler | None = None,
                wearer=DEFAULT_WEARER) -> StreamingStager:
    """The StreamingStager that holds `wearer`'s context for this model (made on first use)."""
    contexts = _CONTEXTS.setdefault(model, {})
    if wearer not in contexts:
        checkpoint = getattr(model, "checkpoint", None)
        if checkpoint is None or scaler is None:
            raise ValueError("this model has no context yet and no checkpoint info: load it with load_model(), "
                             "or pass context=StreamingStager(model, scaler, checkpoint)")
        contexts[wearer] = StreamingStager(model, scaler, checkpoint)
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
    seq_len epochs) lives per (model, wearer): use one `wearer` key per person, or pass your own
    `context=StreamingStager(...)`; reset_context(model[, wearer]) starts a new night.
    Returns (stage 0 Wake / 1 Light / 2 Deep / 3 REM, probabilities (4,)).
    """
    hr = _check_reading("hr", hr, dl.HR_MIN_BPM, dl.HR_MAX_BPM, "mean heart rate over the epoch in bpm")
    motion = _check_reading("motion", motion, 0.0, MAX_ACTIVITY_COUNT,
                            "activity count per 15 s bin as in the counts files")
    steps = _check_reading("steps", steps, 0.0, MAX_STEPS_PER_EPOCH, "steps in the 30 s epoch")
    stager = context if context is not None else get_context(model, scaler, wearer)
    stager.scaler = scaler
    (epoch,) = stager.push_epoch_aggregates(hr, motion, steps)
    return epoch.stage, epoch.probabilities
