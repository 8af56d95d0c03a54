"""Real-time staging: the stream's rules, replay == offline causal evaluation, --realtime / --follow, notebook API.

One tiny causal hybrid is trained for the whole file (module fixture); untrained checkpoints
stand in where only the plumbing matters (all 19 features, the LSTM, an offline model).
"""
import dataclasses
import io
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import data_loader as dl
import degrade
import features
import evaluation
import inference_cli
import inference
import inference_hybrid
import realtime
import synthetic
import training
from checkpoint import (CHECKPOINT_DIR, CheckpointError, build_model, load_model_from_checkpoint, make_checkpoint,
                        save_checkpoint)
from realtime import StagerPool, StreamingStager
from stager_batch import StagerBatch
from conftest import copy_subjects, count_forward_last

TINY_HYBRID = {"channels": 16, "kernel_size": 3, "n_layers": 1, "n_heads": 2}
TINY_LSTM = {"hidden": 16, "n_layers": 1, "n_heads": 2}
REPLAY_SUBJECTS = ("46343", "3509524")
PROB_COLUMNS = ["p_wake", "p_light", "p_deep", "p_rem"]
ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "sleep-accel"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with evaluation.single_thread():  # one window per model call; also kind to a busy machine
        yield


@pytest.fixture(scope="module")
def causal_ckpt(small_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("causal-hybrid")
    argv = ["--data-dir", str(small_data_dir), "--out-dir", str(out), "--epochs", "1", "--batch-size", "64",
            "--stride", "10", "--causal"]
    assert training.run("hybrid", TINY_HYBRID, training.TrainConfig(), argv) == 0
    return out / "model.pth"


@pytest.fixture(scope="module")
def loaded(causal_ckpt):
    return load_model_from_checkpoint(causal_ckpt)


@pytest.fixture(scope="module")
def two_subject_dir(small_data_dir, tmp_path_factory):
    return copy_subjects(small_data_dir, tmp_path_factory.mktemp("two-subjects"), REPLAY_SUBJECTS)


def untrained_checkpoint(path, arch="hybrid", causal=True, features=features.DEFAULT_FEATURES, matrices=None):
    torch.manual_seed(0)
    config = {**(TINY_HYBRID if arch == "hybrid" else TINY_LSTM), "n_features": len(features), "causal": causal}
    model = build_model(arch, config).eval()
    scaler = (dl.FeatureScaler.fit(matrices) if matrices else
              dl.FeatureScaler(np.zeros(len(features), np.float32), np.ones(len(features), np.float32)))
    ckpt = make_checkpoint(model, arch, features=list(features), seq_len=25, target_pos=24 if causal else 12,
                           scaler=scaler)
    save_checkpoint(ckpt, path)
    return path


def make_stager(loaded, **kwargs):
    model, scaler, ckpt = loaded
    return StreamingStager(model, scaler, ckpt, **{"record_features": True, **kwargs})


def offline_rows(ckpt, n_epochs, start_s=0.0, **signals):
    """night_features(causal=True) of a Night built offline from the same readings."""
    epochs = start_s + 30.0 * np.arange(n_epochs)
    night = dl.night_from_arrays("x", epochs, np.zeros(n_epochs, np.int8), signals["heart_rate"],
                                 signals.get("motion"), signals.get("counts"), signals.get("steps"))
    return features.night_features(night, causal=True, features=tuple(ckpt["features"]))


def probs_of(epochs):
    return np.stack([e.probabilities for e in epochs])


def assert_same_predictions(probs, expected, atol=1e-4):
    np.testing.assert_allclose(probs, expected, atol=atol, rtol=0)
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # argmax may differ only on (near-)exact ties
    np.testing.assert_array_equal(probs.argmax(1)[clear], expected.argmax(1)[clear])


def hr_rows(t0, t1, step=5.0, bpm=60.0):
    t = np.arange(t0, t1, step)
    return np.column_stack([t, bpm + 5 * np.sin(t / 300.0)])


# ----------------------------------------------------------------------------- checkpoint contract

def test_stager_needs_a_causal_checkpoint(tmp_path, loaded, causal_ckpt):
    offline = untrained_checkpoint(tmp_path / "offline.pth", causal=False)
    model, scaler, ckpt = load_model_from_checkpoint(offline)
    with pytest.raises(ValueError, match="needs a causal checkpoint"):
        StreamingStager(model, scaler, ckpt)
    with pytest.raises(ValueError, match="needs a causal checkpoint"):
        StreamingStager.from_checkpoint(offline)
    with pytest.raises(ValueError, match="offline model"):
        realtime.load_model(offline)
    stager = StreamingStager.from_checkpoint(causal_ckpt, start_s=0.0, max_delay_s=5.0)
    assert stager.seq_len == 25 and stager.target_pos == 24 and stager.max_delay_s == 5.0
    with pytest.raises(ValueError, match="max_delay_s"):
        make_stager(loaded, max_delay_s=-1)


# ----------------------------------------------------------------------------- features and replay

@pytest.mark.parametrize("condition", ["as recorded", "heart rate every 300 s, no motion", "2 h watch off",
                                       "as recorded, no baseline"])
def test_incremental_features_equal_offline_causal_rows_on_every_bundled_night(condition):
    for subject in dl.find_subjects(BUNDLED):  # 7749105: counts stop early, heart rate turns sparse
        night = degrade.degrade(dl.load_night(BUNDLED, subject, cache_dir=None), degrade.CONDITIONS[condition])
        state = features.IncrementalFeatures(1, features.FEATURES)
        state.set_resting([0], night.resting_hr_bpm)  # every bundled night has one, unless the condition drops it
        rows, no_data = [], []
        for k in range(len(night)):
            hours = (night.epoch_start_s[k] - night.epoch_start_s[0]) / 3600.0
            row, missing = state.update(hours, **{name: getattr(night, name)[k] for name in features.FEATURE_AGGREGATES})
            rows.append(row[0])
            no_data.append(missing[0])
        expected = features.night_features(night, causal=True, features=features.FEATURES)
        np.testing.assert_allclose(np.array(rows, np.float32), expected, atol=1e-5, rtol=0, err_msg=subject)
        np.testing.assert_array_equal(no_data, features.no_data(night, causal=True), err_msg=subject)
    assert state.hr_c1.shape == (1, 61) and state.la_c1.shape == (1, 21)  # ring buffers, not the night's history


def test_incremental_features_keep_a_resting_heart_rate_per_wearer_across_nights():
    state = features.IncrementalFeatures(3, ("heart_rate_bpm", "hr_minus_resting_bpm", "resting_hr_missing"))
    state.set_resting([0, 2], [50.0, 70.0])  # wearer 1: none
    rows, _ = state.update(0.0, heart_rate_bpm=60.0)
    np.testing.assert_array_equal(rows[:, 1:], [[10, 0], [0, 1], [-10, 0]])
    assert state.take_row(2).resting_hr_bpm[0] == 70.0  # a wearer leaving a pool takes it along
    new = state.add_rows(1)
    assert np.isnan(state.resting_hr_bpm[new]).all()  # a new wearer has none
    state.reset([0])  # a new night: the wearer's resting heart rate stays
    state.set_resting(np.array([False, True, False, False]), 65.0)  # a mask, as reset takes
    rows, _ = state.update(0.0, heart_rate_bpm=[60.0, 60.0, 60.0], rows=[0, 1, 2])
    np.testing.assert_array_equal(rows[:, 1:], [[10, 0], [-5, 0], [-10, 0]])
    state.set_resting([0], None)  # none again
    rows, _ = state.update(0.0, heart_rate_bpm=60.0, rows=[0])
    np.testing.assert_array_equal(rows[:, 1:], [[0, 1]])


BASELINE_FEATURES = features.DEFAULT_FEATURES + ("hr_minus_resting_bpm", "resting_hr_missing")


def test_streams_reading_the_resting_heart_rate_equal_the_offline_causal_scoring(small_data_dir, tmp_path):
    """A model whose features include the personal baseline: replayed nights (each stream given its night's
    resting heart rate), a pool with one wearer's set and a batch give the offline causal scoring."""
    nights = [dl.load_night(small_data_dir, s, cache_dir=None) for s in REPLAY_SUBJECTS]
    assert all(np.isfinite(n.resting_hr_bpm) for n in nights)
    matrices = [features.night_features(n, causal=True, features=BASELINE_FEATURES) for n in nights]
    model, scaler, ckpt = load_model_from_checkpoint(
        untrained_checkpoint(tmp_path / "baseline.pth", features=BASELINE_FEATURES, matrices=matrices))
    offline = evaluation.predict_nights(model, scaler, ckpt, nights)
    streamed = realtime.replay_nights(model, scaler, ckpt, small_data_dir, nights)
    assert_same_predictions(streamed[PROB_COLUMNS].to_numpy(), offline[PROB_COLUMNS].to_numpy())
    # one wearer with a resting heart rate, one without (the pool's default): their nights' first hour
    without = dataclasses.replace(nights[1], resting_hr_bpm=math.nan)
    expected = [offline[offline["subject"] == REPLAY_SUBJECTS[0]][PROB_COLUMNS].to_numpy()[:120],
                evaluation.predict_nights(model, scaler, ckpt, [without])[PROB_COLUMNS].to_numpy()[:120]]
    pool = StagerPool(model, scaler, ckpt)
    pool.set_resting_hr(REPLAY_SUBJECTS[0], nights[0].resting_hr_bpm)
    for s in REPLAY_SUBJECTS:
        for kind, rows in realtime.time_ordered_runs(realtime.recorded_readings(small_data_dir, s), 0.0, 3600.0):
            pool.push(s, kind, rows[:, 0], *rows[:, 1:].T)
    pool.flush(3600.0)
    pooled = pool.predict()
    for s, probs in zip(REPLAY_SUBJECTS, expected):
        assert_same_predictions(probs_of(pooled[s]), probs)
    assert math.isnan(pool[REPLAY_SUBJECTS[1]].resting_hr_bpm)
    pool.remove(REPLAY_SUBJECTS[0])  # its row goes to the next wearer, without its resting heart rate
    assert math.isnan(pool["next wearer"].resting_hr_bpm)
    # the batch: the same feature rows, and a wearer's resting heart rate outlives a new night
    batch = StagerBatch(model, scaler, ckpt, n_wearers=2, resting_hr_bpm=[nights[0].resting_hr_bpm, None])
    rows = np.stack([batch.feature_rows(**{name: [getattr(nights[0], name)[k], getattr(without, name)[k]]
                                           for name in features.FEATURE_AGGREGATES})[1] for k in range(120)], axis=1)
    np.testing.assert_array_equal(rows[0], features.night_features(nights[0], True, BASELINE_FEATURES)[:120])
    np.testing.assert_array_equal(rows[1], features.night_features(without, True, BASELINE_FEATURES)[:120])
    batch.reset()
    batch.set_resting_hr([1], 55.0)
    _, rows, _ = batch.feature_rows(heart_rate_bpm=[60.0, 60.0])
    np.testing.assert_array_equal(rows[:, -2:], [[60.0 - nights[0].resting_hr_bpm, 0.0], [5.0, 0.0]])
    _, stages, probs = batch.step(heart_rate_bpm=[60.0, 60.0])
    assert probs.shape == (2, 4) and np.isfinite(probs).all() and (stages >= 0).all()
    with pytest.raises(ValueError, match="resting_hr_bpm"):
        StreamingStager(model, scaler, ckpt, resting_hr_bpm=600.0)
    with pytest.raises(ValueError, match=r"got 600 \(wearer 1\)"):  # the batch checks as the stream does
        batch.set_resting_hr(None, [55.0, 600.0])
    with pytest.raises(ValueError, match="got 10"):
        StagerBatch(model, scaler, ckpt, n_wearers=2, resting_hr_bpm=10.0)


@pytest.mark.parametrize("subject", REPLAY_SUBJECTS)
def test_replaying_a_real_night_gives_the_offline_causal_predictions(subject, small_data_dir, loaded):
    model, scaler, ckpt = loaded
    night = dl.load_night(small_data_dir, subject, cache_dir=None)
    offline = evaluation.predict_nights(model, scaler, ckpt, [night])
    stager = make_stager(loaded, start_s=float(night.epoch_start_s[0]))
    readings = realtime.recorded_readings(small_data_dir, subject)
    sizes = np.random.default_rng(int(subject)).integers(1, 9, 200)  # random batch sizes, time order
    epochs = realtime.replay(stager, readings, float(night.epoch_start_s[-1] + 30), batch_sizes=sizes)
    np.testing.assert_array_equal([e.epoch_start_s for e in epochs], night.epoch_start_s)
    np.testing.assert_allclose(np.stack(stager.feature_rows),
                               features.night_features(night, causal=True, features=tuple(ckpt["features"])),
                               atol=1e-5, rtol=0)
    assert_same_predictions(probs_of(epochs), offline[PROB_COLUMNS].to_numpy())
    assert [e.stage for e in epochs] == list(probs_of(epochs).argmax(1))
    assert stager.stats["late"] == 0 and stager.stats["epochs_closed"] == len(night)
    assert stager.stats["before_start"] > 0  # the files start before the PSG; those rows are cropped


def test_replaying_a_synthetic_night_with_raw_motion_and_steps(tmp_path):
    synthetic.write_night(tmp_path, "77", synthetic.SyntheticNightConfig(hours=1.0, seed=5))
    night = dl.load_night(tmp_path, "77", cache_dir=None)
    assert night.report["motion_source"] == "raw" and not np.isnan(night.steps).any()
    x = features.night_features(night, causal=True, features=features.FEATURES)  # motion magnitude and steps too
    model, scaler, ckpt = load_model_from_checkpoint(
        untrained_checkpoint(tmp_path / "all.pth", features=features.FEATURES, matrices=[x]))
    offline = evaluation.predict_nights(model, scaler, ckpt, [night])
    assert np.isfinite(night.resting_hr_bpm)  # its heart rate starts before the night
    stager = StreamingStager(model, scaler, ckpt, start_s=0.0, record_features=True,
                             resting_hr_bpm=night.resting_hr_bpm)
    readings = realtime.recorded_readings(tmp_path, "77")
    assert set(readings) == {"heart_rate", "motion", "steps"}  # raw motion wins over the counts file
    sizes = np.random.default_rng(1).integers(1, 400, 50)
    epochs = realtime.replay(stager, readings, 3600.0, batch_sizes=sizes)
    assert len(epochs) == 120
    np.testing.assert_allclose(np.stack(stager.feature_rows), x, atol=1e-5, rtol=0)
    assert_same_predictions(probs_of(epochs), offline[PROB_COLUMNS].to_numpy())
    assert stager.stats["accepted"] > 150_000


# ----------------------------------------------------------------------------- stated rules

def test_late_and_before_start_readings_are_dropped_and_counted(loaded):
    stager = make_stager(loaded, start_s=0.0)
    rows = hr_rows(0, 3600)
    closed = stager.push_heart_rate(rows[:, 0], rows[:, 1])
    assert len(closed) == 119  # epoch 119 is open: nothing at or after 3600 s yet
    assert stager.push_heart_rate([3592.5, 45.0, -20.0], [80.0, 200.0, 70.0]) == []
    assert (stager.stats["late"], stager.stats["before_start"]) == (1, 1)  # 45 s: far in the past
    stager.flush(3600.0)
    kept = np.vstack([rows, [[3592.5, 80.0]]])
    np.testing.assert_allclose(np.stack(stager.feature_rows), offline_rows(loaded[2], 120, heart_rate=kept),
                               atol=1e-5)


def test_out_of_order_readings_inside_open_epochs_are_accepted(loaded):
    rows = hr_rows(0, 300, step=3.0)
    shuffled = rows.copy()
    for start in range(0, len(rows), 10):  # shuffle within each 30 s epoch
        np.random.default_rng(start).shuffle(shuffled[start:start + 10])
    in_order, mixed = make_stager(loaded), make_stager(loaded)
    a = in_order.push_heart_rate(rows[:, 0], rows[:, 1]) + in_order.flush(300)
    b = []
    for start in range(0, len(rows), 10):
        b += mixed.push_heart_rate(shuffled[start:start + 10, 0], shuffled[start:start + 10, 1])
    b += mixed.flush(300)
    assert mixed.stats["late"] == 0 and mixed.stats["accepted"] == len(rows)
    np.testing.assert_allclose(probs_of(a), probs_of(b), atol=1e-6)
    np.testing.assert_array_equal(np.stack(in_order.feature_rows), np.stack(mixed.feature_rows))


def test_duplicate_timestamps_keep_the_first_reading(loaded):
    stager = make_stager(loaded)
    stager.push_heart_rate([10.0, 10.0, 20.0], [60.0, 90.0, 64.0])
    stager.push_heart_rate(10.0, 120.0)  # a later push of the same timestamp
    stager.flush(30.0)
    assert stager.stats["duplicates"] == 2 and stager.stats["accepted"] == 2
    expected = offline_rows(loaded[2], 1, heart_rate=np.array([[10.0, 60.0], [20.0, 64.0]]))
    np.testing.assert_allclose(stager.feature_rows[0], expected[0], atol=1e-6)


def test_impossible_values_are_dropped_counted_and_do_not_move_the_clock(loaded):
    stager = make_stager(loaded)
    stager.push_heart_rate([5.0, 6.0, 7.0, 8.0, np.nan, 9.0], [60.0, np.nan, np.inf, 20.0, 70.0, 300.0])
    assert (stager.stats["non_finite"], stager.stats["out_of_range"], stager.stats["accepted"]) == (3, 2, 1)
    assert stager.push_heart_rate(1000.0, 251.0) == [] and stager.clock == 5.0  # dropped: no epoch closes
    stager.push_acceleration([1.0, 1.02], [0.0, 16.5], [0.0, 0.0], [1.0, 1.0])
    stager.push_counts([1.0, 2.0], [3.0, -1.0])
    stager.push_steps([1.0, 2.0], [-3.0, 4.0])
    assert stager.stats["out_of_range"] == 6
    with pytest.raises(ValueError, match="same length"):
        stager.push_heart_rate([1.0, 2.0], [60.0, 61.0, 62.0])
    with pytest.raises(ValueError, match="unknown signal"):
        stager.push("pulse", 1.0, 60.0)


def test_watch_off_gap_epochs_close_as_missing_and_fill_like_offline(loaded):
    hr = np.vstack([hr_rows(0, 600), hr_rows(1200, 1800)])
    counts = np.column_stack([np.arange(0, 1800, 15.0), np.tile([0.0, 40.0, 0.0, 5.0], 30)])
    counts = counts[(counts[:, 0] < 600) | (counts[:, 0] >= 1200)]
    stager = make_stager(loaded)
    epochs = realtime.replay(stager, {"heart_rate": hr, "counts": counts}, 1800.0)
    assert len(epochs) == 60 and stager.stats["epochs_hr_missing"] == 20
    names = list(loaded[2]["features"])
    rows = np.stack(stager.feature_rows)
    np.testing.assert_array_equal(np.flatnonzero(rows[:, names.index("hr_age_log_min")]), np.arange(20, 40))
    np.testing.assert_array_equal(np.flatnonzero(rows[:, names.index("motion_missing")]), np.arange(20, 40))
    np.testing.assert_allclose(rows, offline_rows(loaded[2], 60, heart_rate=hr, counts=counts), atol=1e-5)
    # a clock tick while no readings arrive closes the epochs the watch missed
    ticking = make_stager(loaded)
    ticking.push_heart_rate(hr[:120, 0], hr[:120, 1])
    assert [e.epoch_start_s for e in ticking.flush(700.0)] == [570.0, 600.0, 630.0, 660.0]


def test_a_clock_jump_beyond_max_gap_starts_a_new_night(loaded):
    night1, night2 = hr_rows(0, 600), hr_rows(7215, 7800, bpm=55.0)
    stager = make_stager(loaded, max_gap_s=3600.0)
    first = stager.push_heart_rate(night1[:, 0], night1[:, 1])
    assert len(first) == 19
    jumped = stager.push_heart_rate(night2[:, 0], night2[:, 1]) + stager.flush(7800.0)
    assert jumped[0].epoch_start_s == 570.0  # the old night's open epoch is finished...
    assert jumped[1].epoch_start_s == 7200.0  # ...the skipped epochs are not emitted
    assert stager.stats["new_nights"] == 1 and stager.stats["gap_epochs"] == 240 - 20
    assert stager.start_s == 7200.0
    fresh = make_stager(loaded, start_s=7200.0)
    again = fresh.push_heart_rate(night2[:, 0], night2[:, 1]) + fresh.flush(7800.0)
    np.testing.assert_allclose(probs_of(jumped[1:]), probs_of(again), atol=1e-6)  # expanding stats restart
    # a flush far ahead does the same
    stager.flush(7800.0 + 4000.0)
    assert stager.stats["new_nights"] == 2 and stager.start_s == 11790.0


def test_max_delay_lets_slightly_late_readings_count(loaded):
    prompt, patient = make_stager(loaded), make_stager(loaded, max_delay_s=10.0)
    for stager in (prompt, patient):
        stager.push_heart_rate([5.0, 15.0, 25.0], [60.0, 62.0, 64.0])
    assert len(prompt.push_heart_rate(33.0, 70.0)) == 1
    assert patient.push_heart_rate(33.0, 70.0) == []  # 33 < 30 + 10: epoch 0 still open
    assert prompt.push_heart_rate(28.0, 90.0) == [] and prompt.stats["late"] == 1
    assert patient.push_heart_rate(28.0, 90.0) == [] and patient.stats["late"] == 0
    (epoch0,) = patient.push_heart_rate(41.0, 70.0)  # 41 >= 40 closes it, with the 28 s reading
    assert epoch0.epoch_start_s == 0.0
    expected = offline_rows(loaded[2], 1, heart_rate=np.array([[5, 60], [15, 62], [25, 64], [28, 90.0]]))
    np.testing.assert_allclose(patient.feature_rows[0], expected[0], atol=1e-6)
    # flush does not wait for the delay (nothing older is coming); tick does
    assert [e.epoch_start_s for e in patient.flush(60.0)] == [30.0]
    assert patient.push_heart_rate(55.0, 60.0) == [] and patient.stats["late"] == 1
    assert patient.tick(95.0) == [] and [e.epoch_start_s for e in patient.tick(100.0)] == [60.0]


def test_batch_size_never_changes_the_result(loaded):
    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 900, 300))
    t[rng.integers(0, 150, 40)] -= rng.uniform(0, 60, 40)  # out of order, some late
    t[200:205] = t[199]  # duplicates
    bpm = rng.uniform(40, 120, 300)
    bpm[rng.integers(0, 300, 10)] = np.nan
    whole, single, chunked = make_stager(loaded), make_stager(loaded), make_stager(loaded)
    a = whole.push_heart_rate(t, bpm)
    b = [e for i in range(len(t)) for e in single.push_heart_rate(t[i], bpm[i])]
    c = []
    for lo in range(0, len(t), 7):
        c += chunked.push_heart_rate(t[lo:lo + 7], bpm[lo:lo + 7])
    assert whole.stats == single.stats == chunked.stats
    assert whole.stats["late"] > 0 and whole.stats["duplicates"] >= 5
    for other in (b, c):
        assert [e.epoch_start_s for e in other] == [e.epoch_start_s for e in a]
        np.testing.assert_allclose(probs_of(other), probs_of(a), atol=1e-6)


