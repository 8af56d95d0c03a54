"""Per-epoch features: the one definition of every formula between per-epoch aggregates and model windows.

Two forms side by side, with the parity tests as their contract:
- `night_features`: a whole night at once, vectorised over epochs (offline, or causal for training
  and evaluation of real-time models);
- `IncrementalFeatures`: one epoch at a time for many wearers at once, vectorised over wearers
  (the stream uses it with one wearer, the pooled and batched servers with thousands). Its rows
  equal the causal `night_features` rows of the night so far, to float rounding.
Also here: the per-epoch aggregation of readings (`epoch_mean_std`, `epoch_sum`), the "no data"
rule (`no_data`) and the window layout (`window_epochs`), shared by the offline, streaming and
batched paths. numpy only.

Real watches sample heart rate every few seconds to every few minutes, may have no motion channel
and come off: the features read heart rate over time (the epoch mean where the epoch has
readings, else interpolated up to HR_INTERP_EPOCHS between readings offline, or the last reading
held in real time), give the time since the last reading explicitly (`hr_age_log_min`), and use
no per-epoch sample count or within-epoch spread, which would tell the sampling rate.

The personal baseline (opt-in: not in DEFAULT_FEATURES): `hr_minus_resting_bpm` reads the filled
heart rate against the wearer's resting heart rate from the days before the night (the night's
`resting_hr_bpm`, data_loader.resting_heart_rate; IncrementalFeatures.set_resting in a stream),
0 without one, and `resting_hr_missing` says there is none.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

EPOCH_S = 30
SEQ_LEN = 25
FEATURES_VERSION = 3  # part of every feature-store key: bump when a formula here changes
HR_PRIOR_BPM = 60.0  # heart rate assumed before the first reading of a night (causal) or without any
MOVE_COUNT = 10.0    # an activity count above this is a movement (log_epochs_since_move)
HR_INTERP_EPOCHS = 20  # offline: interpolate heart rate across gaps up to 10 min; hold it across longer ones
HR_AGE_CAP_MIN = 60.0  # hr_age_log_min saturates at an hour without a reading
NO_DATA_EPOCHS = 20    # no stage for an epoch with neither heart rate nor motion within 10 min (see no_data)

# window lengths in epochs (30 s each)
HR_LEVEL_EPOCHS = 60              # hr_minus_30min_mean
HRV_EPOCHS = (10, 20, 40)         # hrv_5min_bpm, hrv_10min_bpm, hrv_20min_bpm
ACTIVITY_EPOCHS = (5, 20)         # log_activity_2_5min, log_activity_10min
# cumulative sums the incremental form keeps: enough to difference the longest window
HR_RING = max(HR_LEVEL_EPOCHS, *HRV_EPOCHS) + 1
ACTIVITY_RING = max(ACTIVITY_EPOCHS) + 1

FEATURES = (
    "heart_rate_bpm",          # epoch mean; between readings interpolated (offline) or held (causal)
    "hr_night_z",              # heart rate against the night: expanding (causal) or whole-night statistics
    "hr_minus_30min_mean",     # heart rate against its 30 min level (trailing if causal, else centred)
    "hrv_5min_bpm",            # heart-rate variability over time: std over HRV_EPOCHS (trailing if causal)
    "hrv_10min_bpm",
    "hrv_20min_bpm",
    "hr_age_log_min",          # log1p minutes since the last heart-rate reading (offline: to the nearest)
    "log_activity",            # log1p activity count
    "log_activity_2_5min",     # activity over ACTIVITY_EPOCHS (trailing if causal)
    "log_activity_10min",
    "log_epochs_since_move",   # log1p epochs since the last count above MOVE_COUNT
    "hours_since_start",       # time of night
    "motion_missing",          # 1 where the epoch had no motion/counts data
    "motion_mag_mean_g",       # raw motion only (0 without it)
    "motion_mag_std_g",
    "steps",                   # steps file only (0 without it)
    "steps_missing",
    "hr_minus_resting_bpm",    # heart_rate_bpm minus the resting heart rate before the night (0 without one)
    "resting_hr_missing",      # 1 where the night has no resting heart rate (too little history)
)
# the personal-baseline features: only models that read one train with it dropped (degrade.draw_condition)
BASELINE_FEATURES = ("hr_minus_resting_bpm", "resting_hr_missing")


def reads_baseline(feature_names) -> bool:
    """Whether a feature list reads the personal baseline."""
    return bool(set(BASELINE_FEATURES) & set(feature_names))


# The bundled data has neither raw motion nor steps, so the default models leave those out.
DEFAULT_FEATURES = FEATURES[:FEATURES.index("motion_missing") + 1]
# the per-epoch aggregates (data_loader.Night fields) the features read
FEATURE_AGGREGATES = ("heart_rate_bpm", "activity_count", "motion_mag_mean_g", "motion_mag_std_g", "steps")
AGGREGATES = ("heart_rate_bpm", "heart_rate_std_bpm") + FEATURE_AGGREGATES[1:]


class EpochAggregates(Protocol):
    """What the features read of a night (data_loader.Night has it): per-epoch arrays, NaN = missing,
    and the wearer's resting heart rate before the night (NaN: none)."""
    epoch_start_s: np.ndarray
    heart_rate_bpm: np.ndarray
    activity_count: np.ndarray
    motion_mag_mean_g: np.ndarray
    motion_mag_std_g: np.ndarray
    steps: np.ndarray
    resting_hr_bpm: float


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

