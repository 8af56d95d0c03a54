"""Data pipeline: alignment, counts, input rules, resting heart rate, cache, splits, scaling, windows."""
import dataclasses
import gzip
import os
import time
import warnings

import numpy as np
import pytest

import data_loader as dl
import features
from conftest import BUNDLED


def write(path, text, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def make_subject(root, sid="1", n_epochs=40, labels=None, hr=None, counts=None, motion=None, steps=None):
    """A hand-made subject; defaults give a clean night of n_epochs epochs."""
    if labels is None:
        labels = "".join(f"{30 * i} {[0, 1, 2, 3, 5][i % 5]}\n" for i in range(n_epochs))
    if hr is None:
        hr = "".join(f"{t:.1f},{60 + (t // 30) % 7}\n" for t in np.arange(-100, 30 * n_epochs, 5.0))
    write(root / "labels" / f"{sid}_labeled_sleep.txt", labels)
    write(root / "heart_rate" / f"{sid}_heartrate.txt", hr)
    if counts is not None:
        write(root / "counts" / f"{sid}_counts.txt", counts)
    if motion is not None:
        write(root / "motion" / f"{sid}_acceleration.txt", motion)
    if steps is not None:
        write(root / "steps" / f"{sid}_steps.txt", steps)
    return root


# ----------------------------------------------------------------------------- alignment

def test_epoch_alignment_known_answers(tmp_path):
    # 4 epochs; stages 0,2,4,5 -> Wake, Light, Deep, REM; samples placed on epoch edges
    labels = "0 0\n30 2\n60 4\n90 5\n"
    hr = "-10,99\n0,60\n29.9,62\n30,70\n45,72\n59.99,74\n95,80\n120,200\n"  # 120 s is outside the window
    counts = "0,10\n15,20\n30,0\n45,0\n61,7\n"  # epoch 3 has no counts
    steps = "5,3\n35,4\n40,1\n"
    make_subject(tmp_path, labels=labels, hr=hr, counts=counts, steps=steps)
    night = dl.parse_night(tmp_path, "1")
    np.testing.assert_array_equal(night.epoch_start_s, [0, 30, 60, 90])
    np.testing.assert_array_equal(night.stage, [0, 1, 2, 3])
    np.testing.assert_allclose(night.heart_rate_bpm[[0, 1, 3]], [61, 72, 80])
    assert np.isnan(night.heart_rate_bpm[2])
    np.testing.assert_allclose(night.heart_rate_std_bpm[0], 1.0)
    np.testing.assert_allclose(night.activity_count[:3], [15, 0, 7])
    assert np.isnan(night.activity_count[3])
    np.testing.assert_allclose(night.steps, [3, 5, 0, 0])
    assert night.report["motion_source"] == "counts"


def test_label_gaps_become_unscored_and_stage_map(tmp_path):
    make_subject(tmp_path, labels="0 1\n30 3\n120 -1\n150 2\n")
    night = dl.parse_night(tmp_path, "1")
    np.testing.assert_array_equal(night.epoch_start_s, [0, 30, 60, 90, 120, 150])
    np.testing.assert_array_equal(night.stage, [1, 2, -1, -1, -1, 1])


def test_gzip_files_read_like_plain(tmp_path):
    plain, gz = tmp_path / "plain", tmp_path / "gz"
    make_subject(plain, counts="0,5\n15,6\n")
    labels = (plain / "labels" / "1_labeled_sleep.txt").read_text()
    hr = (plain / "heart_rate" / "1_heartrate.txt").read_text()
    write(gz / "labels" / "1_labeled_sleep.txt", labels, gz=True)
    write(gz / "heart_rate" / "1_heartrate.txt", hr, gz=True)
    write(gz / "counts" / "1_counts.txt", "0,5\n15,6\n", gz=True)
    a, b = dl.parse_night(plain, "1"), dl.parse_night(gz, "1")
    for name in dl.Night.ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


# ----------------------------------------------------------------------------- activity counts

def test_counts_of_known_sinusoid():
    # 5 Hz lies in the 3-11 Hz pass band: |z| peaks at the amplitude every second.
    # 0.5 g falls in bin floor(0.5 / (5/128)) + 1 = 13, so each 15 s bin is (13*15 - 18) * 3.07.
    t = np.arange(0, 60, 1 / 50)
    counts = dl.counts_from_z(0.5 * np.sin(2 * np.pi * 5 * t))
    assert counts.shape == (4,)
    np.testing.assert_allclose(counts[:3], (13 * 15 - 18) * 3.07)
    # the zero-phase filter's edge transient may lift the last second by one bin (one 3.07 step)
    assert abs(counts[3] - (13 * 15 - 18) * 3.07) <= 3.07 + 1e-9


def test_counts_zero_for_still_or_out_of_band_signal():
    t = np.arange(0, 30, 1 / 50)
    assert np.all(dl.counts_from_z(np.ones_like(t)) == 0)  # gravity alone
    assert np.all(dl.counts_from_z(1.0 + 0.5 * np.sin(2 * np.pi * 0.2 * t)) == 0)  # slow drift


def test_raw_motion_gives_counts_and_magnitude(tmp_path):
    n_epochs = 30
    t = np.arange(-5, 30 * n_epochs, 1 / 50)
    z = np.where((t >= 300) & (t < 330), 0.5 * np.sin(2 * np.pi * 5 * t), 0.0) + 1.0
    motion = "".join(f"{a:.4f} 0 0 {b:.6f}\n" for a, b in zip(t, z))
    make_subject(tmp_path, n_epochs=n_epochs, motion=motion, counts="0,999\n")
    night = dl.parse_night(tmp_path, "1")
    assert night.report["motion_source"] == "raw"  # raw motion wins over the counts file
    moving = np.flatnonzero(night.activity_count > 0)
    np.testing.assert_array_equal(moving, [10])
    np.testing.assert_allclose(night.activity_count[10], (13 * 15 - 18) * 3.07, rtol=0.02)
    np.testing.assert_allclose(night.motion_mag_mean_g[0], 1.0, atol=1e-6)
    assert night.motion_mag_std_g[10] > 0.1 > night.motion_mag_std_g[0]


def test_motion_gap_marks_epochs_missing(tmp_path):
    t = np.concatenate([np.arange(0, 300, 1 / 50), np.arange(600, 900, 1 / 50)])
    motion = "".join(f"{a:.3f} 0 0 1\n" for a in t)
    make_subject(tmp_path, n_epochs=30, motion=motion)
    night = dl.parse_night(tmp_path, "1")
    missing = np.isnan(night.activity_count)
    np.testing.assert_array_equal(np.flatnonzero(missing), np.arange(10, 20))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kind,text,match", [
    ("labels", "0 0\n30 zz\n60 1\n", r"line 2: 'zz' is not a number"),
    ("labels", "0 0\n30 1 7\n60 1\n", r"line 2: expected 2 fields, found 3"),
    ("labels", "0 0\n30\n60 1\n", r"line 2: expected 2 fields, found 1"),
    ("labels", "0 0\n30 6\n60 1\n", r"line 2: unknown stage code 6"),
    ("labels", "0 0\n60 1\n30 1\n", r"line 3: timestamp 30 s is not after"),
    ("labels", "0 0\n30 1\n30 1\n", r"line 3: timestamp 30 s is not after"),
    ("labels", "0 0\n45 1\n", r"line 2: timestamp 45 s is not on the 30 s epoch grid"),
    ("labels", "0 0\n30 nan\n", r"NaN/inf"),
    ("labels", "", r"empty file"),
    ("labels", "\n\n", r"empty file"),
    ("heart_rate", "0,60\n5,sixty\n", r"_heartrate.txt, line 2: 'sixty' is not a number"),
    ("heart_rate", "0,60\n5,61,3\n", r"line 2: expected 2 fields"),
    ("heart_rate", "", r"empty file"),
    ("heart_rate", "0,300\n5,10\n", r"no valid rows after dropping out-of-range"),
    ("heart_rate", "-500,60\n-400,61\n", r"subject 1: no usable signal: neither heart-rate nor motion readings"),
    ("counts", "0,1\n15,x\n", r"_counts.txt, line 2"),
    ("motion", "0 0 0 1\n0.02 0 0\n", r"_acceleration.txt, line 2: expected 4 fields"),
    ("steps", "0,1\n60,a\n", r"_steps.txt, line 2"),
])
def test_bad_input_names_file_and_line(tmp_path, kind, text, match):
    kwargs = {"labels": None, "hr": None}
    if kind == "labels":
        kwargs["labels"] = text
    elif kind == "heart_rate":
        kwargs["hr"] = text
    else:
        kwargs[kind] = text
    make_subject(tmp_path, **kwargs)
    with pytest.raises(dl.DataError, match=match):
        dl.parse_night(tmp_path, "1")


