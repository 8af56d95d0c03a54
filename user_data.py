"""Sleep reports on a user's own recordings: CSV/TSV exports -> a Night -> stages and a night summary.

    python inference_hybrid.py --hr hr.csv --motion counts.csv [--steps steps.csv] [--out-dir out/report]

Input files have a header row naming their columns (case-insensitive; spaces, hyphens, slashes
and dots count as underscores; a unit may follow in brackets, "Heart Rate (bpm)"; comma, tab, semicolon or space
separated, the last three also with decimal commas "97,5"; plain or gzip):

- time (TIME_COLUMNS: `timestamp`, `time`, `t`, `seconds`, `datetime`, ...): seconds (any origin,
  the same in every file) or ISO-8601 date-times, with a UTC offset (`2024-03-01T23:05:10Z`,
  `2024-03-01 23:05:10+01:00`) or without (wall-clock time, taken as given);
- heart rate (HR_COLUMNS: `heart_rate`, `hr`, `bpm`, `pulse`, ...; beats per minute);
- motion: raw acceleration `x`, `y`, `z` (g, ~50 Hz), or activity counts (COUNT_COLUMNS: `count`,
  `counts`, `activity`, ...; 15 s Walch counts, as in the PhysioNet counts files);
- steps (STEPS_COLUMNS: `steps`, `step_count`; steps since the previous reading).

A file may hold several of these (one export with time, heart rate and x, y, z can be passed as
both --hr and --motion); a column with another name, or a unit not in the *_UNITS lists, is an
error listing what is accepted. Headerless PhysioNet files (`t,bpm`, `t x y z`, `t,count`,
`t,steps`) are read as data_loader reads them; a zip, an XML (an Apple Health export: use
--apple-health) or another binary file is refused as such.

Rules: the data_loader input rules apply (non-finite and empty values, heart rate outside 25-250
bpm, |acceleration| > 16 g, negative counts or steps are dropped and counted; rows are sorted,
duplicate timestamps keep the first row); text where a number or a time belongs, a row with a
wrong number of fields, an unknown column, seconds mixed with date-times (in a file or across
files), or a recording longer than MAX_SPAN_H hours is an error naming the file (and line, value),
and so is a report on fewer than MIN_REPORT_MIN minutes with data (check_enough_data). Epoch 0
starts at the earliest heart-rate or motion reading floored to 30 s (date-times: 30 s of UTC, i.e.
:00 or :30 of the clock); the night ends with the epoch holding the last heart-rate or motion
reading. Times become seconds since the start of epoch 0. There are no labels: true_stage is -1
throughout.
"""
from __future__ import annotations

import csv
import json
import math
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

import data_loader as dl
import evaluation
import sleep_metrics as sm
from checkpoint import atomic_write

# Column names as written in common exports (normalised: lower case, spaces, hyphens, slashes and
# dots as underscores); a unit may follow in brackets: "Heart Rate (bpm)", "Time [s]".
TIME_COLUMNS = ("timestamp", "time", "t", "seconds", "datetime", "date_time", "date", "time_stamp", "start",
                "start_time", "start_date", "startdate")
HR_COLUMNS = ("heart_rate", "hr", "bpm", "heartrate", "pulse", "pulse_rate")
ACCELERATION_COLUMNS = ("x", "y", "z")
COUNT_COLUMNS = ("count", "counts", "activity", "activity_count", "activity_counts")
STEPS_COLUMNS = ("steps", "step_count", "step")
KNOWN_COLUMNS = TIME_COLUMNS + HR_COLUMNS + ACCELERATION_COLUMNS + COUNT_COLUMNS + STEPS_COLUMNS
# Units accepted in brackets after a name (lower case, blanks collapsed). Any other unit is refused:
# a value in ms, mg or m/s² read as s or g would give a wrong night without a word.
TIME_UNITS = ("s", "sec", "secs", "second", "seconds", "utc", "gmt", "local", "local time", "iso", "iso 8601",
              "iso8601")
HR_UNITS = ("bpm", "beats/min", "beats per minute", "count/min", "counts/min", "1/min", "/min", "min-1", "min^-1")
ACCELERATION_UNITS = ("g",)
COUNT_UNITS = ("count", "counts")
STEPS_UNITS = ("steps", "step", "count", "counts")
ACCEPTED = ("time: " + ", ".join(TIME_COLUMNS) + "; heart rate: " + ", ".join(HR_COLUMNS)
            + "; motion: x, y, z (raw g) or " + ", ".join(COUNT_COLUMNS) + " (15 s counts); steps: "
            + ", ".join(STEPS_COLUMNS) + "; a unit may follow in brackets, e.g. 'Heart Rate (bpm)', 'Time [s]', 'x (g)'")
