"""Apple Health exports (the Health app's "Export All Health Data": export.zip or its export.xml)
-> nights of heart rate and steps, with Apple's own sleep stages where the watch recorded them.

The XML is streamed through expat (read from inside the zip, never unpacked): only heart-rate,
step-count and sleep-analysis records are kept, as numbers, so memory grows with those readings,
not with the file. An export is a file someone may send you: entity declarations and external
references are refused (no "billion laughs", nothing fetched), and every problem is a DataError
naming the file and the line.

Nights: the readings whose own local time (each record's UTC offset: daylight saving and travel
change it) lies between 18:00 on date D and 12:00 the next day form night D, trimmed to its first
and last heart-rate reading, or to the span of Apple's in-bed/asleep records where there are any.
A night needs MIN_READINGS heart-rate readings between 00:00 and 06:00 (the watch worn in bed).
Its resting heart rate comes from the export's heart-rate readings of the days before it
(data_loader.resting_heart_rate; readings by day, 12:00-18:00 local, are not kept).
"""
from __future__ import annotations

import io
import math
import zipfile
import zlib
from array import array
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator
from xml.parsers import expat

import numpy as np
import pandas as pd

import data_loader as dl
import evaluation
import user_data
from checkpoint import atomic_write
from features import EPOCH_S

HEART_RATE = "HKQuantityTypeIdentifierHeartRate"
STEPS = "HKQuantityTypeIdentifierStepCount"
SLEEP = "HKCategoryTypeIdentifierSleepAnalysis"
# Apple's sleep values -> our stages (0 Wake, 1 Light = Core, 2 Deep, 3 REM); -1: in bed or asleep, no stage
APPLE_STAGES = {"HKCategoryValueSleepAnalysisAwake": 0, "HKCategoryValueSleepAnalysisAsleepCore": 1,
                "HKCategoryValueSleepAnalysisAsleepDeep": 2, "HKCategoryValueSleepAnalysisAsleepREM": 3,
                "HKCategoryValueSleepAnalysisInBed": -1, "HKCategoryValueSleepAnalysisAsleepUnspecified": -1,
                "HKCategoryValueSleepAnalysisAsleep": -1}
NIGHT_FROM_H, NIGHT_TO_H = 18, user_data.NIGHT_ENDS_H  # night D: local 18:00 on D to 12:00 on D + 1
MIN_READINGS = 10                  # a night needs this many heart-rate readings between 00:00 and CORE_TO_H,
CORE_TO_H = 6                      # spanning at least CORE_MIN_SPAN_S
CORE_MIN_SPAN_S = 3600.0
READ_BLOCK = 1 << 20
MAX_DIARY_NIGHTS = 62              # the diary shows the last two months of a longer run
MAX_STEPS_PER_S = 5.0              # a step record faster than this over its interval is implausible


@dataclass
class HealthExport:
    """The kept records of one export, as arrays (UTC seconds; each record's UTC offset in seconds)."""
    path: Path
    heart_rate: np.ndarray   # (n, 3) t, bpm, offset
    steps: np.ndarray        # (n, 4) start, end, steps, offset
    sleep: np.ndarray        # (n, 4) start, end, stage (0-3, -1 in bed/asleep), offset
    report: dict = field(default_factory=dict)  # records read, skipped, dropped as implausible


def _open(path: Path) -> tuple[io.BufferedIOBase, int, zipfile.ZipFile | None]:
    """(binary stream of export.xml, its size, the zip to close)."""
    if not path.is_file():
        raise dl.DataError(f"{path}: no such file (pass export.zip from the Health app, or its export.xml)")
    try:
        if zipfile.is_zipfile(path):
            archive = zipfile.ZipFile(path)
            try:
                members = [m for m in archive.infolist() if m.filename.rsplit("/", 1)[-1] == "export.xml"]
                if not members:
                    raise dl.DataError(f"{path}: a zip without export.xml; is it the Health app's export?")
                member = min(members, key=lambda m: (m.filename.count("/"), m.filename))
                return archive.open(member), member.file_size, archive
            except BaseException:
                archive.close()
                raise
        with open(path, "rb") as f:
            head = f.read(64)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise dl.DataError(f"{path}: a zip that cannot be read ({type(exc).__name__}: {exc}); export it again "
                           "from the Health app") from None
    except OSError as exc:
        raise dl.DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if head[:2] == b"PK":
        raise dl.DataError(f"{path}: a damaged or truncated zip (no central directory)")
    if not user_data.looks_like_xml(head):
        raise dl.DataError(f"{path}: neither a zip nor an XML file")
    return open(path, "rb"), path.stat().st_size, None