def test_blank_lines_are_ignored_and_line_numbers_count_them(tmp_path):
    make_subject(tmp_path, labels="0 0\n\n30 1\n\n60 9\n")
    with pytest.raises(dl.DataError, match="line 5: unknown stage code 9"):
        dl.parse_night(tmp_path, "1")


def test_heart_rate_repairs_are_applied_and_reported(tmp_path):
    hr = "0,60\n10,nan\n20,inf\n50,70\n5,62\n5,99\n40,20\n45,251\n"
    make_subject(tmp_path, n_epochs=2, hr=hr)
    night = dl.parse_night(tmp_path, "1")
    # kept: 0->60, 5->62 (first of the duplicate timestamp), 50->70
    np.testing.assert_allclose(night.heart_rate_bpm, [61, 70])
    report = night.report["heart_rate"]
    assert report == {"non_finite": 2, "out_of_range": 2, "unsorted": True, "duplicates": 1}


def test_missing_files_name_the_subject(tmp_path):
    make_subject(tmp_path)
    (tmp_path / "heart_rate" / "1_heartrate.txt").unlink()
    with pytest.raises(dl.DataError, match=r"subject 1: no usable signal: no heart_rate/, motion/ or counts/ file"):
        dl.parse_night(tmp_path, "1")
    with pytest.raises(dl.DataError, match=r"subject 2: missing labels file"):
        dl.load_night(tmp_path, "2", cache_dir=None)


