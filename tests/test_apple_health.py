"""Apple Health exports: synthetic exports (synthetic.write_health_export: the real DOCTYPE header,
Record and MetadataEntry elements, several nights, a daylight-saving change, a watch-off stretch,
Apple's stages on some nights) through apple_health.py and `--apple-health`, and hostile files."""
import json
import re
import zipfile
from datetime import date

import numpy as np
import pandas as pd
import pytest
import torch

import apple_health
import data_loader as dl
import features
import inference_cli
import synthetic
from checkpoint import build_model, make_checkpoint, save_checkpoint
from conftest import ROOT


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    truth = synthetic.write_health_export(root / "export.zip")
    return root / "export.zip", truth


@pytest.fixture(scope="module")
def offline_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    names = features.DEFAULT_FEATURES
    model = build_model("hybrid", {"channels": 16, "kernel_size": 3, "n_layers": 1, "n_heads": 2,
                                   "n_features": len(names), "causal": False}).eval()
    scaler = dl.FeatureScaler(np.zeros(len(names), np.float32), np.ones(len(names), np.float32))
    path = tmp_path_factory.mktemp("ckpt") / "offline.pth"
    save_checkpoint(make_checkpoint(model, "hybrid", features=list(names), seq_len=25, target_pos=12, scaler=scaler),
                    path)
    return path


def test_records_are_read_from_the_zip_and_from_the_xml_alike(export, tmp_path):
    path, truth = export
    from_zip = apple_health.read_export(path)
    assert from_zip.report["records"] == truth["records"] and len(from_zip.heart_rate) > 600
    assert len(from_zip.sleep) > 10 and len(from_zip.steps) > 50
    with zipfile.ZipFile(path) as archive:
        (tmp_path / "export.xml").write_bytes(archive.read("apple_health_export/export.xml"))
    from_xml = apple_health.read_export(tmp_path / "export.xml")
    np.testing.assert_array_equal(from_xml.heart_rate, from_zip.heart_rate)
    assert (np.diff(from_zip.heart_rate[:, 0]) >= 0).all()
    assert set(np.unique(from_zip.heart_rate[:, 2])) == {3600.0, 7200.0}  # the export's own UTC offsets


def test_health_dates_keep_their_offsets():
    assert apple_health.parse_time("2026-03-29 03:10:00 +0200") == (1774746600.0, 7200.0)
    assert apple_health.parse_time("2026-03-29 01:10:00 +0100") == (1774743000.0, 3600.0)
    with pytest.raises(ValueError, match="not a Health date"):
        apple_health.parse_time("2026-03-29T01:10:00Z")


def test_nights_are_found_by_local_evening_across_daylight_saving(export):
    path, truth = export
    found = list(apple_health.nights(apple_health.read_export(path)))
    assert [n.day.isoformat() for n in found] == ["2026-03-27", "2026-03-28", "2026-03-29", "2026-03-30"]
    for night, expected in zip(found, truth["nights"]):  # in-bed records give the span
        assert night.start_s == expected["bed_s"] and len(night.night) == (expected["rise_s"] - expected["bed_s"]) / 30 + 1
    assert [n.start_clock.utcoffset().total_seconds() for n in found] == [3600, 3600, 7200, 7200]
    # the wearer keeps to the local clock: in bed at 22:30 before and after the change to summer time
    assert [n.start_clock.strftime("%H:%M") for n in found] == ["22:30", "22:30", "22:30", "22:30"]
    with_stages = [n for n in found if n.apple_stage is not None]
    assert [n.day.isoformat() for n in with_stages] == ["2026-03-28", "2026-03-30"]
    expected = truth["nights"][1]["apple_stage"]
    np.testing.assert_array_equal(with_stages[0].apple_stage[:len(expected)], expected)


