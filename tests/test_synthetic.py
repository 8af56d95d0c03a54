"""Synthetic nights: the sleep-accel file formats, plausible physiology, determinism, speed-safe writing."""
import gzip
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import synthetic
from synthetic import SyntheticNightConfig, stage_sequence, write_cohort, write_night

ROOT = Path(__file__).resolve().parent.parent
STAGE_CODES = {-1, 0, 1, 2, 3, 4, 5}
ONE_HOUR = SyntheticNightConfig(hours=1.0, seed=7)
QUARTER_HOUR = SyntheticNightConfig(hours=0.25, seed=7)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """One 1 h night with every kind of file, parsed once for the tests that read it."""
    root = tmp_path_factory.mktemp("night")
    paths = write_night(root, "123456", ONE_HOUR)
    labels = pd.read_csv(paths["labels"], sep=" ", header=None, names=["seconds", "stage"])
    return {
        "root": root,
        "paths": paths,
        "labels": labels,
        "heart_rate": pd.read_csv(paths["heart_rate"], header=None, names=["seconds", "bpm"]),
        "motion": pd.read_csv(paths["motion"], sep=" ", header=None, names=["seconds", "x", "y", "z"]),
        "steps": pd.read_csv(paths["steps"], header=None, names=["seconds", "steps"]),
        "counts": pd.read_csv(paths["counts"], header=None, names=["seconds", "count"]),
        "stage_of_epoch": labels.set_index("seconds")["stage"],
    }


def stages_at(night, seconds):
    """The scored stage of each time, NaN outside the labelled window."""
    epoch_start = (np.floor(np.asarray(seconds) / 30) * 30).astype(int)
    return night["stage_of_epoch"].reindex(epoch_start).to_numpy()


def lines(path):
    return Path(path).read_text().splitlines()


def test_layout_and_file_names(night):
    root, paths = night["root"], night["paths"]
    assert paths == {
        "labels": root / "labels" / "123456_labeled_sleep.txt",
        "heart_rate": root / "heart_rate" / "123456_heartrate.txt",
        "motion": root / "motion" / "123456_acceleration.txt",
        "steps": root / "steps" / "123456_steps.txt",
        "counts": root / "counts" / "123456_counts.txt",
    }
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    leftovers = [p for p in root.rglob("*") if p.is_file() and p not in paths.values()]
    assert leftovers == []  # no temporary files left behind


def test_labels_are_30s_epochs_with_known_codes(night):
    rows = [line.split(" ") for line in lines(night["paths"]["labels"])]
    assert len(rows) == 120  # 1 h of 30 s epochs
    assert [r[0] for r in rows] == [str(30 * i) for i in range(120)]
    stages = np.array([int(r[1]) for r in rows])
    assert set(stages) <= STAGE_CODES
    # Unscored epochs only at the start; the night contains both wake and deep sleep.
    unscored = np.flatnonzero(stages == -1)
    assert np.array_equal(unscored, np.arange(len(unscored)))
    assert (stages == 0).any() and np.isin(stages, [3, 4]).any()


def test_heart_rate_format_and_range(night):
    text = lines(night["paths"]["heart_rate"])
    assert all(re.fullmatch(r"-?\d+\.\d{5},\d+", line) for line in text)
    hr = night["heart_rate"]
    assert hr["bpm"].between(25, 250).all()
    seconds = hr["seconds"].to_numpy()
    assert np.all(np.diff(seconds) > 0)
    assert seconds.min() < -3000  # samples from before the PSG start, like the real files
    assert seconds.max() > 3000  # and over the night (a dropout may cut the last minutes)
    assert 4.0 <= np.median(np.diff(seconds)) <= 6.0
    assert np.diff(seconds).max() > 20  # irregular, with gaps


def test_heart_rate_depends_on_stage(night):
    hr = night["heart_rate"]
    stage = stages_at(night, hr["seconds"])
    wake = hr["bpm"][stage == 0]
    deep = hr["bpm"][np.isin(stage, [3, 4])]
    assert len(wake) > 10 and len(deep) > 10
    assert wake.mean() > deep.mean() + 5
    assert wake.std() > deep.std()  # deep sleep is steady


def test_motion_sampling_and_gravity(night):
    text = lines(night["paths"]["motion"])[:1000]
    assert all(re.fullmatch(r"-?\d+\.\d+( -?\d+\.\d+){3}", line) for line in text)
    motion = night["motion"]
    seconds = motion["seconds"].to_numpy()
    assert abs(np.median(np.diff(seconds)) - 0.02) <= 0.002
    assert np.all(np.diff(seconds) > 0)
    assert seconds[0] < 0 < 3600 <= seconds[-1]
    assert len(motion) == pytest.approx((seconds[-1] - seconds[0]) * 50, rel=0.01)
    magnitude = np.linalg.norm(motion[["x", "y", "z"]].to_numpy(), axis=1)
    deep = np.isin(stages_at(night, seconds), [3, 4])
    assert np.median(magnitude[deep]) == pytest.approx(1.0, abs=0.02)  # gravity only at rest
    assert np.percentile(magnitude[deep], 99) < 1.05


def test_motion_mostly_while_awake(night):
    motion = night["motion"]
    magnitude = np.linalg.norm(motion[["x", "y", "z"]].to_numpy(), axis=1)
    moving = np.abs(magnitude - 1.0) > 0.05
    stage = stages_at(night, motion["seconds"])
    assert moving[stage == 0].mean() > 5 * max(moving[np.isin(stage, [2, 3, 4])].mean(), 1e-4)

    counts = night["counts"]
    count_stage = stages_at(night, counts["seconds"])
    assert counts["count"][count_stage == 0].mean() > counts["count"][np.isin(count_stage, [2, 3, 4])].mean()


