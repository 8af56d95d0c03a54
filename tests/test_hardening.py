"""Hostile input, interrupted and repeated runs: parsers only ever raise DataError; a SIGKILLed
training run loses nothing and --resume reaches the uninterrupted result; the same seed gives the
same run, bit for bit, on CPU."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data_loader as dl
import features
import training
from checkpoint import load_model_from_checkpoint, read_checkpoint
from conftest import BUNDLED, ROOT

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
REAL_LABELS = gzip.decompress((BUNDLED / "labels" / "46343_labeled_sleep.txt.gz").read_bytes())[:3000]
REAL_HR = gzip.decompress((BUNDLED / "heart_rate" / "46343_heartrate.txt.gz").read_bytes())[-4000:]


def _write_subject(root, labels: bytes, hr: bytes, counts: bytes | None = None):
    for folder, name, data in (("labels", "1_labeled_sleep.txt", labels), ("heart_rate", "1_heartrate.txt", hr),
                               ("counts", "1_counts.txt", counts)):
        if data is not None:
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / name).write_bytes(data)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for position, value in edits:
        if buf:
            buf[position % len(buf)] = value
    return bytes(buf)


@FUZZ
@given(st.binary(max_size=400), st.integers(1, 4))
def test_read_signal_on_random_bytes_raises_only_data_error(tmp_path, data, n_cols):
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    try:
        values = dl.read_signal(path, n_cols)
    except dl.DataError as exc:
        assert str(path) in str(exc)
    else:
        assert values.ndim == 2 and values.shape[1] == n_cols and np.isfinite(values).all()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(b"0123456789-.,e \n\tnaif\x00x")), max_size=12),
       st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(b"0123456789-.,e \n\tnaif\x00x")), max_size=12))
def test_mutated_real_files_load_or_fail_with_a_clear_error(tmp_path_factory, label_edits, hr_edits):
    root = tmp_path_factory.mktemp("fuzz")
    _write_subject(root, _mutate(REAL_LABELS, label_edits), _mutate(REAL_HR, hr_edits))
    try:
        night = dl.parse_night(root, "1")
    except dl.DataError as exc:
        message = str(exc)
        assert "1_labeled_sleep.txt" in message or "1_heartrate.txt" in message or "subject 1" in message
    else:
        assert len(night) > 0 and set(np.unique(night.stage)) <= {-1, 0, 1, 2, 3}
        assert np.isfinite(features.night_features(night)).all() and np.isfinite(features.night_features(night, causal=False)).all()


@FUZZ
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=60))
def test_any_heart_rate_values_give_finite_features_or_a_clear_error(tmp_path_factory, bpm):
    root = tmp_path_factory.mktemp("hr")
    hr = "".join(f"{5 * i},{v}\n" for i, v in enumerate(bpm)).encode()
    _write_subject(root, b"0 0\n30 1\n60 2\n90 5\n", hr, b"0,5\n15,nan\n30,-3\n")
    try:
        night = dl.parse_night(root, "1")
    except dl.DataError as exc:
        assert "heart" in str(exc)
    else:
        assert np.isfinite(features.night_features(night)).all()


def _motion_text(n_rows: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    xyz = rng.normal(0, 0.5, (n_rows, 3))
    return [f"{i / 50:.5f} {x:.6f} {y:.6f} {z:.6f}" for i, (x, y, z) in enumerate(xyz)]


@pytest.mark.parametrize("gz", [False, True])
def test_chunked_reading_keeps_results_and_line_numbers_across_chunks(tmp_path, gz):
    lines = _motion_text(500)
    for i in (0, 3, 4, 99, 250, 499):
        lines[i] = ""                                         # blank lines, also at chunk edges
    lines[7], lines[120], lines[301] = "0.14 nan 0 1", "2.4 0 inf 1", "6.02 20 0 0"   # NaN, inf, > 16 g
    path = tmp_path / ("m.txt.gz" if gz else "m.txt")

    def write(rows):
        data = ("\n".join(rows) + "\n").encode()
        path.write_bytes(gzip.compress(data) if gz else data)

    write(lines)
    in_range = lambda v: (np.abs(v[:, 1:4]) <= dl.MOTION_MAX_G).all(axis=1)  # noqa: E731
    whole, whole_report = dl.read_signal(path, 4, report := {}, keep=in_range, chunk_rows=10**6), report
    assert whole.shape == (491, 4) and whole_report == {"non_finite": 2, "out_of_range": 1}
    for chunk_rows in (1, 3, 7, 100):
        report = {}
        np.testing.assert_array_equal(dl.read_signal(path, 4, report, keep=in_range, chunk_rows=chunk_rows), whole)
        assert report == whole_report
        for bad_line, row, reason in ((401, "8.0 0 1", "expected 4 fields, found 3"),
                                      (450, "9.0 0 1 x", "'x' is not a number"),
                                      (1, "0 0 0 1 5", "expected 4 fields, found 5")):
            broken = list(lines)
            broken[bad_line - 1] = row
            write(broken)
            with pytest.raises(dl.DataError, match=rf"m\.txt(\.gz)?, line {bad_line}: {reason}"):
                dl.read_signal(path, 4, chunk_rows=chunk_rows)
            write(lines)


def _train_cmd(data_dir, out, epochs, *extra):
    return [sys.executable, "train_hybrid.py", "--data-dir", str(data_dir), "--out-dir", str(out),
            "--epochs", str(epochs), "--stride", "25", "--batch-size", "32", *extra]


def test_sigkill_during_training_loses_nothing_and_resume_matches(small_data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(small_data_dir, straight, 6), cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=300)
    rng = np.random.default_rng(int(time.time()))
    proc = subprocess.Popen(_train_cmd(small_data_dir, killed, 6), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "last.pth").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))  # somewhere in a later epoch, possibly mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(pd.read_csv(killed / "train_log.csv")) < 6
    # whatever was on disk when it died is complete: the checkpoints load
    load_model_from_checkpoint(killed / "model.pth")
    load_model_from_checkpoint(killed / "last.pth")
    subprocess.run(_train_cmd(small_data_dir, killed, 6, "--resume"), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    a = pd.read_csv(straight / "train_log.csv").drop(columns=["seconds", "windows_per_s"])
    b = pd.read_csv(killed / "train_log.csv").drop(columns=["seconds", "windows_per_s"])
    pd.testing.assert_frame_equal(a, b)
    assert (straight / "test_metrics.json").read_text().split('"train_minutes"')[0] == \
        (killed / "test_metrics.json").read_text().split('"train_minutes"')[0]


TINY_HYBRID = {"channels": 16, "kernel_size": 3, "n_layers": 1, "n_heads": 2}


def _tiny_run(data_dir, out, seed):
    """A 2-epoch tiny hybrid (as test_training.tiny_run) with the given seed: its log, test metrics, weights."""
    argv = ["--data-dir", str(data_dir), "--out-dir", str(out), "--epochs", "2", "--batch-size", "64",
            "--stride", "10", "--seed", str(seed)]
    assert training.run("hybrid", TINY_HYBRID, training.TrainConfig(), argv) == 0
    log = pd.read_csv(out / "train_log.csv").drop(columns=["seconds", "windows_per_s"])
    metrics = json.loads((out / "test_metrics.json").read_text())
    metrics.pop("train_minutes")
    return log, metrics, read_checkpoint(out / "model.pth")["state_dict"]


def test_same_seed_and_data_give_identical_runs_on_cpu_and_another_seed_does_not(small_data_dir, tmp_path):
    log_a, metrics_a, weights_a = _tiny_run(small_data_dir, tmp_path / "a", seed=7)
    log_b, metrics_b, weights_b = _tiny_run(small_data_dir, tmp_path / "b", seed=7)
    pd.testing.assert_frame_equal(log_a, log_b, check_exact=True)
    assert metrics_a == metrics_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    log_c, metrics_c, weights_c = _tiny_run(small_data_dir, tmp_path / "c", seed=8)
    assert metrics_c["test_subjects"] == metrics_a["test_subjects"]  # the split has its own seed
    assert not log_c.equals(log_a) and metrics_c != metrics_a
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["heart_rate", "motion", "steps"]),
       st.sampled_from([b"", b"timestamp,heart_rate\n", b"time,x,y,z\n", b"t,count\n", b"datetime,steps\n"]))
def test_user_csv_reader_on_random_bytes_raises_only_data_error(tmp_path_factory, data, role, header):
    import user_data
    path = tmp_path_factory.mktemp("user") / "export.csv"
    path.write_bytes(header + data)
    try:
        user_data.read_user_signal(path, role)
    except dl.DataError as exc:
        assert str(path) in str(exc)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(b"0123456789-:.,TZ+ \n\tnaif\x00x")), max_size=12))
def test_mutated_user_csv_exports_load_or_fail_with_a_clear_error(tmp_path_factory, edits):
    import user_data
    root = tmp_path_factory.mktemp("user-mutated")
    hr = "timestamp,heart_rate\n" + "".join(f"2024-03-01T23:{m:02d}:{s:02d}+01:00,{60 + (m * 7 + s) % 25}\n"
                                             for m in range(0, 20) for s in range(0, 60, 5))
    counts = "time,count\n" + "".join(f"2024-03-01T23:{m:02d}:{s:02d}+01:00,{(m * s) % 40}\n"
                                       for m in range(0, 20) for s in (0, 15, 30, 45))
    (root / "hr.csv").write_bytes(_mutate(hr.encode(), edits))
    (root / "counts.csv").write_bytes(counts.encode())
    try:
        recording = user_data.load_recording(root / "hr.csv", root / "counts.csv")
    except dl.DataError as exc:
        assert "hr.csv" in str(exc) or "counts.csv" in str(exc)
    else:
        assert recording is not None


def test_a_write_that_dies_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    from checkpoint import atomic_write
    target = tmp_path / "model.pth"
    atomic_write(target, lambda f: f.write(b"previous checkpoint"))

    def dies_midway(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt  # what a kill between write and rename looks like to this process

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies_midway)
    assert target.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]  # no temp file left behind
