"""Real-world recording conditions applied to recorded nights: sparse heart rate, no motion channel,
no heart rate, the watch taken off, no resting heart rate (a new wearer, or too little history).
Training draws a condition per night and pass; evaluation (robustness.py) measures each named condition.

A condition thins the night's raw heart-rate readings (keeping the first reading in each
interval, as a watch that samples periodically records), drops a channel for the whole night, or
removes both channels over a stretch, then recomputes the per-epoch aggregates as the loader does;
dropping the baseline clears the night's resting heart rate.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

import data_loader as dl
from features import EPOCH_S, epoch_mean_std

# heart-rate intervals a training night is thinned to; None keeps the recording (about 5 s)
TRAIN_HR_PERIODS_S = (None, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TRAIN_P_DROP_MOTION = 0.3
TRAIN_P_DROP_HEART_RATE = 0.15
TRAIN_P_WATCH_OFF = 0.3
TRAIN_WATCH_OFF_S = (600.0, 3 * 3600.0)
TRAIN_P_DROP_BASELINE = 0.5  # in every drawn condition, as-recorded ones too: each is seen with and without one


@dataclass(frozen=True)
class TrainMix:
    """What draw_condition draws a degraded training night from: a heart-rate interval out of
    hr_periods_s (None: as recorded), then the motion channel dropped with p_drop_motion, else the
    heart rate with p_drop_heart_rate (on a night with motion)."""
    hr_periods_s: tuple[float | None, ...] = TRAIN_HR_PERIODS_S
    p_drop_motion: float = TRAIN_P_DROP_MOTION
    p_drop_heart_rate: float = TRAIN_P_DROP_HEART_RATE


# TrainConfig.train_mix names one: "mixed" every real-world case, "sparse no motion" only heart rate every
# 2-10 min without motion (a typical watch export), for a model of that input profile. Nights drawn as
# recorded (p_recorded) come first: a model of that profile alone also needs p_recorded 0
TRAIN_MIXES = {"mixed": TrainMix(), "sparse no motion": TrainMix((120.0, 300.0, 600.0), 1.0, 0.0)}


@dataclass(frozen=True)
class Condition:
    """How a night is degraded. hr_period_s: keep the first heart-rate reading in each interval of this
    length (None: as recorded); drop_*: remove a channel for the whole night; watch_off_s: a stretch
    with neither channel, starting watch_off_start_frac of the way into the night; hr_offset_bpm shifts
    every heart-rate reading (training draws it to keep models off a person's absolute level);
    drop_baseline: no resting heart rate (resting_hr_bpm NaN)."""
    name: str = "as recorded"
    hr_period_s: float | None = None
    drop_motion: bool = False
    drop_heart_rate: bool = False
    watch_off_s: float = 0.0
    watch_off_start_frac: float = 0.5
    hr_offset_bpm: float = 0.0  # added to every heart-rate reading: a watch (or a person) that reads higher or lower
    drop_baseline: bool = False


# what robustness.py measures; the watch-off stretch is centred on the night
CONDITIONS = {c.name: c for c in (
    Condition("as recorded"),
    Condition("heart rate every 15 s", hr_period_s=15.0),
    Condition("heart rate every 60 s", hr_period_s=60.0),
    Condition("heart rate every 300 s", hr_period_s=300.0),
    Condition("heart rate only", drop_motion=True),
    Condition("motion only", drop_heart_rate=True),
    Condition("heart rate every 300 s, no motion", hr_period_s=300.0, drop_motion=True),
    Condition("2 h watch off", watch_off_s=7200.0),
    Condition("as recorded, no baseline", drop_baseline=True),
    Condition("heart rate only, no baseline", drop_motion=True, drop_baseline=True),
)}
# what training selects models on (training.validation_keys): the recording and the common real-world cases
VALIDATION_CONDITIONS = ("as recorded", "heart rate every 60 s", "heart rate every 300 s, no motion",
                         "heart rate only", "motion only")


def draw_condition(rng: np.random.Generator, night: dl.Night, p_recorded: float = 0.0,
                   p_drop_baseline: float = 0.0, hr_shift_bpm: float = 0.0, mix: TrainMix = TrainMix()) -> Condition:
    """A training condition: with probability p_recorded the recording as it is; else heart-rate
    interval uniform over mix.hr_periods_s, then the motion channel dropped, or else (on a night
    with motion) the heart rate dropped, and a watch-off stretch of 10 min to 3 h at a random place.
    In both cases the resting heart rate is then dropped with probability p_drop_baseline (training
    passes TRAIN_P_DROP_BASELINE for models that read it), and a heart-rate offset drawn from a normal
    of std hr_shift_bpm. A draw at 0 takes nothing from rng, so the other draws stay as they were."""
    def finish(condition: Condition) -> Condition:
        drop = p_drop_baseline > 0 and bool(rng.random() < p_drop_baseline)
        offset = float(rng.normal(0.0, hr_shift_bpm)) if hr_shift_bpm > 0 else 0.0
        return dataclasses.replace(condition, drop_baseline=drop, hr_offset_bpm=offset)

    if p_recorded > 0 and rng.random() < p_recorded:
        return finish(Condition("drawn"))
    period = mix.hr_periods_s[rng.integers(len(mix.hr_periods_s))]
    has_motion = bool((~np.isnan(night.activity_count)).any())
    drop_motion = bool(rng.random() < mix.p_drop_motion)
    drop_hr = bool(not drop_motion and has_motion and rng.random() < mix.p_drop_heart_rate)
    off = float(rng.uniform(*TRAIN_WATCH_OFF_S)) if rng.random() < TRAIN_P_WATCH_OFF else 0.0
    return finish(Condition("drawn", period, drop_motion, drop_hr, off, float(rng.uniform(0.0, 1.0))))


def heart_rate_samples(night: dl.Night) -> np.ndarray:
    """The night's heart-rate readings (m, 2); a night built without them (per-epoch means only)
    stands in one reading at the middle of each epoch that has a heart rate."""
    if len(night.heart_rate_samples) or np.isnan(night.heart_rate_bpm).all():
        return night.heart_rate_samples
    has = ~np.isnan(night.heart_rate_bpm)
    return np.column_stack([night.epoch_start_s[has] + EPOCH_S / 2, night.heart_rate_bpm[has]])


def thin(samples: np.ndarray, period_s: float, phase_s: float = 0.0) -> np.ndarray:
    """The first reading in each interval [phase + j * period, phase + (j + 1) * period)."""
    if len(samples) == 0:
        return samples
    interval = np.floor((samples[:, 0] - phase_s) / period_s)
    first = np.concatenate([[True], np.diff(interval) > 0])
    return samples[first]


def watch_off_span(night: dl.Night, condition: Condition) -> tuple[float, float]:
    """Start and end (s) of the condition's watch-off stretch in this night."""
    start, end = float(night.epoch_start_s[0]), float(night.epoch_start_s[-1] + EPOCH_S)
    room_epochs = max(end - start - condition.watch_off_s, 0.0) // EPOCH_S  # on the epoch grid
    off_start = start + EPOCH_S * np.floor(condition.watch_off_start_frac * room_epochs)
    return off_start, off_start + condition.watch_off_s


def watch_off_epochs(night: dl.Night, condition: Condition) -> np.ndarray:
    """Epochs that overlap the watch-off stretch (none without one)."""
    if condition.watch_off_s <= 0:
        return np.zeros(len(night), bool)
    off_start, off_end = watch_off_span(night, condition)
    return (night.epoch_start_s + EPOCH_S > off_start) & (night.epoch_start_s < off_end)


def degrade(night: dl.Night, condition: Condition, rng: np.random.Generator | None = None) -> dl.Night:
    """The night as a device under `condition` would have recorded it (a new Night; stages unchanged).

    rng: the phase of the heart-rate intervals (None: intervals start at the night's first epoch).
    """
    samples = heart_rate_samples(night)
    if condition.hr_period_s:  # intervals start at or before the night's start, so none is cut short
        phase = float(night.epoch_start_s[0]) - (rng.uniform(0, condition.hr_period_s) if rng is not None else 0.0)
        samples = thin(samples, condition.hr_period_s, phase)
    if condition.drop_heart_rate:
        samples = samples[:0]
    if condition.hr_offset_bpm:
        samples = samples + [0.0, condition.hr_offset_bpm]
    activity = night.activity_count.copy()
    motion_mean, motion_std, steps = night.motion_mag_mean_g.copy(), night.motion_mag_std_g.copy(), night.steps.copy()
    if condition.drop_motion:
        activity[:], motion_mean[:], motion_std[:] = np.nan, np.nan, np.nan
    if condition.watch_off_s > 0:
        off_start, off_end = watch_off_span(night, condition)
        samples = samples[(samples[:, 0] < off_start) | (samples[:, 0] >= off_end)]
        off = watch_off_epochs(night, condition)
        for values in (activity, motion_mean, motion_std, steps):
            values[off] = np.nan
    hr_mean, hr_std, _ = epoch_mean_std(dl.epoch_index(samples[:, 0], night.epoch_start_s), samples[:, 1], len(night))
    # the same watch (or person) reads the days before the night with the same offset
    resting = math.nan if condition.drop_baseline else night.resting_hr_bpm + condition.hr_offset_bpm
    return dataclasses.replace(night, heart_rate_bpm=hr_mean, heart_rate_std_bpm=hr_std, activity_count=activity,
                               motion_mag_mean_g=motion_mean, motion_mag_std_g=motion_std, steps=steps,
                               heart_rate_samples=samples, resting_hr_bpm=resting,
                               report={**night.report, "condition": condition.name})
