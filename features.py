"""Per-epoch features: the one definition of every formula between per-epoch aggregates and model windows.

Two forms side by side, with the parity tests as their contract:
- `night_features`: a whole night at once, vectorised over epochs (offline, or causal for training
  and evaluation of real-time models);
- `IncrementalFeatures`: one epoch at a time for many wearers at once, vectorised over wearers
  (the stream uses it with one wearer, the batched server with thousands). Its rows equal the
  causal `night_features` rows of the night so far, to float rounding.
Also here: the per-epoch aggregation of readings (`epoch_mean_std`, `epoch_sum`) and the window
layout (`window_epochs`), shared by the offline, streaming and batched paths. numpy only.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

EPOCH_S = 30
SEQ_LEN = 25
HR_PRIOR_BPM = 60.0  # causal fill before the first heart-rate sample of a night
MOVE_COUNT = 10.0    # an activity count above this is a movement (log_epochs_since_move)

# window lengths in epochs (30 s each)
HR_LEVEL_EPOCHS = 60              # hr_minus_30min_mean
HRV_EPOCHS = (5, 10, 20)          # hrv_2_5min_bpm, hrv_5min_bpm, hrv_10min_bpm
ACTIVITY_EPOCHS = (5, 20)         # log_activity_2_5min, log_activity_10min
# cumulative sums the incremental form keeps: enough to difference the longest window
HR_RING = max(HR_LEVEL_EPOCHS, *HRV_EPOCHS) + 1
ACTIVITY_RING = max(ACTIVITY_EPOCHS) + 1

FEATURES = (
    "heart_rate_bpm",          # epoch mean, filled
    "heart_rate_std_bpm",      # within-epoch spread (0 where missing)
    "hr_night_z",              # heart rate against the night: expanding (causal) or whole-night statistics
    "hr_minus_30min_mean",     # heart rate against its 30 min level (trailing if causal, else centred)
    "hr_delta_bpm",            # change from the previous epoch
    "hrv_2_5min_bpm",          # heart-rate variability: std over HRV_EPOCHS (trailing if causal)
    "hrv_5min_bpm",
    "hrv_10min_bpm",
    "log_activity",            # log1p activity count
    "log_activity_2_5min",     # activity over ACTIVITY_EPOCHS (trailing if causal)
    "log_activity_10min",
    "log_epochs_since_move",   # log1p epochs since the last count above MOVE_COUNT
    "hours_since_start",       # time of night
    "hr_missing",              # 1 where the epoch had no heart-rate sample
    "motion_missing",          # 1 where the epoch had no motion/counts data
    "motion_mag_mean_g",       # raw motion only (0 without it)
    "motion_mag_std_g",
    "steps",                   # steps file only (0 without it)
    "steps_missing",
)
# The bundled data has neither raw motion nor steps, so the default models leave those out.
DEFAULT_FEATURES = (
    "heart_rate_bpm", "heart_rate_std_bpm", "hr_night_z", "hr_minus_30min_mean", "hr_delta_bpm",
    "hrv_2_5min_bpm", "hrv_5min_bpm", "hrv_10min_bpm", "log_activity", "log_activity_2_5min",
    "log_activity_10min", "log_epochs_since_move", "hours_since_start", "hr_missing", "motion_missing",
)
AGGREGATES = ("heart_rate_bpm", "heart_rate_std_bpm", "activity_count", "motion_mag_mean_g", "motion_mag_std_g",
              "steps")


class EpochAggregates(Protocol):
    """What the features read of a night (data_loader.Night has it): per-epoch arrays, NaN = missing."""
    epoch_start_s: np.ndarray
    heart_rate_bpm: np.ndarray
    heart_rate_std_bpm: np.ndarray
    activity_count: np.ndarray
    motion_mag_mean_g: np.ndarray
    motion_mag_std_g: np.ndarray
    steps: np.ndarray


def check_features(features) -> tuple[str, ...]:
    unknown = [name for name in features if name not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; known: {list(FEATURES)}")
    return tuple(features)


# ----------------------------------------------------------------------------- aggregation of readings

def epoch_mean_std(slot: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, std and count of `values` per slot 0..n-1 (slot -1: ignored); NaN where a slot has none.

    A slot is an epoch of one night (offline) or a wearer in one epoch (batched), or the one epoch
    a stream closes: the same float64 operations in every case.
    """
    keep = slot >= 0
    slot, values = slot[keep], values[keep]
    count = np.bincount(slot, minlength=n).astype(np.float64)
    total = np.bincount(slot, weights=values, minlength=n)
    total_sq = np.bincount(slot, weights=values * values, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        var = np.where(count > 0, total_sq / np.maximum(count, 1) - mean ** 2, np.nan)
    return mean, np.sqrt(np.clip(var, 0, None)), count


def epoch_sum(slot: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Sum of `values` per slot 0..n-1 (slot -1: ignored), 0 where a slot has none (steps)."""
    keep = slot >= 0
    return np.bincount(slot[keep], weights=values[keep], minlength=n)


# ----------------------------------------------------------------------------- whole night, vectorised

def _forward_fill(values: np.ndarray, lead: float) -> np.ndarray:
    """Carry the last observed value forward; `lead` before the first observation."""
    observed = ~np.isnan(values)
    last = np.where(observed, np.arange(len(values)), -1)
    np.maximum.accumulate(last, out=last)
    return np.where(last >= 0, values[np.maximum(last, 0)], lead)


def fill_missing(values: np.ndarray, causal: bool, lead: float) -> np.ndarray:
    """Forward fill within the night; offline also fills a leading gap backwards (needs the future)."""
    if not causal and (~np.isnan(values)).any():
        lead = values[np.flatnonzero(~np.isnan(values))[0]]
    return _forward_fill(values, lead)


def _rolling(values: np.ndarray, window: int, fn: str, centred: bool = False) -> np.ndarray:
    """Mean or std over the last `window` epochs (fewer at the start), or centred on the epoch."""
    c1 = np.concatenate([[0.0], np.cumsum(values)])
    c2 = np.concatenate([[0.0], np.cumsum(values * values)])
    end = np.arange(1, len(values) + 1)
    if centred:  # the trailing window that ends window // 2 epochs later, clipped at the night's end
        end = np.minimum(end + window // 2, len(values))
    start = np.maximum(end - window, 0)
    n = end - start
    mean = (c1[end] - c1[start]) / n
    if fn == "mean":
        return mean
    return np.sqrt(np.clip((c2[end] - c2[start]) / n - mean * mean, 0, None))


def night_features(night: EpochAggregates, causal: bool = True, features: tuple[str, ...] = FEATURES) -> np.ndarray:
    """Per-epoch feature matrix (n, len(features)), float32.

    causal=True uses only the current and past epochs, so a stream computes the same rows;
    causal=False may use the whole night (night-level heart-rate statistics, centred windows,
    backward fill).
    """
    features = check_features(features)
    centred = not causal
    hr_observed = ~np.isnan(night.heart_rate_bpm)
    hr = fill_missing(night.heart_rate_bpm, causal, HR_PRIOR_BPM)
    counts = fill_missing(night.activity_count, causal, 0.0)
    if causal:
        n_seen = np.cumsum(hr_observed)
        s1 = np.cumsum(np.where(hr_observed, night.heart_rate_bpm, 0.0))
        s2 = np.cumsum(np.where(hr_observed, night.heart_rate_bpm, 0.0) ** 2)
        night_mean = np.where(n_seen > 0, s1 / np.maximum(n_seen, 1), hr)
        night_std = np.sqrt(np.clip(np.where(n_seen > 1, s2 / np.maximum(n_seen, 1) - night_mean ** 2, 0.0), 0, None))
    else:
        observed = night.heart_rate_bpm[hr_observed]
        night_mean, night_std = observed.mean(), observed.std()
    moved = np.where(counts > MOVE_COUNT, np.arange(len(counts)), -1)
    np.maximum.accumulate(moved, out=moved)
    since_move = np.where(moved >= 0, np.arange(len(counts)) - moved, np.arange(len(counts)) + 1)
    log_counts = np.log1p(counts)
    hrv = [_rolling(hr, w, "std", centred) for w in HRV_EPOCHS]
    activity = [_rolling(log_counts, w, "mean", centred) for w in ACTIVITY_EPOCHS]
    columns = {
        "heart_rate_bpm": hr,
        "heart_rate_std_bpm": np.nan_to_num(night.heart_rate_std_bpm),
        "hr_night_z": (hr - night_mean) / np.maximum(night_std, 1.0),
        "hr_minus_30min_mean": hr - _rolling(hr, HR_LEVEL_EPOCHS, "mean", centred),
        "hr_delta_bpm": np.diff(hr, prepend=hr[0]),
        "hrv_2_5min_bpm": hrv[0], "hrv_5min_bpm": hrv[1], "hrv_10min_bpm": hrv[2],
        "log_activity": log_counts,
        "log_activity_2_5min": activity[0], "log_activity_10min": activity[1],
        "log_epochs_since_move": np.log1p(since_move),
        "hours_since_start": (night.epoch_start_s - night.epoch_start_s[0]) / 3600.0,
        "hr_missing": (~hr_observed).astype(np.float64),
        "motion_missing": np.isnan(night.activity_count).astype(np.float64),
        "motion_mag_mean_g": np.nan_to_num(night.motion_mag_mean_g),
        "motion_mag_std_g": np.nan_to_num(night.motion_mag_std_g),
        "steps": np.nan_to_num(night.steps),
        "steps_missing": np.isnan(night.steps).astype(np.float64),
    }
    return np.stack([columns[name] for name in features], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- one epoch at a time, many wearers

class IncrementalFeatures:
    """`night_features(night, causal=True)` one epoch at a time for n wearers, O(1) work and memory per epoch.

    Expanding heart-rate statistics are running sums; trailing windows keep the last HR_RING /
    ACTIVITY_RING values of the running cumulative sums in ring buffers, so every number comes
    from the same float64 operations as the whole-night form. Each wearer has its own night:
    `reset(wearers)` starts a new one, `update` closes one epoch for every wearer.
    """

    def __init__(self, n_wearers: int, features: tuple[str, ...] = FEATURES):
        self.features = check_features(features)
        self.n_wearers = int(n_wearers)
        self._wearers = np.arange(self.n_wearers)
        n = self.n_wearers
        self.n = np.zeros(n, np.int64)                    # epochs closed in each wearer's night
        self.hr_last, self.count_last, self.prev_hr = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        self.n_seen, self.s1, self.s2 = np.zeros(n, np.int64), np.zeros(n), np.zeros(n)
        self.hr_c1, self.hr_c2 = np.zeros((n, HR_RING)), np.zeros((n, HR_RING))
        self.la_c1 = np.zeros((n, ACTIVITY_RING))
        self.last_move = np.full(n, -1, np.int64)

    def reset(self, wearers=None) -> None:
        """A new night for the given wearers (indices or boolean mask; None: all)."""
        w = self._wearers if wearers is None else np.asarray(wearers)
        self.n[w] = 0
        self.hr_last[w], self.count_last[w], self.prev_hr[w] = np.nan, np.nan, np.nan
        self.n_seen[w], self.s1[w], self.s2[w] = 0, 0.0, 0.0
        self.hr_c1[w], self.hr_c2[w], self.la_c1[w] = 0.0, 0.0, 0.0
        self.last_move[w] = -1

    def update(self, hours_since_start, heart_rate_bpm, heart_rate_std_bpm=None, activity_count=None, steps=None,
               motion_mag_mean_g=None, motion_mag_std_g=None) -> np.ndarray:
        """Close one epoch for every wearer: raw feature rows (n, n_features) float32.

        Each argument is (n,) or a scalar; None or NaN marks a missing aggregate. heart_rate_std_bpm
        defaults to 0 where the heart rate is given (one reading).
        """
        nan = np.full(self.n_wearers, np.nan)

        def column(values):
            return nan if values is None else np.broadcast_to(np.asarray(values, np.float64), nan.shape)

        hr_raw = column(heart_rate_bpm)
        hr_std = np.where(np.isnan(hr_raw), np.nan, 0.0) if heart_rate_std_bpm is None else column(heart_rate_std_bpm)
        count_raw, steps = column(activity_count), column(steps)
        mag_mean, mag_std = column(motion_mag_mean_g), column(motion_mag_std_g)
        k = self.n
        hr_observed = ~np.isnan(hr_raw)
        self.hr_last = np.where(hr_observed, hr_raw, self.hr_last)
        self.n_seen = self.n_seen + hr_observed
        self.s1 = np.where(hr_observed, self.s1 + hr_raw, self.s1)
        self.s2 = np.where(hr_observed, self.s2 + hr_raw * hr_raw, self.s2)
        hr = np.where(np.isnan(self.hr_last), HR_PRIOR_BPM, self.hr_last)
        self.count_last = np.where(np.isnan(count_raw), self.count_last, count_raw)
        counts = np.where(np.isnan(self.count_last), 0.0, self.count_last)
        seen = np.maximum(self.n_seen, 1)
        night_mean = np.where(self.n_seen > 0, self.s1 / seen, hr)
        var = np.where(self.n_seen > 1, self.s2 / seen - night_mean * night_mean, 0.0)
        night_std = np.sqrt(np.where(var > 0, var, 0.0))
        n1 = k + 1
        w = self._wearers
        self.hr_c1[w, n1 % HR_RING] = self.hr_c1[w, k % HR_RING] + hr
        self.hr_c2[w, n1 % HR_RING] = self.hr_c2[w, k % HR_RING] + hr * hr
        log_counts = np.log1p(counts)
        self.la_c1[w, n1 % ACTIVITY_RING] = self.la_c1[w, k % ACTIVITY_RING] + log_counts
        self.last_move = np.where(counts > MOVE_COUNT, k, self.last_move)
        since_move = np.where(self.last_move >= 0, k - self.last_move, k + 1)

        def rolling(c1, c2, window):
            size = c1.shape[1]
            count = np.minimum(window, n1)
            end, begin = n1 % size, (n1 - count) % size
            mean = (c1[w, end] - c1[w, begin]) / count
            if c2 is None:
                return mean
            var = (c2[w, end] - c2[w, begin]) / count - mean * mean
            return np.sqrt(np.where(var > 0, var, 0.0))

        hrv = [rolling(self.hr_c1, self.hr_c2, window) for window in HRV_EPOCHS]
        activity = [rolling(self.la_c1, None, window) for window in ACTIVITY_EPOCHS]
        columns = {
            "heart_rate_bpm": hr,
            "heart_rate_std_bpm": np.where(np.isnan(hr_std), 0.0, hr_std),
            "hr_night_z": (hr - night_mean) / np.maximum(night_std, 1.0),
            "hr_minus_30min_mean": hr - rolling(self.hr_c1, None, HR_LEVEL_EPOCHS),
            "hr_delta_bpm": hr - np.where(np.isnan(self.prev_hr), hr, self.prev_hr),
            "hrv_2_5min_bpm": hrv[0], "hrv_5min_bpm": hrv[1], "hrv_10min_bpm": hrv[2],
            "log_activity": log_counts,
            "log_activity_2_5min": activity[0], "log_activity_10min": activity[1],
            "log_epochs_since_move": np.log1p(since_move.astype(np.float64)),
            "hours_since_start": column(hours_since_start),
            "hr_missing": (~hr_observed).astype(np.float64),
            "motion_missing": np.isnan(count_raw).astype(np.float64),
            "motion_mag_mean_g": np.nan_to_num(mag_mean),
            "motion_mag_std_g": np.nan_to_num(mag_std),
            "steps": np.nan_to_num(steps),
            "steps_missing": np.isnan(steps).astype(np.float64),
        }
        self.prev_hr = hr
        self.n = n1
        return np.stack([columns[name] for name in self.features], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- windows

def window_epochs(targets, seq_len: int, target_pos: int, n_epochs) -> np.ndarray:
    """Epoch index (m, seq_len) of each position of the windows that read epoch targets[i] at target_pos.

    Positions before the night's first epoch repeat it and positions past epoch n_epochs - 1 repeat
    that one (edge padding), so every epoch gets a window and a night shorter than seq_len works.
    n_epochs may be one number (a whole night) or one per window (each wearer's night so far).
    """
    if not 0 <= target_pos < seq_len:
        raise ValueError(f"target_pos must be in [0, {seq_len}), got {target_pos}")
    raw = np.asarray(targets)[:, None] - target_pos + np.arange(seq_len)[None, :]
    last = np.asarray(n_epochs)[..., None] - 1 if np.ndim(n_epochs) else n_epochs - 1
    return np.clip(raw, 0, last)


def window_indices(n_epochs: int, seq_len: int, target_pos: int, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Windows of a whole night whose position `target_pos` is epoch 0, stride, 2*stride, ...:
    (epoch indices (m, seq_len), valid: False where a position is edge padding)."""
    targets = np.arange(0, n_epochs, stride)
    raw = targets[:, None] - target_pos + np.arange(seq_len)[None, :]
    return window_epochs(targets, seq_len, target_pos, n_epochs), (raw >= 0) & (raw < n_epochs)


def make_windows(x: np.ndarray, seq_len: int, target_pos: int) -> np.ndarray:
    """(n_epochs, seq_len, F): one window per epoch, the epoch at `target_pos`."""
    idx, _ = window_indices(len(x), seq_len, target_pos)
    return x[idx]


class WindowRing:
    """The last seq_len feature rows of each of n wearers (epoch e at slot e % seq_len) and the window
    that reads each wearer's newest epoch at target_pos, laid out as window_epochs on the night so far.

    seq_len slots are enough: a position before epoch 0 repeats epoch 0, which is still held while
    the night has fewer than seq_len epochs; positions after the newest epoch repeat it.
    """

    def __init__(self, n_wearers: int, seq_len: int, n_features: int, target_pos: int):
        window_epochs(np.zeros(1, np.int64), seq_len, target_pos, 1)  # checks target_pos
        self.seq_len, self.target_pos = int(seq_len), int(target_pos)
        self.rows = np.zeros((n_wearers, seq_len, n_features), np.float32)
        self._wearers = np.arange(n_wearers)

    def push(self, epoch: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store each wearer's row of epoch `epoch` (n,); (windows (n, seq_len, F), their ring slots (n, seq_len))."""
        self.rows[self._wearers, epoch % self.seq_len] = rows
        slots = window_epochs(epoch, self.seq_len, self.target_pos, epoch + 1) % self.seq_len
        return self.rows[self._wearers[:, None], slots], slots
