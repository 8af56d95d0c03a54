"""PhysioNet Sleep-Accel files -> aligned 30 s epochs (`Night`), plus subject splits and the feature scaler.

Reading is in two layers:

1. `read_signal` parses one file (plain or gzip, in blocks of rows so that a 50 Hz motion file
   needs little more memory than its parsed values) into a clean float array, applying the
   documented input rules below or raising `DataError` naming the file, line and value.
2. `load_night` crops every signal to the PSG window and reduces it to per-epoch aggregates
   (a `Night`): heart-rate mean/std, activity counts, motion magnitude, steps, with NaN where a
   signal is missing, plus the wearer's resting heart rate from the days of heart rate before the
   night (`resting_heart_rate`). Parsed nights are cached on disk.

Features (features.py) and the cohort store (feature_store.py) build on the Night.

Input rules (each one tested):
- labels: rows must be `seconds stage` with seconds increasing in steps that are multiples of
  30 s (gaps become unscored epochs); an unsorted/duplicate timestamp, a stage code outside
  -1..5, or a non-finite value is an error naming file and line.
- heart rate, counts, motion, steps: non-finite values and heart rate outside 25-250 bpm (or
  motion beyond +-16 g, negative counts/steps) are dropped as artifacts; unsorted rows are
  sorted and duplicate timestamps keep their first row. The night's report counts each.
- any file: a malformed row (wrong field count, text where a number belongs) or an empty file
  is an error naming file and line. Blank lines are ignored.
- a subject without a labels file, or with neither heart rate nor motion (raw or counts) inside
  the PSG window, is an error naming the subject. Each signal on its own is optional.
- one bad subject is skipped with a warning; `strict=True` raises instead.

Stage map: 0 Wake; 1, 2 Light; 3, 4 Deep; 5 REM; -1 (unscored) stays in the timeline as -1.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from scipy.signal import butter, filtfilt

from features import EPOCH_S, epoch_mean_std, epoch_sum

STAGE_NAMES = ("Wake", "Light", "Deep", "REM")
PSG_STAGE_TO_CLASS = {-1: -1, 0: 0, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3}
HR_MIN_BPM, HR_MAX_BPM = 25.0, 250.0
MOTION_MAX_G = 16.0
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data" / "sleep-accel"
DEFAULT_CACHE_DIR = Path(os.environ.get("SLEEP_STAGING_CACHE", Path(__file__).resolve().parent / ".cache"))
CACHE_VERSION = 6  # 5: raw heart-rate samples kept; heart rate optional; 6: resting heart rate

# file kind -> (folder, file suffix, number of columns)
FILE_KINDS = {
    "labels": ("labels", "_labeled_sleep.txt", 2),
    "heart_rate": ("heart_rate", "_heartrate.txt", 2),
    "motion": ("motion", "_acceleration.txt", 4),
    "steps": ("steps", "_steps.txt", 2),
    "counts": ("counts", "_counts.txt", 2),
}

# Walch's activity counts (Oakley-style), see counts_from_z
COUNTS_FS_HZ = 50
COUNTS_BAND_HZ = (3.0, 11.0)
COUNTS_FILTER_ORDER = 5
COUNTS_BIN_S = 15
STEPS_MARGIN_S = 600.0  # steps are unknown (not zero) this far beyond the first and last steps reading
MIN_MOTION_COVERAGE = 0.5  # an epoch with fewer raw samples than this share of 50 Hz is "motion missing"
# The personal baseline (resting_heart_rate): a low percentile of the days before the night, not the
# minimum, so that a few artefacts do not set it; too few readings give none rather than a noisy one.
RESTING_HR_DAYS = 7
RESTING_HR_PERCENTILE = 5
RESTING_HR_MIN_READINGS = 50


class DataError(ValueError):
    """Bad input data; the message names the file (and line, value) at fault."""


class DataWarning(UserWarning):
    """A subject skipped, or input repaired by a documented rule."""


# ----------------------------------------------------------------------------- reading files

def subject_files(data_dir: str | Path, subject_id: str) -> dict[str, Path]:
    """Existing files of one subject, by kind; plain `.txt` or gzip `.txt.gz`."""
    found = {}
    for kind, (folder, suffix, _) in FILE_KINDS.items():
        for name in (subject_id + suffix, subject_id + suffix + ".gz"):
            path = Path(data_dir) / folder / name
            if path.is_file():
                found[kind] = path
                break
    return found


def find_subjects(data_dir: str | Path) -> list[str]:
    """Subject ids that have a labels file, sorted."""
    labels_dir = Path(data_dir) / "labels"
    if not labels_dir.is_dir():
        raise DataError(f"{data_dir}: no labels/ folder; expected the PhysioNet sleep-accel layout "
                        "(labels/, heart_rate/, motion/, steps/, counts/)")
    ids = {p.name.split("_labeled_sleep.txt")[0] for p in labels_dir.iterdir()
           if p.name.endswith(("_labeled_sleep.txt", "_labeled_sleep.txt.gz"))}
    return sorted(ids)


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_text(path: Path):
    if is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, "r", encoding="utf-8", errors="replace")


def _first_bad_line(path: Path, n_cols: int) -> tuple[int, str, str] | None:
    """(line number, line, reason) of the first row that is not n_cols numbers; slow path only."""
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.replace(",", " ").split()
            if not fields:
                continue
            if len(fields) != n_cols:
                return line_no, line.rstrip("\n"), f"expected {n_cols} fields, found {len(fields)}"
            for value in fields:
                try:
                    float(value)
                except ValueError:
                    return line_no, line.rstrip("\n"), f"{value!r} is not a number"
    return None


READ_CHUNK_ROWS = 50_000  # rows parsed at a time (1.6 MB of motion values): bounds the parser's memory


def _check_nan_rows(path: Path, rows: np.ndarray, n_cols: int) -> int:
    """Rows (0-based line index, sorted) that parsed with NaN: raise for a missing field, else count blanks.

    NaN comes from a blank line, a missing field, or a literal nan: only the raw line tells them
    apart. One streaming pass that looks at those lines only.
    """
    blank, i = 0, 0
    with open_text(path) as f:
        for row, line in enumerate(f):
            if row < rows[i]:
                continue
            fields = line.replace(",", " ").split()
            if fields and len(fields) != n_cols:
                text = line.rstrip("\n")[:80]
                raise DataError(f"{path}, line {row + 1}: expected {n_cols} fields, found {len(fields)}: {text!r}")
            blank += not fields
            i += 1
            if i == len(rows):
                return blank
    return blank + len(rows) - i  # rows past the last line: blank


def read_signal(path: str | Path, n_cols: int, report: dict | None = None, keep=None,
                chunk_rows: int = READ_CHUNK_ROWS) -> np.ndarray:
    """Parse a comma- or whitespace-separated numeric file into an (n, n_cols) float64 array.

    Rows whose values are all finite are kept in file order; rows with NaN/inf are dropped and
    counted in report["non_finite"]. Malformed rows raise DataError naming file and line.
    keep: optional function of a block of finite rows -> bool mask; the other rows are dropped
    and counted in report["out_of_range"] (the result may then be empty).
    The file is parsed `chunk_rows` lines at a time (gzip streamed) and each block is filtered
    at once: what grows with the file is only the kept rows (8 bytes a value; twice that for a
    moment while the blocks are joined), not the parser's buffers.
    """
    path = Path(path)
    parts, nan_rows, n_inf, n_finite, n_out, row0 = [], [], 0, 0, 0, 0
    try:
        with open_text(path) as f:
            first = ""
            for first in f:
                if first.strip():
                    break
        if not first.strip():
            raise DataError(f"{path}: empty file (no data rows)")
        sep = "," if "," in first else r"\s+"
        with warnings.catch_warnings():
            # pandas only warns, and drops the extra fields, when the first row is too long
            warnings.simplefilter("error", pd.errors.ParserWarning)
            with pd.read_csv(path, sep=sep, header=None, dtype=np.float64, engine="c", skip_blank_lines=False,
                             compression="gzip" if is_gzip(path) else None, names=list(range(n_cols)),
                             index_col=False, on_bad_lines="error", chunksize=chunk_rows) as reader:
                for table in reader:  # one row per line, blank lines included: row i is line i + 1
                    values = table.to_numpy()
                    nan = np.isnan(values).any(axis=1)
                    if nan.any():
                        nan_rows.append(row0 + np.flatnonzero(nan))
                        values = values[~nan]
                    inf = ~np.isfinite(values).all(axis=1)
                    if inf.any():
                        n_inf += int(inf.sum())
                        values = values[~inf]
                    n_finite += len(values)
                    if keep is not None:
                        ok = keep(values)
                        if not ok.all():
                            n_out += int((~ok).sum())
                            values = values[ok]
                    parts.append(values)
                    row0 += len(table)
    except DataError:
        raise
    except (ValueError, pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError, EOFError,
            OSError, zlib.error) as exc:
        try:
            bad = _first_bad_line(path, n_cols) if not isinstance(exc, (OSError, EOFError, zlib.error)) else None
        except (OSError, EOFError, zlib.error, UnicodeDecodeError):  # a damaged .gz fails again on re-reading
            bad = None
        if bad:
            line_no, line, reason = bad
            raise DataError(f"{path}, line {line_no}: {reason}: {line[:80]!r}") from None
        if isinstance(exc, pd.errors.ParserWarning):
            raise DataError(f"{path}: cannot be parsed (a row has more than {n_cols} fields)") from None
        raise DataError(f"{path}: cannot be parsed ({type(exc).__name__}: {exc})") from None
    non_finite = n_inf
    if nan_rows:
        nan_rows = np.concatenate(nan_rows)
        non_finite += len(nan_rows) - _check_nan_rows(path, nan_rows, n_cols)
    if n_finite == 0:
        raise DataError(f"{path}: no valid data rows")
    if report is not None:
        if non_finite:
            report["non_finite"] = report.get("non_finite", 0) + non_finite
        if n_out:
            report["out_of_range"] = report.get("out_of_range", 0) + n_out
    values = parts[0] if len(parts) == 1 else np.concatenate(parts)
    del parts
    return values


def _sort_dedupe(values: np.ndarray, report: dict) -> np.ndarray:
    """Sort rows by time (stable) and keep the first row of each duplicate timestamp."""
    t = values[:, 0]
    if np.any(np.diff(t) < 0):
        report["unsorted"] = True
        values = values[np.argsort(t, kind="stable")]
        t = values[:, 0]
    dup = np.concatenate([[False], np.diff(t) == 0])
    if dup.any():
        report["duplicates"] = report.get("duplicates", 0) + int(dup.sum())
        values = values[~dup]
    return values


def read_labels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (epoch_start_s, class 0-3 or -1) for every 30 s epoch of the PSG timeline."""
    path = Path(path)
    values = read_signal(path, 2, report := {})
    if report.get("non_finite"):
        raise DataError(f"{path}: {report['non_finite']} row(s) with NaN/inf; labels must be complete")
    t, stage = values[:, 0], values[:, 1]
    bad = np.flatnonzero(~np.isin(stage, list(PSG_STAGE_TO_CLASS)))
    if bad.size:
        raise DataError(f"{path}, line {_line_of(path, bad[0])}: unknown stage code {stage[bad[0]]:g} "
                        f"(expected -1 unscored, 0 Wake, 1 N1, 2 N2, 3 N3, 4 N4, 5 REM)")
    step = np.diff(t)
    bad = np.flatnonzero(step <= 0)
    if bad.size:
        raise DataError(f"{path}, line {_line_of(path, bad[0] + 1)}: timestamp {t[bad[0] + 1]:g} s is not after "
                        f"the previous row ({t[bad[0]]:g} s); labels must be sorted without duplicates")
    bad = np.flatnonzero(np.abs(step / EPOCH_S - np.round(step / EPOCH_S)) > 1e-6)
    if bad.size:
        raise DataError(f"{path}, line {_line_of(path, bad[0] + 1)}: timestamp {t[bad[0] + 1]:g} s is not on the "
                        f"{EPOCH_S} s epoch grid started at {t[0]:g} s")
    # gaps in the label timeline become unscored epochs
    n_epochs = int(round((t[-1] - t[0]) / EPOCH_S)) + 1
    epoch_start_s = t[0] + EPOCH_S * np.arange(n_epochs, dtype=np.float64)
    classes = np.full(n_epochs, -1, dtype=np.int8)
    classes[np.round((t - t[0]) / EPOCH_S).astype(int)] = [PSG_STAGE_TO_CLASS[int(s)] for s in stage]
    return epoch_start_s, classes