ROLES = ("heart_rate", "motion", "steps")
MAX_SPAN_H = 48.0  # one report is one night; a longer span is a multi-day export (or times in ms)
# Below this many minutes with data (staged epochs) a report is refused: efficiency and stage shares
# of a few minutes would look as certain as a night's and mean nothing (less than one sleep cycle).
MIN_REPORT_MIN = 60.0
NIGHT_ENDS_H = 12  # a night is named after its evening: the morning until noon belongs to the day before
NS_PER_S = 1_000_000_000
EPOCH_NS = dl.EPOCH_S * NS_PER_S
_TZ_SUFFIX = re.compile(r"\d{2}:\d{2}(?::\d{2}(?:\.\d*)?)?\s*(?:z|[+-]\d{2}(?::?\d{2})?)$", re.IGNORECASE)


@dataclass
class UserSignal:
    """One signal read from a user file: times (float seconds, or int64 ns since 1970 for date-times)."""
    kind: str                     # heart_rate, motion (raw x, y, z), counts or steps
    path: Path
    time: np.ndarray              # sorted; float64 seconds, or int64 ns (UTC, or wall clock when naive)
    values: np.ndarray            # (n, 1) or (n, 3)
    time_format: str              # "seconds", "iso" (with UTC offsets) or "iso-naive"
    utc_offset: timedelta | None = None   # of the first row (aware date-times)
    report: dict = field(default_factory=dict)


@dataclass
class UserRecording:
    """A user's night: the Night (stage -1) and where epoch 0 lies in the files' time base."""
    night: dl.Night
    time_format: str
    start_clock: datetime | None  # date-times: start of epoch 0 (in the first reading's UTC offset)
    origin_s: float | None        # seconds: start of epoch 0 in the files' time base
    inputs: dict[str, str]
    notes: dict[str, dict]        # per signal: rows dropped or repaired

    def label(self) -> str:
        """What the night is called in titles: its evening's date, or the file for times in seconds."""
        if self.start_clock is None:
            return f"night in {Path(next(iter(self.inputs.values()))).name}"
        wall_clock_s = self.start_clock.replace(tzinfo=timezone.utc).timestamp()
        return f"night of {date(1970, 1, 1) + timedelta(days=int(night_day(wall_clock_s)))}"

    def clock_times(self) -> list[str] | None:
        """ISO-8601 start of every epoch (date-time inputs only)."""
        if self.start_clock is None:
            return None
        return [(self.start_clock + timedelta(seconds=float(s))).isoformat() for s in self.night.epoch_start_s]


def night_day(local_s):
    """Days since 1970 of the night a local clock time (seconds since 1970 on that clock) belongs to:
    its evening's date, mornings until NIGHT_ENDS_H counting to the day before."""
    return np.floor((np.asarray(local_s, np.float64) - NIGHT_ENDS_H * 3600.0) / 86400.0)


# ----------------------------------------------------------------------------- reading one file

def _normalise(name: str) -> str:
    return re.sub(r"[\s\-/.]+", "_", name.strip().strip("\ufeff").strip().strip("\"'").strip().lower())


_UNIT_SUFFIX = re.compile(r"^(.*?)\s*[(\[]\s*([^()\[\]]*?)\s*[)\]]$")
_UNITS = ((TIME_COLUMNS, TIME_UNITS, "time"), (HR_COLUMNS, HR_UNITS, "heart rate"),
          (ACCELERATION_COLUMNS, ACCELERATION_UNITS, "acceleration"), (COUNT_COLUMNS, COUNT_UNITS, "activity counts"),
          (STEPS_COLUMNS, STEPS_UNITS, "steps"))