def parse_time(text: str) -> tuple[float, float]:
    """"2026-03-01 23:05:10 +0100" -> (UTC seconds, UTC offset seconds); ValueError if malformed."""
    if len(text) != 25 or text[19] != " " or text[20] not in "+-" or not text[21:25].isdigit() \
            or int(text[21:23]) > 14 or int(text[23:25]) > 59:
        raise ValueError(f"{text!r} is not a Health date (YYYY-MM-DD hh:mm:ss +hhmm)")
    try:
        local = datetime.fromisoformat(text[:19]).replace(tzinfo=timezone.utc).timestamp()
        offset = (int(text[21:23]) * 3600 + int(text[23:25]) * 60) * (1 if text[20] == "+" else -1)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date ({exc})") from None
    return local - offset, float(offset)


def read_export(path: str | Path, since: date | None = None, until: date | None = None,
                progress: bool = False) -> HealthExport:
    """Stream an export's heart-rate, step and sleep records (optionally only those between the
    evening of `since` and the morning after `until`, local time; heart rate also from the
    data_loader.RESTING_HR_DAYS days before, which give the first nights their resting heart rate)."""
    path = Path(path)
    stream, size, archive = _open(path)
    lo = -math.inf if since is None else datetime(since.year, since.month, since.day, NIGHT_FROM_H,
                                                  tzinfo=timezone.utc).timestamp() - 14 * 3600
    hi = math.inf if until is None else datetime(until.year, until.month, until.day, NIGHT_TO_H,
                                                 tzinfo=timezone.utc).timestamp() + 86400 + 14 * 3600
    hr_lo = lo - dl.RESTING_HR_DAYS * 86400.0
    kept = {"heart_rate": array("d"), "steps": array("d"), "sleep": array("d")}
    counts = {"records": 0, "heart_rate": 0, "steps": 0, "sleep": 0, "implausible_heart_rate": 0,
              "daytime_heart_rate": 0, "implausible_steps": 0, "implausible_sleep": 0, "unknown_sleep_values": 0,
              "outside_dates": 0}
    state = {"root": None}
    parser = expat.ParserCreate()

    def refuse(*_):  # entity declarations and external references: refused, never expanded or fetched
        raise dl.DataError(f"{path}, line {parser.CurrentLineNumber}: the XML declares an entity or refers to an "
                           "external resource; a Health export has neither (refused for safety)")

    def start(name, attrs):
        if state["root"] is None:
            state["root"] = name
            if name != "HealthData":
                raise dl.DataError(f"{path}: not an Apple Health export (root element <{name}>, expected "
                                   "<HealthData>)")
        if name != "Record":
            return
        counts["records"] += 1
        kind = attrs.get("type")
        if kind not in (HEART_RATE, STEPS, SLEEP):
            return
        try:
            t0, offset = parse_time(attrs["startDate"])
            t1 = t0 if kind == HEART_RATE else parse_time(attrs["endDate"])[0]
            value = attrs["value"]
            if kind == SLEEP and value not in APPLE_STAGES:
                counts["unknown_sleep_values"] += 1
                return
            number = APPLE_STAGES[value] if kind == SLEEP else float(value)
        except KeyError as exc:
            raise dl.DataError(f"{path}, line {parser.CurrentLineNumber}: {kind} record without a valid "
                               f"{exc} attribute") from None
        except ValueError as exc:
            raise dl.DataError(f"{path}, line {parser.CurrentLineNumber}: {kind} record: {exc}") from None
        if not (hr_lo if kind == HEART_RATE else lo) <= t0 <= hi:
            counts["outside_dates"] += 1
            return
        if kind == HEART_RATE:
            if not (math.isfinite(number) and dl.HR_MIN_BPM <= number <= dl.HR_MAX_BPM):
                counts["implausible_heart_rate"] += 1
                return
            if NIGHT_TO_H <= ((t0 + offset) % 86400.0) / 3600.0 < NIGHT_FROM_H:  # daytime: in no night
                counts["daytime_heart_rate"] += 1
                return
            kept["heart_rate"].extend((t0, number, offset))
        elif kind == STEPS:
            if not (math.isfinite(number) and 0 <= number <= MAX_STEPS_PER_S * max(t1 - t0, 1.0) and t1 >= t0):
                counts["implausible_steps"] += 1
                return
            kept["steps"].extend((t0, t1, number, offset))
        else:
            if not 0 <= t1 - t0 <= 86400.0:
                counts["implausible_sleep"] += 1
                return
            kept["sleep"].extend((t0, t1, number, offset))
        counts["heart_rate" if kind == HEART_RATE else "steps" if kind == STEPS else "sleep"] += 1

    parser.StartElementHandler = start
    parser.EntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}", leave=False)
    bytes_read = 0
    try:
        while True:
            block = stream.read(READ_BLOCK)
            bytes_read += len(block)
            if bar is not None:
                bar.update(len(block))
            parser.Parse(block, not block)
            if not block:
                break
    except expat.ExpatError as exc:
        raise dl.DataError(f"{path}, line {exc.lineno}, column {exc.offset}: not well-formed XML "
                           f"({expat.errors.messages[exc.code]}); a truncated or damaged export?") from None
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, NotImplementedError, RuntimeError) as exc:
        where = "zip" if archive is not None else "file"
        raise dl.DataError(f"{path}: damaged {where} after about {bytes_read:,} bytes of export.xml "
                           f"({type(exc).__name__}: {exc})") from None
    except (LookupError, UnicodeError) as exc:
        raise dl.DataError(f"{path}: the XML's text encoding cannot be read ({exc})") from None
    finally:
        if bar is not None:
            bar.close()
        stream.close()
        if archive is not None:
            archive.close()
    if state["root"] is None:
        raise dl.DataError(f"{path}: empty export (no XML element)")
    heart_rate = np.frombuffer(kept["heart_rate"], np.float64).reshape(-1, 3)
    if not len(heart_rate):
        raise dl.DataError(f"{path}: no heart-rate records ({HEART_RATE})"
                           + (" between the dates asked for" if counts["outside_dates"] else ""))
    heart_rate = heart_rate[np.argsort(heart_rate[:, 0], kind="stable")]
    return HealthExport(path, heart_rate, np.frombuffer(kept["steps"], np.float64).reshape(-1, 4),
                        np.frombuffer(kept["sleep"], np.float64).reshape(-1, 4), counts)