def test_memory_holds_only_open_epochs_over_ten_hours(loaded):
    stager = make_stager(loaded, record_features=False)
    n_closed = 0
    for block in range(2400):  # 10 h of 1 Hz heart rate and 15 s counts, pushed as they come
        t = block * 15.0 + np.arange(15.0)
        n_closed += len(stager.push_counts(t[0], 12.0))
        n_closed += len(stager.push_heart_rate(t, 60 + 10 * np.sin(t / 900)))
        assert stager.open_epochs() == [math.floor(stager.clock / 30)]
    held = stager.buffered_samples()
    assert held["heart_rate"] <= 30 and held["counts"] <= 2 and held["motion"] == held["steps"] == 0
    assert n_closed == stager.stats["epochs_closed"] == 1199 and stager.stats["late"] == 0
    assert stager.windows.state.ring.rows.shape == (1, 25, len(stager.features)) and not stager.feature_rows
    assert stager.windows.state.features.hr_c1.shape == (1, features.HR_RING)
    stager.reset()
    assert stager.clock is None and stager.n_closed == 0 and sum(stager.buffered_samples().values()) == 0


def test_pool_batches_wearers_and_matches_one_stager_each(small_data_dir, loaded, monkeypatch):
    model, scaler, ckpt = loaded
    subjects = ("46343", "3509524", "4018081")
    readings = {s: realtime.recorded_readings(small_data_dir, s) for s in subjects}
    pool = StagerPool(model, scaler, ckpt)
    calls = count_forward_last(monkeypatch, model)
    pooled = {s: [] for s in subjects}
    try:
        for end in np.arange(60.0, 3600.0 + 1, 60.0):  # every minute, each wearer's new readings
            for s in subjects:
                for kind, rows in realtime.time_ordered_runs(readings[s], end - 60, end):
                    pool.push(s, kind, rows[:, 0], *rows[:, 1:].T)
            for s, epochs in pool.predict().items():
                pooled[s] += epochs
        pool.flush(3600.0)
        for s, epochs in pool.predict().items():
            pooled[s] += epochs
    finally:
        monkeypatch.undo()
    assert len(pool) == 3 and len(calls) == 61 and max(calls) == 6  # one call per minute for all wearers
    for s in subjects:
        alone = StreamingStager(model, scaler, ckpt)
        expected = realtime.replay(alone, readings[s], end_s=3600.0)
        assert len(pooled[s]) == len(expected) == 120
        assert [e.epoch_start_s for e in pooled[s]] == [e.epoch_start_s for e in expected]
        np.testing.assert_allclose(probs_of(pooled[s]), probs_of(expected), atol=1e-5)
        assert {**pool[s].stats, "before_start": 0} == {**alone.stats, "before_start": 0}  # pool: t >= 0 only