def _line_of(path: Path, row: int) -> int:
    """Line number (1-based) of data row `row`, counting blank lines; slow path only."""
    with open_text(path) as f:
        seen = -1
        for line_no, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == row:
                    return line_no
    return row + 1


# ----------------------------------------------------------------------------- per-epoch aggregates

def counts_from_z(z_g: np.ndarray, fs_hz: int = COUNTS_FS_HZ) -> np.ndarray:
    """Walch's activity counts from uniformly sampled z acceleration (g), per 15 s bin.

    Band-pass 3-11 Hz (Butterworth order 5, zero-phase), |z|, quantise into 128 bins over
    0-5 g, take the max per second, sum per 15 s, then (c - 18) * 3.07 clipped at 0.
    Operates on the last axis, so a (n_epochs, samples) array is filtered epoch by epoch.
    """
    nyquist = fs_hz / 2
    b, a = butter(COUNTS_FILTER_ORDER, [COUNTS_BAND_HZ[0] / nyquist, COUNTS_BAND_HZ[1] / nyquist], "bandpass")
    z_abs = np.abs(filtfilt(b, a, z_g, axis=-1))
    binned = np.digitize(z_abs, np.linspace(0.0, 5.0, 128 + 1))
    n_seconds = z_abs.shape[-1] // fs_hz
    per_second = binned[..., : n_seconds * fs_hz].reshape(*z_abs.shape[:-1], n_seconds, fs_hz).max(-1)
    n_bins = n_seconds // COUNTS_BIN_S
    per_bin = per_second[..., : n_bins * COUNTS_BIN_S].reshape(*z_abs.shape[:-1], n_bins, COUNTS_BIN_S).sum(-1)
    return np.clip((per_bin - 18) * 3.07, 0, None)


