"""Long-running measurement scripts say on stderr what they are doing; stdout stays their JSON.

benchmark.py is covered in test_benchmark.py; scale_check.py trains models, so only its helper
(the same memory_check.progress) is exercised here through the others.
"""
import json
import re

import loadtest
import memory_check
import soak

LINE = re.compile(r"^\[ *\d+\.\d s\] ")


def steps_in_order(err: str, steps: list[str]) -> list[str]:
    lines = [line for line in err.splitlines() if LINE.match(line)]
    positions = [next((i for i, line in enumerate(lines) if step in line), None) for step in steps]
    assert None not in positions, (steps, lines)
    assert positions == sorted(positions), lines
    return lines


def test_soak_reports_every_simulated_hour_and_an_early_stop(capsys):
    assert soak.main(["--wearers", "3", "--hours", "2.5", "--max-seconds", "60"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["simulated_epochs"] == 300
    # the shipped model revises: the soak collects the revisions (a pool keeps them until taken)
    assert 0 < result["wearer_epochs_revised"] <= result["wearer_epochs_staged"] == 3 * 300
    steps_in_order(captured.err, ["soak: 3 wearers, 2.5 simulated h (300 epochs), path pool",
                                  "epoch 120/300 (1.00 simulated h)", "epoch 240/300 (2.00 simulated h)"])
    capsys.readouterr()
    assert soak.main(["--wearers", "2", "--hours", "8", "--max-seconds", "0.001"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["stopped_early"] is True
    steps_in_order(captured.err, ["soak: 2 wearers", "soak: stopping after 0 s (--max-seconds 0.001)"])


def test_memory_check_reports_each_step(tmp_path, capsys):
    assert memory_check.main(["--hours", "0.02", "--subjects", "1", "--workdir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["subjects"]["1"]["peak_rss_mib"] > 0
    steps_in_order(captured.err, ["memory_check: writing a 0.02 h synthetic night", "parsing it in a fresh process",
                                  "loading 1 subject(s) in one process", "memory_check: done"])


def test_loadtest_reports_each_step(capsys):
    argv = ["--wearers", "3", "--seconds", "1", "--mode", "single", "--fast-path-rounds", "1"]
    assert loadtest.main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["single"]["epochs_lost"] == 0
    steps_in_order(captured.err, ["loadtest: preparing the nights", "loadtest: in-process fast path, 3 wearers",
                                  "3 wearers x 3 rounds, 1 torch thread(s)", "single mode: starting serve.py",
                                  "single mode: 3 wearers for 1 s", "single mode: checking the database",
                                  "loadtest: single: "])
