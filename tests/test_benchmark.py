"""benchmark.py smoke run: every section runs and reports positive numbers (no timing thresholds)."""
import json
import re

import benchmark


def test_quick_benchmark_reports_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--json-out", str(out), "--checkpoint-dir", str(tmp_path / "no-checkpoints"),
            "--stream-epochs", "5", "--wearers", "12", "--rounds", "1", "--warmup-rounds", "1", "--threads", "1",
            "--repeats", "1", "--offline-epochs", "30"]
    assert benchmark.main(argv) == 0
    report = json.loads(out.read_text())
    captured = capsys.readouterr()
    assert json.loads(captured.out) == report  # progress goes to stderr, stdout stays the JSON
    # a line on stderr before every step that takes a while, in order, each with the seconds so far
    steps = ["loading the nights in", "1/5 streaming update latency", "2/5 batched wearers, shipped",
             "12 wearers x 2 rounds, 1 torch thread(s)", "2/5 batched wearers, compact",
             "3/5 whole-night scoring, hybrid", "3/5 whole-night scoring, lstm", "4/5 loading the nights",
             "5/5 writing and parsing a synthetic Apple Health export of 2 MB", "parsing 2 MB of XML", "done in"]
    lines = captured.err.splitlines()
    assert all(re.match(r"\[ *\d+\.\d s\] ", line) for line in lines), lines
    positions = [next(i for i, line in enumerate(lines) if step in line) for step in steps]
    assert positions == sorted(positions), lines
    assert set(report) >= {"machine", "stream_update", "batched", "offline_scoring", "data_loading", "targets", "met"}
    stream = report["stream_update"]
    assert stream["fresh"] and "not found" in stream["note"] and stream["epochs_timed"] >= 4
    for key in ("p50_ms", "p99_ms", "mean_ms", "model_call_p50_ms"):
        assert stream[key] > 0
    for section in ("batched", "batched_compact"):
        batched = report[section]
        assert batched["wearers"] == 12 and batched["best_threads"] == 1 and batched["fresh"]
        for path in ("vectorised", "pool", "model_only"):
            assert batched[path]["wearer_epochs_per_s"] > 0 and set(batched[path]["by_threads"]) == {"1"}
        assert batched["vectorised_equals_pool"] is True
    assert report["batched_compact"]["channels"] == 32 and "channels" in report["batched_compact"]["note"]
    for arch in ("hybrid", "lstm"):
        scoring = report["offline_scoring"][arch]
        assert scoring["fresh"] and scoring["seconds_per_night"] > 0 and scoring["nights"] == 3
        assert scoring["cropped_to_epochs"] == 30
    loading = report["data_loading"]
    assert loading["subjects"] == 25 and loading["cold_s"] > 0 and loading["cached_s"] > 0
    assert set(report["met"]) == set(report["targets"]) == {"stream_update_p99_ms", "batched_wearer_epochs_per_s",
                                                           "batched_compact_wearer_epochs_per_s"}
    assert all(isinstance(v, bool) for v in report["met"].values())