def epoch_index(t: np.ndarray, epoch_start_s: np.ndarray) -> np.ndarray:
    """Epoch of each timestamp, or -1 outside the PSG window [first start, last start + 30 s)."""
    idx = np.floor((t - epoch_start_s[0]) / EPOCH_S).astype(np.int64)
    idx[(idx < 0) | (idx >= len(epoch_start_s))] = -1
    return idx


def motion_epoch_aggregates(motion: np.ndarray, epoch_start_s: np.ndarray) -> dict[str, np.ndarray]:
    """Per-epoch activity count (per 15 s bin), magnitude mean/std (g) from raw t,x,y,z rows.

    Rows must be sorted by time. Each epoch is resampled to 50 Hz from its own samples only and
    filtered on its own, so the result for an epoch depends only on that epoch's samples: the
    same numbers come out offline and in a stream (realtime.py).
    """
    n = len(epoch_start_s)
    t = motion[:, 0]
    idx = epoch_index(t, epoch_start_s)
    magnitude = motion[:, 1] ** 2  # as (xyz ** 2).sum(axis=1), one column at a time (memory)
    magnitude += motion[:, 2] ** 2
    magnitude += motion[:, 3] ** 2
    np.sqrt(magnitude, out=magnitude)
    mag_mean, mag_std, n_samples = epoch_mean_std(idx, magnitude, n)
    del idx, magnitude
    samples_per_epoch = EPOCH_S * COUNTS_FS_HZ
    covered = n_samples >= MIN_MOTION_COVERAGE * samples_per_epoch
    counts = np.full(n, np.nan)
    if covered.any():
        grid = epoch_start_s[covered, None] + np.arange(samples_per_epoch) / COUNTS_FS_HZ
        # each epoch is interpolated from its own samples only (edges held), never a neighbour's
        raw_idx = np.floor((t - epoch_start_s[0]) / EPOCH_S)  # non-decreasing: rows are time-sorted
        lo = np.searchsorted(raw_idx, np.flatnonzero(covered), "left")
        hi = np.searchsorted(raw_idx, np.flatnonzero(covered), "right")
        z_uniform = np.stack([np.interp(g, t[a:b], motion[a:b, 3]) for g, a, b in zip(grid, lo, hi)])
        counts[covered] = counts_from_z(z_uniform).mean(axis=1)
    mag_mean[~covered] = np.nan
    mag_std[~covered] = np.nan
    return {"activity_count": counts, "motion_mag_mean_g": mag_mean, "motion_mag_std_g": mag_std}