def test_bad_subject_skipped_unless_strict(tmp_path, cache_dir):
    make_subject(tmp_path, sid="1")
    make_subject(tmp_path, sid="2", labels="0 0\n30 8\n")
    with pytest.warns(dl.DataWarning, match=r"skipping subject 2: .*unknown stage code 8"):
        nights = dl.load_nights(tmp_path, cache_dir=cache_dir)
    assert [n.subject_id for n in nights] == ["1"]
    with pytest.raises(dl.DataError, match="unknown stage code 8"):
        dl.load_nights(tmp_path, cache_dir=cache_dir, strict=True)


def test_night_shorter_than_seq_len_still_gets_a_window_per_epoch(tmp_path):
    make_subject(tmp_path, n_epochs=5)
    night = dl.parse_night(tmp_path, "1")
    x = features.night_features(night)
    for target in (0, features.SEQ_LEN // 2, features.SEQ_LEN - 1):
        windows = features.make_windows(x, features.SEQ_LEN, target)
        assert windows.shape == (5, features.SEQ_LEN, x.shape[1])
        np.testing.assert_array_equal(windows[:, target], x)  # each epoch sits at the target position
    idx, valid = features.window_indices(5, features.SEQ_LEN, features.SEQ_LEN - 1)
    assert valid.sum() == 1 + 2 + 3 + 4 + 5  # padded positions are flagged


def test_missing_data_directory_is_clear(tmp_path):
    with pytest.raises(dl.DataError, match="does not exist"):
        dl.load_nights(tmp_path / "nope")
    with pytest.raises(dl.DataError, match="no labels/ folder"):
        dl.load_nights(tmp_path)


# ----------------------------------------------------------------------------- features

def test_causal_features_never_look_ahead():
    night = dl.load_night(BUNDLED, "46343", cache_dir=None)
    full = features.night_features(night, causal=True)
    k = 300
    prefix = dl.Night(night.subject_id, *(getattr(night, a)[:k] for a in dl.Night.ARRAYS),
                      resting_hr_bpm=night.resting_hr_bpm)
    np.testing.assert_allclose(features.night_features(prefix, causal=True), full[:k], rtol=1e-5, atol=1e-5)
    # offline features use the whole night, so they may differ on a prefix
    assert not np.allclose(features.night_features(prefix, causal=False), features.night_features(night, causal=False)[:k])


def test_missing_heart_rate_is_held_causally_interpolated_offline_and_its_age_given():
    # readings of 70 bpm in epochs 2-4, none in 5-7, 50 bpm in 8-9; epochs 0-1 before the first reading
    hr = np.array([np.nan, np.nan, 70, 70, 70, np.nan, np.nan, np.nan, 50, 50])
    night = dl.Night("1", 30.0 * np.arange(10), np.zeros(10, np.int8), hr, np.zeros(10), np.zeros(10),
                     np.full(10, np.nan), np.full(10, np.nan), np.full(10, np.nan))
    names = list(features.FEATURES)
    causal = features.night_features(night, causal=True)
    offline = features.night_features(night, causal=False)
    hr_col, age_col = names.index("heart_rate_bpm"), names.index("hr_age_log_min")
    np.testing.assert_allclose(causal[:, hr_col], [features.HR_PRIOR_BPM] * 2 + [70] * 6 + [50] * 2)
    np.testing.assert_allclose(offline[:, hr_col], [70] * 5 + [65, 60, 55] + [50] * 2)  # interpolated, lead backwards
    cap = np.log1p(features.HR_AGE_CAP_MIN)
    minutes = 0.5 * np.array([np.inf, np.inf, 0, 0, 0, 1, 2, 3, 0, 0])
    np.testing.assert_allclose(causal[:, age_col], np.log1p(minutes.clip(max=features.HR_AGE_CAP_MIN)), rtol=1e-6)
    assert causal[0, age_col] == pytest.approx(cap)
    np.testing.assert_allclose(offline[:, age_col], np.log1p(0.5 * np.array([2, 1, 0, 0, 0, 1, 2, 1, 0, 0])), rtol=1e-6)
    assert np.isfinite(causal).all() and np.isfinite(offline).all()


def test_heart_rate_is_held_not_interpolated_across_gaps_longer_than_the_limit():
    n = features.HR_INTERP_EPOCHS + 10
    hr = np.full(n, np.nan)
    hr[0], hr[-1] = 70.0, 50.0
    night = dl.Night("1", 30.0 * np.arange(n), np.zeros(n, np.int8), hr, np.zeros(n), np.zeros(n),
                     np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan))
    offline = features.night_features(night, causal=False, features=("heart_rate_bpm",))[:, 0]
    np.testing.assert_allclose(offline, [70.0] * (n - 1) + [50.0])