def _column_names(fields: list[str], path: Path, header_line: int) -> list[str]:
    """Each header field's normalised name, its unit in brackets (if any) checked and dropped."""
    names, unknown = [], []
    for field_text in fields:
        text = field_text.strip().strip("\ufeff").strip().strip("\"'").strip()
        match = _UNIT_SUFFIX.match(text)
        name, unit = (_normalise(match.group(1)), re.sub(r"\s+", " ", match.group(2).lower())) if match and \
            match.group(1).strip() else (_normalise(text), "")
        names.append(name)
        if name not in KNOWN_COLUMNS:
            unknown.append(field_text)
            continue
        columns, units, what = next(group for group in _UNITS if name in group[0])
        if unit and unit not in units:
            raise dl.DataError(f"{path}, line {header_line}: column {text!r}: unit {unit!r} is not taken for {what} "
                               f"(accepted: {', '.join(units)}); convert the column or drop the unit")
    if unknown:
        shown = [_shorten(f) for f in unknown[:6]] + (["..."] if len(unknown) > 6 else [])
        raise dl.DataError(f"{path}, line {header_line}: unknown column(s) {shown}; accepted column names "
                           f"(case-insensitive): {ACCEPTED}")
    return names


def _shorten(text: str, width: int = 40) -> str:
    """A header field as shown in an error: a file that is not a CSV can have a 'field' of kilobytes."""
    return text if len(text) <= width else text[:width] + "..."


def _first_data_line(path: Path) -> tuple[int, str]:
    """(line number, text) of the first non-blank line."""
    try:
        with dl.open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    return line_no, line.rstrip("\r\n")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:  # e.g. a truncated or damaged .gz
        raise dl.DataError(f"{path}: cannot read as text or gzip: {exc}") from exc
    raise dl.DataError(f"{path}: empty file (no header, no data rows)")


