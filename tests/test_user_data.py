"""Sleep reports on a user's own recordings (user_data.py, inference*.py --hr/--motion/--steps).

Hand-made CSVs (seconds and ISO-8601 with and without UTC offset, header variants, counts and raw
x, y, z), one error test per kind of bad input, and a real bundled night exported to user-CSV form
that must give the offline evaluation's stages. One tiny offline hybrid is trained for the file.
"""
import json
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
import torch

import data_loader as dl
import features
import evaluation
import inference_cli
import sleep_metrics as sm
import training
import user_data
from checkpoint import load_model_from_checkpoint

TINY_HYBRID = {"channels": 16, "kernel_size": 3, "n_layers": 1, "n_heads": 2}
PROB_COLUMNS = ["p_wake", "p_light", "p_deep", "p_rem"]
T0 = 1_000_012.5  # seconds, any origin: epoch 0 starts at 999,990 (floored to 30 s)
CET = timezone(timedelta(hours=1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; kind to a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def offline_ckpt(small_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("offline-hybrid")
    argv = ["--data-dir", str(small_data_dir), "--out-dir", str(out), "--epochs", "1", "--stride", "25",
            "--batch-size", "64"]
    assert training.run("hybrid", TINY_HYBRID, training.TrainConfig(), argv) == 0
    return out / "model.pth"


# ----------------------------------------------------------------------------- hand-made recordings

def hr_rows(duration_s=3600.0, t0=T0, step=7.0):
    t = t0 + np.arange(0.0, duration_s, step)
    return np.column_stack([t, np.round(62.0 + 6.0 * np.sin((t - t0) / 400.0), 2)])


def count_rows(duration_s=3600.0, t0=T0 + 3.0):
    t = t0 + np.arange(0.0, duration_s, 15.0)
    return np.column_stack([t, np.round(np.clip(80.0 * np.sin((t - t0) / 700.0), 0, None), 2)])


def step_rows(duration_s=3600.0, t0=T0 + 300.0):
    t = t0 + np.arange(0.0, duration_s - 600.0, 60.0)
    return np.column_stack([t, (np.arange(len(t)) % 7 == 0) * 12.0])


def write(path, header, rows, sep=",", time_fmt=None):
    """A user CSV: header (list of names, or None for headerless), rows of [t, values...]."""
    lines = [sep.join(header)] if header else []
    for row in rows:
        t = time_fmt(row[0]) if time_fmt else f"{row[0]:.3f}"
        lines.append(sep.join([t] + [f"{v:g}" for v in row[1:]]))
    path.write_text("\n".join(lines) + "\n")
    return path


def iso(tz=CET, base=datetime(2024, 3, 1, 22, 0, 0, tzinfo=timezone.utc), sep="T"):
    """Seconds -> ISO date-times: 999,990 s (the floored start of T0) maps to base."""
    def fmt(t):
        moment = base + timedelta(seconds=t - 999_990.0)
        if tz is None:
            return moment.replace(tzinfo=None).isoformat(sep=sep, timespec="milliseconds")
        text = moment.astimezone(tz).isoformat(sep=sep, timespec="milliseconds")
        return text.replace("+00:00", "Z") if tz == timezone.utc else text
    return fmt


def expected_night(hr, counts=None, motion=None, steps=None, origin=999_990.0, end=None):
    """night_from_arrays on the same rows, shifted to the floored start: what the report must build."""
    last = max(hr[-1, 0], (counts if counts is not None else motion)[-1, 0]) if end is None else end
    n = int((last - origin) // 30) + 1

    def shift(a):
        return None if a is None else np.column_stack([a[:, 0] - origin, a[:, 1:]])
    return dl.night_from_arrays("x", 30.0 * np.arange(n), np.full(n, -1, np.int8), shift(hr), shift(motion),
                                shift(counts), shift(steps))


def assert_same_night(night, expected):
    assert len(night) == len(expected)
    for name in dl.Night.ARRAYS:
        np.testing.assert_allclose(getattr(night, name), getattr(expected, name), rtol=0, atol=1e-9,
                                   equal_nan=True, err_msg=name)


@pytest.mark.parametrize("hr_header,count_header,steps_header,sep", [
    (["timestamp", "heart_rate"], ["timestamp", "count"], ["timestamp", "steps"], ","),
    (["Time", "HR"], ["TIME", "Counts"], ["time", "Step_Count"], "\t"),
    (["t", "BPM"], ["seconds", "activity"], ["T", "steps"], ";"),
    (["seconds", "Heart-Rate"], ["t", "counts"], ["seconds", "step-count"], " "),
    (["Timestamp", "Heart Rate"], ["Time", "Activity"], ["t", "Steps"], ","),
])
def test_seconds_with_header_variants(tmp_path, hr_header, count_header, steps_header, sep):
    hr, counts, steps = hr_rows(), count_rows(), step_rows()
    rec = user_data.load_recording(write(tmp_path / "hr.csv", hr_header, hr, sep),
                                   write(tmp_path / "counts.csv", count_header, counts, sep),
                                   write(tmp_path / "steps.csv", steps_header, steps, sep))
    assert rec.time_format == "seconds" and rec.origin_s == 999_990.0 and rec.start_clock is None
    assert rec.clock_times() is None and rec.night.subject_id == "hr"
    assert_same_night(rec.night, expected_night(hr, counts=counts, steps=steps))
    assert (rec.night.stage == -1).all() and rec.night.report["motion_source"] == "counts"
    assert rec.night.epoch_start_s[0] == 0 and len(rec.night) == 121  # 999990 .. last reading 1003605.5


@pytest.mark.parametrize("tz,sep", [(CET, " "), (timezone.utc, "T"), (timezone(timedelta(hours=-5)), "T"),
                                    (None, "T")])
def test_iso_times_with_and_without_offset_give_the_seconds_night(tmp_path, tz, sep):
    hr, counts = hr_rows(), count_rows()
    fmt = iso(tz, sep=sep)
    rec = user_data.load_recording(write(tmp_path / "hr.csv", ["datetime", "bpm"], hr, time_fmt=fmt),
                                   write(tmp_path / "c.csv", ["timestamp", "counts"], counts, time_fmt=fmt))
    assert_same_night(rec.night, expected_night(hr, counts=counts))
    start = datetime(2024, 3, 1, 22, 0, 0, tzinfo=timezone.utc)  # first reading 22:00:22.5 floored to 30 s
    if tz is None:
        assert rec.time_format == "iso-naive" and rec.start_clock == start.replace(tzinfo=None)
    else:
        assert rec.time_format == "iso" and rec.start_clock == start and rec.start_clock.utcoffset() == tz.utcoffset(None)
    clock = rec.clock_times()
    assert len(clock) == len(rec.night) and clock[0] == rec.start_clock.isoformat()
    assert datetime.fromisoformat(clock[2]) - datetime.fromisoformat(clock[0]) == timedelta(seconds=60)


def test_raw_acceleration_gives_walch_counts_and_headerless_files_are_physionet_style(tmp_path):
    hr = hr_rows(600.0)
    t = T0 + np.arange(0.0, 600.0, 0.02)
    rng = np.random.default_rng(0)
    motion = np.column_stack([t, 0.1 * rng.normal(size=len(t)), 0.1 * rng.normal(size=len(t)),
                              -1.0 + 0.3 * np.sin(2 * np.pi * 5 * t) * (np.sin(t / 60) > 0)])
    motion = np.round(motion, 5)
    with_header = user_data.load_recording(write(tmp_path / "hr.csv", ["t", "hr"], hr),
                                           write(tmp_path / "acc.csv", ["timestamp", "X", "Y", "Z"], motion))
    expected = expected_night(hr, motion=motion)
    assert with_header.night.report["motion_source"] == "raw"
    assert_same_night(with_header.night, expected)
    assert np.nanmax(with_header.night.activity_count) > 0
    # the same rows without header, as the PhysioNet files are written (t,bpm and t x y z)
    (tmp_path / "hr.txt").write_text("\n".join(f"{a:.3f},{b:g}" for a, b in hr) + "\n")
    (tmp_path / "acc.txt").write_text("\n".join(" ".join(f"{v:.5f}" for v in r) for r in motion) + "\n")
    headerless = user_data.load_recording(tmp_path / "hr.txt", tmp_path / "acc.txt")
    assert_same_night(headerless.night, expected)
    # a headerless 2-column motion file is counts
    counts = count_rows(600.0)
    (tmp_path / "counts.txt").write_text("\n".join(f"{a:.3f},{b:g}" for a, b in counts) + "\n")
    rec = user_data.load_recording(tmp_path / "hr.txt", tmp_path / "counts.txt")
    assert rec.night.report["motion_source"] == "counts"
    assert_same_night(rec.night, expected_night(hr, counts=counts))


def test_one_combined_export_serves_as_heart_rate_and_motion_and_bad_rows_follow_the_input_rules(tmp_path):
    hr = hr_rows(900.0)
    path = tmp_path / "export.csv"
    lines = ["timestamp,heart_rate,counts"]
    for i, (t, bpm) in enumerate(hr):
        count = f"{i % 40:g}" if i % 2 == 0 else ""          # counts in every other row
        lines.append(f"{t:.3f},{bpm:g},{count}")
    lines[5] = f"{hr[4, 0]:.3f},300,"                          # implausible heart rate: dropped
    lines.insert(9, "")                                         # blank line: ignored
    lines.append(f"{hr[2, 0]:.3f},70,")                         # duplicate timestamp, out of order
    lines.append(f"{hr[-1, 0] + 3:.3f},nan,")                   # NaN: dropped
    path.write_text("\n".join(lines) + "\n")
    rec = user_data.load_recording(path, path)
    assert rec.notes["heart_rate"] == {"out_of_range": 1, "non_finite": 1, "unsorted": True, "duplicates": 1}
    assert rec.notes["counts"] == {"missing": len(hr) // 2 + 3}  # empty cells: odd rows, row 4, the two added
    kept = np.delete(hr, 4, axis=0)
    counts = np.array([[t, float(i % 40)] for i, (t, _) in enumerate(hr) if i % 2 == 0 and i != 4])
    assert_same_night(rec.night, expected_night(kept, counts=counts))


# ----------------------------------------------------------------------------- bad input: clear errors

def bad_case(tmp_path, name):
    hr, counts = hr_rows(300.0), count_rows(300.0)
    good_hr = write(tmp_path / "hr.csv", ["timestamp", "heart_rate"], hr)
    good_counts = write(tmp_path / "counts.csv", ["timestamp", "counts"], counts)
    if name == "unknown column":
        return write(tmp_path / "bad.csv", ["timestamp", "spo2"], hr), good_counts, \
            [r"bad\.csv, line 1: unknown column\(s\) \['spo2'\]", "heart_rate, hr, bpm", "timestamp, time, t"]
    if name == "two heart-rate columns":
        return write(tmp_path / "bad.csv", ["t", "hr", "bpm"], np.column_stack([hr, hr[:, 1]])), good_counts, \
            [r"bad\.csv, line 1: several heart-rate columns \['hr', 'bpm'\]; keep one"]
    if name == "missing time column":
        (tmp_path / "bad.csv").write_text("heart_rate\n60\n61\n")
        return tmp_path / "bad.csv", good_counts, [r"bad\.csv, line 1: no time column"]
    if name == "no heart-rate column":
        return good_counts, good_counts, [r"counts\.csv, line 1: no heart-rate column; name it one of heart_rate, hr, bpm"]
    if name == "no motion column":
        return good_hr, good_hr, [r"hr\.csv, line 1: no motion columns"]
    if name == "partial x,y,z":
        (tmp_path / "bad.csv").write_text("t,x,y\n0,0.1,0.2\n")
        return good_hr, tmp_path / "bad.csv", [r"bad\.csv, line 1: no motion columns \(found \['x', 'y'\], missing \['z'\]\)"]
    if name == "unparseable time":
        text = (tmp_path / "hr.csv").read_text().splitlines()
        text[4] = "yesterday 11pm," + text[4].split(",")[1]
        (tmp_path / "bad.csv").write_text("\n".join(text) + "\n")
        return tmp_path / "bad.csv", good_counts, [r"bad\.csv, line 5: timestamp 'yesterday 11pm' is not a number"]
    if name == "unparseable date-time":
        lines = ["time,hr", "2024-03-01T23:00:00Z,60", "2024-03-01T23:00:05Z,61", "2024-03-01T25:00:10Z,62"]
        (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
        return tmp_path / "bad.csv", good_counts, [r"bad\.csv, line 4: time '2024-03-01T25:00:10Z' is not an ISO-8601"]
    if name == "offset mixed with naive":
        lines = ["time,hr", "2024-03-01T23:00:00+01:00,60", "2024-03-01T23:00:05,61"]
        (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
        return tmp_path / "bad.csv", good_counts, [r"bad\.csv, line 3: time '2024-03-01T23:00:05' mixes date-times"]
    if name == "seconds and date-times across files":
        lines = ["time,hr", "2024-03-01T23:00:00Z,60", "2024-03-01T23:00:05Z,61"]
        (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
        return tmp_path / "bad.csv", good_counts, ["different kinds of time", r"bad\.csv: date-times with UTC offset",
                                                   r"counts\.csv: seconds"]
    if name == "text for a number":
        text = (tmp_path / "hr.csv").read_text().splitlines()
        text[3] = text[3].split(",")[0] + ",sixty"
        (tmp_path / "bad.csv").write_text("\n".join(text) + "\n")
        return tmp_path / "bad.csv", good_counts, [r"bad\.csv, line 4: heart_rate 'sixty' is not a number"]
    if name == "wrong field count":
        text = (tmp_path / "counts.csv").read_text().splitlines()
        text[6] = text[6] + ",5"
        (tmp_path / "bad.csv").write_text("\n".join(text) + "\n")
        return good_hr, tmp_path / "bad.csv", [r"bad\.csv, line 7: expected 2 fields as in the header, found 3"]
    if name == "short row":
        text = (tmp_path / "counts.csv").read_text().splitlines()
        text[3] = text[3].split(",")[0]
        (tmp_path / "bad.csv").write_text("\n".join(text) + "\n")
        return good_hr, tmp_path / "bad.csv", [r"bad\.csv, line 4: expected 2 fields as in the header, found 1"]
    if name == "empty file":
        (tmp_path / "bad.csv").write_text("\n\n")
        return tmp_path / "bad.csv", good_counts, [r"bad\.csv: empty file"]
    if name == "header only":
        (tmp_path / "bad.csv").write_text("timestamp,hr\n")
        return tmp_path / "bad.csv", good_counts, [r"bad\.csv: a header but no data rows"]
    if name == "no valid heart rate":
        return write(tmp_path / "bad.csv", ["t", "hr"], np.column_stack([hr[:, 0], hr[:, 1] * 0 + 400])), \
            good_counts, [r"bad\.csv: no valid heart-rate rows \(dropped: \{'out_of_range': \d+\}\)"]
    if name == "headerless with wrong columns":
        (tmp_path / "bad.txt").write_text("0 0.1 0.2\n1 0.1 0.2\n")
        return good_hr, tmp_path / "bad.txt", [r"bad\.txt: a headerless motion file has 4 columns .* found 3"]
    if name == "longer than one night":
        return write(tmp_path / "ms.csv", ["t", "hr"], np.column_stack([hr[:, 0] * 1000, hr[:, 1]])), \
            write(tmp_path / "ms_counts.csv", ["t", "counts"], np.column_stack([counts[:, 0] * 1000, counts[:, 1]])), \
            ["the recording spans .* h", "not milliseconds"]
    if name == "missing file":
        return tmp_path / "nope.csv", good_counts, [r"nope\.csv: no such file"]
    if name == "only empty cells":
        (tmp_path / "bad.csv").write_text("timestamp,hr\n , \n\x0b\n")
        return tmp_path / "bad.csv", good_counts, [r"bad\.csv: no data row has both a time and a value"]
    if name == "truncated gzip":
        (tmp_path / "bad.csv.gz").write_bytes(b"\x1f\x8b")
        return tmp_path / "bad.csv.gz", good_counts, [r"bad\.csv\.gz: cannot read as text or gzip"]
    raise AssertionError(name)


BAD_CASES = ["unknown column", "two heart-rate columns", "missing time column", "no heart-rate column", "no motion column",
             "partial x,y,z", "unparseable time", "unparseable date-time", "offset mixed with naive",
             "seconds and date-times across files", "text for a number", "wrong field count", "short row",
             "empty file", "header only", "no valid heart rate", "headerless with wrong columns",
             "longer than one night", "missing file", "truncated gzip", "only empty cells"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_names_file_line_and_value(tmp_path, case):
    hr, motion, patterns = bad_case(tmp_path, case)
    with pytest.raises(dl.DataError) as info:
        user_data.load_recording(hr, motion)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_cli_bad_input_is_an_error_message_and_exit_code(tmp_path, offline_ckpt, capsys):
    hr, motion, _ = bad_case(tmp_path, "unknown column")
    assert inference_cli.main("hybrid", offline_ckpt, ["--hr", str(hr), "--motion", str(motion),
                                                    "--out-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown column(s) ['spo2']" in err and "accepted column names" in err
    assert not (tmp_path / "out").exists()


def comma_decimals(path, sep):
    """The file rewritten as a European spreadsheet writes it: another separator, decimal commas."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0].replace(",", sep)] + [line.replace(",", sep).replace(".", ",")
                                                               for line in lines[1:]]) + "\n")
    return path


@pytest.mark.parametrize("hr_header,count_header,sep", [
    (["Time", "Heart Rate (bpm)"], ["Time", "Activity Count"], ","),
    (["Timestamp [s]", "HR (count/min)"], ["time (s)", "Counts [counts]"], ","),
    (["Time", "Heart Rate (bpm)"], ["Time", "Counts"], ";"),       # decimal commas in a semicolon file
    (["seconds", "Pulse (beats/min)"], ["t", "activity"], "\t"),  # ... and in a tab-separated one
    (["Start", "heartRate"], ["start time", "count"], ","),
    (["Date/Time", "Heart.Rate [bpm]"], ["date-time", "activity counts"], ","),
])
def test_common_export_spellings_and_decimal_commas_give_the_same_night(tmp_path, hr_header, count_header, sep):
    hr, counts = hr_rows(), count_rows()
    hr_path = write(tmp_path / "hr.csv", hr_header, hr)
    count_path = write(tmp_path / "counts.csv", count_header, counts)
    if sep != ",":
        comma_decimals(hr_path, sep), comma_decimals(count_path, sep)
        assert "," in hr_path.read_text().splitlines()[1]  # the times and values have decimal commas now
    rec = user_data.load_recording(hr_path, count_path)
    assert rec.time_format == "seconds" and rec.origin_s == 999_990.0
    assert_same_night(rec.night, expected_night(hr, counts=counts))


def test_iso_times_with_decimal_comma_values_in_a_semicolon_file(tmp_path):
    hr = hr_rows(600.0)
    path = tmp_path / "hr.csv"
    path.write_text("Time;Heart Rate (bpm)\n" + "".join(f"{iso(CET)(t)};{str(v).replace('.', ',')}\n" for t, v in hr))
    signal = user_data.read_user_signal(path, "heart_rate")
    np.testing.assert_allclose(signal.values[:, 0], hr[:, 1])
    assert signal.time_format == "iso" and len(signal.time) == len(hr)


@pytest.mark.parametrize("text,patterns", [
    ("Time (ms),hr\n0,60\n", [r"line 1: column 'Time \(ms\)': unit 'ms' is not taken for time \(accepted: s, sec"]),
    ("t,hr\n0,60\n", None),  # the control: the same file without a unit is fine
    ("t,Heart Rate (Hz)\n0,1\n", [r"unit 'hz' is not taken for heart rate \(accepted: bpm, beats/min"]),
    ("Date,Time,HR\n2024-03-01,23:00:00,60\n",
     [r"several time columns \['time', 'date'\]; keep one \(a date and a time in separate columns: join them"]),
    ('Time,HR\n0,"97,5"\n5,96\n',
     [r"line 2: hr '97,5' is not a number \(a decimal comma is read in semicolon- or tab-separated files only"]),
    ("Time;HR\n0;1.097,5\n", [r"line 2: hr '1\.097,5' is not a number \(accepted: 97, 97\.5, 97,5"]),
    ("Time,Heart Rate (bpm),SpO2 (%)\n0,60,97\n", [r"unknown column\(s\) \['SpO2 \(%\)'\]", "accepted column names",
                                                   r"a unit may follow in brackets, e\.g\. 'Heart Rate \(bpm\)'"]),
])
def test_ambiguous_columns_and_numbers_are_refused_saying_what_is_accepted(tmp_path, text, patterns):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    if patterns is None:
        assert user_data.read_user_signal(path, "heart_rate").values[0, 0] == 60
        return
    with pytest.raises(dl.DataError) as info:
        user_data.read_user_signal(path, "heart_rate")
    assert str(info.value).startswith(f"{path}")
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_archive_xml_or_binary_given_as_a_csv_says_what_it_is(tmp_path, offline_ckpt, capsys):
    import zipfile
    import synthetic
    health_zip = tmp_path / "export.zip"
    synthetic.write_health_export(health_zip, n_nights=1)
    health_xml = tmp_path / "export.xml"
    synthetic.write_health_export(health_xml, n_nights=1, as_zip=False)
    other_zip = tmp_path / "data.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("hr.csv", "t,hr\n0,60\n")
    other_xml = tmp_path / "page.xml"
    other_xml.write_text("<?xml version='1.0'?>\n<html><body>heart, rate</body></html>\n")
    binary = tmp_path / "hr.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    utf16 = tmp_path / "hr_unicode.txt"
    utf16.write_bytes("Time\tHR\n0\t60\n".encode("utf-16"))  # with its byte-order mark
    cases = [(health_zip, "an Apple Health export (a zip holding export.xml), not a CSV: read it with "
                          f"--apple-health {health_zip} instead of --hr"),
             (health_xml, f"an Apple Health export (XML), not a CSV: read it with --apple-health {health_xml} "
                          "instead of --hr"),
             (other_zip, "a zip archive, not a CSV/TSV text file: unpack the CSV inside"),
             (other_xml, "an XML file, not a CSV/TSV text file (an Apple Health export.xml goes to --apple-health)"),
             (binary, "a binary file, not a CSV/TSV text file"),
             (utf16, "UTF-16 text (as Excel's \"Unicode text\" writes it); save it as CSV in UTF-8")]
    for path, message in cases:
        assert inference_cli.main("hybrid", offline_ckpt, ["--hr", str(path), "--out-dir", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err == f"error: {path}: {message}" + err[len(f"error: {path}: {message}"):]
        assert len(err) < 300 and "\\x" not in err and "unknown column" not in err  # no bytes of the file
    with pytest.raises(dl.DataError, match="instead of --motion"):
        user_data.read_user_signal(health_zip, "motion")
    assert not (tmp_path / "out").exists()


def test_unknown_columns_are_shown_shortened(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("t,hr," + ",".join("q" * 300 + str(i) for i in range(10)) + "\n" + "0,60" + ",1" * 10 + "\n")
    with pytest.raises(dl.DataError) as info:
        user_data.read_user_signal(path, "heart_rate")
    assert "'" + "q" * 40 + "...'" in str(info.value) and "'...'" in str(info.value)
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize("argv,message", [
    (["--steps", "s.csv"], "give --hr FILE and/or --motion FILE too"),
    (["--out-dir", "out"], "give --hr FILE and/or --motion FILE too"),
    (["--hr", "h.csv", "--motion", "m.csv", "--realtime"], "does not go with --realtime"),
    (["--hr", "h.csv", "--motion", "m.csv", "--sleep-metrics"], "does not go with --sleep-metrics"),
])
def test_cli_flag_combinations(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference_cli.main("hybrid", "unused.pth", argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------------- the report

def test_report_writes_stages_hypnogram_and_summary(tmp_path, offline_ckpt, capsys):
    hr, counts, steps = hr_rows(2 * 3600.0), count_rows(2 * 3600.0), step_rows(2 * 3600.0)
    fmt = iso(CET, sep=" ")
    args = ["--hr", str(write(tmp_path / "night_hr.csv", ["timestamp", "heart_rate"], hr, time_fmt=fmt)),
            "--motion", str(write(tmp_path / "night_counts.csv", ["timestamp", "counts"], counts, time_fmt=fmt)),
            "--steps", str(write(tmp_path / "night_steps.csv", ["timestamp", "steps"], steps, time_fmt=fmt)),
            "--out-dir", str(tmp_path / "report")]
    assert inference_cli.main("hybrid", offline_ckpt, args) == 0
    out = capsys.readouterr().out
    report = tmp_path / "report"
    frame = pd.read_csv(report / "stages.csv")
    expected_columns = list(evaluation.PREDICTION_COLUMNS)
    expected_columns.insert(2, "clock_time")
    assert list(frame.columns) == expected_columns
    assert len(frame) == 241 and (frame["true_stage"] == -1).all() and (frame["subject"] == "night_hr").all()
    assert frame["clock_time"].iloc[0] == "2024-03-01T23:00:00+01:00" and frame["epoch_start_s"].iloc[1] == 30
    np.testing.assert_allclose(frame[PROB_COLUMNS].sum(axis=1), 1.0, atol=1e-4)
    assert (report / "hypnogram.png").stat().st_size > 5000
    summary = json.loads((report / "summary.json").read_text())
    metrics = sm.sleep_metrics(frame["pred"].to_numpy())
    for name in sm.METRICS:
        value = summary["metrics"][name]
        assert (value is None and np.isnan(metrics[name])) or value == pytest.approx(metrics[name]), name
    assert summary["metrics"]["time_in_bed_min"] == 120.5 and summary["epochs"] == 241
    assert summary["start"] == "2024-03-01T23:00:00+01:00" and summary["end"] == "2024-03-02T01:00:30+01:00"
    assert sum(s["minutes"] for s in summary["stages"].values()) == 120.5
    assert summary["motion_source"] == "counts" and summary["mode"].startswith("offline")
    text = (report / "summary.txt").read_text()
    for words in ("time in bed", "total sleep time", "sleep efficiency", "sleep-onset latency", "WASO",
                  "REM latency", "awakenings", "% of sleep"):
        assert words in text and words in out


def test_sparse_heart_rate_alone_with_a_watch_off_hour_reports_no_data_there(tmp_path, offline_ckpt, capsys):
    # heart rate every 5 min, ISO times, no motion file: 2 h, the watch off for 1 h, 1 h more
    hr = hr_rows(4 * 3600.0, step=300.0)
    hr = hr[(hr[:, 0] < T0 + 2 * 3600) | (hr[:, 0] >= T0 + 3 * 3600)]
    path = write(tmp_path / "hr.csv", ["timestamp", "heart_rate"], hr, time_fmt=iso(CET))
    assert inference_cli.main("hybrid", offline_ckpt, ["--hr", str(path), "--out-dir", str(tmp_path / "r")]) == 0
    frame = pd.read_csv(tmp_path / "r" / "stages.csv")
    minutes = (frame["epoch_start_s"] - frame["epoch_start_s"].iloc[0]) / 60.0
    no_data = frame["pred"] == -1
    # the stretch without readings (the last reading before it at 115 min, the next at 180 min) gets no stage
    assert no_data[(minutes > 116) & (minutes < 179)].all() and not no_data[minutes < 110].any()
    assert frame.loc[no_data, PROB_COLUMNS].isna().all().all()  # empty cells in the CSV
    assert frame.loc[~no_data, "pred"].between(0, 3).all()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    staged = frame.loc[~no_data, "pred"].to_numpy()
    assert summary["no_data_min"] == pytest.approx(no_data.sum() * 0.5)
    assert summary["metrics"]["time_in_bed_min"] == pytest.approx(len(staged) * 0.5)  # no-data minutes left out
    assert summary["metrics"]["total_sleep_time_min"] == pytest.approx((staged >= 1).sum() * 0.5)
    assert "no data" in (tmp_path / "r" / "summary.txt").read_text() and "no data" in capsys.readouterr().out
    assert summary["heart_rate_coverage_pct"] < 15 and summary["motion_coverage_pct"] == 0


@pytest.mark.parametrize("minutes,step_s,refused", [(5.0, 300.0, True), (55.0, 60.0, True), (65.0, 60.0, False)])
def test_a_recording_with_too_little_data_is_refused(tmp_path, offline_ckpt, capsys, minutes, step_s, refused):
    # 2 readings 5 min apart gave "efficiency 100%, 45.5% Deep"; below MIN_REPORT_MIN nothing is reported
    hr = hr_rows(minutes * 60.0 + 1.0, step=step_s)
    path = write(tmp_path / "hr.csv", ["timestamp", "heart_rate"], hr, time_fmt=iso(CET))
    code = inference_cli.main("hybrid", offline_ckpt, ["--hr", str(path), "--out-dir", str(tmp_path / "r")])
    captured = capsys.readouterr()
    if not refused:
        assert code == 0 and (tmp_path / "r" / "summary.json").is_file()
        return
    assert code == 1 and not (tmp_path / "r").exists() and "efficiency" not in captured.out
    assert captured.err.startswith(f"error: {path}: only ")
    assert f"a sleep report needs at least {user_data.MIN_REPORT_MIN:g} min with data" in captured.err
    assert user_data.MIN_REPORT_MIN == 60


def test_a_watch_off_stretch_counts_against_the_minimum(tmp_path, offline_ckpt, capsys):
    # 2 h from the first reading to the last, but readings only in its first and last 20 min
    hr = hr_rows(2 * 3600.0, step=60.0)
    hr = hr[(hr[:, 0] < T0 + 1200) | (hr[:, 0] > T0 + 6000)]
    path = write(tmp_path / "hr.csv", ["t", "hr"], hr)
    assert inference_cli.main("hybrid", offline_ckpt, ["--hr", str(path), "--out-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert re.search(r"only \d+(\.\d)? min with heart rate or motion \(of 119\.5 min", err), err


@pytest.mark.parametrize("start,label", [
    (datetime(2024, 3, 1, 22, 0, tzinfo=CET), "night of 2024-03-01"),
    (datetime(2024, 3, 2, 0, 30, tzinfo=CET), "night of 2024-03-01"),   # after midnight: still that evening's night
    (datetime(2024, 3, 2, 0, 30), "night of 2024-03-01"),                # wall-clock times without offset
    (None, "night in recording_hr.csv"),                                  # seconds: no date to name it by
])
def test_report_is_titled_by_its_night_not_by_the_file(tmp_path, offline_ckpt, capsys, monkeypatch, start, label):
    titles = []
    plot = evaluation.plot_hypnogram
    monkeypatch.setattr(evaluation, "plot_hypnogram", lambda frame, path, title="", **kw: (titles.append(title),
                                                                                          plot(frame, path, title, **kw)))
    hr = hr_rows(2 * 3600.0, step=60.0)
    if start is None:
        fmt = None
    else:
        def fmt(t):
            moment = start + timedelta(seconds=t - 999_990.0)
            return moment.isoformat()
    path = write(tmp_path / "recording_hr.csv", ["timestamp", "heart_rate"], hr, time_fmt=fmt)
    assert inference_cli.main("hybrid", offline_ckpt, ["--hr", str(path), "--out-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert titles and titles[0].split("] ", 1)[1].startswith(f"{label}: total sleep ")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["night"] == label and summary["subject"] == "recording_hr"
    assert out.startswith(f"Night summary: {label} (")


def test_heart_rate_alone_says_no_motion_plainly(tmp_path, offline_ckpt, capsys):
    path = write(tmp_path / "hr.csv", ["t", "hr"], hr_rows(2 * 3600.0, step=60.0))
    assert inference_cli.main("hybrid", offline_ckpt, ["--hr", str(path), "--out-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\]; no motion \(staged from heart rate alone\); heart rate in \d+% of epochs", out), out
    assert "motion from" not in out and "no file" not in out
    counts = write(tmp_path / "counts.csv", ["t", "counts"], count_rows(2 * 3600.0))
    assert inference_cli.main("hybrid", offline_ckpt, ["--hr", str(path), "--motion", str(counts),
                                                    "--out-dir", str(tmp_path / "r2")]) == 0
    assert "; motion: activity counts; " in capsys.readouterr().out


def test_motion_alone_gives_a_report(tmp_path, offline_ckpt):
    counts = write(tmp_path / "counts.csv", ["t", "counts"], count_rows(3600.0))
    assert inference_cli.main("hybrid", offline_ckpt, ["--motion", str(counts), "--out-dir", str(tmp_path / "r")]) == 0
    frame = pd.read_csv(tmp_path / "r" / "stages.csv")
    assert len(frame) == 121 and frame["pred"].between(0, 3).all() and frame["subject"].iloc[0] == "counts"


def test_hypnogram_without_psg_and_with_clock_axis(tmp_path):
    n = 200
    probs = np.random.default_rng(1).dirichlet(np.ones(4), size=n)
    frame = pd.DataFrame({"subject": "u", "epoch_start_s": 30 * np.arange(n), "true_stage": -1,
                          "pred": probs.argmax(1), **dict(zip(PROB_COLUMNS, probs.T))})
    evaluation.plot_hypnogram(frame, tmp_path / "a.png", "no PSG")
    evaluation.plot_hypnogram(frame, tmp_path / "b.png", "clock", start_clock=datetime(2024, 3, 1, 23, 7, tzinfo=CET))
    assert (tmp_path / "a.png").stat().st_size > 5000 and (tmp_path / "b.png").stat().st_size > 5000


def test_real_night_exported_to_user_csv_gives_the_offline_evaluation_stages(small_data_dir, offline_ckpt, tmp_path):
    subject = "46343"
    files = dl.subject_files(small_data_dir, subject)
    epochs, _ = dl.read_labels(files["labels"])
    end = epochs[-1] + 30
    base = datetime(2024, 3, 1, 22, 0, 0, tzinfo=CET)  # a 30 s boundary: the epoch grids align
    exported = {}
    for kind, column in (("heart_rate", "heart_rate"), ("counts", "count")):
        rows = dl.read_signal(files[kind], 2)
        rows = rows[(rows[:, 0] >= 0) & (rows[:, 0] < end)]  # the PSG window, as the loader crops
        exported[kind] = rows
        lines = [f"timestamp,{column}"] + [f"{(base + timedelta(seconds=float(t))).isoformat(timespec='microseconds')},"
                                           f"{v:.6f}" for t, v in rows]
        (tmp_path / f"{kind}.csv").write_text("\n".join(lines) + "\n")
    # the grid aligns: the first reading lies in the first PSG epoch, the last one in the last
    assert 0 <= min(r[0, 0] for r in exported.values()) < 30 and end - 30 <= max(r[-1, 0] for r in exported.values())
    model, scaler, ckpt = load_model_from_checkpoint(offline_ckpt)
    recording = user_data.load_recording(tmp_path / "heart_rate.csv", tmp_path / "counts.csv")
    report = user_data.predict_recording(model, scaler, ckpt, recording)
    (night,) = dl.load_nights(small_data_dir, [subject], cache_dir=None)
    expected = evaluation.predict_nights(model, scaler, ckpt, [night])
    assert len(report) == len(expected) == 567
    np.testing.assert_array_equal(report["epoch_start_s"], expected["epoch_start_s"])
    np.testing.assert_array_equal(report["pred"], expected["pred"])
    np.testing.assert_allclose(report[PROB_COLUMNS], expected[PROB_COLUMNS], rtol=0, atol=1e-6)
    assert report["clock_time"].iloc[0] == "2024-03-01T22:00:00+01:00"


def untrained_causal_checkpoint(path):
    """(model, scaler, names) of an untrained tiny causal hybrid saved at path."""
    from checkpoint import build_model, make_checkpoint, save_checkpoint
    torch.manual_seed(0)
    names = features.DEFAULT_FEATURES
    model = build_model("hybrid", {**TINY_HYBRID, "n_features": len(names), "causal": True}).eval()
    scaler = dl.FeatureScaler(np.zeros(len(names), np.float32), np.ones(len(names), np.float32))
    save_checkpoint(make_checkpoint(model, "hybrid", features=list(names), seq_len=25, target_pos=24, scaler=scaler),
                    path)
    return model, scaler, names


def test_a_causal_checkpoint_works_too(tmp_path):
    model, scaler, names = untrained_causal_checkpoint(tmp_path / "causal.pth")
    hr = write(tmp_path / "hr.csv", ["t", "hr"], hr_rows(3600.0))
    counts = write(tmp_path / "counts.csv", ["t", "counts"], count_rows(3600.0))
    assert inference_cli.main("hybrid", tmp_path / "unused.pth", ["--checkpoint", str(tmp_path / "causal.pth"), "--hr", str(hr),
                                                               "--motion", str(counts), "--out-dir", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["mode"].startswith("causal") and summary["epochs"] == 121 and summary["start"] == 999_990.0
    frame = pd.read_csv(tmp_path / "r" / "stages.csv")
    assert list(frame.columns) == evaluation.PREDICTION_COLUMNS  # seconds: no clock_time column
    night = user_data.load_recording(hr, counts).night
    expected = evaluation.predict_nights(model, scaler, {"causal": True, "features": list(names), "seq_len": 25,
                                                          "target_pos": 24}, [night])
    np.testing.assert_array_equal(frame["pred"], expected["pred"])


def test_evaluation_plots_of_each_mode_keep_their_own_names(tmp_path, small_data_dir, offline_ckpt, capsys):
    # --realtime, a causal checkpoint and --smooth used to write the plain evaluation's hybrid_*.png
    untrained_causal_checkpoint(tmp_path / "causal.pth")
    plots = tmp_path / "plots"
    common = ["--data-dir", str(small_data_dir), "--subjects", "46343", "--plots-dir", str(plots)]
    runs = {"hybrid": [], "hybrid_smoothed": ["--smooth"],
            "hybrid_causal": ["--checkpoint", str(tmp_path / "causal.pth")],
            "hybrid_realtime": ["--checkpoint", str(tmp_path / "causal.pth"), "--realtime", "--sleep-metrics"]}
    written = {}
    for stem, argv in runs.items():
        before = {p.name: p.read_bytes() for p in plots.glob("*.png")} if plots.exists() else {}
        assert inference_cli.main("hybrid", offline_ckpt, common + argv) == 0
        assert f"({stem}_*.png)" in capsys.readouterr().out
        now = {p.name: p.read_bytes() for p in plots.glob("*.png")}
        assert all(now[name] == data for name, data in before.items())  # nothing earlier overwritten
        written[stem] = sorted(set(now) - set(before))
    assert load_model_from_checkpoint(offline_ckpt)[2].get("transitions") is not None  # so --smooth smooths
    for stem, names in written.items():
        expected = {f"{stem}_hypnogram_46343.png", f"{stem}_confusion.png"}
        if stem == "hybrid_realtime":
            expected.add("hybrid_realtime_bland_altman.png")
        assert set(names) == expected, (stem, names)


def test_evaluation_says_what_it_is_doing_on_stderr(small_data_dir, offline_ckpt, capsys):
    assert inference_cli.main("hybrid", offline_ckpt, ["--data-dir", str(small_data_dir), "--plots-dir", ""]) == 0
    captured = capsys.readouterr()
    assert "loading nights" in captured.err  # the loader's progress bar
    assert re.search(r"scoring 6 night\(s\) \([\d,]+ epochs\) \.\.\.", captured.err), captured.err
    assert "scoring" not in captured.out and "kappa" in captured.out