def test_no_data_offline_covers_whole_long_stretches_and_causal_only_after_the_limit():
    n, limit = 100, features.NO_DATA_EPOCHS
    hr = np.full(n, 60.0)
    hr[10:10 + limit] = np.nan            # a stretch of exactly the limit: staged from context
    hr[50:50 + limit + 5] = np.nan        # longer: no stage anywhere in it offline
    night = dl.Night("1", 30.0 * np.arange(n), np.zeros(n, np.int8), hr, np.zeros(n), np.full(n, np.nan),
                     np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan))
    offline, causal = features.no_data(night, causal=False), features.no_data(night, causal=True)
    np.testing.assert_array_equal(np.flatnonzero(offline), np.arange(50, 50 + limit + 5))
    np.testing.assert_array_equal(np.flatnonzero(causal), np.arange(50 + limit, 50 + limit + 5))
    motion_only = dl.Night("1", night.epoch_start_s, night.stage, np.full(n, np.nan), np.full(n, np.nan),
                           np.zeros(n), np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan))
    assert not features.no_data(motion_only, causal=False).any()  # motion alone is data


def test_a_subject_with_heart_rate_only_or_counts_only_loads(tmp_path):
    make_subject(tmp_path)
    night = dl.parse_night(tmp_path, "1")
    assert np.isnan(night.activity_count).all() and not np.isnan(night.heart_rate_bpm).all()
    (tmp_path / "heart_rate" / "1_heartrate.txt").unlink()
    (tmp_path / "counts").mkdir(exist_ok=True)
    (tmp_path / "counts" / "1_counts.txt").write_text("".join(f"{t},{t % 7}\n" for t in range(0, 600, 15)))
    night = dl.parse_night(tmp_path, "1")
    assert np.isnan(night.heart_rate_bpm).all() and not np.isnan(night.activity_count).all()
    assert night.report["heart_rate_last_s"] is None and len(night.heart_rate_samples) == 0