def test_a_long_watch_off_stretch_gets_no_stage_in_the_stream_the_pool_and_the_notebook(loaded):
    model, scaler, ckpt = loaded
    hr = np.vstack([hr_rows(0, 600), hr_rows(3000, 3600)])  # the watch off for 40 min
    stager = make_stager(loaded)
    epochs = realtime.replay(stager, {"heart_rate": hr}, 3600.0)
    stages = np.array([e.stage for e in epochs])
    no_stage = np.flatnonzero(stages == -1)  # causal: once NO_DATA_EPOCHS epochs have passed without a reading
    np.testing.assert_array_equal(no_stage, np.arange(19 + features.NO_DATA_EPOCHS + 1, 100))  # last reading: epoch 19
    assert np.isnan(probs_of(epochs)[no_stage]).all() and not np.isnan(np.delete(probs_of(epochs), no_stage, 0)).any()
    assert stager.stats["epochs_no_data"] == len(no_stage)
    night = dl.night_from_arrays("x", 30.0 * np.arange(120), np.zeros(120, np.int8), hr)
    np.testing.assert_array_equal(features.no_data(night, causal=True), stages == -1)  # the offline rule
    pool = StagerPool(model, scaler, ckpt)
    for kind, rows in realtime.time_ordered_runs({"heart_rate": hr}):
        pool.push("w", kind, rows[:, 0], *rows[:, 1:].T)
    pool.flush(3600.0)
    pooled = pool.predict()["w"]
    assert [e.stage for e in pooled] == list(stages)
    np.testing.assert_allclose(probs_of(pooled), probs_of(epochs), atol=1e-5)
    context = StreamingStager(model, scaler, ckpt)
    before = [realtime.predict_label_from_triplet(model, scaler, hr=None, motion=None, context=context)
              for _ in range(3)]
    assert all(stage == -1 and np.isnan(p).all() for stage, p in before)  # no reading yet: no stage
    stage, p = realtime.predict_label_from_triplet(model, scaler, hr=60.0, motion=None, context=context)
    assert 0 <= stage <= 3 and p.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("which", ["window", "night"])