UTF16_BOMS = ((b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def looks_like_xml(head: bytes) -> bool:
    """Whether a file's first bytes open an XML document (after a byte-order mark and blanks)."""
    for bom, encoding in UTF16_BOMS:
        if head.startswith(bom):
            return head[2:].decode(encoding, "ignore").lstrip().startswith("<")
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


FLAGS = {"heart_rate": "--hr", "motion": "--motion", "steps": "--steps"}


def _refuse_non_text(path: Path, role: str) -> None:
    """A zip, an XML or another binary file given where a CSV belongs: say what it is, not its bytes."""
    if dl.is_gzip(path):  # gzip: a compressed CSV, read as text (a damaged one fails there, naming the file)
        return
    with open(path, "rb") as f:
        head = f.read(4096)
    instead = f"read it with --apple-health {path} instead of {FLAGS[role]}"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as archive:
                health = any(m.rsplit("/", 1)[-1] == "export.xml" for m in archive.namelist())
        except (zipfile.BadZipFile, OSError, EOFError):
            health = False
        raise dl.DataError(f"{path}: " + (f"an Apple Health export (a zip holding export.xml), not a CSV: {instead}"
                                         if health else "a zip archive, not a CSV/TSV text file: unpack the CSV "
                                         "inside and pass that (an Apple Health export.zip goes to --apple-health)"))
    if looks_like_xml(head):
        health = b"HealthData" in head or "HealthData".encode("utf-16-le") in head
        raise dl.DataError(f"{path}: " + (f"an Apple Health export (XML), not a CSV: {instead}" if health else
                                         "an XML file, not a CSV/TSV text file (an Apple Health export.xml goes to "
                                         "--apple-health)"))
    if head.startswith(tuple(bom for bom, _ in UTF16_BOMS)):
        raise dl.DataError(f"{path}: UTF-16 text (as Excel's \"Unicode text\" writes it); save it as CSV in UTF-8")
    if b"\x00" in head:
        raise dl.DataError(f"{path}: a binary file, not a CSV/TSV text file; give a CSV with a header row such as "
                           "'timestamp,heart_rate' (an Apple Health export goes to --apple-health)")


def _separator(line: str) -> str:
    for sep in (",", "\t", ";"):
        if sep in line:
            return sep
    return " "


def _split(line: str, sep: str) -> list[str]:
    if sep == " ":
        return line.split()
    return next(csv.reader([line], delimiter=sep, skipinitialspace=True))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _data_line_numbers(path: Path, header_line: int, rows: np.ndarray) -> dict[int, tuple[int, str]]:
    """Line number and text of the given data rows (0-based, blank lines not counted); slow path only."""
    wanted, found, row = set(int(r) for r in rows), {}, -1
    with dl.open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if line_no <= header_line or not line.strip():
                continue
            row += 1
            if row in wanted:
                found[row] = (line_no, line.rstrip("\r\n"))
                if len(found) == len(wanted):
                    break
    return found


def _field_count_error(path: Path, header_line: int, sep: str, n_fields: int) -> None:
    """Raise DataError at the first data line with a wrong number of fields; slow path only."""
    with dl.open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if line_no <= header_line or not line.strip():
                continue
            fields = _split(line.rstrip("\r\n"), sep)
            if len(fields) != n_fields:
                raise dl.DataError(f"{path}, line {line_no}: expected {n_fields} fields as in the header, "
                                   f"found {len(fields)}: {line.strip()[:80]!r}")


def _pick(names: list[str], options: tuple[str, ...], what: str, path: Path, header_line: int) -> str | None:
    present = [n for n in options if n in names]
    if len(present) > 1:
        joined = " (a date and a time in separate columns: join them into one date-time)" if what == "time" else ""
        raise dl.DataError(f"{path}, line {header_line}: several {what} columns {present}; keep one{joined}")
    return present[0] if present else None


def read_user_signal(path: str | Path, role: str) -> UserSignal:
    """Read the `role` signal (heart_rate, motion or steps) of one file; see the module docstring."""
    path = Path(path)
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not path.is_file():
        raise dl.DataError(f"{path}: no such file")
    _refuse_non_text(path, role)
    header_line, first = _first_data_line(path)
    sep = _separator(first)
    fields = _split(first, sep)
    if all(_is_number(f) for f in fields):
        return _read_headerless(path, role, len(fields))
    names = _column_names(fields, path, header_line)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise dl.DataError(f"{path}, line {header_line}: column(s) {repeated} appear more than once")
    time_col = _pick(names, TIME_COLUMNS, "time", path, header_line)
    if time_col is None:
        raise dl.DataError(f"{path}, line {header_line}: no time column; name it one of {', '.join(TIME_COLUMNS)}")
    if role == "heart_rate":
        col = _pick(names, HR_COLUMNS, "heart-rate", path, header_line)
        if col is None:
            raise dl.DataError(f"{path}, line {header_line}: no heart-rate column; name it one of "
                               f"{', '.join(HR_COLUMNS)}")
        kind, value_cols = "heart_rate", [col]
    elif role == "motion":
        axes = [a for a in ACCELERATION_COLUMNS if a in names]
        count_col = _pick(names, COUNT_COLUMNS, "activity-count", path, header_line)
        if len(axes) == 3:
            kind, value_cols = "motion", list(ACCELERATION_COLUMNS)  # raw motion wins, as in data_loader
        elif count_col is not None:
            kind, value_cols = "counts", [count_col]
        else:
            missing = f" (found {axes}, missing {[a for a in ACCELERATION_COLUMNS if a not in axes]})" if axes else ""
            raise dl.DataError(f"{path}, line {header_line}: no motion columns{missing}; give raw acceleration "
                               f"x, y, z (g) or activity counts named one of {', '.join(COUNT_COLUMNS)}")
    else:
        col = _pick(names, STEPS_COLUMNS, "steps", path, header_line)
        if col is None:
            raise dl.DataError(f"{path}, line {header_line}: no steps column; name it one of {', '.join(STEPS_COLUMNS)}")
        kind, value_cols = "steps", [col]
    try:
        table = pd.read_csv(path, sep=r"\s+" if sep == " " else sep, header=None, skiprows=header_line,
                            names=names, dtype=str, na_filter=False,
                            skip_blank_lines=True, skipinitialspace=True, index_col=False, engine="c",
                            on_bad_lines="error", compression="gzip" if dl.is_gzip(path) else None)
    except (pd.errors.ParserError, ValueError) as exc:
        _field_count_error(path, header_line, sep, len(names))
        raise dl.DataError(f"{path}: cannot be parsed ({type(exc).__name__}: {str(exc).strip()[:200]})") from None
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise dl.DataError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if len(table) == 0:
        raise dl.DataError(f"{path}: a header but no data rows")
    columns = {name: table[name].to_numpy(dtype=object) for name in (time_col, *value_cols)}
    empty = np.zeros(len(table), dtype=bool)
    for values in columns.values():
        empty |= (values == "") | pd.isna(values)
    if empty.any():  # an empty cell is a missing value, a missing field is an error
        _field_count_error(path, header_line, sep, len(names))
    if empty.all():
        raise dl.DataError(f"{path}: no data row has both a time and a value")
    report: dict = {}
    values = np.column_stack([_numbers(path, header_line, col, columns[col], sep) for col in value_cols])
    t, time_format, offset = _times(path, header_line, time_col, columns[time_col], ~empty, sep)
    return _clean(UserSignal(kind, path, t, values, time_format, offset, report), empty)


_DECIMAL_COMMA = re.compile(r"^\s*([-+]?\d*),(\d+)\s*$")


def _to_float(text: np.ndarray, sep: str) -> np.ndarray:
    """Numbers as float64 (NaN where not a number). Outside comma-separated files a single comma
    between digits is a decimal comma ("97,5"), as European spreadsheets write semicolon files; in a
    comma-separated file it could as well be a thousands separator, so it stays an error there."""
    series = pd.Series(text)
    numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, copy=True)
    if sep != ",":
        retry = np.flatnonzero(np.isnan(numbers) & series.str.contains(",", regex=False).to_numpy(dtype=bool))
        if retry.size:  # the slow path only for the cells that need it
            fixed = series.iloc[retry].str.replace(_DECIMAL_COMMA, r"\1.\2", regex=True)
            numbers[retry] = pd.to_numeric(fixed, errors="coerce").to_numpy(dtype=np.float64)
    return numbers


def _not_a_number(value: str, sep: str) -> str:
    """Why a cell is not a number, with what would be read."""
    if "," in value and sep == ",":
        return ("is not a number (a decimal comma is read in semicolon- or tab-separated files only; in a "
                "comma-separated file write 97.5)")
    return "is not a number (accepted: 97, 97.5" + (", 97,5" if sep != "," else "") + ", or empty/NaN for missing)"


def _numbers(path: Path, header_line: int, name: str, text: np.ndarray, sep: str) -> np.ndarray:
    numbers = _to_float(text, sep)
    bad = np.flatnonzero(np.isnan(numbers) & (text != "") & ~pd.Series(text).str.strip().str.lower().isin(
        ["nan", "na", "n/a", "null", "none"]).to_numpy())
    if bad.size:
        line_no, line = _data_line_numbers(path, header_line, bad[:1])[int(bad[0])]
        raise dl.DataError(f"{path}, line {line_no}: {name} {text[bad[0]]!r} {_not_a_number(str(text[bad[0]]), sep)}: "
                           f"{line[:80]!r}")
    return numbers


def _times(path: Path, header_line: int, name: str, text: np.ndarray, present: np.ndarray, sep: str
           ) -> tuple[np.ndarray, str, timedelta | None]:
    """Times as float seconds or int64 ns (date-times); the format comes from the first row."""
    series = pd.Series(text).str.strip()
    first = series[present].iloc[0] if present.any() else ""

    def fail(row: int, why: str):
        line_no, line = _data_line_numbers(path, header_line, np.array([row]))[row]
        raise dl.DataError(f"{path}, line {line_no}: {name} {text[row]!r} {why}: {line[:80]!r}")

    if _is_number(first) or (sep != "," and _DECIMAL_COMMA.match(first)):
        seconds = _to_float(series.to_numpy(dtype=object), sep)
        bad = np.flatnonzero(present & np.isnan(seconds))
        if bad.size:
            fail(int(bad[0]), "is not a number of seconds (the column holds seconds, as its first row)")
        return seconds, "seconds", None
    aware = series.str.contains(_TZ_SUFFIX).to_numpy(dtype=bool)
    mixed = np.flatnonzero(present & (aware != aware[np.flatnonzero(present)[0]]))
    if mixed.size:
        fail(int(mixed[0]), "mixes date-times with and without a UTC offset (the first row "
             + ("has one)" if aware[np.flatnonzero(present)[0]] else "has none)"))
    stamps = pd.to_datetime(series.where(present, None), format="ISO8601", utc=True, errors="coerce")
    bad = np.flatnonzero(present & pd.isna(stamps).to_numpy())
    if bad.size:
        fail(int(bad[0]), "is not an ISO-8601 date-time (e.g. 2024-03-01T23:05:10Z) nor a number of seconds")
    ns = stamps.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").view(np.int64).copy()
    is_aware = bool(aware[np.flatnonzero(present)[0]])
    offset = pd.Timestamp(first).utcoffset() if is_aware else None
    return ns, "iso" if is_aware else "iso-naive", offset


def _read_headerless(path: Path, role: str, n_fields: int) -> UserSignal:
    """A PhysioNet-style file without header: t,bpm / t x y z / t,count / t,steps (seconds)."""
    if role == "motion":
        if n_fields not in (2, 4):
            raise dl.DataError(f"{path}: a headerless motion file has 4 columns (t x y z, raw g) or 2 (t,count), "
                               f"found {n_fields}; or add a header row ({ACCEPTED})")
        kind = "motion" if n_fields == 4 else "counts"
    else:
        if n_fields != 2:
            raise dl.DataError(f"{path}: a headerless {role.replace('_', '-')} file has 2 columns (t,value), found "
                               f"{n_fields}; or add a header row ({ACCEPTED})")
        kind = role
    report: dict = {}
    rows = dl.read_signal(path, n_fields, report)
    return _clean(UserSignal(kind, path, rows[:, 0], rows[:, 1:], "seconds", None, report), None)


def _clean(signal: UserSignal, empty: np.ndarray | None) -> UserSignal:
    """The data_loader input rules: drop missing, non-finite and implausible rows; sort; dedupe."""
    report, t, v = signal.report, signal.time, signal.values
    keep = np.ones(len(t), dtype=bool) if empty is None else ~empty
    if empty is not None and empty.any():
        report["missing"] = report.get("missing", 0) + int(empty.sum())
    if t.dtype.kind == "f":
        finite = np.isfinite(t) & np.isfinite(v).all(axis=1)
    else:
        finite = np.isfinite(v).all(axis=1)
    if (keep & ~finite).any():
        report["non_finite"] = report.get("non_finite", 0) + int((keep & ~finite).sum())
    keep &= finite
    plausible = dl.plausible(signal.kind, v)
    if (keep & ~plausible).any():
        report["out_of_range"] = int((keep & ~plausible).sum())
    keep &= plausible
    t, v = t[keep], v[keep]
    if len(t) == 0:
        raise dl.DataError(f"{signal.path}: no valid {signal.kind.replace('_', '-')} rows "
                           f"(dropped: {report or 'none'})")
    if np.any(np.diff(t) < 0):
        report["unsorted"] = True
        order = np.argsort(t, kind="stable")
        t, v = t[order], v[order]
    dup = np.concatenate([[False], np.diff(t) == 0])
    if dup.any():
        report["duplicates"] = int(dup.sum())
        t, v = t[~dup], v[~dup]
    signal.time, signal.values = t, v
    return signal


# ----------------------------------------------------------------------------- a night from several files

def load_recording(hr: str | Path | None = None, motion: str | Path | None = None, steps: str | Path | None = None,
                   subject: str | None = None) -> UserRecording:
    """Read the files, put them on one 30 s epoch grid and reduce them to a Night (stage -1).

    Heart rate, motion or both (steps only beside one of them); the night spans the heart rate and motion."""
    if hr is None and motion is None:
        raise dl.DataError("a recording needs a heart-rate file, a motion file, or both")
    signals = {role: read_user_signal(path, role) for role, path in (("heart_rate", hr), ("motion", motion),
                                                                       ("steps", steps)) if path is not None}
    formats = {role: s.time_format for role, s in signals.items()}
    if len(set(formats.values())) > 1:
        described = {"seconds": "seconds", "iso": "date-times with UTC offset", "iso-naive": "date-times without offset"}
        raise dl.DataError("the files use different kinds of time, which cannot be aligned: " + "; ".join(
            f"{signals[r].path}: {described[f]}" for r, f in formats.items()))
    main = [signals[role] for role in ("heart_rate", "motion") if role in signals]
    time_format = main[0].time_format
    first = min(s.time[0] for s in main)
    last = max(s.time[-1] for s in main)
    if time_format == "seconds":
        origin = math.floor(first / dl.EPOCH_S) * dl.EPOCH_S
        relative = {role: s.time - origin for role, s in signals.items()}
        span_s = float(last - origin)
    else:
        origin = (int(first) // EPOCH_NS) * EPOCH_NS
        relative = {role: (s.time - origin) / NS_PER_S for role, s in signals.items()}
        span_s = (int(last) - origin) / NS_PER_S
    if span_s > MAX_SPAN_H * 3600:
        raise dl.DataError(f"the recording spans {span_s / 3600:.1f} h ({', '.join(str(s.path) for s in main)}); "
                           f"a report covers one night (at most {MAX_SPAN_H:g} h): crop "
                           "the export to the night (are the times in seconds, not milliseconds?)")
    n_epochs = int(span_s // dl.EPOCH_S) + 1
    epoch_start_s = dl.EPOCH_S * np.arange(n_epochs, dtype=np.float64)

    def rows(role):
        s = signals.get(role)
        return None if s is None else np.column_stack([relative[role], s.values])

    motion_signal = signals.get("motion")
    name = subject or re.sub(r"\.(csv|tsv|txt)$", "", main[0].path.name.removesuffix(".gz"), flags=re.IGNORECASE)
    report: dict = {}
    night = dl.night_from_arrays(name, epoch_start_s, np.full(n_epochs, -1, np.int8), rows("heart_rate"),
                                 motion=rows("motion") if motion_signal and motion_signal.kind == "motion" else None,
                                 counts=rows("motion") if motion_signal and motion_signal.kind == "counts" else None,
                                 steps=rows("steps"), report=report)
    for role, s in signals.items():
        if s.report:
            night.report[s.kind] = s.report
    start_clock = origin_s = None
    if time_format == "seconds":
        origin_s = float(origin)
    else:
        start_clock = datetime(1970, 1, 1) + timedelta(microseconds=origin // 1000)
        if time_format == "iso":
            offset = main[0].utc_offset or timedelta(0)
            start_clock = (start_clock.replace(tzinfo=timezone.utc)).astimezone(timezone(offset))
    return UserRecording(night, time_format, start_clock, origin_s,
                         {role: str(s.path) for role, s in signals.items()},
                         {s.kind: s.report for s in signals.values() if s.report})


# ----------------------------------------------------------------------------- predicting and summarising

def predict_recording(model, scaler: dl.FeatureScaler, checkpoint: dict, recording: UserRecording,
                      smooth: bool = True) -> pd.DataFrame:
    """evaluation.PREDICTION_COLUMNS for every epoch (true_stage -1), plus clock_time for date-time inputs."""
    frame = evaluation.predict_nights(model, scaler, checkpoint, [recording.night], smooth)
    clock = recording.clock_times()
    if clock is not None:
        frame.insert(2, "clock_time", clock)
    return frame


def night_summary(frame: pd.DataFrame, recording: UserRecording, checkpoint_path: str = "",
                  mode: str = "") -> dict:
    """The night's figures (sleep_metrics.sleep_metrics of the predicted stages) and where they come from."""
    all_stages = frame["pred"].to_numpy()
    stages = all_stages[all_stages >= 0]
    metrics = sm.night_metrics(all_stages)  # epochs without data (-1) are left out of every figure
    night = recording.night
    n = len(stages)
    per_stage = {}
    for code, stage in enumerate(dl.STAGE_NAMES):
        minutes = float((stages == code).sum() * sm.EPOCH_MIN)
        per_stage[stage] = {
            "minutes": minutes,
            "percent_of_sleep": None if code == 0 else metrics[f"{stage.lower()}_pct"],
            "percent_of_time_in_bed": 100.0 * minutes / metrics["time_in_bed_min"] if n else float("nan"),
        }
    end_s = float(night.epoch_start_s[-1] + dl.EPOCH_S)
    summary = {
        "subject": night.subject_id,
        "night": recording.label(),
        "inputs": recording.inputs,
        "checkpoint": str(checkpoint_path),
        "mode": mode,
        "epochs": len(all_stages),
        "no_data_min": metrics["no_data_min"],
        "time_format": recording.time_format,
        "start": recording.start_clock.isoformat() if recording.start_clock else recording.origin_s,
        "end": (recording.start_clock + timedelta(seconds=end_s)).isoformat() if recording.start_clock
        else recording.origin_s + end_s,
        "motion_source": night.report.get("motion_source"),
        "heart_rate_coverage_pct": 100.0 * float(np.mean(~np.isnan(night.heart_rate_bpm))),
        "motion_coverage_pct": 100.0 * float(np.mean(~np.isnan(night.activity_count))),
        "input_notes": recording.notes,
        "metrics": {name: metrics[name] for name in sm.METRICS},
        "stages": per_stage,
    }
    return json_safe(summary)


def json_safe(value):
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


MOTION_SOURCES = {"raw": "motion: raw acceleration", "counts": "motion: activity counts",
                  None: "no motion (staged from heart rate alone)"}


def check_enough_data(frame: pd.DataFrame, recording: UserRecording) -> None:
    """Refuse a report on less than MIN_REPORT_MIN minutes with data (a DataError naming the files)."""
    staged_min = float((frame["pred"].to_numpy() >= 0).sum() * sm.EPOCH_MIN)
    if staged_min < MIN_REPORT_MIN:
        raise dl.DataError(
            f"{', '.join(recording.inputs.values())}: only {staged_min:g} min with heart rate or motion "
            f"(of {len(frame) * sm.EPOCH_MIN:g} min from the first reading to the last); a sleep report needs at "
            f"least {MIN_REPORT_MIN:g} min with data: efficiency and stage shares of less would mean nothing. "
            "Give a whole night's recording")


def format_summary(summary: dict) -> str:
    """The printed night summary (also summary.txt)."""
    m = summary["metrics"]

    def minutes(value):
        if value is None:
            return "-"
        return f"{value:.1f} min ({int(value // 60)} h {value % 60:04.1f} min)" if value >= 60 else f"{value:.1f} min"

    when = (f"{summary['start']} to {summary['end']}" if summary["time_format"] != "seconds"
            else f"{summary['start']:g} s to {summary['end']:g} s of the files' time base")
    lines = [
        f"Night summary: {summary.get('night') or summary['subject']} ({summary['epochs']} epochs of 30 s, {when})",
        f"  model: {summary['checkpoint']} [{summary['mode']}]; {MOTION_SOURCES[summary['motion_source']]}; "
        f"heart rate in {summary['heart_rate_coverage_pct']:.0f}% of epochs, motion in "
        f"{summary['motion_coverage_pct']:.0f}%",
        f"  time in bed          {minutes(m['time_in_bed_min'])}" + (
            f" with data; no data (no heart rate or motion, not staged): {minutes(summary['no_data_min'])}"
            if summary.get("no_data_min") else ""),
        f"  total sleep time     {minutes(m['total_sleep_time_min'])}",
        f"  sleep efficiency     " + ("-" if m["sleep_efficiency_pct"] is None else f"{m['sleep_efficiency_pct']:.1f} %"),
        f"  sleep-onset latency  {minutes(m['sleep_onset_latency_min'])}",
        f"  WASO                 {minutes(m['waso_min'])}",
        f"  REM latency          {minutes(m['rem_latency_min'])}" + (" from sleep onset"
                                                                     if m["rem_latency_min"] is not None else ""),
        f"  awakenings           {int(m['awakenings']) if m['awakenings'] is not None else '-'}"
        + (" (night-smoothed model: brief awakenings are merged; --no-smooth counts them)"
           if "night-smoothed" in summary["mode"] else ""),
        f"  {'stage':<8}{'minutes':>9}{'% of sleep':>12}{'% of time in bed':>18}",
    ]
    for stage, row in summary["stages"].items():
        pct_sleep = "-" if row["percent_of_sleep"] is None else f"{row['percent_of_sleep']:.1f}"
        pct_bed = "-" if row["percent_of_time_in_bed"] is None else f"{row['percent_of_time_in_bed']:.1f}"
        lines.append(f"  {stage:<8}{row['minutes']:>9.1f}{pct_sleep:>12}{pct_bed:>18}")
    if summary["input_notes"]:
        notes = "; ".join(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in rules.items())
                          for kind, rules in summary["input_notes"].items())
        lines.append(f"  input rows dropped or repaired: {notes}")
    return "\n".join(lines)


def write_report(frame: pd.DataFrame, summary: dict, recording: UserRecording, out_dir: str | Path,
                 title: str = "", reference: np.ndarray | None = None,
                 reference_label: str = "PSG") -> dict[str, Path]:
    """stages.csv, hypnogram.png (with a reference hypnogram when given), summary.json, summary.txt in
    out_dir; returns their paths."""
    out = Path(out_dir)
    paths = {"stages": out / "stages.csv", "hypnogram": out / "hypnogram.png",
             "summary_json": out / "summary.json", "summary_txt": out / "summary.txt"}
    evaluation.write_predictions(frame, paths["stages"])
    evaluation.plot_hypnogram(frame, paths["hypnogram"], title, start_clock=recording.start_clock,
                              reference=reference, reference_label=reference_label)
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(paths["summary_json"], lambda f: f.write(text.encode()))
    atomic_write(paths["summary_txt"], lambda f: f.write((format_summary(summary) + "\n").encode()))
    return paths