def test_heart_rate_against_the_resting_heart_rate_reads_the_filled_heart_rate_and_flags_none():
    # as above: readings of 70 bpm in epochs 2-4, 50 bpm in 8-9; a resting heart rate of 55 bpm
    hr = np.array([np.nan, np.nan, 70, 70, 70, np.nan, np.nan, np.nan, 50, 50])
    night = dl.Night("1", 30.0 * np.arange(10), np.zeros(10, np.int8), hr, np.zeros(10), np.zeros(10),
                     np.full(10, np.nan), np.full(10, np.nan), np.full(10, np.nan), resting_hr_bpm=55.0)
    names = ("heart_rate_bpm", "hr_minus_resting_bpm", "resting_hr_missing")
    causal = features.night_features(night, causal=True, features=names)
    offline = features.night_features(night, causal=False, features=names)
    np.testing.assert_allclose(causal[:, 1], [5] * 2 + [15] * 6 + [-5] * 2)  # held (60 bpm before the first)
    np.testing.assert_allclose(offline[:, 1], [15] * 5 + [10, 5, 0] + [-5] * 2)  # interpolated, lead backwards
    assert (causal[:, 2] == 0).all() and (offline[:, 2] == 0).all()
    none = dataclasses.replace(night, resting_hr_bpm=np.nan)  # no baseline: 0, and the flag says so
    for causal_form in (True, False):
        x = features.night_features(none, causal=causal_form, features=names)
        assert (x[:, 1] == 0).all() and (x[:, 2] == 1).all()
        np.testing.assert_array_equal(x[:, 0], features.night_features(night, causal_form, names)[:, 0])
    # opt-in: the default features (the shipped checkpoints' list) do not read it
    assert not {"hr_minus_resting_bpm", "resting_hr_missing"} & set(features.DEFAULT_FEATURES)
    default = features.DEFAULT_FEATURES
    np.testing.assert_array_equal(features.night_features(night, features=default),
                                  features.night_features(none, features=default))


def test_unknown_feature_name_is_rejected():
    night = dl.load_night(BUNDLED, "46343", cache_dir=None)
    with pytest.raises(ValueError, match="unknown feature"):
        features.night_features(night, features=("heart_rate_bpm", "pulse"))


# ----------------------------------------------------------------------------- resting heart rate

def test_resting_heart_rate_is_the_5th_percentile_of_the_week_before_the_night():
    start = 3600.0
    week = start - dl.RESTING_HR_DAYS * 86400.0
    history = np.column_stack([np.linspace(week, start - 1.0, 100), np.arange(41.0, 141.0)])
    older = np.column_stack([week - 1.0 - np.arange(200.0)[::-1], np.full(200, 30.0)])  # more than a week before
    inside = np.column_stack([start + np.arange(200.0), np.full(200, 35.0)])            # the night itself
    readings = np.concatenate([older, history, inside])
    assert dl.resting_heart_rate(readings, start) == pytest.approx(np.percentile(np.arange(41.0, 141.0), 5))
    assert dl.resting_heart_rate(readings, start) == pytest.approx(45.95)


