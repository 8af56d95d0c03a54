"""Synthetic nights written in the PhysioNet "sleep-accel" file formats.

For tests and scale benchmarks: the files look like the real release (same folders, names,
delimiters and number formats), and the signals follow plausible physiology so that models
and sanity checks have something real to find (heart rate falls in deep sleep, the wrist
moves mostly while awake), but nothing here is real data.

Layout under the output root (".txt.gz" instead of ".txt" with gzip=True):

    labels/<id>_labeled_sleep.txt    "<seconds> <stage>"      30 s epochs from 0; -1 unscored,
                                                               0 Wake, 1 N1, 2 N2, 3 N3, 4 N4, 5 REM
    heart_rate/<id>_heartrate.txt    "<seconds>,<bpm>"        ~5 s irregular, from before 0, gaps
    motion/<id>_acceleration.txt     "<seconds> <x> <y> <z>"  ~50 Hz raw wrist acceleration in g
    steps/<id>_steps.txt             "<seconds>,<steps>"      one row a minute
    counts/<id>_counts.txt           "<seconds>,<count>"      15 s activity counts (a proxy)

    python synthetic.py --out DIR --subjects N [--hours H] [--no-motion] [--gzip] [--seed S]
    python synthetic.py --health-export --out export.zip     # an Apple Health export (apple_health.py)
"""
from __future__ import annotations

import argparse
import contextlib
import gzip as gzip_module
import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from scipy.signal import lfilter, lfilter_zi
from tqdm import tqdm

__all__ = [
    "SyntheticNightConfig",
    "write_health_export",
    "write_night",
    "write_cohort",
    "stage_sequence",
    "STAGE_CODES",
    "main",
]

EPOCH_S = 30
UNSCORED, WAKE, N1, N2, N3, N4, REM = -1, 0, 1, 2, 3, 4, 5
STAGE_CODES = (UNSCORED, WAKE, N1, N2, N3, N4, REM)
DEEP_STAGES = (N3, N4)

# Where each kind of file goes: (folder, file name pattern).
FILE_LAYOUT = {
    "labels": ("labels", "{}_labeled_sleep.txt"),
    "heart_rate": ("heart_rate", "{}_heartrate.txt"),
    "motion": ("motion", "{}_acceleration.txt"),
    "steps": ("steps", "{}_steps.txt"),
    "counts": ("counts", "{}_counts.txt"),
}

# Level 6 rather than gzip's default 9: nearly the same size, several times faster on motion.
GZIP_LEVEL = 6
ROWS_PER_WRITE = 250_000  # bounds the memory of formatting a 1.44M-row motion file


def _by_stage(values: dict[int, float]) -> np.ndarray:
    """Lookup table indexed by stage code + 1 (codes run from -1)."""
    return np.array([values[code] for code in STAGE_CODES], dtype=float)


# Heart rate (bpm) by stage before the per-subject offset: deep sleep is low and steady,
# REM higher and irregular; unscored epochs are the subject awake in bed before lights-off.
HR_MEAN_BY_STAGE = _by_stage({UNSCORED: 72, WAKE: 73, N1: 63, N2: 60, N3: 55, N4: 54, REM: 65})
HR_SD_BY_STAGE = _by_stage({UNSCORED: 4.0, WAKE: 5.0, N1: 3.5, N2: 2.5, N3: 1.2, N4: 1.0, REM: 5.0})
# Expected wrist movements per 30 s epoch: frequent while awake, rare in deep sleep; REM
# movements are small twitches (muscle atonia).
MOVES_PER_EPOCH = _by_stage({UNSCORED: 0.5, WAKE: 0.6, N1: 0.15, N2: 0.04, N3: 0.015, N4: 0.01, REM: 0.06})
# Chance that a movement ends with the wrist in a new orientation (a posture change).
REORIENT_CHANCE = _by_stage({UNSCORED: 0.5, WAKE: 0.5, N1: 0.4, N2: 0.4, N3: 0.3, N4: 0.3, REM: 0.05})
# Chance per epoch of waking up briefly, by the stage being left.
AWAKENING_CHANCE = {N1: 0.04, N2: 0.012, N3: 0.004, N4: 0.004, REM: 0.02}