def _previous(observed: np.ndarray) -> np.ndarray:
    """Index of the last observed epoch at or before each epoch; -1 where none."""
    last = np.where(observed, np.arange(len(observed)), -1)
    return np.maximum.accumulate(last)


def _next(observed: np.ndarray) -> np.ndarray:
    """Index of the first observed epoch at or after each epoch; len where none."""
    n = len(observed)
    first = np.where(observed, np.arange(n), n)
    return np.minimum.accumulate(first[::-1])[::-1]


def fill_missing(values: np.ndarray, causal: bool, lead: float) -> np.ndarray:
    """Forward fill within the night; offline also fills a leading gap backwards (needs the future)."""
    observed = ~np.isnan(values)
    if not causal and observed.any():
        lead = values[np.flatnonzero(observed)[0]]
    prev = _previous(observed)
    return np.where(prev >= 0, values[np.maximum(prev, 0)], lead)


def filled_heart_rate(heart_rate_bpm: np.ndarray, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """(heart rate per epoch with its gaps filled, epochs to the reading it comes from (inf: none)).

    Causal: the last reading held (HR_PRIOR_BPM before the first). Offline: linear interpolation
    between the readings on both sides when they are at most HR_INTERP_EPOCHS apart (age: the
    distance to the nearer one), else the previous reading held (the next one before the first).
    """
    n = len(heart_rate_bpm)
    observed = ~np.isnan(heart_rate_bpm)
    epoch = np.arange(n)
    prev = _previous(observed)
    held = np.where(prev >= 0, heart_rate_bpm[np.maximum(prev, 0)], HR_PRIOR_BPM)
    age = np.where(prev >= 0, epoch - prev, np.inf)
    if causal:
        return held, age
    nxt = _next(observed)
    after = heart_rate_bpm[np.minimum(nxt, n - 1)] if n else held
    held = np.where(prev >= 0, held, np.where(nxt < n, after, HR_PRIOR_BPM))
    span = nxt - prev
    inside = (prev >= 0) & (nxt < n) & (span > 0) & (span <= HR_INTERP_EPOCHS)
    with np.errstate(invalid="ignore", divide="ignore"):
        ramp = held + (after - held) * (epoch - prev) / np.maximum(span, 1)
    ahead = np.where(nxt < n, nxt - epoch, np.inf)
    age = np.where(inside, np.minimum(age, ahead), np.where(prev >= 0, age, ahead))
    return np.where(inside, ramp, held), age


def hr_age_feature(age_epochs: np.ndarray) -> np.ndarray:
    """log1p of the minutes to the heart-rate reading an epoch's value comes from, capped at HR_AGE_CAP_MIN."""
    return np.log1p(np.minimum(age_epochs * (EPOCH_S / 60.0), HR_AGE_CAP_MIN))


def hr_minus_resting(hr: np.ndarray, resting_hr_bpm) -> np.ndarray:
    """The filled heart rate against the resting heart rate (scalar or per row); 0 where there is none (NaN)."""
    return np.where(np.isnan(resting_hr_bpm), 0.0, hr - resting_hr_bpm)


def stages_of(probabilities: np.ndarray) -> np.ndarray:
    """The stage of each row of probabilities (n, 4): its argmax, or -1 for a NaN row (no data)."""
    missing = np.isnan(probabilities).any(axis=1)
    return np.where(missing, -1, np.where(missing[:, None], 0.0, probabilities).argmax(axis=1))


def has_data(night: EpochAggregates) -> np.ndarray:
    """Epochs with a heart-rate or a motion reading."""
    return ~np.isnan(night.heart_rate_bpm) | ~np.isnan(night.activity_count)


def no_data(night: EpochAggregates, causal: bool) -> np.ndarray:
    """Epochs that get no stage: without heart rate or motion, inside a stretch without either that
    is longer than NO_DATA_EPOCHS (offline: the whole stretch; causal, which cannot see its end:
    once no reading has come for NO_DATA_EPOCHS epochs, and before the night's first reading).
    Shorter stretches are staged from context."""
    data = has_data(night)
    epoch = np.arange(len(data))
    prev = _previous(data)
    since = np.where(prev >= 0, epoch - prev, np.iinfo(np.int64).max)
    if causal:
        return since > NO_DATA_EPOCHS
    nxt = _next(data)
    run = np.where(data, 0, np.where(nxt < len(data), nxt, len(data)) - np.where(prev >= 0, prev, -1) - 1)
    return ~data & (run > NO_DATA_EPOCHS)


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
    interpolation and backward fill).
    """
    features = check_features(features)
    centred = not causal
    hr_observed = ~np.isnan(night.heart_rate_bpm)
    hr, age = filled_heart_rate(night.heart_rate_bpm, causal)
    counts = fill_missing(night.activity_count, causal, 0.0)
    observed_hr = np.where(hr_observed, night.heart_rate_bpm, 0.0)
    if causal:
        n_seen = np.cumsum(hr_observed)
        s1, s2 = np.cumsum(observed_hr), np.cumsum(observed_hr ** 2)
        night_mean = np.where(n_seen > 0, s1 / np.maximum(n_seen, 1), hr)
        night_std = np.sqrt(np.clip(np.where(n_seen > 1, s2 / np.maximum(n_seen, 1) - night_mean ** 2, 0.0), 0, None))
    elif hr_observed.any():
        night_mean, night_std = night.heart_rate_bpm[hr_observed].mean(), night.heart_rate_bpm[hr_observed].std()
    else:
        night_mean, night_std = HR_PRIOR_BPM, 0.0
    moved = np.where(counts > MOVE_COUNT, np.arange(len(counts)), -1)
    np.maximum.accumulate(moved, out=moved)
    since_move = np.where(moved >= 0, np.arange(len(counts)) - moved, np.arange(len(counts)) + 1)
    log_counts = np.log1p(counts)
    resting = np.full(len(hr), night.resting_hr_bpm, np.float64)
    hrv = [_rolling(hr, w, "std", centred) for w in HRV_EPOCHS]
    activity = [_rolling(log_counts, w, "mean", centred) for w in ACTIVITY_EPOCHS]
    columns = {
        "heart_rate_bpm": hr,
        "hr_night_z": (hr - night_mean) / np.maximum(night_std, 1.0),
        "hr_minus_30min_mean": hr - _rolling(hr, HR_LEVEL_EPOCHS, "mean", centred),
        "hrv_5min_bpm": hrv[0], "hrv_10min_bpm": hrv[1], "hrv_20min_bpm": hrv[2],
        "hr_age_log_min": hr_age_feature(age),
        "log_activity": log_counts,
        "log_activity_2_5min": activity[0], "log_activity_10min": activity[1],
        "log_epochs_since_move": np.log1p(since_move),
        "hours_since_start": (night.epoch_start_s - night.epoch_start_s[0]) / 3600.0,
        "motion_missing": np.isnan(night.activity_count).astype(np.float64),
        "motion_mag_mean_g": np.nan_to_num(night.motion_mag_mean_g),
        "motion_mag_std_g": np.nan_to_num(night.motion_mag_std_g),
        "steps": np.nan_to_num(night.steps),
        "steps_missing": np.isnan(night.steps).astype(np.float64),
        "hr_minus_resting_bpm": hr_minus_resting(hr, resting),
        "resting_hr_missing": np.isnan(resting).astype(np.float64),
    }
    return np.stack([columns[name] for name in features], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- one epoch at a time, many wearers

class IncrementalFeatures:
    """`night_features(night, causal=True)` and `no_data(night, causal=True)` one epoch at a time for
    many wearers, O(1) work and memory per epoch.

    Expanding heart-rate statistics are running sums; trailing windows keep the last HR_RING /
    ACTIVITY_RING values of the running cumulative sums in ring buffers, so every number comes
    from the same float64 operations as the whole-night form. Each wearer (a row) has its own
    night: `reset(rows)` starts a new one, `update` closes one epoch for every wearer or for the
    given rows. `add_rows` makes room for more wearers (StagerPool). `set_resting` gives wearers their
    resting heart rate (the night's `resting_hr_bpm`): the wearer's, not the night's, so `reset` keeps
    it; none (NaN) for a new row until set.
    """

    _STATE = {"n": (np.int64, 0), "hr_last": (np.float64, np.nan), "hr_last_k": (np.int64, -1),
              "count_last": (np.float64, np.nan), "n_seen": (np.int64, 0), "s1": (np.float64, 0.0),
              "s2": (np.float64, 0.0), "last_move": (np.int64, -1), "last_data_k": (np.int64, -1)}
    _WEARER = {"resting_hr_bpm": (np.float64, np.nan)}  # per wearer across nights: set by add_rows, not reset
    _RINGS = {"hr_c1": HR_RING, "hr_c2": HR_RING, "la_c1": ACTIVITY_RING}

    def __init__(self, n_wearers: int, features: tuple[str, ...] = FEATURES):
        self.features = check_features(features)
        self.n_wearers = 0
        for name, (dtype, _) in {**self._STATE, **self._WEARER}.items():
            setattr(self, name, np.zeros(0, dtype))
        for name, size in self._RINGS.items():
            setattr(self, name, np.zeros((0, size)))
        self.add_rows(n_wearers)

    def take_row(self, row: int) -> "IncrementalFeatures":
        """A one-wearer copy of one row's state (a wearer leaving a shared state)."""
        out = IncrementalFeatures(1, self.features)
        for name in (*self._STATE, *self._WEARER, *self._RINGS):
            getattr(out, name)[0] = getattr(self, name)[row]
        return out

    def add_rows(self, count: int) -> np.ndarray:
        """Room for `count` more wearers, each at the start of a night; returns their row indices."""
        for name in (*self._STATE, *self._WEARER, *self._RINGS):
            old = getattr(self, name)
            setattr(self, name, np.concatenate([old, np.zeros((count, *old.shape[1:]), old.dtype)]))
        rows = np.arange(self.n_wearers, self.n_wearers + count)
        self.n_wearers += count
        for name, (_, start) in self._WEARER.items():
            getattr(self, name)[rows] = start
        self.reset(rows)
        return rows

    @staticmethod
    def _select(rows):
        """An index of rows given as indices or a boolean mask (None: all)."""
        w = slice(None) if rows is None else np.asarray(rows)
        if not isinstance(w, slice) and w.dtype != bool:
            w = w.astype(np.int64)  # an empty list is a float array
        return w

    def reset(self, rows=None) -> None:
        """A new night for the given rows (indices or boolean mask; None: all); their resting heart rate stays."""
        w = self._select(rows)
        for name, (_, start) in self._STATE.items():
            getattr(self, name)[w] = start
        for name in self._RINGS:
            getattr(self, name)[w] = 0.0

    def set_resting(self, rows, resting_hr_bpm) -> None:
        """The resting heart rate (bpm; NaN or None: none) of the given rows (indices or boolean mask; None:
        all), scalar or one per row; it holds for their epochs closed from now on, across `reset`."""
        self.resting_hr_bpm[self._select(rows)] = np.asarray(resting_hr_bpm, np.float64)  # None -> NaN

    def update(self, hours_since_start, heart_rate_bpm=None, activity_count=None, steps=None,
               motion_mag_mean_g=None, motion_mag_std_g=None, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Close one epoch for every wearer (or for `rows`, an index array): (feature rows (m, n_features)
        float32, no_data (m,) bool). Each aggregate is (m,) or a scalar; None or NaN marks it missing."""
        w = np.arange(self.n_wearers) if rows is None else np.asarray(rows, np.int64)
        nan = np.full(len(w), np.nan)

        def column(values):
            return nan if values is None else np.broadcast_to(np.asarray(values, np.float64), nan.shape)

        hr_raw, count_raw, steps = column(heart_rate_bpm), column(activity_count), column(steps)
        mag_mean, mag_std = column(motion_mag_mean_g), column(motion_mag_std_g)
        k = self.n[w]
        hr_observed, count_observed = ~np.isnan(hr_raw), ~np.isnan(count_raw)
        hr_last = np.where(hr_observed, hr_raw, self.hr_last[w])
        hr_last_k = np.where(hr_observed, k, self.hr_last_k[w])
        resting = self.resting_hr_bpm[w]
        n_seen = self.n_seen[w] + hr_observed
        s1 = np.where(hr_observed, self.s1[w] + hr_raw, self.s1[w])
        s2 = np.where(hr_observed, self.s2[w] + hr_raw * hr_raw, self.s2[w])
        hr = np.where(np.isnan(hr_last), HR_PRIOR_BPM, hr_last)
        age = np.where(hr_last_k >= 0, k - hr_last_k, np.inf)
        count_last = np.where(count_observed, count_raw, self.count_last[w])
        counts = np.where(np.isnan(count_last), 0.0, count_last)
        last_data_k = np.where(hr_observed | count_observed, k, self.last_data_k[w])
        seen = np.maximum(n_seen, 1)
        night_mean = np.where(n_seen > 0, s1 / seen, hr)
        var = np.where(n_seen > 1, s2 / seen - night_mean * night_mean, 0.0)
        night_std = np.sqrt(np.where(var > 0, var, 0.0))
        n1 = k + 1
        self.hr_c1[w, n1 % HR_RING] = self.hr_c1[w, k % HR_RING] + hr
        self.hr_c2[w, n1 % HR_RING] = self.hr_c2[w, k % HR_RING] + hr * hr
        log_counts = np.log1p(counts)
        self.la_c1[w, n1 % ACTIVITY_RING] = self.la_c1[w, k % ACTIVITY_RING] + log_counts
        last_move = np.where(counts > MOVE_COUNT, k, self.last_move[w])
        since_move = np.where(last_move >= 0, k - last_move, k + 1)

        def rolling(c1, c2, window):
            size = c1.shape[1]
            count = np.minimum(window, n1)
            end, begin = n1 % size, (n1 - count) % size
            mean = (c1[w, end] - c1[w, begin]) / count
            if c2 is None:
                return mean
            var = (c2[w, end] - c2[w, begin]) / count - mean * mean
            return np.sqrt(np.where(var > 0, var, 0.0))

        columns = {
            "heart_rate_bpm": lambda: hr,
            "hr_night_z": lambda: (hr - night_mean) / np.maximum(night_std, 1.0),
            "hr_minus_30min_mean": lambda: hr - rolling(self.hr_c1, None, HR_LEVEL_EPOCHS),
            "hrv_5min_bpm": lambda: rolling(self.hr_c1, self.hr_c2, HRV_EPOCHS[0]),
            "hrv_10min_bpm": lambda: rolling(self.hr_c1, self.hr_c2, HRV_EPOCHS[1]),
            "hrv_20min_bpm": lambda: rolling(self.hr_c1, self.hr_c2, HRV_EPOCHS[2]),
            "hr_age_log_min": lambda: hr_age_feature(age),
            "log_activity": lambda: log_counts,
            "log_activity_2_5min": lambda: rolling(self.la_c1, None, ACTIVITY_EPOCHS[0]),
            "log_activity_10min": lambda: rolling(self.la_c1, None, ACTIVITY_EPOCHS[1]),
            "log_epochs_since_move": lambda: np.log1p(since_move.astype(np.float64)),
            "hours_since_start": lambda: column(hours_since_start),
            "motion_missing": lambda: (~count_observed).astype(np.float64),
            "motion_mag_mean_g": lambda: np.nan_to_num(mag_mean),
            "motion_mag_std_g": lambda: np.nan_to_num(mag_std),
            "steps": lambda: np.nan_to_num(steps),
            "steps_missing": lambda: np.isnan(steps).astype(np.float64),
            "hr_minus_resting_bpm": lambda: hr_minus_resting(hr, resting),
            "resting_hr_missing": lambda: np.isnan(resting).astype(np.float64),
        }
        out = np.empty((len(w), len(self.features)), np.float32)
        for j, name in enumerate(self.features):
            out[:, j] = columns[name]()
        self.hr_last[w], self.hr_last_k[w], self.n_seen[w], self.s1[w], self.s2[w] = hr_last, hr_last_k, n_seen, s1, s2
        self.count_last[w], self.last_move[w], self.last_data_k[w], self.n[w] = count_last, last_move, last_data_k, n1
        no_data = np.where(last_data_k >= 0, k - last_data_k, np.iinfo(np.int64).max) > NO_DATA_EPOCHS
        return out, no_data


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
    """The last seq_len feature rows of each wearer (epoch e at slot e % seq_len) and the window that
    reads each wearer's newest epoch at target_pos, laid out as window_epochs on the night so far.

    seq_len slots are enough: a position before epoch 0 repeats epoch 0, which is still held while
    the night has fewer than seq_len epochs; positions after the newest epoch repeat it.
    """

    def __init__(self, n_wearers: int, seq_len: int, n_features: int, target_pos: int):
        window_epochs(np.zeros(1, np.int64), seq_len, target_pos, 1)  # checks target_pos
        self.seq_len, self.target_pos = int(seq_len), int(target_pos)
        self.rows = np.zeros((n_wearers, seq_len, n_features), np.float32)

    def add_rows(self, count: int) -> None:
        self.rows = np.concatenate([self.rows, np.zeros((count, *self.rows.shape[1:]), np.float32)])

    def take_row(self, row: int) -> "WindowRing":
        """A one-wearer copy of one row."""
        out = WindowRing(1, self.seq_len, self.rows.shape[2], self.target_pos)
        out.rows[0] = self.rows[row]
        return out

    def push(self, epoch: np.ndarray, feature_rows: np.ndarray, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Store each wearer's feature row of epoch `epoch` (m,); (windows (m, seq_len, F), ring slots (m, seq_len)).

        rows: the wearers (ring rows) concerned, default all."""
        w = np.arange(len(self.rows)) if rows is None else np.asarray(rows, np.int64)
        self.rows[w, epoch % self.seq_len] = feature_rows
        slots = window_epochs(epoch, self.seq_len, self.target_pos, epoch + 1) % self.seq_len
        return self.rows[w[:, None], slots], slots