def test_a_pool_reuses_the_rows_of_removed_wearers(loaded, which):
    """A removed wearer's row goes to the next one, which starts afresh (a whole-night model's step state
    too); a handle kept after removal goes on with a copy of its own state."""
    if which == "night":
        rows = np.random.default_rng(0).normal(size=(50, len(features.DEFAULT_FEATURES)))
        loaded = lookahead_model("night", 3, [rows])
    model, scaler, ckpt = loaded
    pool = StagerPool(model, scaler, ckpt)
    for w in range(40):
        pool.push(w, "heart_rate", [0.0, 40.0], [60.0, 62.0])
    rows = pool.state.features.n_wearers
    pool.remove(3)
    pool.push("new", "heart_rate", [0.0, 40.0], [70.0, 72.0])
    assert pool.state.features.n_wearers == rows and pool["new"].windows.row == 3
    staged = pool.predict()
    assert len(staged) == 40 and staged["new"][0].probabilities.shape == (4,)
    alone = StreamingStager(model, scaler, ckpt)
    np.testing.assert_allclose(staged["new"][0].probabilities, alone.push_heart_rate([0.0, 40.0], [70.0, 72.0])[0]
                               .probabilities, atol=1e-6)  # a fresh night on the reused row
    kept = pool[5]
    pool.remove(5)  # a handle kept after removal goes on with its own state, not the row's next owner
    pool.push("newer", "heart_rate", [0.0, 40.0, 70.0], [90.0, 91.0, 92.0])
    twin = StreamingStager(model, scaler, ckpt)
    twin.push_heart_rate([0.0, 40.0], [60.0, 62.0])
    np.testing.assert_allclose(probs_of(kept.push_heart_rate([70.0, 100.0], [64.0, 66.0])),
                               probs_of(twin.push_heart_rate([70.0, 100.0], [64.0, 66.0])), atol=1e-6)
    line = inference_cli.format_epoch(realtime.StagedEpoch(30.0, -1, realtime.NO_DATA_PROBABILITIES), 0.0)
    assert "no data" in line and "REM" not in line


# ----------------------------------------------------------------------------- command line

def test_cli_realtime_csv_equals_offline_causal_csv(two_subject_dir, causal_ckpt, tmp_path, capsys):
    out = {}
    for mode, extra in (("offline", []), ("realtime", ["--realtime"])):
        out[mode] = tmp_path / f"{mode}.csv"
        code = inference_cli.main("hybrid", causal_ckpt, ["--checkpoint", str(causal_ckpt), "--data-dir",
                                                       str(two_subject_dir), "--predictions-out", str(out[mode]),
                                                       "--plots-dir", "", *extra])
        assert code == 0
        out[mode + "_text"] = capsys.readouterr().out.splitlines()
    offline, streamed = pd.read_csv(out["offline"]), pd.read_csv(out["realtime"])
    assert list(streamed.columns) == evaluation.PREDICTION_COLUMNS
    pd.testing.assert_frame_equal(streamed[["subject", "epoch_start_s", "true_stage"]],
                                  offline[["subject", "epoch_start_s", "true_stage"]])
    assert_same_predictions(streamed[PROB_COLUMNS].to_numpy(), offline[PROB_COLUMNS].to_numpy())
    near_tie = np.diff(np.sort(offline[PROB_COLUMNS].to_numpy(), axis=1)[:, -2:], axis=1)[:, 0] <= 1e-4
    assert ((streamed["pred"] == offline["pred"]) | near_tie).all()
    assert "streamed reading by reading" in out["realtime_text"][0]
    assert out["realtime_text"][1:-1] == out["offline_text"][1:-1]  # the same metrics and report


def test_cli_streaming_defaults_to_the_shipped_causal_checkpoint(monkeypatch, tmp_path, causal_ckpt,
                                                                 two_subject_dir, capsys):
    assert inference_hybrid.REALTIME_CHECKPOINT == CHECKPOINT_DIR / "hybrid_causal" / "model.pth"
    assert inference.REALTIME_CHECKPOINT == CHECKPOINT_DIR / "lstm_causal" / "model.pth"
    shipped = tmp_path / "checkpoints"
    (shipped / "hybrid_causal").mkdir(parents=True)
    shutil.copy(causal_ckpt, shipped / "hybrid_causal" / "model.pth")
    monkeypatch.setattr("checkpoint.CHECKPOINT_DIR", shipped)
    argv = ["--realtime", "--data-dir", str(two_subject_dir), "--subjects", "3509524", "--plots-dir", ""]
    assert inference_cli.main("hybrid", shipped / "hybrid_offline" / "model.pth", argv) == 0
    assert str(shipped / "hybrid_causal" / "model.pth") in capsys.readouterr().out
    offline = untrained_checkpoint(tmp_path / "offline.pth", causal=False)
    assert inference_cli.main("hybrid", offline, ["--realtime", "--checkpoint", str(offline), "--plots-dir", ""]) == 1
    assert "needs a causal checkpoint" in capsys.readouterr().err
    assert inference_cli.main("lstm", offline, ["--realtime", "--plots-dir", ""]) == 1  # no lstm_causal there
    assert "lstm_causal" in capsys.readouterr().err


def test_cli_follow_stages_files_as_they_grow(tmp_path, causal_ckpt, small_data_dir, loaded, capsys):
    readings = realtime.recorded_readings(small_data_dir, "46343")
    hr = readings["heart_rate"][(readings["heart_rate"][:, 0] >= 0) & (readings["heart_rate"][:, 0] < 600)]
    counts = readings["counts"][readings["counts"][:, 0] < 600]
    hr_path, counts_path = tmp_path / "live_heartrate.csv", tmp_path / "live_counts.txt"
    hr_path.write_text("t,bpm\n")  # a header line is skipped

    def phone_app():  # appends a minute of readings at a time, lines sometimes split mid-way
        with open(hr_path, "a") as f_hr, open(counts_path, "a") as f_counts:
            for start in range(0, 600, 60):
                for f, rows, fmt in ((f_hr, hr, "{:.3f},{:g}\n"), (f_counts, counts, "{:.6f} {:g}\n")):
                    text = "".join(fmt.format(*r) for r in rows[(rows[:, 0] >= start) & (rows[:, 0] < start + 60)])
                    if start == 120 and f is f_hr:
                        text += "oops,not,a,row\n"
                    f.write(text[:7])
                    f.flush()
                    time.sleep(0.02)
                    f.write(text[7:])
                    f.flush()
                time.sleep(0.05)

    writer = threading.Thread(target=phone_app)
    writer.start()
    try:
        code = inference_cli.main("hybrid", causal_ckpt, ["--follow", str(hr_path), f"counts={counts_path}",
                                                       "--checkpoint", str(causal_ckpt), "--max-delay", "90",
                                                       "--follow-timeout", "2.0"])
    finally:
        writer.join()
    assert code == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip().endswith(tuple("0123456789")) and " s " in line]
    # the same readings streamed directly: a minute of lag fits inside --max-delay 90
    stager = make_stager(loaded, max_delay_s=90.0)
    expected = realtime.replay(stager, {"heart_rate": hr, "counts": counts})
    assert len(lines) == len(expected) == 16  # epochs ending by clock - 90 s
    for line, epoch in zip(lines, expected):
        fields = line.split()
        assert float(fields[0]) == epoch.epoch_start_s and fields[3] == dl.STAGE_NAMES[epoch.stage]
        np.testing.assert_allclose([float(v) for v in fields[5::2]], epoch.probabilities, atol=2e-3)
    assert "not a number" in captured.err  # the bad line is skipped with a warning
    assert "stopped: 16 epoch(s) staged" in captured.err


# ----------------------------------------------------------------------------- notebook API

def night_triplets(night):
    hr = [None if math.isnan(v) else float(v) for v in night.heart_rate_bpm]
    motion = [None if math.isnan(v) else float(v) for v in night.activity_count]
    return hr, motion