@dataclass
class SyntheticNightConfig:
    """What to synthesise for each night; the same config, seed and subject id give the same bytes."""

    hours: float = 8.0  # length of the scored (PSG) window
    motion_hz: float = 50.0
    hr_period_s: float = 5.0  # typical spacing of heart-rate samples
    include_motion: bool = True
    include_steps: bool = True
    include_counts: bool = True
    gzip: bool = False  # write every file as ".txt.gz"
    seed: int = 0
    # The real heart-rate and steps files reach back before the PSG start (negative seconds).
    seconds_before_psg: float = 3600.0
    # The real motion files too; kept short by default so an 8 h night stays ~1.44M rows.
    motion_seconds_before_psg: float = 120.0

    def __post_init__(self) -> None:
        if self.hours <= 0 or self.motion_hz <= 0 or self.hr_period_s <= 0:
            raise ValueError("hours, motion_hz and hr_period_s must be positive")
        if self.seconds_before_psg < 0 or self.motion_seconds_before_psg < 0:
            raise ValueError("seconds before the PSG start cannot be negative")
        if self.seed < 0:
            raise ValueError("seed must be a non-negative integer")

    @property
    def n_epochs(self) -> int:
        return max(1, int(round(self.hours * 3600 / EPOCH_S)))


# --------------------------------------------------------------------------- hypnogram