@dataclass
class Night:
    """One subject's night as per-epoch aggregates; NaN marks a missing signal."""
    subject_id: str
    epoch_start_s: np.ndarray       # (n,) start of each 30 s epoch, seconds from PSG start
    stage: np.ndarray               # (n,) int8: 0 Wake, 1 Light, 2 Deep, 3 REM, -1 unscored
    heart_rate_bpm: np.ndarray      # (n,) mean of the epoch's heart-rate samples
    heart_rate_std_bpm: np.ndarray  # (n,) spread of the epoch's heart-rate samples
    activity_count: np.ndarray      # (n,) activity count per 15 s bin (Walch), from raw motion or counts file
    motion_mag_mean_g: np.ndarray   # (n,) mean |acceleration|, raw motion only
    motion_mag_std_g: np.ndarray    # (n,) std of |acceleration|, raw motion only
    steps: np.ndarray               # (n,) steps recorded in the epoch
    report: dict = field(default_factory=dict)  # what the input rules repaired, signal ends
    # (m, 2) the heart-rate readings (t_s, bpm) inside the epochs, sorted: what degrade.py thins
    heart_rate_samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    resting_hr_bpm: float = math.nan  # the wearer's resting heart rate before the night (resting_heart_rate); NaN: none

    ARRAYS = ("epoch_start_s", "stage", "heart_rate_bpm", "heart_rate_std_bpm", "activity_count",
              "motion_mag_mean_g", "motion_mag_std_g", "steps")

    def __len__(self) -> int:
        return len(self.epoch_start_s)