def test_resting_heart_rate_needs_enough_readings_inside_the_window():
    week = -dl.RESTING_HR_DAYS * 86400.0
    t = np.linspace(week, -1.0, dl.RESTING_HR_MIN_READINGS)  # the first exactly where the window starts
    readings = np.column_stack([t, np.full(len(t), 55.0)])
    assert dl.resting_heart_rate(readings, 0.0) == 55.0
    assert np.isnan(dl.resting_heart_rate(readings[1:], 0.0))  # one too few: no baseline
    early = readings.copy()
    early[0, 0] -= 1.0  # just before the week
    assert np.isnan(dl.resting_heart_rate(early, 0.0))
    late = readings.copy()
    late[-1, 0] = 0.0  # the night's first instant belongs to the night
    assert np.isnan(dl.resting_heart_rate(late, 0.0))
    assert np.isnan(dl.resting_heart_rate(None, 0.0)) and np.isnan(dl.resting_heart_rate(np.zeros((0, 2)), 0.0))


def test_the_loader_takes_the_resting_heart_rate_from_the_day_before_and_caches_it(tmp_path, cache_dir):
    before = "".join(f"{t:.0f},{50 + i % 20}\n" for i, t in enumerate(np.arange(-86400.0, 0.0, 600.0)))
    night = "".join(f"{t:.0f},30\n" for t in np.arange(0.0, 1200.0, 5.0))  # lower, but inside the night
    make_subject(tmp_path, hr=before + night)
    first = dl.load_night(tmp_path, "1", cache_dir)
    assert first.resting_hr_bpm == pytest.approx(np.percentile(50 + np.arange(144) % 20, 5))
    cached = dl.load_night(tmp_path, "1", cache_dir)
    assert cached.report.get("from_cache") and cached.resting_hr_bpm == first.resting_hr_bpm
    make_subject(tmp_path / "short", hr=before.splitlines(keepends=True)[0] + night)  # one reading before: none
    assert np.isnan(dl.load_night(tmp_path / "short", "1", cache_dir).resting_hr_bpm)


def test_every_bundled_subject_gets_a_resting_heart_rate_from_its_days_before_the_night():
    resting = {s: dl.load_night(BUNDLED, s, cache_dir=None).resting_hr_bpm for s in dl.find_subjects(BUNDLED)}
    assert len(resting) == 25 and all(45.0 < r < 80.0 for r in resting.values()), resting
    assert resting["5383425"] == 60.0  # 80 readings in the 14 h before its night: enough
    # the history alone: the same night without its days before has none
    files = dl.subject_files(BUNDLED, "46343")
    epoch_start_s, stage = dl.read_labels(files["labels"])
    hr = dl.read_signal(files["heart_rate"], 2)
    inside = dl.night_from_arrays("46343", epoch_start_s, stage, hr[hr[:, 0] >= epoch_start_s[0]])
    assert np.isnan(inside.resting_hr_bpm)
    assert dl.night_from_arrays("46343", epoch_start_s, stage, hr).resting_hr_bpm == resting["46343"]


# ----------------------------------------------------------------------------- cache