# ----------------------------------------------------------------------------- nights

@dataclass
class HealthNight:
    """One night of an export, on a 30 s grid from `start_s` (UTC seconds)."""
    day: date
    start_s: float
    offset_s: float              # UTC offset of the night's first reading (for clock times)
    night: dl.Night              # stage -1 throughout
    apple_stage: np.ndarray | None  # Apple's stage per epoch (-1 none) where the export has them
    source: Path = Path()

    @property
    def start_clock(self) -> datetime:
        return datetime.fromtimestamp(self.start_s, timezone(timedelta(seconds=self.offset_s)))


def night_of(t_utc: np.ndarray, offset_s: np.ndarray) -> np.ndarray:
    """Night (days since 1970, the evening's date) of each reading from its own local time; -1 by day."""
    local = t_utc + offset_s
    day = user_data.night_day(local)
    by_night = local - day * 86400.0 >= NIGHT_FROM_H * 3600.0
    return np.where(by_night, day, -1).astype(np.int64)


def _spread(intervals: np.ndarray, start_s: float, n: int) -> np.ndarray | None:
    """(t, value) rows at the middle of each epoch an interval record covers, its value shared by
    overlap, sorted by time; None when nothing falls inside the n epochs from start_s."""
    end_s = start_s + n * EPOCH_S
    rows = []
    for t0, t1, value in intervals[:, :3]:
        if t1 <= t0:
            if start_s <= t0 < end_s:
                rows.append((t0 - start_s, value))
            continue
        lo, hi = max(t0, start_s), min(t1, end_s)  # only the part inside the night is split into epochs
        if hi <= lo:
            continue
        first, last = math.floor((lo - start_s) / EPOCH_S), math.floor((hi - start_s) / EPOCH_S)
        edges = np.clip(start_s + EPOCH_S * np.arange(first, last + 2), lo, hi)
        share = np.diff(edges) / (t1 - t0)
        mids = (edges[:-1] + edges[1:]) / 2 - start_s
        rows.extend(zip(mids[share > 0], value * share[share > 0]))
    if not rows:
        return None
    rows = np.array(rows, np.float64)
    return rows[np.argsort(rows[:, 0], kind="stable")]