def resting_heart_rate(readings: np.ndarray | None, night_start_s: float) -> float:
    """The wearer's resting heart rate before a night: the RESTING_HR_PERCENTILE-th percentile of the
    heart-rate readings (t_s, bpm rows, already cleaned) in the RESTING_HR_DAYS days before the night,
    night_start_s - RESTING_HR_DAYS days <= t_s < night_start_s; NaN (no baseline) with fewer than
    RESTING_HR_MIN_READINGS readings there. Readings inside the night are not used.

    The one definition of the baseline: the study files, user recordings and Apple Health exports all
    come through night_from_arrays, which calls it on the readings it is given.
    """
    if readings is None or len(readings) == 0:
        return math.nan
    t = readings[:, 0]
    before = (t >= night_start_s - RESTING_HR_DAYS * 86400.0) & (t < night_start_s)
    if before.sum() < RESTING_HR_MIN_READINGS:
        return math.nan
    return float(np.percentile(readings[before, 1], RESTING_HR_PERCENTILE))


def night_from_arrays(subject_id: str, epoch_start_s: np.ndarray, stage: np.ndarray,
                      heart_rate: np.ndarray | None = None, motion: np.ndarray | None = None,
                      counts: np.ndarray | None = None, steps: np.ndarray | None = None,
                      report: dict | None = None) -> Night:
    """Reduce parsed signals ((n, 2) t,bpm; (n, 4) t,x,y,z; (n, 2) t,count; (n, 2) t,steps) to a Night.

    Any signal may be missing (None); a night with neither heart rate nor motion inside the epochs
    is a DataError naming the subject. Heart-rate readings before the first epoch give the resting
    heart rate (resting_heart_rate); the per-epoch aggregates use only the readings inside the epochs.
    """
    n = len(epoch_start_s)
    report = {} if report is None else report
    nan = np.full(n, np.nan)
    hr_mean, hr_std, samples = nan.copy(), nan.copy(), np.zeros((0, 2))
    report["heart_rate_last_s"] = None
    if heart_rate is not None:
        hr_idx = epoch_index(heart_rate[:, 0], epoch_start_s)
        if (hr_idx >= 0).any():
            hr_mean, hr_std, _ = epoch_mean_std(hr_idx, heart_rate[:, 1], n)
            samples = np.array(heart_rate[hr_idx >= 0, :2], np.float64)
            report["heart_rate_last_s"] = float(samples[:, 0].max())
    motion_aggs = {"activity_count": nan.copy(), "motion_mag_mean_g": nan.copy(), "motion_mag_std_g": nan.copy()}
    if motion is not None:
        motion_aggs = motion_epoch_aggregates(motion, epoch_start_s)
        report["motion_source"] = "raw"
    elif counts is not None:
        count_idx = epoch_index(counts[:, 0], epoch_start_s)
        motion_aggs["activity_count"] = epoch_mean_std(count_idx, counts[:, 1], n)[0]
        report["motion_source"] = "counts"
    covered = np.flatnonzero(~np.isnan(motion_aggs["activity_count"]))
    report["motion_last_s"] = float(epoch_start_s[covered[-1]] + EPOCH_S) if covered.size else None
    if report["heart_rate_last_s"] is None and not covered.size:
        raise DataError(f"subject {subject_id}: no usable signal: neither heart-rate nor motion readings inside "
                        f"the recording ({epoch_start_s[0]:g}-{epoch_start_s[-1] + EPOCH_S:g} s)")
    step_values = nan.copy()
    if steps is not None:
        step_idx = epoch_index(steps[:, 0], epoch_start_s)
        step_values = epoch_sum(step_idx, steps[:, 1], n)
        # outside the span the steps file covers, steps are unknown rather than zero
        step_values[(epoch_start_s < steps[0, 0] - STEPS_MARGIN_S) | (epoch_start_s > steps[-1, 0] + STEPS_MARGIN_S)] = np.nan
    return Night(subject_id, np.asarray(epoch_start_s, np.float64), np.asarray(stage, np.int8),
                 hr_mean, hr_std, motion_aggs["activity_count"], motion_aggs["motion_mag_mean_g"],
                 motion_aggs["motion_mag_std_g"], step_values, report, samples[np.argsort(samples[:, 0], kind="stable")],
                 resting_heart_rate(heart_rate, float(epoch_start_s[0])))