def test_nights_get_their_resting_heart_rate_from_the_days_before_also_when_read_from_a_date(export):
    path, _ = export
    full = apple_health.read_export(path)
    found = list(apple_health.nights(full))
    for night in found[1:]:  # the export's readings before the night: the evening, the nights before
        assert night.night.resting_hr_bpm == dl.resting_heart_rate(full.heart_rate[:, :2], night.start_s)
        assert 45.0 < night.night.resting_hr_bpm < 60.0  # asleep about 56 bpm, awake 78
    day = date(2026, 3, 29)  # reading from a date keeps the heart rate of the days before it
    dated = apple_health.read_export(path, day, day)
    (later,) = apple_health.nights(dated, only=day)
    assert later.night.resting_hr_bpm == found[2].night.resting_hr_bpm
    t = full.heart_rate[:, 0]
    week = full.heart_rate[(t >= later.start_s - dl.RESTING_HR_DAYS * 86400.0) & (t < later.start_s)]
    np.testing.assert_array_equal(dated.heart_rate[dated.heart_rate[:, 0] < later.start_s], week)


def test_the_command_writes_a_report_per_night_nights_csv_and_a_diary(export, offline_ckpt, tmp_path, capsys):
    path, _ = export
    out = tmp_path / "health"
    assert inference_cli.main("hybrid", offline_ckpt, ["--apple-health", str(path), "--out-dir", str(out)]) == 0
    table = pd.read_csv(out / "nights.csv")
    assert list(table.columns) == list(apple_health.NIGHT_COLUMNS) and len(table) == 4
    assert table["date"].tolist() == ["2026-03-27", "2026-03-28", "2026-03-29", "2026-03-30"]
    assert (out / "diary.png").stat().st_size > 5000
    watch_off = json.loads((out / "2026-03-29" / "summary.json").read_text())
    assert 85 <= watch_off["no_data_min"] <= 100  # off 01:00-02:30; readings every 5 min around it
    staged = pd.read_csv(out / "2026-03-28" / "stages.csv")
    assert "apple_stage" in staged.columns and staged["clock_time"].iloc[0] == "2026-03-28T22:30:00+01:00"
    apple = json.loads((out / "2026-03-28" / "summary.json").read_text())["apple_stages"]
    assert apple["epochs_compared"] > 800 and "not polysomnography" in apple["note"]
    assert "apple_stages" not in json.loads((out / "2026-03-27" / "summary.json").read_text())
    assert (out / "2026-03-28" / "hypnogram.png").stat().st_size > 5000
    assert "agreement with Apple's stages" in capsys.readouterr().out
    one = tmp_path / "one"
    assert inference_cli.main("hybrid", offline_ckpt, ["--apple-health", str(path), "--night", "2026-03-29",
                                                       "--out-dir", str(one)]) == 0
    assert pd.read_csv(one / "nights.csv")["date"].tolist() == ["2026-03-29"]
    assert inference_cli.main("hybrid", offline_ckpt, ["--apple-health", str(path), "--night", "2026-01-01",
                                                       "--out-dir", str(one)]) == 1
    assert "no heart-rate records" in (err := capsys.readouterr().err) and "between the dates asked for" in err


ORDINALS = {"first": 0, "second": 1, "third": 2, "fourth": 3}


def test_the_documented_synthetic_export_is_the_generated_one(export):
    # docs/apple_health.md describes the diary's export: which night crosses the change to summer
    # time and when the watch is off; both are read back from the export the program writes
    text = " ".join((ROOT / "docs" / "apple_health.md").read_text().split())
    match = re.search(r"(\w+) nights; the (\w+) \((\d{4}-\d\d-\d\d)\) crosses the change to summer time, the (\w+) "
                      r"\((\d{4}-\d\d-\d\d)\) has the watch off from (\d\d:\d\d) to (\d\d:\d\d)", text)
    assert match, "docs/apple_health.md no longer describes the synthetic export in the expected words"
    count, dst_ordinal, dst_day, off_ordinal, off_day, off_from, off_to = match.groups()
    path, truth = export
    hr = apple_health.read_export(path).heart_rate
    found = list(apple_health.nights(apple_health.read_export(path)))
    days = [n.day.isoformat() for n in found]
    assert {"four": 4}[count] == len(found) == len(truth["nights"])
    assert days[ORDINALS[dst_ordinal]] == dst_day and days[ORDINALS[off_ordinal]] == off_day
    night_of = apple_health.night_of(hr[:, 0], hr[:, 2])
    crossing = [day for day in days if len(set(hr[night_of == (np.datetime64(day) - np.datetime64("1970-01-01"))
                                                 .astype(int), 2])) == 2]
    assert crossing == [dst_day]  # the only night whose readings carry both offsets
    readings = hr[night_of == (np.datetime64(off_day) - np.datetime64("1970-01-01")).astype(int)]
    gaps = np.diff(readings[:, 0])
    assert (gaps > 30 * 60).sum() == 1  # one long gap: the watch off
    i = int(gaps.argmax())
    local = [(readings[j, 0] + readings[j, 2]) % 86400 / 60 for j in (i, i + 1)]  # minutes since local midnight
    documented = [int(hh) * 60 + int(mm) for hh, mm in (off_from.split(":"), off_to.split(":"))]
    # the last reading before and the first after lie within one reading interval (5 min) of the span
    assert documented[0] - 6 <= local[0] <= documented[0] and documented[1] <= local[1] <= documented[1] + 6
    off = truth["nights"][ORDINALS[off_ordinal]]["watch_off_s"]
    assert [(t + readings[i, 2]) % 86400 / 60 for t in off] == documented  # and so says the truth