def test_cache_hit_rebuild_on_corruption_and_on_change(tmp_path, cache_dir):
    make_subject(tmp_path)
    first = dl.load_night(tmp_path, "1", cache_dir)
    assert "from_cache" not in first.report
    cached = dl.load_night(tmp_path, "1", cache_dir)
    assert cached.report.get("from_cache")
    np.testing.assert_array_equal(cached.heart_rate_bpm, first.heart_rate_bpm)
    # a corrupt cache file is rebuilt, never trusted
    (cache_file,) = list(cache_dir.glob("*.npz"))
    cache_file.write_bytes(b"garbage" * 10)
    rebuilt = dl.load_night(tmp_path, "1", cache_dir)
    assert "from_cache" not in rebuilt.report
    np.testing.assert_array_equal(rebuilt.heart_rate_bpm, first.heart_rate_bpm)
    # editing a source file changes the key
    hr_file = tmp_path / "heart_rate" / "1_heartrate.txt"
    hr_file.write_text(hr_file.read_text().replace(",60", ",90"))
    os.utime(hr_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = dl.load_night(tmp_path, "1", cache_dir)
    assert "from_cache" not in changed.report
    assert np.nanmax(changed.heart_rate_bpm) > np.nanmax(first.heart_rate_bpm)


# ----------------------------------------------------------------------------- splits and scaling

def test_split_80_10_10_by_subject_is_disjoint_and_fixed():
    ids = [str(i) for i in range(25)]
    train, val, test = dl.split_subjects(ids, seed=1337)
    assert (len(train), len(val), len(test)) == (19, 3, 3)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert set(train) | set(val) | set(test) == set(ids)
    assert dl.split_subjects(list(reversed(ids)), seed=1337) == (train, val, test)
    assert dl.split_subjects(ids, seed=7) != (train, val, test)


@pytest.mark.parametrize("k", [2, 5, 25])
def test_kfold_by_subject_never_shares_a_subject(k):
    ids = [str(i) for i in range(25)]
    folds = dl.kfold_subjects(ids, k)
    held = [s for _, fold in folds for s in fold]
    assert sorted(held) == sorted(ids)  # every subject held out exactly once
    for train, fold in folds:
        assert not set(train) & set(fold)
        assert set(train) | set(fold) == set(ids)


def test_scaler_is_fitted_on_training_subjects_only():
    nights = {n.subject_id: n for n in dl.load_nights(BUNDLED, cache_dir=None)}
    train, val, test = dl.split_subjects(list(nights))
    train_x = [features.night_features(nights[s]) for s in train]
    scaler = dl.FeatureScaler.fit(train_x)
    np.testing.assert_allclose(scaler.mean, np.concatenate(train_x).mean(axis=0), rtol=1e-4, atol=1e-4)
    all_mean = np.concatenate([features.night_features(n) for n in nights.values()]).mean(axis=0)
    assert not np.allclose(scaler.mean, all_mean, rtol=1e-4, atol=1e-4)
    z = scaler.transform(np.concatenate(train_x))
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-3)
    sk = scaler.to_sklearn()
    np.testing.assert_allclose(sk.transform(train_x[0]), scaler.transform(train_x[0]), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bundled real data

def test_bundled_data_summary_flags_truncated_subject(capsys):
    assert dl.main(["--summary", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "loaded 25 subjects" in out
    flagged = [line for line in out.splitlines() if "TRUNCATED" in line]
    assert len(flagged) == 1 and flagged[0].split()[0] == "7749105"


def test_bundled_stage_mix_matches_known_counts():
    night = dl.load_night(BUNDLED, "5383425", cache_dir=None)  # one of the two subjects with N4
    # PhysioNet file: 2 unscored, 40 W, 52 N1 + 391 N2, 34 N3 + 190 N4, 269 REM
    assert [int((night.stage == c).sum()) for c in (-1, 0, 1, 2, 3)] == [2, 40, 443, 224, 269]


# ----------------------------------------------------------------------------- synthetic full-release files

@pytest.mark.parametrize("gz", [False, True])
def test_reads_synthetic_release_with_raw_motion_and_steps(tmp_path, cache_dir, gz):
    import synthetic
    synthetic.write_night(tmp_path, "42", synthetic.SyntheticNightConfig(hours=1.0, gzip=gz, seed=3))
    night = dl.load_night(tmp_path, "42", cache_dir)
    assert night.report["motion_source"] == "raw"
    assert len(night) == 120
    assert np.mean(~np.isnan(night.heart_rate_bpm)) > 0.8
    assert np.mean(~np.isnan(night.activity_count)) > 0.95  # counts computed from the 50 Hz file
    np.testing.assert_allclose(np.nanmedian(night.motion_mag_mean_g), 1.0, atol=0.05)
    assert not np.isnan(night.steps).all()
    wake, asleep = night.stage == 0, night.stage > 0
    assert np.nanmean(night.activity_count[wake]) > np.nanmean(night.activity_count[asleep])
    x = features.night_features(night, features=features.FEATURES)
    assert x.shape == (120, len(features.FEATURES)) and np.isfinite(x).all()
    assert dl.load_night(tmp_path, "42", cache_dir).report.get("from_cache")