def _read_optional(files: dict, kind: str, report: dict, valid) -> np.ndarray | None:
    if kind not in files:
        return None
    sub_report: dict = {}
    values = read_signal(files[kind], FILE_KINDS[kind][2], sub_report, keep=valid)
    if len(values) == 0:
        raise DataError(f"{files[kind]}: no valid rows after dropping out-of-range values")
    values = _sort_dedupe(values, sub_report)
    if sub_report:
        report[kind] = sub_report
    return values


def plausible(kind: str, values: np.ndarray) -> np.ndarray:
    """Rows of a signal's value columns (no time column) that pass the input rules.

    heart_rate: 25-250 bpm; motion: every axis within +-16 g; counts, steps: >= 0. NaN fails.
    The one definition used by files, streams and user exports alike.
    """
    with np.errstate(invalid="ignore"):
        if kind == "heart_rate":
            return (values[:, 0] >= HR_MIN_BPM) & (values[:, 0] <= HR_MAX_BPM)
        if kind == "motion":
            ok = np.abs(values[:, 0]) <= MOTION_MAX_G  # column by column: no (n, 3) temporary
            for axis in range(1, values.shape[1]):
                ok &= np.abs(values[:, axis]) <= MOTION_MAX_G
            return ok
        if kind in ("counts", "steps"):
            return values[:, 0] >= 0
    raise ValueError(f"unknown signal kind {kind!r}")


def parse_night(data_dir: str | Path, subject_id: str) -> Night:
    """Read and align one subject's files (no cache). The heart-rate file's days before the night give
    the resting heart rate."""
    files = subject_files(data_dir, subject_id)
    if "labels" not in files:
        folder, suffix, _ = FILE_KINDS["labels"]
        raise DataError(f"subject {subject_id}: missing labels file {Path(data_dir) / folder / (subject_id + suffix)}"
                        " (plain or .gz)")
    if not {"heart_rate", "motion", "counts"} & set(files):
        raise DataError(f"subject {subject_id}: no usable signal: no heart_rate/, motion/ or counts/ file for it "
                        f"in {data_dir}")
    epoch_start_s, stage = read_labels(files["labels"])
    report: dict = {}
    signals = {kind: _read_optional(files, kind, report, lambda v, kind=kind: plausible(kind, v[:, 1:]))
               for kind in ("heart_rate", "motion", "counts", "steps")}
    return night_from_arrays(subject_id, epoch_start_s, stage, report=report, **signals)


# ----------------------------------------------------------------------------- cache