@pytest.mark.parametrize("argv, message", [
    (["--night", "2026-03-01"], "belong(s) to --apple-health"),
    (["--apple-health", "e.zip", "--hr", "h.csv"], "does not go with --hr"),
    (["--apple-health", "e.zip", "--night", "March"], "is not a date"),
])
def test_flag_combinations(argv, message, capsys):
    with pytest.raises(SystemExit):
        inference_cli.main("hybrid", "unused.pth", argv)
    assert message in capsys.readouterr().err


def hostile(tmp_path, body: str, header: str = synthetic.HEALTH_HEADER, name="export.xml"):
    path = tmp_path / name
    path.write_text(header + body)
    return path


RECORD = synthetic._record("HKQuantityTypeIdentifierHeartRate", "count/min", 1774648800.0, 1774648800.0, "60")


@pytest.mark.parametrize("case, pattern", [
    ("entity expansion", r"declares an entity"),
    ("external entity", r"declares an entity|external"),
    ("not health", r"not an Apple Health export \(root element <html>"),
    ("no heart rate", r"no heart-rate records"),
    ("bad date", r"line \d+: HKQuantityTypeIdentifierHeartRate record: '2026-13-45 99:00:00 \+0100'"),
    ("bad value", r"line \d+: HKQuantityTypeIdentifierHeartRate record: could not convert"),
    ("truncated xml", r"line \d+, column \d+: not well-formed XML"),
    ("truncated zip", r"damaged|truncated"),
    ("not xml", r"neither a zip nor an XML file"),
])
def test_hostile_files_are_one_clear_error_naming_the_file(tmp_path, case, pattern):
    if case == "entity expansion":
        path = hostile(tmp_path, RECORD + "</HealthData>\n", header='<?xml version="1.0"?>\n<!DOCTYPE HealthData [\n'
                       '<!ENTITY a "aaaaaaaaaa">\n<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">\n]>\n<HealthData>&b;\n')
    elif case == "external entity":
        path = hostile(tmp_path, "</HealthData>\n", header='<?xml version="1.0"?>\n<!DOCTYPE HealthData [\n'
                       '<!ENTITY x SYSTEM "file:///etc/passwd">\n]>\n<HealthData>&x;\n')
    elif case == "not health":
        path = hostile(tmp_path, "<body/></html>\n", header="<html>\n")
    elif case == "no heart rate":
        path = hostile(tmp_path, "</HealthData>\n")
    elif case == "bad date":
        bad = re.sub(r'startDate="[^"]*"', 'startDate="2026-13-45 99:00:00 +0100"', RECORD)
        path = hostile(tmp_path, RECORD + bad + "</HealthData>\n")
    elif case == "bad value":
        path = hostile(tmp_path, RECORD.replace('value="60"', 'value="sixty"') + "</HealthData>\n")
    elif case == "truncated xml":
        path = hostile(tmp_path, RECORD * 3 + RECORD[:40])
    elif case == "truncated zip":
        good = tmp_path / "good.zip"
        synthetic.write_health_export(good)
        path = tmp_path / "export.zip"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        path = tmp_path / "export.xml"
        path.write_bytes(b"\x00\x01binary")
    with pytest.raises(dl.DataError, match=pattern) as caught:
        apple_health.read_export(path)
    assert str(path) in str(caught.value)


