"""Sleep metrics on hand-made hypnograms with known answers, and the agreement summary."""
import math

import numpy as np
import pandas as pd

import sleep_metrics as sm


def test_hand_made_night_known_answers():
    # 10 min awake, then sleep: 20 L, 4 W, 10 D, 2 W, 6 R, 1 L, then 3 W at the end (epochs)
    stages = [0] * 20 + [1] * 20 + [0] * 4 + [2] * 10 + [0] * 2 + [3] * 6 + [1] * 1 + [0] * 3
    m = sm.sleep_metrics(np.array(stages))
    assert m["time_in_bed_min"] == len(stages) / 2 == 33.0
    assert m["sleep_onset_latency_min"] == 10.0
    assert m["total_sleep_time_min"] == (20 + 10 + 6 + 1) / 2
    assert math.isclose(m["sleep_efficiency_pct"], 100 * 18.5 / 33.0)
    assert m["waso_min"] == 3.0          # 4 + 2 epochs between onset and the last sleep epoch
    assert m["awakenings"] == 2
    assert m["rem_latency_min"] == (20 + 4 + 10 + 2) / 2  # from sleep onset
    assert (m["light_min"], m["deep_min"], m["rem_min"], m["wake_min"]) == (10.5, 5.0, 3.0, 14.5)
    assert math.isclose(m["light_pct"] + m["deep_pct"] + m["rem_pct"], 100.0)


def test_unscored_counts_as_not_asleep_and_no_sleep_is_safe():
    m = sm.sleep_metrics(np.array([-1, -1, 1, 1, -1, 1]))
    assert m["sleep_onset_latency_min"] == 1.0 and m["waso_min"] == 0.5 and m["awakenings"] == 1
    assert math.isnan(m["rem_latency_min"])
    awake = sm.sleep_metrics(np.zeros(10, int))
    assert awake["total_sleep_time_min"] == 0 and awake["awakenings"] == 0 and math.isnan(awake["light_pct"])


def test_agreement_bias_and_limits():
    rows = []
    for subject, shift in (("a", 2), ("b", 4)):
        true = np.array([0] * 10 + [1] * 50 + [3] * 20)
        pred = true.copy()
        pred[10:10 + shift] = 0  # predicted sleep onset `shift` epochs late
        rows.append(pd.DataFrame({"subject": subject, "epoch_start_s": 30 * np.arange(80), "true_stage": true,
                                  "pred": pred}))
    comparison = sm.compare(pd.concat(rows))
    table = sm.agreement(comparison)
    assert table.loc["sleep_onset_latency_min", "bias"] == 1.5   # (1 + 2) / 2 minutes
    assert table.loc["total_sleep_time_min", "bias"] == -1.5
    assert math.isclose(table.loc["sleep_onset_latency_min", "sd"], np.std([1, 2], ddof=1))
    assert table.loc["rem_min", "bias"] == 0 and table.loc["rem_min", "mean_abs_error"] == 0


def test_cli_prints_agreement_and_plots(tmp_path, capsys):
    true = np.array([0] * 10 + [1] * 50 + [2] * 10 + [3] * 20)
    frame = pd.concat([pd.DataFrame({"subject": s, "epoch_start_s": 30 * np.arange(90), "true_stage": true,
                                     "pred": np.roll(true, k)}) for s, k in (("x", 1), ("y", 3), ("z", 0))])
    path = tmp_path / "p.csv"
    frame.to_csv(path, index=False)
    assert sm.main(["--predictions", str(path), "--plot", str(tmp_path / "ba.png")]) == 0
    assert "total_sleep_time_min" in capsys.readouterr().out
    assert (tmp_path / "ba.png").stat().st_size > 1000
    frame.drop(columns="pred").to_csv(path, index=False)
    assert sm.main(["--predictions", str(path)]) == 1
    assert "lacks column(s) ['pred']" in capsys.readouterr().err