def test_notebook_api_equals_the_offline_causal_model(causal_ckpt, small_data_dir):
    model, scaler = inference_hybrid.load_model(causal_ckpt)
    ckpt = realtime.loaded(model).checkpoint
    assert ckpt["causal"] and "state_dict" not in ckpt
    night = dl.load_night(small_data_dir, "3509524", cache_dir=None)
    n = 80
    hr, motion = night_triplets(night)
    got = [inference_hybrid.predict_label_from_triplet(model, scaler, hr=hr[k], motion=motion[k], steps=0.0)
           for k in range(n)]
    assert all(isinstance(pred, int) and probs.shape == (4,) and pred == probs.argmax() for pred, probs in got)
    # offline: a Night with one heart-rate reading per epoch (spread 0) and the same counts
    short = dl.Night("x", night.epoch_start_s[:n], night.stage[:n], night.heart_rate_bpm[:n],
                     np.where(np.isnan(night.heart_rate_bpm[:n]), np.nan, 0.0), night.activity_count[:n],
                     np.full(n, np.nan), np.full(n, np.nan), np.zeros(n))
    x = scaler.transform(features.night_features(short, causal=True, features=tuple(ckpt["features"])))
    expected = evaluation.predict_night(model, x, ckpt["seq_len"], ckpt["target_pos"])
    assert_same_predictions(np.stack([p for _, p in got]), expected, atol=1e-5)
    inference_hybrid.reset_context(model)


@pytest.mark.parametrize("reading, message", [
    ({"hr": 300.0}, "hr=300.0 is outside the plausible range 25-250"), ({"hr": 10}, "hr=10"),
    ({"hr": float("nan")}, "hr=nan"), ({"hr": "fast"}, "hr='fast' is not a number"),
    ({"motion": -1.0}, "motion=-1.0"), ({"motion": 20000.0}, "0-10000"), ({"motion": float("nan")}, "motion=nan"),
    ({"steps": -2}, "steps=-2"), ({"steps": 500}, "0-300"), ({"steps": float("nan")}, "steps=nan"),
])
def test_notebook_api_rejects_implausible_readings(causal_ckpt, reading, message):
    model, scaler = inference_hybrid.load_model(causal_ckpt)
    inference_hybrid.predict_label_from_triplet(model, scaler, hr=60.0, motion=0.0, steps=0.0)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        inference_hybrid.predict_label_from_triplet(model, scaler, **reading)
    assert inference_hybrid.get_context(model).n_closed == 1  # a rejected reading does not use up an epoch


def test_notebook_contexts_reset_and_stay_apart_per_wearer(causal_ckpt, loaded):
    predict = inference_hybrid.predict_label_from_triplet
    model, scaler = inference_hybrid.load_model(causal_ckpt)
    rng = np.random.default_rng(0)
    a = [(float(h), float(m)) for h, m in zip(rng.uniform(50, 90, 30), rng.exponential(40, 30))]
    b = [(float(h), float(m)) for h, m in zip(rng.uniform(40, 70, 30), rng.exponential(5, 30))]
    alone_a = [predict(model, scaler, hr=h, motion=m, wearer="ann")[1] for h, m in a]
    inference_hybrid.reset_context(model, "ann")
    mixed_a, mixed_b = [], []
    for (ha, ma), (hb, mb) in zip(a, b):  # interleaved wearers do not disturb each other
        mixed_a.append(predict(model, scaler, hr=ha, motion=ma, wearer="ann")[1])
        mixed_b.append(predict(model, scaler, hr=hb, motion=mb, wearer="bob")[1])
    np.testing.assert_allclose(mixed_a, alone_a, atol=1e-6)
    assert not np.allclose(mixed_a, mixed_b)
    inference_hybrid.reset_context(model)  # every wearer of this model starts a new night
    assert predict(model, scaler, hr=a[0][0], motion=a[0][1], wearer="bob")[1] == pytest.approx(alone_a[0], abs=1e-6)
    own = StreamingStager(*loaded)  # an explicit context works with any loaded model
    np.testing.assert_allclose(predict(loaded[0], loaded[1], hr=a[0][0], motion=a[0][1], context=own)[1],
                               alone_a[0], atol=1e-6)
    with pytest.raises(ValueError, match="load it with load_model"):
        predict(loaded[0], loaded[1], hr=60.0)  # no checkpoint info on this model
    other, _ = inference_hybrid.load_model(causal_ckpt)  # a second model has its own contexts
    assert inference_hybrid.get_context(other, scaler) is not inference_hybrid.get_context(model, scaler)
    missing = predict(model, scaler, hr=None, motion=None, steps=None)  # None: the watch was off
    assert missing[1].shape == (4,)


def test_load_model_defaults_to_the_shipped_causal_checkpoints(monkeypatch, causal_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="hybrid_causal/model.pth does not exist"):
        monkeypatch.setattr(inference_hybrid, "REALTIME_CHECKPOINT", tmp_path / "hybrid_causal" / "model.pth")
        inference_hybrid.load_model()
    monkeypatch.setattr(inference_hybrid, "REALTIME_CHECKPOINT", causal_ckpt)
    model, scaler = inference_hybrid.load_model()
    assert realtime.loaded(model).path == str(causal_ckpt) and realtime.loaded(model).checkpoint["arch"] == "hybrid"
    lstm_path = untrained_checkpoint(tmp_path / "lstm.pth", arch="lstm")
    monkeypatch.setattr(inference, "REALTIME_CHECKPOINT", lstm_path)
    lstm, lstm_scaler = inference.load_model()
    pred, probs = inference.predict_label_from_triplet(lstm, lstm_scaler, hr=58.0, motion=0.0, steps=0.0)
    assert 0 <= pred < 4 and probs.sum() == pytest.approx(1.0)
    with pytest.raises(CheckpointError, match="holds a 'hybrid' model"):
        inference.load_model(causal_ckpt)