def stage_sequence(n_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """A plausible hypnogram of `n_epochs` 30 s epochs (int8 stage codes).

    Unscored epochs, then Wake until sleep onset, ~90 min cycles (N1 -> N2 -> N3 -> N2 -> REM)
    with deep sleep early and REM lengthening towards morning, brief awakenings and stage
    flicker from an epoch-level Markov step, and Wake at the end.
    """
    stages = np.full(n_epochs, WAKE, dtype=np.int8)
    n_unscored = min(int(rng.integers(0, 31)), n_epochs // 10)
    stages[:n_unscored] = UNSCORED
    # Caps keep short test nights mostly asleep: even a 1 h night reaches deep sleep.
    sleep_onset = n_unscored + min(int(rng.integers(6, 41)), n_epochs // 6)
    sleep_end = n_epochs - min(int(rng.integers(2, 41)), n_epochs // 10)
    if sleep_end - sleep_onset < 4:
        return stages
    _fill_sleep_cycles(stages, sleep_onset, sleep_end, rng)
    _add_awakenings_and_flicker(stages, sleep_onset, sleep_end, rng)
    if rng.random() < 0.1:  # some scorers still used R&K, splitting deep sleep into N3/N4
        _rescore_deepest_as_n4(stages)
    return stages


def _fill_sleep_cycles(stages: np.ndarray, start: int, end: int, rng: np.random.Generator) -> None:
    position, cycle = start, 0
    while position < end:
        night_fraction = (position - start) / (end - start)
        length = int(np.clip(rng.normal(180, 20), 140, 240))  # ~90 min in epochs
        deep_share = max(0.0, 0.40 * (1 - 1.5 * night_fraction)) * rng.uniform(0.7, 1.3)
        rem_share = (0.10 + 0.35 * night_fraction) * rng.uniform(0.8, 1.2)
        if cycle == 0 and rng.random() < 0.3:
            rem_share = 0.0  # the first REM period is often skipped
        n_n1 = int(rng.integers(2, 7)) if cycle == 0 else int(rng.integers(0, 4))
        n_deep = int(deep_share * length)
        n_rem = int(rem_share * length)
        n_n2 = max(length - n_n1 - n_deep - n_rem, 4)
        # First N3 comes 8-20 min after sleep onset.
        n_n2_before = int(rng.integers(16, 40)) if cycle == 0 else int(n_n2 * rng.uniform(0.3, 0.6))
        n_n2_before = min(n_n2_before, n_n2)
        for stage, count in ((N1, n_n1), (N2, n_n2_before), (N3, n_deep), (N2, n_n2 - n_n2_before), (REM, n_rem)):
            stop = min(position + count, end)
            stages[position:stop] = stage
            position = stop
        cycle += 1


def _add_awakenings_and_flicker(stages: np.ndarray, start: int, end: int, rng: np.random.Generator) -> None:
    i = start + 2
    while i < end:
        stage = int(stages[i])
        night_fraction = (i - start) / (end - start)
        p_wake = AWAKENING_CHANCE.get(stage, 0.0) * (0.6 + 0.8 * night_fraction)  # sleep lightens
        u = rng.random()
        if u < p_wake:
            wake_stop = min(i + min(int(rng.geometric(0.35)), 20), end)
            stages[i:wake_stop] = WAKE
            n1_stop = min(wake_stop + int(rng.integers(1, 5)), end)  # fall back asleep via N1
            stages[wake_stop:n1_stop] = N1
            i = n1_stop + 1
            continue
        if stage == N3 and u < p_wake + 0.06:
            stages[i] = N2
        elif stage == N2 and u < p_wake + 0.02:
            stages[i] = N1
        i += 1


def _rescore_deepest_as_n4(stages: np.ndarray) -> None:
    """The middle half of every long N3 run becomes N4 (R&K's deepest stage)."""
    deep = np.concatenate(([False], stages == N3, [False]))
    edges = np.flatnonzero(np.diff(deep.astype(np.int8)))
    for run_start, run_stop in zip(edges[::2], edges[1::2]):
        if run_stop - run_start >= 8:
            quarter = (run_stop - run_start) // 4
            stages[run_start + quarter : run_stop - quarter] = N4


# --------------------------------------------------------------------------- night model


@dataclass
class _Movements:
    """Wrist movements of a night, sorted and non-overlapping (seconds, g)."""

    start_s: np.ndarray
    duration_s: np.ndarray
    amplitude_g: np.ndarray
    reorients: np.ndarray  # bool: the wrist ends the movement in a new orientation


@dataclass
class _Night:
    stages: np.ndarray  # the scored epochs, from 0 s
    slot_start_s: float  # a 30 s slot grid that also covers before and after the PSG window
    slot_stages: np.ndarray  # awake outside the PSG window
    end_s: float  # continuous signals stop here, a little after the last epoch
    movements: _Movements

    def stage_at(self, seconds: np.ndarray) -> np.ndarray:
        slot = np.floor((np.asarray(seconds, dtype=float) - self.slot_start_s) / EPOCH_S).astype(np.int64)
        return self.slot_stages[np.clip(slot, 0, len(self.slot_stages) - 1)]


def _subject_rngs(seed: int, subject_id: str) -> dict[str, np.random.Generator]:
    """Independent streams per signal, so that leaving motion out does not change heart rate."""
    # sha256 rather than hash(): Python's str hash is salted per process.
    subject_key = int.from_bytes(hashlib.sha256(subject_id.encode()).digest()[:8], "little")
    names = ("stages", "movements", "heart_rate", "motion", "steps", "counts")
    children = np.random.SeedSequence([seed, subject_key]).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def _simulate_night(config: SyntheticNightConfig, rngs: dict[str, np.random.Generator]) -> _Night:
    stages = stage_sequence(config.n_epochs, rngs["stages"])
    psg_end_s = len(stages) * EPOCH_S
    end_s = psg_end_s + float(rngs["stages"].uniform(1, 60))  # the watch runs past lights-on
    before_s = max(config.seconds_before_psg, config.motion_seconds_before_psg) + 2
    n_before = int(np.ceil(before_s / EPOCH_S))
    n_after = int(np.ceil((end_s - psg_end_s) / EPOCH_S)) + 1
    slot_stages = np.concatenate(
        [np.full(n_before, WAKE, np.int8), stages, np.full(n_after, WAKE, np.int8)]
    )
    slot_start_s = -n_before * EPOCH_S
    movements = _simulate_movements(slot_start_s, slot_stages, rngs["movements"])
    return _Night(stages, float(slot_start_s), slot_stages, end_s, movements)


def _simulate_movements(slot_start_s: float, slot_stages: np.ndarray, rng: np.random.Generator) -> _Movements:
    restlessness = rng.lognormal(0.0, 0.4)  # some people move much more than others
    per_slot = rng.poisson(MOVES_PER_EPOCH[slot_stages + 1] * restlessness)
    slot = np.repeat(np.arange(len(slot_stages)), per_slot)
    stage = slot_stages[slot]
    n = len(slot)
    start = slot_start_s + EPOCH_S * slot + rng.uniform(0, EPOCH_S, n)
    awake = stage <= WAKE
    duration = np.where(
        awake, np.clip(rng.lognormal(np.log(4.0), 0.7, n), 0.5, 30), np.clip(rng.lognormal(np.log(1.5), 0.5, n), 0.3, 8)
    )
    amplitude = np.where(awake, rng.uniform(0.05, 0.6, n), np.clip(rng.lognormal(np.log(0.12), 0.5, n), 0.02, 0.5))
    twitch = stage == REM
    duration = np.where(twitch, rng.uniform(0.2, 1.0, n), duration)
    amplitude = np.where(twitch, rng.uniform(0.02, 0.08, n), amplitude)
    reorients = rng.random(n) < REORIENT_CHANCE[stage + 1]

    order = np.argsort(start, kind="stable")
    start, duration, amplitude, reorients = start[order], duration[order], amplitude[order], reorients[order]
    # Movements must not overlap (orientation changes one at a time): push each past the last.
    for i in range(1, n):
        earliest = start[i - 1] + duration[i - 1] + 0.2
        if start[i] < earliest:
            start[i] = earliest
    return _Movements(start, duration, amplitude, reorients)


def _lowpass(x: np.ndarray, tau_s: float) -> np.ndarray:
    """First-order low-pass of a 1 Hz series, starting settled at x[0] (no start-up transient)."""
    alpha = 1.0 - np.exp(-1.0 / tau_s)
    b, a = [alpha], [1.0, alpha - 1.0]
    y, _ = lfilter(b, a, x, zi=lfilter_zi(b, a) * x[0])
    return y


def _heart_rate(night: _Night, config: SyntheticNightConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, integer bpm) sampled irregularly from before the PSG start to the end."""
    grid = np.arange(np.floor(-config.seconds_before_psg) - 2, np.ceil(night.end_s) + 2, 1.0)
    stage = night.stage_at(grid)
    # HR settles into a new stage over about a minute rather than jumping at the epoch edge.
    mean = _lowpass(HR_MEAN_BY_STAGE[stage + 1] + np.where(grid < 0, rng.uniform(0, 8), 0.0), 40)
    sd = _lowpass(HR_SD_BY_STAGE[stage + 1], 40)
    phi = np.exp(-1 / 15)  # AR(1) wander with a ~15 s memory, unit variance
    wander = lfilter([np.sqrt(1 - phi**2)], [1, -phi], rng.standard_normal(len(grid)))

    # Each movement comes with a brief rise in HR (arousal), decaying over ~15 s.
    moves = night.movements
    inside = (moves.start_s >= grid[0]) & (moves.start_s < grid[-1])
    kicks = np.zeros(len(grid))
    np.add.at(
        kicks,
        (moves.start_s[inside] - grid[0]).astype(np.int64),
        np.minimum(15, 30 * moves.amplitude_g[inside]) * rng.uniform(0.5, 1.5, inside.sum()),
    )
    arousal = lfilter([1.0], [1.0, -np.exp(-1 / 15)], kicks)

    night_s = len(night.stages) * EPOCH_S
    baseline = rng.normal(0, 7)  # people differ
    drift = (
        baseline
        - rng.uniform(2, 6) * np.clip(grid / night_s, 0, 1)  # HR declines over the night
        + rng.uniform(0, 2) * np.sin(2 * np.pi * grid / rng.uniform(5400, 10800) + rng.uniform(0, 2 * np.pi))
    )
    hr = mean + drift + sd * wander + arousal + rng.normal(0, 1.0, len(grid))

    # Sample spacing: whole seconds around the period (as the watch reports) with tiny jitter.
    span = night.end_s + config.seconds_before_psg
    n_draw = int(span / max(1.0, config.hr_period_s - 2) * 1.2) + 16
    steps = np.maximum(1.0, np.rint(rng.normal(config.hr_period_s, 1.3, n_draw))) + rng.normal(0, 2e-5, n_draw)
    times = -config.seconds_before_psg + rng.uniform(0, config.hr_period_s) + np.cumsum(steps)
    times = times[times < night.end_s]
    # Occasional dropouts of 0.5-6 min (the watch loses contact); at least one, so that
    # every night exercises a reader's gap handling.
    n_gaps = 1 + rng.poisson(span / 3600 * 0.6)
    gap_start = rng.uniform(-config.seconds_before_psg, night.end_s, n_gaps)
    gap_stop = gap_start + rng.uniform(30, 360, n_gaps)
    in_gap = ((times[:, None] >= gap_start) & (times[:, None] < gap_stop)).any(axis=1)
    times = times[~in_gap]
    bpm = np.clip(np.rint(np.interp(times, grid, hr)), 35, 200).astype(np.int64)
    return times, bpm


def _random_directions(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _motion(night: _Night, config: SyntheticNightConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, xyz in g) at ~motion_hz: gravity along the wrist's orientation plus movements."""
    hz = config.motion_hz
    start = -config.motion_seconds_before_psg + rng.uniform(0, 1)
    n = max(0, int((night.end_s - start) * hz))
    # Clock jitter of at most a fifth of a sample keeps timestamps strictly increasing.
    times = start + np.arange(n) / hz + rng.uniform(-0.2, 0.2, n) / hz

    moves = night.movements
    first = np.searchsorted(times, moves.start_s)
    last = np.searchsorted(times, moves.start_s + moves.duration_s)
    xyz = np.empty((n, 3))
    direction = _random_directions(rng, 1)[0]
    filled = 0
    for k in range(len(moves.start_s)):
        a, b = int(first[k]), int(last[k])
        new_direction = _random_directions(rng, 1)[0] if moves.reorients[k] else direction
        if a >= n:
            break
        xyz[filled:a] = direction  # still: gravity only
        length = b - a
        if length > 0:
            # The wrist rotates from the old to the new orientation during the movement...
            w = np.linspace(0.0, 1.0, length)[:, None]
            turning = (1 - w) * direction + w * new_direction
            turning /= np.maximum(np.linalg.norm(turning, axis=1, keepdims=True), 1e-6)
            # ...while shaking at 3-11 Hz under a smooth envelope.
            n_tones = int(rng.integers(1, 4))
            t = np.arange(length)[:, None] / hz
            tones = np.sin(2 * np.pi * rng.uniform(3, 11, n_tones) * t + rng.uniform(0, 2 * np.pi, n_tones))
            axes = rng.standard_normal((n_tones, 3)) / np.sqrt(3 * n_tones)
            envelope = np.hanning(length + 2)[1:-1, None]
            xyz[a:b] = turning + moves.amplitude_g[k] * envelope * (tones @ axes)
        direction = new_direction
        filled = max(filled, b)
    xyz[filled:] = direction
    xyz += rng.normal(0, 0.004, xyz.shape)  # sensor noise
    return times, xyz


def _wake_run_lengths(stages: np.ndarray) -> np.ndarray:
    """For every slot, the length of the run of awake slots it belongs to (0 when asleep)."""
    awake = np.concatenate(([False], stages <= WAKE, [False]))
    edges = np.flatnonzero(np.diff(awake.astype(np.int8)))
    lengths = np.zeros(len(stages), dtype=np.int64)
    for run_start, run_stop in zip(edges[::2], edges[1::2]):
        lengths[run_start:run_stop] = run_stop - run_start
    return lengths


def _steps(night: _Night, config: SyntheticNightConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(whole seconds, steps) a minute apart; steps only while up for several minutes."""
    first = int(np.floor(-config.seconds_before_psg)) + int(rng.integers(0, 60))
    times = np.arange(first, int(night.end_s), 60, dtype=np.int64)
    slot = np.clip(((times + 30 - night.slot_start_s) // EPOCH_S).astype(np.int64), 0, len(night.slot_stages) - 1)
    up_long_enough = _wake_run_lengths(night.slot_stages)[slot] >= 6  # 3 min awake, not a brief arousal
    walking = up_long_enough & (rng.random(len(times)) < 0.35)
    steps = np.where(walking, rng.poisson(rng.uniform(10, 90, len(times))), 0)
    return times, steps.astype(np.int64)


def _counts(night: _Night, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, counts) per 15 s over the PSG window: movement intensity integrated over time.

    The real counts come from band-passing the raw acceleration; this proxy only has to be
    mostly zero asleep and larger while awake, so it integrates the movement amplitudes.
    """
    psg_end_s = len(night.stages) * EPOCH_S
    # The real 15 s clock runs slightly slow (~15.014 s) and starts a few ms after 0.
    period = 15.0 * (1 + rng.uniform(0, 1e-3))
    times = rng.uniform(0, 0.02) + period * np.arange(int(np.ceil(psg_end_s / period)))
    times = times[times < psg_end_s]

    moves = night.movements
    # Movement integrated from -inf to x is piecewise linear: slope +amp at a start, -amp at an end.
    knots = np.concatenate([moves.start_s, moves.start_s + moves.duration_s])
    slope_change = np.concatenate([moves.amplitude_g, -moves.amplitude_g])
    if len(knots) == 0:
        return times, np.zeros(len(times))
    order = np.argsort(knots, kind="stable")
    knots, slope = knots[order], np.cumsum(slope_change[order])
    integral = np.concatenate([[0.0], np.cumsum(slope[:-1] * np.diff(knots))])
    g_seconds = np.interp(times + period, knots, integral) - np.interp(times, knots, integral)
    counts = np.round(40 * rng.uniform(0.7, 1.3) * g_seconds * rng.lognormal(0, 0.2, len(times)), 2)
    return times, np.where(counts < 0.5, 0.0, counts)


# --------------------------------------------------------------------------- text output


def _ascii_fixed_point(values: np.ndarray, decimals: int) -> np.ndarray:
    """ASCII of `values` with `decimals` decimals as a (rows, width) uint8 array; 0 bytes are padding.

    Digits are computed with integer arithmetic for all rows at once, which is far faster
    than printf-formatting a million rows one at a time.
    """
    values = np.asarray(values, dtype=float)
    scale = 10**decimals
    scaled = np.rint(np.abs(values) * scale).astype(np.int64)
    negative = (values < 0) & (scaled > 0)  # never write "-0.00000"
    whole, fraction = np.divmod(scaled, scale)
    n_whole = len(str(int(whole.max()))) if len(whole) else 1
    width = 1 + n_whole + (1 + decimals if decimals else 0)
    out = np.zeros((len(values), width), dtype=np.uint8)
    out[:, 0] = np.where(negative, ord("-"), 0)
    for k in range(n_whole):
        power = 10 ** (n_whole - 1 - k)
        out[:, 1 + k] = (whole // power) % 10 + ord("0")
        if power > 1:
            out[whole < power, 1 + k] = 0  # no leading zeros; the ones digit always stays
    if decimals:
        out[:, 1 + n_whole] = ord(".")
        for k in range(decimals):
            out[:, 2 + n_whole + k] = (fraction // 10 ** (decimals - 1 - k)) % 10 + ord("0")
    return out


def _format_rows(columns: Sequence[tuple[np.ndarray, int]], delimiter: str) -> bytes:
    """Rows of "v1<delimiter>v2...\\n", each column as (values, decimals)."""
    n = len(columns[0][0])
    sep = np.full((n, 1), ord(delimiter), dtype=np.uint8)
    newline = np.full((n, 1), ord("\n"), dtype=np.uint8)
    blocks: list[np.ndarray] = []
    for i, (values, decimals) in enumerate(columns):
        if i:
            blocks.append(sep)
        blocks.append(_ascii_fixed_point(values, decimals))
    blocks.append(newline)
    table = np.hstack(blocks)
    return table[table != 0].tobytes()  # row-major, so dropping padding leaves the text in order


def _chunked_rows(columns: Sequence[tuple[np.ndarray, int]], delimiter: str) -> Iterator[bytes]:
    n = len(columns[0][0])
    for start in range(0, n, ROWS_PER_WRITE):
        stop = start + ROWS_PER_WRITE
        yield _format_rows([(np.asarray(v)[start:stop], d) for v, d in columns], delimiter)


def _write_atomic(path: Path, chunks: Iterable[bytes], compress: bool) -> None:
    """Write to a temporary file beside `path`, then rename: `path` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            if compress:
                # No name and mtime 0 in the header, so the same data gives the same bytes.
                with gzip_module.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as gz:
                    for chunk in chunks:
                        gz.write(chunk)
            else:
                for chunk in chunks:
                    raw.write(chunk)
        os.chmod(temporary, 0o644)  # mkstemp makes files private to the owner
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _path_for(root: Path, kind: str, subject_id: str, compress: bool) -> Path:
    folder, pattern = FILE_LAYOUT[kind]
    return root / folder / (pattern.format(subject_id) + (".gz" if compress else ""))


def write_night(root: str | Path, subject_id: str, config: SyntheticNightConfig | None = None) -> dict[str, Path]:
    """Write one subject's synthetic night under `root`; returns {kind: path} for the kinds written.

    Kinds: "labels" and "heart_rate" always, "motion", "steps", "counts" as configured.
    Deterministic given config.seed and subject_id.
    """
    config = config or SyntheticNightConfig()
    root, subject_id = Path(root), str(subject_id)
    rngs = _subject_rngs(config.seed, subject_id)
    night = _simulate_night(config, rngs)
    paths: dict[str, Path] = {}

    def write(kind: str, chunks: Iterable[bytes]) -> None:
        paths[kind] = _path_for(root, kind, subject_id, config.gzip)
        _write_atomic(paths[kind], chunks, config.gzip)

    epoch_seconds = np.arange(len(night.stages)) * EPOCH_S
    write("labels", _chunked_rows([(epoch_seconds, 0), (night.stages, 0)], " "))
    hr_times, bpm = _heart_rate(night, config, rngs["heart_rate"])
    write("heart_rate", _chunked_rows([(hr_times, 5), (bpm, 0)], ","))
    if config.include_motion:
        motion_times, xyz = _motion(night, config, rngs["motion"])
        columns = [(motion_times, 5)] + [(xyz[:, axis], 6) for axis in range(3)]
        write("motion", _chunked_rows(columns, " "))
        del motion_times, xyz
    if config.include_steps:
        step_times, steps = _steps(night, config, rngs["steps"])
        write("steps", _chunked_rows([(step_times, 0), (steps, 0)], ","))
    if config.include_counts:
        count_times, counts = _counts(night, rngs["counts"])
        text = io.BytesIO()
        # numpy's default "%.18e", as in the release's counts files (written by np.savetxt).
        np.savetxt(text, np.column_stack([count_times, counts]), fmt="%.18e", delimiter=",")
        write("counts", [text.getvalue()])
    return paths


def write_cohort(
    root: str | Path,
    n_subjects: int,
    config: SyntheticNightConfig | None = None,
    start_id: int = 1000000,
    progress: bool = True,
) -> list[str]:
    """Write `n_subjects` nights with ids start_id, start_id + 1, ...; returns the ids."""
    subject_ids = [str(start_id + i) for i in range(n_subjects)]
    for subject_id in tqdm(subject_ids, desc="synthetic nights", unit="night", disable=not progress):
        write_night(root, subject_id, config)
    return subject_ids


# ----------------------------------------------------------------------------- Apple Health exports

HEALTH_HEADER = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE HealthData [
<!-- HealthKit Export Version: 13 -->
<!ELEMENT HealthData (ExportDate,Me,(Record|Correlation|Workout|ActivitySummary|ClinicalRecord)*)>
<!ATTLIST HealthData
  locale CDATA #REQUIRED
>
<!ELEMENT ExportDate EMPTY>
<!ATTLIST ExportDate
  value CDATA #REQUIRED
>
<!ELEMENT Record ((MetadataEntry|HeartRateVariabilityMetadataList)*)>
<!ATTLIST Record
  type          CDATA #REQUIRED
  unit          CDATA #IMPLIED
  sourceName    CDATA #REQUIRED
  sourceVersion CDATA #IMPLIED
  device        CDATA #IMPLIED
  creationDate  CDATA #IMPLIED
  startDate     CDATA #REQUIRED
  endDate       CDATA #REQUIRED
  value         CDATA #IMPLIED
>
<!ELEMENT MetadataEntry EMPTY>
<!ATTLIST MetadataEntry
  key   CDATA #REQUIRED
  value CDATA #REQUIRED
>
]>
<HealthData locale="en_GB">
 <ExportDate value="2026-04-02 09:00:00 +0200"/>
 <Me HKCharacteristicTypeIdentifierDateOfBirth="1980-01-01" HKCharacteristicTypeIdentifierBiologicalSex="HKBiologicalSexNotSet"/>
"""
DST_SWITCH_UTC_S = 1774746000.0  # 2026-03-29 01:00 UTC: central Europe moves from +0100 to +0200


def health_offset_s(t_utc: float) -> float:
    """The synthetic export's UTC offset at t_utc: central European time, +0100, +0200 from DST_SWITCH_UTC_S."""
    return 7200.0 if t_utc >= DST_SWITCH_UTC_S else 3600.0


def health_time(t_utc: float) -> str:
    """Unix seconds as a Health export date in central European time (health_offset_s)."""
    offset = int(health_offset_s(t_utc))
    local = np.datetime64(int(t_utc + offset), "s").astype(object)
    return f"{local:%Y-%m-%d %H:%M:%S} +0{offset // 3600}00"


def _record(kind: str, unit: str, t0: float, t1: float, value: str, metadata: bool = False) -> str:
    text = (f' <Record type="{kind}" sourceName="Synthetic Watch" sourceVersion="10.0" '
            f'device="&lt;&lt;HKDevice: 0x1&gt;, name:Apple Watch&gt;" unit="{unit}" creationDate="{health_time(t1)}" '
            f'startDate="{health_time(t0)}" endDate="{health_time(t1)}" value="{value}"')
    if not metadata:
        return text + "/>\n"
    return (text + '>\n  <MetadataEntry key="HKMetadataKeyHeartRateMotionContext" value="0"/>\n </Record>\n')


def write_health_export(path: str | Path, first_night_utc_s: float = 1774638000.0, n_nights: int = 4,
                        hr_period_s: float = 300.0, apple_stage_nights: Sequence[int] = (1, 3),
                        watch_off_night: int | None = 2, seed: int = 0, as_zip: bool = True,
                        repeat: int = 1) -> dict:
    """A synthetic Health export: heart rate (every hr_period_s at night, every 10 min by day, with
    motion-context metadata), step counts, in-bed records each night and Apple's stages on
    apple_stage_nights (0-based); night watch_off_night (0-based) has the watch off 01:00-02:30
    local. The wearer lives by the local clock: every evening starts at the local time of
    first_night_utc_s (default 2026-03-27 20:00 +0100), in bed 22:30 for 8 h. With the defaults
    the second night (2026-03-28) crosses the change to summer time (in bed 22:30 +0100 to 07:30
    +0200) and the third (2026-03-29) has the watch off. repeat > 1 writes the nights' records
    that many times over (a large file for parse-speed runs; later copies fall on the same nights).
    Returns the truth: per night, the in-bed span, Apple's stage per 30 s epoch and the watch-off
    span (UTC seconds, None on other nights)."""
    rng = np.random.default_rng(seed)
    truth, lines = {"nights": []}, []

    def evening_of(k: int) -> float:  # the same local clock time every day, across the change of offset
        t = first_night_utc_s + 86400.0 * k
        return t - (health_offset_s(t) - health_offset_s(first_night_utc_s))

    for k in range(n_nights):
        evening = evening_of(k)                                        # 20:00 local
        bed, rise = evening + 2.5 * 3600, evening + 10.5 * 3600        # in bed 22:30 for 8 h
        off_from, off_to = evening + 5 * 3600, evening + 6.5 * 3600    # watch off 01:00-02:30 (watch_off_night)
        t = evening - 12 * 3600.0
        while t < evening_of(k + 1) - 12 * 3600:                       # heart rate: by day every 10 min
            asleep = bed <= t < rise
            off = watch_off_night == k and off_from <= t < off_to
            if not off:
                bpm = (56 + 6 * np.sin((t - bed) / 2400) if asleep else 78) + rng.normal(0, 2)
                lines.append((t, _record("HKQuantityTypeIdentifierHeartRate", "count/min", t, t, f"{bpm:.0f}",
                                         metadata=True)))
            t += (hr_period_s if asleep else 600.0) + rng.uniform(-20, 20)
        for t in np.arange(evening - 12 * 3600, evening + 2 * 3600, 1800.0):  # steps by day
            lines.append((t, _record("HKQuantityTypeIdentifierStepCount", "count", t, t + 600, f"{rng.integers(50, 900)}")))
        lines.append((bed, _record("HKCategoryTypeIdentifierSleepAnalysis", "", bed, rise,
                                   "HKCategoryValueSleepAnalysisInBed")))
        stages = None
        if k in apple_stage_nights:
            names = ("HKCategoryValueSleepAnalysisAwake", "HKCategoryValueSleepAnalysisAsleepCore",
                     "HKCategoryValueSleepAnalysisAsleepDeep", "HKCategoryValueSleepAnalysisAsleepREM")
            stages = np.full(int((rise - bed) // 30), -1, np.int8)
            t = bed
            while t < rise:
                stage = int(rng.choice(4, p=[0.1, 0.5, 0.2, 0.2]))
                end = min(t + 60 * float(rng.integers(10, 40)), rise)
                lines.append((t, _record("HKCategoryTypeIdentifierSleepAnalysis", "", t, end, names[stage])))
                stages[int((t - bed) // 30):int((end - bed) // 30)] = stage
                t = end
        truth["nights"].append({"bed_s": bed, "rise_s": rise, "apple_stage": stages,
                                "watch_off_s": (off_from, off_to) if watch_off_night == k else None})
    lines.sort(key=lambda item: item[0])  # Health exports list records by type, then time: either parses
    body = "".join(text for _, text in lines)
    text = HEALTH_HEADER + body * repeat + "</HealthData>\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_zip:
        import zipfile
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("apple_health_export/export.xml", text)
            archive.writestr("apple_health_export/export_cda.xml", "<ClinicalDocument/>")
    else:
        path.write_text(text)
    truth["records"] = len(lines) * repeat
    truth["xml_bytes"] = len(text.encode())
    return truth


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic nights in the PhysioNet sleep-accel file formats.")
    parser.add_argument("--out", required=True, type=Path, help="output root (labels/, heart_rate/, ... go under it), "
                        "or with --health-export the export.zip to write")
    parser.add_argument("--subjects", type=int, default=None, help="number of subjects")
    parser.add_argument("--health-export", action="store_true",
                        help="write a synthetic Apple Health export.zip (4 nights, see write_health_export) instead")
    parser.add_argument("--hours", type=float, default=8.0, help="length of each scored night")
    parser.add_argument("--no-motion", action="store_true", help="skip the large raw motion files")
    parser.add_argument("--gzip", action="store_true", help="write .txt.gz files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-id", type=int, default=1000000, help="first subject id")
    args = parser.parse_args(argv)
    if args.health_export:
        truth = write_health_export(args.out, seed=args.seed)
        print(f"wrote a synthetic Apple Health export ({truth['records']:,} records) to {args.out}")
        return 0
    if args.subjects is None:
        parser.error("--subjects is required (or --health-export)")
    config = SyntheticNightConfig(hours=args.hours, include_motion=not args.no_motion, gzip=args.gzip, seed=args.seed)
    subject_ids = write_cohort(args.out, args.subjects, config, start_id=args.start_id)
    print(f"wrote {len(subject_ids)} synthetic nights to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