def test_implausible_heart_rates_are_dropped_and_counted(tmp_path):
    rows = "".join(synthetic._record("HKQuantityTypeIdentifierHeartRate", "count/min", 1774648800.0 + 60 * i,
                                     1774648800.0 + 60 * i, v) for i, v in enumerate(["60", "400", "61", "0", "62"]))
    export = apple_health.read_export(hostile(tmp_path, rows + "</HealthData>\n"))
    assert export.heart_rate[:, 1].tolist() == [60.0, 61.0, 62.0] and export.report["implausible_heart_rate"] == 2


def night_records(midnight_utc: float = 1774652400.0, every_s: float = 300.0) -> str:
    """Heart rate every 5 min from 23:00 to 07:00 local (+0100), around midnight_utc (2026-03-28 00:00 +0100)."""
    return "".join(synthetic._record("HKQuantityTypeIdentifierHeartRate", "count/min", t, t, "58")
                   for t in np.arange(midnight_utc - 3600, midnight_utc + 7 * 3600, every_s))


def test_awkward_but_valid_records_are_handled(tmp_path):
    midnight = 1774652400.0
    steps = [synthetic._record("HKQuantityTypeIdentifierStepCount", "count", t, t + 600, "60")
             for t in np.arange(midnight - 3000, midnight + 3 * 3600, 600.0)][::-1]  # any order
    edge = synthetic._record("HKQuantityTypeIdentifierStepCount", "count", midnight - 4200, midnight - 3600, "30")
    weird = [
        synthetic._record("HKCategoryTypeIdentifierSleepAnalysis", "", midnight, midnight - 60,  # ends before it starts
                          "HKCategoryValueSleepAnalysisInBed"),
        synthetic._record("HKCategoryTypeIdentifierSleepAnalysis", "", midnight, midnight + 80 * 365 * 86400.0,
                          "HKCategoryValueSleepAnalysisInBed"),  # ends in a century
        synthetic._record("HKCategoryTypeIdentifierSleepAnalysis", "", midnight, midnight + 600,
                          "HKCategoryValueSleepAnalysisAsleepFuture"),  # a value of a later watchOS
    ]
    path = hostile(tmp_path, night_records() + "".join(steps) + edge + "".join(weird) + "</HealthData>\n")
    export = apple_health.read_export(path)
    assert export.report["implausible_sleep"] == 2 and export.report["unknown_sleep_values"] == 1
    (night,) = apple_health.nights(export)
    assert night.start_clock.strftime("%H:%M") == "23:00" and len(night.night) == (8 * 3600 - 300) // 30 + 1
    steps_per_epoch = night.night.steps  # the record ending at the night's start adds nothing and breaks nothing
    assert np.nansum(steps_per_epoch) == pytest.approx(60 * len(steps))
    assert not np.isnan(steps_per_epoch[1:100]).any()  # sorted: the span of the step records is right


def test_since_and_until_give_exactly_those_nights(export, offline_ckpt, tmp_path):
    path, _ = export
    out = tmp_path / "range"
    assert inference_cli.main("hybrid", offline_ckpt, ["--apple-health", str(path), "--since", "2026-03-28",
                                                       "--until", "2026-03-28", "--out-dir", str(out)]) == 0
    assert pd.read_csv(out / "nights.csv")["date"].tolist() == ["2026-03-28"]


@pytest.mark.parametrize("text", ["2026-03-28 01:00:00 +9900", "2026-03-28 01:00:00 +0199", "2026-03-28 01:00:00 +01:0"])
def test_impossible_utc_offsets_are_errors(text):
    with pytest.raises(ValueError, match="not a Health date"):
        apple_health.parse_time(text)


def test_the_export_is_found_by_its_exact_name_and_a_bom_is_fine(tmp_path):
    body = synthetic.HEALTH_HEADER + night_records() + "</HealthData>\n"
    path = tmp_path / "two.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("apple_health_export/myexport.xml", "<html/>")
        archive.writestr("apple_health_export/export.xml", body)
    assert len(apple_health.read_export(path).heart_rate) == 96
    bom = tmp_path / "bom.xml"
    bom.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert len(apple_health.read_export(bom).heart_rate) == 96