def test_steps_and_counts_format(night):
    assert all(re.fullmatch(r"-?\d+,\d+", line) for line in lines(night["paths"]["steps"]))
    steps = night["steps"]
    assert (steps["steps"] >= 0).all() and steps["steps"].max() > 0
    assert np.all(np.diff(steps["seconds"]) == 60)
    assert steps["seconds"].min() < 0

    assert all(line.count(",") == 1 for line in lines(night["paths"]["counts"]))
    counts = night["counts"]
    assert (counts["count"] >= 0).all()
    assert np.median(np.diff(counts["seconds"])) == pytest.approx(15, abs=0.05)
    assert counts["seconds"].min() >= 0 and counts["seconds"].max() < 3600


def test_same_seed_same_bytes_other_seed_or_subject_differs(tmp_path):
    a = write_night(tmp_path / "a", "42", QUARTER_HOUR)
    b = write_night(tmp_path / "b", "42", QUARTER_HOUR)
    assert {k: p.read_bytes() for k, p in a.items()} == {k: p.read_bytes() for k, p in b.items()}

    other_seed = write_night(tmp_path / "c", "42", SyntheticNightConfig(hours=0.25, seed=8))
    other_subject = write_night(tmp_path / "d", "43", QUARTER_HOUR)
    for kind in ("heart_rate", "motion", "counts"):
        assert other_seed[kind].read_bytes() != a[kind].read_bytes()
        assert other_subject[kind].read_bytes() != a[kind].read_bytes()


def test_leaving_motion_out_changes_nothing_else(tmp_path):
    full = write_night(tmp_path / "full", "42", QUARTER_HOUR)
    lean = write_night(tmp_path / "lean", "42", SyntheticNightConfig(hours=0.25, seed=7, include_motion=False))
    assert "motion" not in lean and not (tmp_path / "lean" / "motion").exists()
    assert {k: p.read_bytes() for k, p in lean.items()} == {k: full[k].read_bytes() for k in lean}

    only_hr = write_night(
        tmp_path / "bare", "42",
        SyntheticNightConfig(hours=0.25, seed=7, include_motion=False, include_steps=False, include_counts=False),
    )
    assert set(only_hr) == {"labels", "heart_rate"}


def test_gzip_writes_the_same_text_compressed(tmp_path):
    plain = write_night(tmp_path / "plain", "42", QUARTER_HOUR)
    packed = write_night(tmp_path / "packed", "42", SyntheticNightConfig(hours=0.25, seed=7, gzip=True))
    again = write_night(tmp_path / "again", "42", SyntheticNightConfig(hours=0.25, seed=7, gzip=True))
    assert set(packed) == set(plain)
    for kind, path in packed.items():
        assert path.name == plain[kind].name + ".gz"
        with gzip.open(path, "rb") as f:
            assert f.read() == plain[kind].read_bytes()
        assert path.read_bytes() == again[kind].read_bytes()  # no timestamp in the gzip header
    assert len(pd.read_csv(packed["heart_rate"], header=None)) > 100


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_night(tmp_path, "42", QUARTER_HOUR)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_cohort_writes_every_subject(tmp_path):
    config = SyntheticNightConfig(hours=0.25, include_motion=False)
    ids = write_cohort(tmp_path, 3, config, start_id=500, progress=False)
    assert ids == ["500", "501", "502"]
    for subject_id in ids:
        assert (tmp_path / "labels" / f"{subject_id}_labeled_sleep.txt").is_file()
        assert (tmp_path / "heart_rate" / f"{subject_id}_heartrate.txt").is_file()
    assert len(list((tmp_path / "labels").iterdir())) == 3
    first_two = [(tmp_path / "heart_rate" / f"{i}_heartrate.txt").read_bytes() for i in ids[:2]]
    assert first_two[0] != first_two[1]


def test_command_line(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "synthetic.py", "--out", str(out), "--subjects", "2", "--hours", "0.2",
         "--no-motion", "--gzip", "--seed", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "labels").iterdir()) == [
        "1000000_labeled_sleep.txt.gz", "1000001_labeled_sleep.txt.gz",
    ]
    assert not (out / "motion").exists()
    assert (out / "steps" / "1000001_steps.txt.gz").is_file()


def test_full_night_hypnogram_is_plausible():
    stages = stage_sequence(960, np.random.default_rng(0))  # 8 h
    share = {code: np.mean(stages == code) for code in STAGE_CODES}
    assert share[0] > 0.03 and share[5] > 0.08 and share[3] + share[4] > 0.05 and share[2] > 0.3
    deep = np.flatnonzero(np.isin(stages, [3, 4]))
    rem = np.flatnonzero(stages == 5)
    assert np.median(deep) < np.median(rem)  # deep sleep early in the night, REM late
    assert stages[-1] == 0 and stages[0] in (-1, 0)


def test_number_formatting_is_exact():
    values = np.array([0.0, 0.5, -3600.0, 12.00005, -0.000001, 28799.999996, 7.0])
    text = synthetic._format_rows([(values, 5), (np.arange(7) * 50, 0)], ",").decode()
    assert text.splitlines() == [
        "0.00000,0", "0.50000,50", "-3600.00000,100", "12.00005,150",
        "0.00000,200", "28800.00000,250", "7.00000,300",
    ]
    rng = np.random.default_rng(1)
    values = rng.normal(0, 2, 10_000)
    parsed = np.array([float(v) for v in synthetic._format_rows([(values, 6)], " ").split()])
    assert np.abs(parsed - values).max() <= 0.5e-6 + 1e-12