def cache_path(cache_dir: Path, data_dir: Path, subject_id: str, files: dict[str, Path]) -> Path:
    """Key: cache version + every source file's path, size and mtime; a change makes a new key."""
    key = [str(CACHE_VERSION), str(Path(data_dir).resolve()), subject_id]
    for kind in sorted(files):
        st = files[kind].stat()
        key.append(f"{kind}:{files[kind].name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("|".join(key).encode()).hexdigest()[:24]
    return cache_dir / f"{subject_id}-{digest}.npz"


def _save_night(path: Path, night: Night) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, subject_id=np.array(night.subject_id), report=np.array(json.dumps(night.report)),
                     heart_rate_samples=night.heart_rate_samples, resting_hr_bpm=np.array(night.resting_hr_bpm),
                     **{name: getattr(night, name) for name in Night.ARRAYS})
        os.replace(tmp, path)  # atomic: a reader never sees a half-written cache
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached_night(path: Path, subject_id: str) -> Night | None:
    """The cached Night, or None when the file is missing, corrupt or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in Night.ARRAYS}
            samples, resting_hr_bpm = z["heart_rate_samples"], float(z["resting_hr_bpm"])
            cached_id, report = str(z["subject_id"]), json.loads(str(z["report"]))
        n = len(arrays["epoch_start_s"])
        if (cached_id != subject_id or n == 0 or any(a.shape != (n,) for a in arrays.values())
                or samples.ndim != 2 or samples.shape[1] != 2):
            return None
        return Night(subject_id, **arrays, report=report, heart_rate_samples=samples, resting_hr_bpm=resting_hr_bpm)
    except Exception:  # any damage means rebuild, never trust
        return None


def load_night(data_dir: str | Path, subject_id: str, cache_dir: str | Path | None = DEFAULT_CACHE_DIR) -> Night:
    """One subject's Night, from the cache when its source files are unchanged."""
    if cache_dir is None:
        return parse_night(data_dir, subject_id)
    files = subject_files(data_dir, subject_id)
    if not files:
        return parse_night(data_dir, subject_id)  # raises: names the missing files
    path = cache_path(Path(cache_dir), Path(data_dir), subject_id, files)
    if path.exists():
        night = _load_cached_night(path, subject_id)
        if night is not None:
            night.report["from_cache"] = True
            return night
    night = parse_night(data_dir, subject_id)
    try:
        _save_night(path, night)
    except OSError as exc:  # a read-only cache folder slows loading down, nothing more
        warnings.warn(f"cannot write cache {path}: {exc}", DataWarning, stacklevel=2)
    return night


def require_folder(data_dir: Path) -> None:
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist (download the release with "
                        "`python data_loader.py --download` or use the bundled data/sleep-accel)")


def load_nights(data_dir: str | Path = DEFAULT_DATA_DIR, subjects: list[str] | None = None, *,
                strict: bool = False, cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                progress: bool = False) -> list[Night]:
    """Load every (or the given) subject; a bad subject is skipped with a DataWarning unless strict."""
    data_dir = Path(data_dir)
    require_folder(data_dir)
    subjects = find_subjects(data_dir) if subjects is None else list(subjects)
    iterator = subjects
    if progress:
        from tqdm import tqdm
        iterator = tqdm(subjects, desc="loading nights", unit="subject", leave=False)
    nights = []
    for subject_id in iterator:
        try:
            nights.append(load_night(data_dir, subject_id, cache_dir))
        except DataError as exc:
            if strict:
                raise
            warnings.warn(f"skipping subject {subject_id}: {exc}", DataWarning, stacklevel=2)
    return nights


# ----------------------------------------------------------------------------- splits, scaling, windows