def test_importing_the_inference_scripts_runs_nothing():
    code = ("import sys, time; t = time.perf_counter(); import inference_hybrid, inference; "
            "assert 'training' not in sys.modules and callable(inference_hybrid.load_model); "
            "print('imported')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"


def cropped_readings(data_dir, subjects, end_s: float) -> list[dict]:
    """Each subject's readings in [0, end_s), keeping the first of duplicate timestamps (as the stream does)."""
    out = []
    for s in subjects:
        r = {k: v[(v[:, 0] >= 0) & (v[:, 0] < end_s)] for k, v in realtime.recorded_readings(data_dir, s).items()}
        out.append({kind: rows[np.sort(np.unique(rows[:, 0], return_index=True)[1])] for kind, rows in r.items()})
    return out


def epoch_aggregates(batch, readings: list[dict], k: int) -> dict:
    """StagerBatch.aggregate of every wearer's heart rate and counts in epoch k."""
    flat = []
    for kind in ("heart_rate", "counts"):
        sel = [r[kind][(r[kind][:, 0] >= 30.0 * k) & (r[kind][:, 0] < 30.0 * (k + 1))] for r in readings]
        flat += [np.concatenate([np.full(len(x), w) for w, x in enumerate(sel)]), np.concatenate([x[:, 1] for x in sel])]
    return batch.aggregate(*flat)


def test_vectorised_batch_equals_one_stager_per_wearer(small_data_dir, loaded):
    """StagerBatch (all wearers' state in arrays, one epoch for everyone per step) == StreamingStager each."""
    model, scaler, ckpt = loaded
    subjects = ("46343", "3509524", "4018081", "5132496", "9961348")
    n_epochs = 90
    end_s = 30.0 * n_epochs
    readings = cropped_readings(small_data_dir, subjects, end_s)
    readings[1] = {k: v[(v[:, 0] < 900) | (v[:, 0] >= 1500)] for k, v in readings[1].items()}  # watch off 10 min
    # heart rate starts late: the 60 bpm prior, expanding statistics start later
    readings[2]["heart_rate"] = readings[2]["heart_rate"][readings[2]["heart_rate"][:, 0] >= 400]
    batch = StagerBatch(model, scaler, ckpt, n_wearers=len(subjects))
    rows_only = StagerBatch(model, scaler, ckpt, n_wearers=len(subjects))
    starts, probs, raw_rows = [], [], []
    for k in range(n_epochs):
        aggregates = epoch_aggregates(batch, readings, k)
        start, stage, p = batch.step(**aggregates)
        starts.append(start)
        probs.append(p)
        raw_rows.append(rows_only.feature_rows(**aggregates)[1])
        np.testing.assert_array_equal(stage, p.argmax(1))
    probs, raw_rows = np.stack(probs, axis=1), np.stack(raw_rows, axis=1)  # (wearer, epoch, ...)
    for w, r in enumerate(readings):
        alone = StreamingStager(model, scaler, ckpt, record_features=True)
        epochs = realtime.replay(alone, r, end_s=end_s)
        assert [e.epoch_start_s for e in epochs] == list(np.stack(starts)[:, w])
        np.testing.assert_array_equal(raw_rows[w], np.stack(alone.feature_rows))  # the same float operations
        assert_same_predictions(probs[w], probs_of(epochs), atol=1e-5)
    assert raw_rows[1, 31:50, list(ckpt["features"]).index("hr_age_log_min")].all()
    batch.reset([0])
    assert batch.n.tolist() == [0] + [n_epochs] * (len(subjects) - 1)


SHIPPED_CAUSAL = ROOT / "checkpoints" / "hybrid_causal" / "model.pth"


@pytest.fixture
def torch_threads():
    """Set torch's thread count inside a test (this module runs single-threaded otherwise)."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.mark.parametrize("which", ["tiny", "shipped"])
@pytest.mark.parametrize("threads", [1, 2])
def test_vectorised_batch_with_conv_cache_equals_the_full_model_on_its_windows(loaded, which, threads,
                                                                                torch_threads):
    """StagerBatch keeps the conv outputs of earlier epochs and splits wearers across threads: every
    step's probabilities equal softmax(model(window)[:, -1]) of the windows it stages, from the
    first epoch of a night (edge padding) on, and after a reset. The shipped causal model reads whole
    nights: its steps equal the model on each wearer's night so far."""
    if which == "shipped":
        if not SHIPPED_CAUSAL.is_file():
            pytest.skip("no shipped causal checkpoint")
        loaded = load_model_from_checkpoint(SHIPPED_CAUSAL)
    model, scaler, ckpt = loaded
    torch_threads(threads)
    n_wearers, seq_len = 10, ckpt["seq_len"]
    batch = StagerBatch(model, scaler, ckpt, n_wearers, batch_size=4)  # 2 threads: 2 parts of 5 wearers
    # the cache where it pays (one model, the window more than twice the receptive field), the plain call elsewhere
    assert (batch.conv is not None) == (hasattr(model, "encode_last") and seq_len > 2 * model.receptive_field)
    assert which != "shipped" or seq_len == 0  # the shipped causal model reads whole nights, a step per epoch
    assert which != "tiny" or batch.conv is not None
    rng = np.random.default_rng(0)
    nights = [[] for _ in range(n_wearers)]  # a whole-night model (seq_len 0): each wearer's scaled rows so far
    for k in range(40):
        if k == 30:
            batch.reset([3, 7])  # a new night for two wearers: their windows start over
            nights[3], nights[7] = [], []
        hr = np.where(rng.random(n_wearers) < 0.1, np.nan, rng.normal(62, 8, n_wearers))
        counts = np.where(rng.random(n_wearers) < 0.1, np.nan, rng.gamma(0.5, 40, n_wearers))
        _, stages, probs = batch.step(hr, activity_count=counts)
        with torch.inference_mode():
            if seq_len == 0:  # the shipped model steps: what it gives each wearer's night so far in one pass
                for w in range(n_wearers):
                    nights[w].append(batch.rows[w, 0])
                expected = np.stack([torch.softmax(model(torch.from_numpy(np.stack(night))[None])[0, -1], dim=-1).numpy()
                                     for night in nights])
            else:
                n = batch.n - 1  # the epoch just staged, per wearer
                epochs = np.clip(n[:, None] + np.arange(seq_len) - (seq_len - 1), 0, n[:, None])
                windows = torch.from_numpy(batch.rows[np.arange(n_wearers)[:, None], epochs % seq_len])
                expected = torch.softmax(model(windows)[:, -1], dim=-1).numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(stages, probs.argmax(1))
    assert torch.get_num_threads() == threads  # the worker threads leave the caller's setting alone


@pytest.mark.parametrize("arch", ["hybrid", "lstm"])
def test_predict_windows_split_across_threads_equals_one_call(tmp_path, arch, torch_threads):
    """On 2 threads, 1,000 windows run as one part per thread: the same probabilities as the full
    model's last position (forward_last is used for it), and as on 1 thread."""
    model, _, _ = load_model_from_checkpoint(untrained_checkpoint(tmp_path / "m.pth", arch=arch))
    windows = np.random.default_rng(0).normal(size=(1000, 25, len(features.DEFAULT_FEATURES))).astype(np.float32)
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(windows))[:, -1], dim=-1).numpy()
    by_threads = {}
    for threads in (1, 2):
        torch_threads(threads)
        by_threads[threads] = evaluation.predict_windows(model, windows, 24, batch_size=128)
        assert torch.get_num_threads() == threads
    np.testing.assert_allclose(by_threads[1], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(by_threads[2], by_threads[1], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the revised stage (a model with a lookahead)

REVISED_PROBS = [c + "_revised" for c in PROB_COLUMNS]


def lookahead_model(arch="hybrid", lookahead=3, matrices=None, names=features.DEFAULT_FEATURES, span=1):
    """A randomly initialised causal model with a lookahead (and revision span): (model, scaler fitted on
    matrices, checkpoint dict)."""
    torch.manual_seed(1)
    tcn = {**TINY_HYBRID, "n_layers": 0, "kernel_size": 3, "dilated": 2}  # dilated convolutions alone
    config = {**{"hybrid": TINY_HYBRID, "lstm": TINY_LSTM, "tcn": tcn, "night": tcn}[arch], "n_features": len(names),
              "causal": True, "lookahead": lookahead, "revision_span": span}
    seq_len = 0 if arch == "night" else 25  # "night": the TCN over whole nights, staged a step per epoch
    arch = "lstm" if arch == "lstm" else "hybrid"
    model = build_model(arch, config).eval()
    scaler = dl.FeatureScaler.fit(matrices)
    return model, scaler, make_checkpoint(model, arch, features=list(names), seq_len=seq_len,
                                          target_pos=max(seq_len - 1, 0), scaler=scaler)


def hr_night(hr, n_epochs, start_s=0.0):
    """A Night of heart-rate readings alone, n_epochs from start_s, and its causal feature matrix."""
    night = dl.night_from_arrays("x", start_s + 30.0 * np.arange(n_epochs), np.zeros(n_epochs, np.int8), hr)
    return night, features.night_features(night, causal=True, features=features.DEFAULT_FEATURES)


def count_model_calls(monkeypatch, model) -> list:
    """(batch size, lags) of every model.forward_last call until monkeypatch.undo()."""
    calls = []
    forward_last = model.forward_last

    def counted(x, lags=False):
        calls.append((x.shape[0], lags))
        return forward_last(x, lags)

    monkeypatch.setattr(model, "forward_last", counted)
    return calls


def starts_of(epochs):
    return [e.epoch_start_s for e in epochs]


@pytest.mark.parametrize("arch,span", [("hybrid", 1), ("lstm", 1), ("hybrid", 3), ("night", 1), ("night", 3)])
def test_replaying_a_night_gives_the_offline_revised_stage_from_the_same_model_calls(arch, span, small_data_dir,
                                                                                     monkeypatch):
    night = dl.load_night(small_data_dir, "46343", cache_dir=None)
    assert not features.no_data(night, causal=True).any()  # every epoch's window is run once
    model, scaler, ckpt = lookahead_model(arch, 3, [features.night_features(night, causal=True, features=features.DEFAULT_FEATURES)],
                                          span=span)
    immediate = evaluation.predict_nights(model, scaler, ckpt, [night])
    revised = evaluation.predict_nights(model, scaler, ckpt, [night], revised=True)
    calls = count_model_calls(monkeypatch, model)
    try:
        frame = realtime.replay_nights(model, scaler, ckpt, small_data_dir, [night])
    finally:
        monkeypatch.undo()
    assert realtime.REVISED_COLUMNS == ["pred_revised", *REVISED_PROBS]
    assert list(frame.columns) == evaluation.PREDICTION_COLUMNS + realtime.REVISED_COLUMNS
    np.testing.assert_allclose(frame[PROB_COLUMNS].to_numpy(), immediate[PROB_COLUMNS].to_numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(frame[REVISED_PROBS].to_numpy(), revised[PROB_COLUMNS].to_numpy(), atol=1e-6, rtol=0)
    assert_same_predictions(frame[REVISED_PROBS].to_numpy(), revised[PROB_COLUMNS].to_numpy(), atol=1e-6)
    assert (frame["pred_revised"] == features.stages_of(frame[REVISED_PROBS].to_numpy())).all()
    assert not np.allclose(frame[REVISED_PROBS].to_numpy(), frame[PROB_COLUMNS].to_numpy())  # another output
    # no extra model call: each epoch's window is run once, every lag from that one call (a whole-night
    # model steps instead, one epoch a step)
    assert sum(size for size, _ in calls) == (0 if arch == "night" else len(night)) and all(lags for _, lags in calls)


@pytest.mark.parametrize("arch", ["hybrid", "lstm"])
def test_predict_windows_gives_every_lag_from_one_call(arch, monkeypatch):
    """every_lag: (n, 1 + lookahead, 4) from one forward_last per chunk; lag 0 is the immediate stage,
    lag j the model's own lag-j output (softmax of forward_last(x, lags=True)[:, j])."""
    windows = np.random.default_rng(2).normal(size=(70, 25, len(features.DEFAULT_FEATURES))).astype(np.float32)
    model, _, _ = lookahead_model(arch, 3, [windows[:, -1]])
    immediate = evaluation.predict_windows(model, windows, 24)
    calls = count_model_calls(monkeypatch, model)
    every = evaluation.predict_windows(model, windows, 24, batch_size=32, every_lag=True)
    monkeypatch.undo()
    assert every.shape == (70, 4, 4) and calls == [(32, True), (32, True), (4, True), (2, True)]  # power-of-two chunks
    np.testing.assert_allclose(every[:, 0], immediate, atol=1e-6, rtol=0)
    with torch.inference_mode():
        direct = torch.softmax(model.forward_last(torch.from_numpy(windows), lags=True), dim=-1).numpy()
    np.testing.assert_allclose(every, direct, atol=1e-6, rtol=0)
    assert evaluation.predict_windows(model, windows[:0], 24, every_lag=True).shape == (0, 4, 4)
    with pytest.raises(ValueError, match="last position"):
        evaluation.predict_windows(model, windows, 12, every_lag=True)


@pytest.mark.parametrize("arch", ["tcn", "lstm"])
def test_a_whole_night_causal_model_revises_from_the_epochs_up_to_its_lookahead_only(arch):
    """seq_len 0 (the night as one sequence), causal with a lookahead: the immediate stage is lag 0 of
    the one pass, the revision revise_night over its every-lag output; epoch t's revision reads no epoch
    after t + lookahead (the night cut there gives it too), and its immediate stage none after t."""
    x = np.random.default_rng(3).normal(size=(60, len(features.DEFAULT_FEATURES))).astype(np.float32)
    model, _, _ = lookahead_model(arch, 3, [x], span=2)
    immediate = evaluation.predict_night(model, x, 0, 0)
    revised = evaluation.predict_night(model, x, 0, 0, revised=True)
    every = evaluation.predict_whole_night(model, x, every_lag=True)
    assert every.shape == (60, 4, 4) and revised.shape == (60, 4)
    np.testing.assert_allclose(every[:, 0], immediate, atol=1e-6, rtol=0)
    np.testing.assert_allclose(revised, evaluation.revise_night(every, 2), atol=1e-12, rtol=0)
    for t in (0, 20, 41):
        np.testing.assert_allclose(evaluation.predict_night(model, x[:t + 4], 0, 0, revised=True)[t], revised[t],
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(evaluation.predict_night(model, x[:t + 1], 0, 0)[t], immediate[t], atol=1e-5, rtol=0)
    assert not np.allclose(revised, immediate, atol=1e-3)  # the revision reads later epochs
    assert evaluation.predict_whole_night(model, x[:0], every_lag=True).shape == (0, 4, 4)
    if arch == "lstm":  # no step form: the stream refuses it (the TCN streams: the replay tests)
        scaler = dl.FeatureScaler.fit([x])
        checkpoint = make_checkpoint(model, "lstm", features=list(features.DEFAULT_FEATURES), seq_len=0, target_pos=0,
                                     scaler=scaler)
        with pytest.raises(ValueError, match="only the hybrid without a Transformer \\(n_layers 0\\) stages them"):
            StreamingStager(model, scaler, checkpoint)


def test_the_revision_averages_the_windows_of_its_span_and_at_a_nights_end_those_it_has():
    """evaluation.revise_night, lookahead 3, span 2: epoch t is the mean of window t+2's lag 2 and window
    t+3's lag 3; near the end, the windows of the span the night has, else the last window's lag."""
    every_lag = np.random.default_rng(4).dirichlet(np.ones(4), size=(6, 4))  # (epochs, 1 + lookahead, 4)
    revised = evaluation.revise_night(every_lag, span=2)
    expected = [(every_lag[t + 2, 2] + every_lag[t + 3, 3]) / 2 for t in range(3)]
    expected += [every_lag[5, 2], every_lag[5, 1], every_lag[5, 0]]  # epoch 3: window 5 (lag 2) is the span's
    np.testing.assert_allclose(revised, np.array(expected), rtol=0, atol=1e-12)
    # span 1 is lag 3 alone (the last window at the shorter lag near the end), span 4 every lag
    np.testing.assert_array_equal(evaluation.revise_night(every_lag, 1)[:3], every_lag[[3, 4, 5], 3])
    np.testing.assert_allclose(evaluation.revise_night(every_lag, 4)[0], every_lag[[0, 1, 2, 3], [0, 1, 2, 3]].mean(0))
    assert evaluation.revision_lags(3, 2) == (2, 3) and evaluation.revision_lags(3, 2, later=0) == (0, 0)
    with pytest.raises(ValueError, match="revision_span must be 1 .. lookahead \\+ 1 = 4, got 5"):
        realtime.Revisions(3, 5)
    for arch in ("hybrid", "lstm"):
        with pytest.raises(ValueError, match="revision_span must be 1 .. lookahead \\+ 1 = 4, got 5"):
            lookahead_model(arch, 3, [np.zeros((2, len(features.DEFAULT_FEATURES)))], span=5)
    with pytest.raises(ValueError, match="revision_span must be 1 .. lookahead \\+ 1 = 4, got 0"):
        evaluation.revise_night(every_lag, span=0)


@pytest.mark.parametrize("span", [1, 2])
def test_revisions_through_a_watch_off_stretch_a_new_night_and_the_nights_end(span):
    """Epochs staged from context just before a stretch without data are revised by the windows of
    no-data epochs (kept for it); a jump to a new night revises the old night's last epochs from its
    last windows at shorter lags; the final flush does the same for the new night."""
    hr1 = np.vstack([hr_rows(0, 600), hr_rows(3000, 3600)])  # the watch off for 40 min
    hr2 = hr_rows(30000, 31200, bpm=55.0)                     # 7 h later (max_gap_s 6 h): a new night
    (night1, x1), (night2, x2) = hr_night(hr1, 120), hr_night(hr2, 40, start_s=30000.0)
    model, scaler, ckpt = lookahead_model("hybrid", 3, [x1, x2], span=span)
    offline = evaluation.predict_nights(model, scaler, ckpt, [night1, night2], revised=True)
    stager = StreamingStager(model, scaler, ckpt)
    immediate = realtime.replay(stager, {"heart_rate": np.vstack([hr1, hr2])}, end_s=31200.0)
    revised = stager.take_revised()
    assert stager.stats["new_nights"] == 1 and stager.take_revised() == []
    assert starts_of(revised) == starts_of(immediate) == list(offline["epoch_start_s"])
    np.testing.assert_allclose(probs_of(revised), offline[PROB_COLUMNS].to_numpy(), atol=1e-6, rtol=0)
    stages, revised_stages = np.array([e.stage for e in immediate]), np.array([e.stage for e in revised])
    np.testing.assert_array_equal(np.flatnonzero(stages == -1), np.arange(40, 100))  # causal no data
    np.testing.assert_array_equal(revised_stages == -1, stages == -1)  # no data: no revision either
    assert np.isfinite(probs_of(revised)[37:40]).all()  # from the windows of no-data epochs 40-42
    np.testing.assert_array_equal(revised_stages, features.stages_of(probs_of(revised)))


def test_flush_revises_what_waits_from_the_latest_window_and_a_tick_does_not():
    hr = hr_rows(0, 600)
    night, x = hr_night(hr, 20)
    model, scaler, ckpt = lookahead_model("lstm", 3, [x])
    stager = StreamingStager(model, scaler, ckpt)
    immediate = stager.push_heart_rate(hr[hr[:, 0] < 300, 0], hr[hr[:, 0] < 300, 1])  # epochs 0-8 close
    assert len(immediate) == 9 and starts_of(stager.take_revised()) == [30.0 * k for k in range(6)]  # 3 back
    immediate += stager.tick(300.0)  # closes epoch 9 and, from its window, revises epoch 6
    assert starts_of(stager.take_revised()) == [180.0]
    assert stager.flush(300.0, revise=False) == [] and stager.take_revised() == []  # a clock tick only
    assert stager.flush(300.0) == []  # the night's end: epochs 7-9 from epoch 9's window, lags 2, 1, 0
    at_end = stager.take_revised()
    assert starts_of(at_end) == [210.0, 240.0, 270.0] and stager.flush(300.0) == [] == stager.take_revised()
    np.testing.assert_allclose(at_end[-1].probabilities, immediate[-1].probabilities, atol=1e-7)  # lag 0
    short = evaluation.predict_nights(model, scaler, ckpt, [hr_night(hr[hr[:, 0] < 300], 10)[0]], revised=True)
    np.testing.assert_allclose(probs_of(at_end), short[PROB_COLUMNS].to_numpy()[7:], atol=1e-6, rtol=0)
    # the night goes on: later epochs are revised as usual, the ones already revised are not again
    stager.push_heart_rate(hr[hr[:, 0] >= 300, 0], hr[hr[:, 0] >= 300, 1])
    stager.flush(600.0)
    later = stager.take_revised()
    assert starts_of(later) == [30.0 * k for k in range(10, 20)]
    whole = evaluation.predict_nights(model, scaler, ckpt, [night], revised=True)
    np.testing.assert_allclose(probs_of(later), whole[PROB_COLUMNS].to_numpy()[10:], atol=1e-6, rtol=0)
    # a night shorter than the lookahead: every epoch from its last window
    tiny = StreamingStager(model, scaler, ckpt)
    realtime.replay(tiny, {"heart_rate": hr[hr[:, 0] < 60]}, end_s=60.0)
    expected = evaluation.predict_nights(model, scaler, ckpt, [hr_night(hr[hr[:, 0] < 60], 2)[0]], revised=True)
    np.testing.assert_allclose(probs_of(tiny.take_revised()), expected[PROB_COLUMNS].to_numpy(), atol=1e-6, rtol=0)


def test_a_model_without_lookahead_gives_no_revisions(small_data_dir, loaded):
    model, scaler, ckpt = loaded
    assert realtime.lookahead_of(model) == 0
    night = dl.load_night(small_data_dir, "3509524", cache_dir=None)
    frame = realtime.replay_nights(model, scaler, ckpt, small_data_dir, [night])
    assert list(frame.columns) == evaluation.PREDICTION_COLUMNS and len(frame) == len(night)
    stager = make_stager(loaded)
    assert len(realtime.replay(stager, {"heart_rate": hr_rows(0, 600)}, end_s=600.0)) == 20
    assert stager.take_revised() == []
    pool = StagerPool(model, scaler, ckpt)
    pool.push("w", "heart_rate", [0.0, 40.0], [60.0, 62.0])
    pool.flush(60.0)
    assert len(pool.predict()["w"]) == 2 and pool.take_revised() == {}
    batch = StagerBatch(model, scaler, ckpt, n_wearers=2)
    batch.step(np.array([60.0, 61.0]))
    assert len(batch.revised.wearer) == 0 and len(batch.end_night().wearer) == 0
    lookahead, scaler_la, ckpt_la = lookahead_model("hybrid", 2, [np.random.default_rng(0).normal(size=(5, 13))])
    with pytest.raises(ValueError, match="last position"):
        StreamingStager(lookahead, scaler_la, {**ckpt_la, "target_pos": 12})


def by_wearer(revised_batches, n_wearers):
    """StagerBatch RevisedEpochs, in the order given, split by wearer: [(starts, probabilities)]."""
    out = [([], []) for _ in range(n_wearers)]
    for r in revised_batches:
        for w, start, p in zip(r.wearer, r.epoch_start_s, r.probabilities):
            out[w][0].append(start)
            out[w][1].append(p)
    return out


@pytest.mark.parametrize("arch,span", [("hybrid", 1), ("lstm", 1), ("tcn", 1), ("tcn", 3), ("night", 3)])  # StagerBatch: the conv
def test_pool_and_batch_revise_as_one_stager_each(arch, span, small_data_dir):                  # cache, predict_windows
    subjects = ("46343", "3509524", "4018081")
    n_epochs = 90
    end_s = 30.0 * n_epochs
    readings = cropped_readings(small_data_dir, subjects, end_s)
    # the watch off for 15 min: no-data epochs, whose windows still revise earlier ones
    readings[1] = {k: v[(v[:, 0] < 600) | (v[:, 0] >= 1500)] for k, v in readings[1].items()}
    night = dl.load_night(small_data_dir, subjects[0], cache_dir=None)
    model, scaler, ckpt = lookahead_model(arch, 4, [features.night_features(night, causal=True, features=features.DEFAULT_FEATURES)],
                                          span=span)
    expected = []
    for r in readings:
        alone = StreamingStager(model, scaler, ckpt)
        immediate = realtime.replay(alone, r, end_s=end_s)
        expected.append((immediate, alone.take_revised()))
    assert [e.stage for e in expected[1][1]].count(-1) > 0
    # the pool: each wearer's new readings every minute, one predict for all
    pool = StagerPool(model, scaler, ckpt)
    pooled = {w: [] for w in range(len(subjects))}
    for end in np.arange(60.0, end_s + 1, 60.0):
        for w, r in enumerate(readings):
            for kind, rows in realtime.time_ordered_runs(r, end - 60, end):
                pool.push(w, kind, rows[:, 0], *rows[:, 1:].T)
        pool.predict()
        for w, epochs in pool.take_revised().items():
            pooled[w] += epochs
    assert all(len(pooled[w]) == n_epochs - 5 for w in pooled)  # epoch 89 is still open, 4 wait for it
    pool.flush(end_s)
    pool.predict()
    for w, epochs in pool.take_revised().items():
        pooled[w] += epochs
    # the batch: one step per epoch for everyone; the night's end for wearer 0 by reset, the rest by end_night
    batch = StagerBatch(model, scaler, ckpt, n_wearers=len(subjects))
    assert (batch.conv is not None) == (arch == "hybrid")  # the TCN's window is not twice its field
    steps = []
    for k in range(n_epochs):
        batch.step(**epoch_aggregates(batch, readings, k))
        steps.append(batch.revised)
    at_reset = batch.reset([0])
    assert at_reset.wearer.tolist() == [0] * 4 and batch.n[0] == 0
    ends = batch.end_night()
    assert ends.wearer.tolist() == [1] * 4 + [2] * 4 and len(batch.end_night().wearer) == 0
    batched = by_wearer(steps + [at_reset, ends], len(subjects))
    for w, (immediate, revised) in enumerate(expected):
        assert starts_of(revised) == starts_of(immediate) == starts_of(pooled[w]) == batched[w][0]
        np.testing.assert_allclose(probs_of(pooled[w]), probs_of(revised), atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.stack(batched[w][1]), probs_of(revised), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the revised stage on the command line

def test_cli_realtime_with_a_lookahead_model_writes_and_reports_the_revised_stage(two_subject_dir, tmp_path, capsys):
    """--realtime with a lookahead: the CSV adds pred_revised and its probabilities (predict_nights(revised=True)
    of the same nights), the report prints the revised stage's figures beside the immediate one's."""
    nights = [dl.load_night(two_subject_dir, s, cache_dir=None) for s in REPLAY_SUBJECTS]
    model, scaler, ckpt = lookahead_model("hybrid", 3, [features.night_features(n, causal=True,
                                                                                features=features.DEFAULT_FEATURES)
                                                         for n in nights], span=2)
    path, csv = tmp_path / "lookahead.pth", tmp_path / "streamed.csv"
    save_checkpoint(ckpt, path)
    assert inference_cli.main("hybrid", path, ["--checkpoint", str(path), "--realtime", "--data-dir",
                                               str(two_subject_dir), "--predictions-out", str(csv),
                                               "--plots-dir", ""]) == 0
    text = capsys.readouterr().out
    streamed = pd.read_csv(csv)
    assert list(streamed.columns) == evaluation.PREDICTION_COLUMNS + realtime.REVISED_COLUMNS
    order = list(streamed["subject"].astype(str).unique())
    offline = evaluation.predict_nights(model, scaler, ckpt, sorted(nights, key=lambda n: order.index(n.subject_id)),
                                        revised=True)
    assert_same_predictions(streamed[REVISED_PROBS].to_numpy(), offline[PROB_COLUMNS].to_numpy(), atol=1e-5)
    near_tie = np.diff(np.sort(offline[PROB_COLUMNS].to_numpy(), axis=1)[:, -2:], axis=1)[:, 0] <= 1e-4
    assert ((streamed["pred_revised"] == offline["pred"]) | near_tie).all()
    assert ("revised stage: each epoch staged again 3 epochs (1.5 min) later, the mean of the model's 2 latest "
            "outputs for it (pred_revised)") in text
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in text.splitlines()
            if line.split()[:1] in (["immediate"], ["revised"]) and len(line.split()) == 8}
    y_true = streamed["true_stage"].to_numpy()
    for name, column in (("immediate", "pred"), ("revised", "pred_revised")):
        m = evaluation.compute_metrics(y_true, streamed[column].to_numpy())
        assert rows[name] == [round(m[k], 3) for k in ("accuracy", "kappa", "macro_f1", "recall_wake",
                                                          "recall_light", "recall_deep", "recall_rem")], name
    assert rows["immediate"] != rows["revised"]
    assert f"kappa {rows['immediate'][1]:.3f}" in text  # the headline is the immediate stage's, as before


def test_cli_follow_prints_revisions_as_they_come(tmp_path, small_data_dir):
    """--follow with a lookahead: a line per closed epoch as before, and a line ending in "revised" for each
    revision, right after the push that gave it."""
    readings = realtime.recorded_readings(small_data_dir, "46343")
    hr = readings["heart_rate"][(readings["heart_rate"][:, 0] >= 0) & (readings["heart_rate"][:, 0] < 900)]
    night, x = hr_night(hr, 30)
    model, scaler, ckpt = lookahead_model("lstm", 3, [x])
    path = tmp_path / "hr.csv"
    path.write_text("".join(f"{t:.3f},{bpm:g}\n" for t, bpm in hr))
    out, err = io.StringIO(), io.StringIO()
    stager = StreamingStager(model, scaler, ckpt)
    assert inference_cli.follow(stager, [f"hr={path}"], timeout_s=0.3, poll_s=0.05, out=out, err=err) == 29
    alone = StreamingStager(model, scaler, ckpt)
    immediate = realtime.replay(alone, {"heart_rate": hr})
    revised = alone.take_revised()
    assert len(immediate) == 29 and len(revised) == 26  # the last epoch is open, 3 wait for their look-ahead
    lines = out.getvalue().splitlines()
    assert lines == [inference_cli.format_epoch(e, 0.0) for e in immediate] + \
        [inference_cli.format_epoch(e, 0.0, revised=True) for e in revised]
    assert "stopped: 29 epoch(s) staged, 26 revised" in err.getvalue()