def nights(export: HealthExport, only: date | None = None, since: date | None = None,
           until: date | None = None) -> Iterator[HealthNight]:
    """The nights, in date order (only night `only`, or those from `since` to `until`), one at a time.

    A night needs MIN_READINGS heart-rate readings between 00:00 and CORE_TO_H local spanning at least
    CORE_MIN_SPAN_S (the watch worn in bed); its span is that of Apple's in-bed/asleep records that
    overlap those readings, else the night's first to last reading, within 18:00-12:00 local.
    """
    hr, sleep = export.heart_rate, export.sleep
    day_of_reading = night_of(hr[:, 0], hr[:, 2])
    days = sorted(set(day_of_reading[day_of_reading >= 0].tolist()))
    epoch0 = date(1970, 1, 1)
    if only is not None:
        since = until = only
    days = [d for d in days if (since is None or d >= (since - epoch0).days) and
            (until is None or d <= (until - epoch0).days)]
    for d in days:
        readings = hr[day_of_reading == d]
        local_h = ((readings[:, 0] + readings[:, 2]) % 86400.0) / 3600.0
        core = readings[local_h < CORE_TO_H, 0]
        if len(core) < MIN_READINGS or core[-1] - core[0] < CORE_MIN_SPAN_S:  # the watch not worn in bed
            continue
        offset = float(readings[0, 2])
        window_start = (d * 86400.0 + NIGHT_FROM_H * 3600.0) - offset
        window_end = window_start + (24 - NIGHT_FROM_H + NIGHT_TO_H) * 3600.0
        spells = sleep[(sleep[:, 1] > core[0]) & (sleep[:, 0] < core[-1])] if len(sleep) else sleep
        if len(spells):
            begin, end = min(spells[:, 0].min(), core[0]), max(spells[:, 1].max(), core[-1])
        else:
            begin, end = readings[0, 0], readings[-1, 0]
        begin, end = max(begin, window_start), min(end, window_end - 1.0)
        if len(spells):  # Apple's stages: every record inside the span, not only those over the core
            spells = sleep[(sleep[:, 1] > begin) & (sleep[:, 0] < end)]
        start = math.floor(begin / EPOCH_S) * EPOCH_S
        n = int((end - start) // EPOCH_S) + 1
        # the readings of the night and of the days before it (its resting heart rate)
        lo, hi = np.searchsorted(hr[:, 0], [start - dl.RESTING_HR_DAYS * 86400.0, start + n * EPOCH_S])
        steps = export.steps[(export.steps[:, 1] > start) & (export.steps[:, 0] < start + n * EPOCH_S)]
        day = epoch0 + timedelta(days=d)
        night = dl.night_from_arrays(day.isoformat(), EPOCH_S * np.arange(n, dtype=np.float64),
                                     np.full(n, -1, np.int8), np.column_stack([hr[lo:hi, 0] - start, hr[lo:hi, 1]]),
                                     steps=_spread(steps, start, n) if len(steps) else None)
        apple = None
        staged = spells[spells[:, 2] >= 0]
        if len(staged):
            apple = np.full(n, -1, np.int8)
            middle = start + EPOCH_S * (np.arange(n) + 0.5)
            for t0, t1, stage, _ in staged:
                apple[(middle >= t0) & (middle < t1)] = int(stage)
        yield HealthNight(day, float(start), offset, night, apple, export.path)


# ----------------------------------------------------------------------------- reports

NIGHT_COLUMNS = ("date", "start", "end", "time_in_bed_min", "total_sleep_time_min", "sleep_efficiency_pct",
                 "waso_min", "wake_min", "light_min", "deep_min", "rem_min", "no_data_min",
                 "heart_rate_coverage_pct", "apple_agreement_pct", "apple_kappa")


def report_night(model, scaler, checkpoint: dict, health_night: HealthNight, out_dir: Path, title: str,
                 checkpoint_path: str, mode: str, smooth: bool = True) -> tuple[dict, np.ndarray]:
    """The --hr report of one night in out_dir (stages.csv with Apple's stages beside ours where the
    export has them, hypnogram.png, summary.json/.txt); returns its summary and predicted stages."""
    recording = user_data.UserRecording(health_night.night, "iso", health_night.start_clock, None,
                                        {"apple_health": str(health_night.source)}, {})
    frame = user_data.predict_recording(model, scaler, checkpoint, recording, smooth=smooth)
    summary = user_data.night_summary(frame, recording, checkpoint_path, mode)
    apple = health_night.apple_stage
    if apple is not None:
        frame["apple_stage"] = apple
        agreement = evaluation.compute_metrics(apple.astype(np.int64), frame["pred"].to_numpy())
        summary["apple_stages"] = {
            "epochs_compared": agreement["n_epochs"], "agreement_pct": 100.0 * agreement["accuracy"],
            "kappa": agreement["kappa"],
            "note": "Apple's stages are the watch's own estimate, not polysomnography; neither is ground truth"}
        summary = user_data.json_safe(summary)
    user_data.write_report(frame, summary, recording, out_dir, title, reference=apple,
                           reference_label="Apple Watch stages (not PSG)")
    return summary, frame["pred"].to_numpy()


def night_row(summary: dict) -> dict:
    """One row of nights.csv."""
    m, stages, apple = summary["metrics"], summary["stages"], summary.get("apple_stages", {})
    return {"date": summary["subject"], "start": summary["start"], "end": summary["end"],
            "time_in_bed_min": m["time_in_bed_min"], "total_sleep_time_min": m["total_sleep_time_min"],
            "sleep_efficiency_pct": m["sleep_efficiency_pct"], "waso_min": m["waso_min"],
            "wake_min": stages["Wake"]["minutes"], "light_min": stages["Light"]["minutes"],
            "deep_min": stages["Deep"]["minutes"], "rem_min": stages["REM"]["minutes"],
            "no_data_min": summary["no_data_min"], "heart_rate_coverage_pct": summary["heart_rate_coverage_pct"],
            "apple_agreement_pct": apple.get("agreement_pct"), "apple_kappa": apple.get("kappa")}


def plot_diary(nights_staged: list[tuple[HealthNight, np.ndarray]], path: Path) -> None:
    """All nights as a sleep diary: a row per night, local clock time across, a colour per stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {0: "#d62728", 1: "#9ecae1", 2: "#08519c", 3: "#2ca02c", -1: "0.8"}
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(nights_staged) + 1.4))
    for row, (health_night, stages) in enumerate(nights_staged):
        clock = health_night.start_clock
        start_h = (clock.hour + clock.minute / 60 + clock.second / 3600 - NIGHT_FROM_H) % 24
        edges = np.flatnonzero(np.diff(np.concatenate([[-9], stages, [-9]])))
        for a, b in zip(edges[:-1], edges[1:]):
            ax.broken_barh([(start_h + a * EPOCH_S / 3600, (b - a) * EPOCH_S / 3600)], (row - 0.4, 0.8),
                           color=colours[int(stages[a])])
    ax.set_yticks(range(len(nights_staged)), [n.day.isoformat() for n, _ in nights_staged])
    ax.invert_yaxis()
    ticks = np.arange(0, 19, 2)
    ax.set_xticks(ticks, [f"{(NIGHT_FROM_H + int(t)) % 24:02d}:00" for t in ticks])
    ax.set_xlim(0, 24 - NIGHT_FROM_H + NIGHT_TO_H)
    ax.set_xlabel("local clock time")
    handles = [matplotlib.patches.Patch(color=colours[c], label=name)
               for c, name in ((0, "Wake"), (1, "Light"), (2, "Deep"), (3, "REM"), (-1, "no data"))]
    ax.legend(handles=handles, loc="upper right", fontsize=8)  # mornings after 08:00 are mostly empty
    ax.set_title("sleep diary (predicted stages)")
    evaluation.save_figure(fig, path)


def report_export(model, scaler, checkpoint: dict, export: HealthExport, out_dir: str | Path, arch: str,
                  checkpoint_path: str, mode: str, only: date | None = None, smooth: bool = True,
                  progress: bool = True, since: date | None = None, until: date | None = None) -> list[dict]:
    """A report per night in out_dir/<date>/, then nights.csv and diary.png across the nights."""
    out = Path(out_dir)
    summaries, staged = [], []
    iterator = nights(export, only, since, until)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="staging nights", unit="night", leave=False)
    for health_night in iterator:
        title = f"{arch} [{mode}] night of {health_night.day.isoformat()}"
        summary, stages = report_night(model, scaler, checkpoint, health_night, out / health_night.day.isoformat(),
                                       title, checkpoint_path, mode, smooth)
        summaries.append(summary)
        staged.append((health_night, stages))
    if not summaries:
        raise dl.DataError(f"{export.path}: no night with at least {MIN_READINGS} heart-rate readings between "
                           f"00:00 and {CORE_TO_H:02d}:00 over an hour or more"
                           + (f" for the night of {only.isoformat()}" if only else ""))
    table = pd.DataFrame([night_row(s) for s in summaries], columns=list(NIGHT_COLUMNS))
    atomic_write(out / "nights.csv", lambda f: f.write(table.to_csv(index=False, float_format="%.1f").encode()))
    plot_diary(staged[-MAX_DIARY_NIGHTS:], out / "diary.png")
    return summaries