def split_subjects(subject_ids: list[str], seed: int = 1337, val_frac: float = 0.1,
                   test_frac: float = 0.1) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test) subject ids: 80/10/10 by subject, fixed seed, order-independent."""
    ids = sorted(set(subject_ids))
    if len(ids) < 3:
        raise ValueError(f"need at least 3 subjects for a train/val/test split, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = max(1, int(np.floor(test_frac * len(ids) + 0.5)))
    n_val = max(1, int(np.floor(val_frac * len(ids) + 0.5)))
    test = sorted(ids[i] for i in order[:n_test])
    val = sorted(ids[i] for i in order[n_test:n_test + n_val])
    train = sorted(ids[i] for i in order[n_test + n_val:])
    return train, val, test


def kfold_subjects(subject_ids: list[str], k: int, seed: int = 1337) -> list[tuple[list[str], list[str]]]:
    """k (train, held-out) splits by subject; every subject is held out exactly once."""
    ids = sorted(set(subject_ids))
    if not 2 <= k <= len(ids):
        raise ValueError(f"k-fold needs 2 <= k <= number of subjects ({len(ids)}), got k={k}")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.array_split(order, k)
    return [(sorted(ids[i] for i in order if i not in set(fold)), sorted(ids[i] for i in fold)) for fold in folds]


@dataclass
class FeatureScaler:
    """Per-feature standardisation fitted on training subjects only; plain arrays, no pickle needed."""
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, matrices: Iterable[np.ndarray]) -> "FeatureScaler":
        """Mean and std over the rows of all matrices, one matrix at a time (a cohort never sits in RAM).

        Chan's pairwise update in float64 keeps it exact to rounding; a constant feature gets scale 1.
        """
        n, mean, m2 = 0, None, None
        for x in matrices:
            x = np.asarray(x, np.float64)
            if len(x) == 0:
                continue
            x_mean = x.mean(axis=0)
            x_m2 = ((x - x_mean) ** 2).sum(axis=0)
            if mean is None:
                n, mean, m2 = len(x), x_mean, x_m2
                continue
            total = n + len(x)
            delta = x_mean - mean
            mean = mean + delta * len(x) / total
            m2 = m2 + x_m2 + delta ** 2 * n * len(x) / total
            n = total
        if mean is None:
            raise ValueError("cannot fit a scaler on no rows")
        scale = np.sqrt(m2 / n)
        scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
        return cls(mean.astype(np.float32), scale.astype(np.float32))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale).astype(np.float32)

    def to_sklearn(self):
        """An equivalent sklearn StandardScaler (what scaler.pkl holds)."""
        from sklearn.preprocessing import StandardScaler
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = self.mean.astype(np.float64), self.scale.astype(np.float64)
        scaler.var_, scaler.n_features_in_, scaler.n_samples_seen_ = self.scale.astype(np.float64) ** 2, len(self.mean), 1
        return scaler


# ----------------------------------------------------------------------------- summary CLI

def summarize(nights: list[Night]) -> str:
    """Per-subject table: epochs, stage mix, heart-rate and motion coverage, truncation flags."""
    rows = [f"{'subject':>9} {'epochs':>6} {'scored':>6} {'Wake%':>6} {'Light%':>6} {'Deep%':>6} {'REM%':>6} "
            f"{'HR cov%':>7} {'motion%':>7} {'source':>6}  flags"]
    for night in nights:
        n = len(night)
        scored = night.stage[night.stage >= 0]
        mix = [100.0 * np.mean(scored == c) if scored.size else 0.0 for c in range(4)]
        hr_cov = 100.0 * np.mean(~np.isnan(night.heart_rate_bpm))
        motion_cov = 100.0 * np.mean(~np.isnan(night.activity_count))
        end_s = night.epoch_start_s[-1] + EPOCH_S
        flags = []
        for label, last_key, coverage in (("heart rate", "heart_rate_last_s", hr_cov),
                                          ("motion", "motion_last_s", motion_cov)):
            last_s = night.report.get(last_key)
            if last_s is None:
                flags.append(f"no {label}")
            elif coverage < 80.0 or last_s < end_s - 1800:
                flags.append(f"TRUNCATED {label}: {coverage:.0f}% of epochs, last data at {last_s:.0f} s of {end_s:.0f} s")
        for kind in ("heart_rate", "motion", "counts", "steps"):
            for rule, count in night.report.get(kind, {}).items():
                flags.append(f"{kind} {rule}: {count}")
        rows.append(f"{night.subject_id:>9} {n:>6} {scored.size:>6} " + " ".join(f"{m:>6.1f}" for m in mix)
                    + f" {hr_cov:>7.1f} {motion_cov:>7.1f} {night.report.get('motion_source', '-'):>6}  "
                    + "; ".join(flags))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="PhysioNet-layout folder")
    parser.add_argument("--summary", action="store_true", help="per-subject epochs, stage mix, coverage, flags")
    parser.add_argument("--download", action="store_true", help="fetch the full release from PhysioNet")
    parser.add_argument("--dest", default="data/physionet", help="where --download writes")
    parser.add_argument("--url", default=None, help="release URL for --download (default: PhysioNet)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad subject")
    parser.add_argument("--no-cache", action="store_true", help="parse every file, ignore and write no cache")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    args = parser.parse_args(argv)
    if args.download:
        from download import PHYSIONET_URL, DownloadError, download_release
        try:
            paths = download_release(args.dest, args.url or PHYSIONET_URL)
        except DownloadError as exc:
            print(f"download failed: {exc}", file=sys.stderr)
            return 1
        print(f"{len(paths)} files verified in {args.dest}; use --data-dir {args.dest}")
        return 0
    cache_dir = None if args.no_cache else args.cache_dir
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            nights = load_nights(args.data_dir, strict=args.strict, cache_dir=cache_dir, progress=True)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(summarize(nights))  # the summary is also what a bare run shows
    hits = sum(bool(n.report.get("from_cache")) for n in nights)
    print(f"\nloaded {len(nights)} subjects in {elapsed:.2f} s ({hits} from cache) from {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
