"""Sleep metrics on hand-made hypnograms with known answers, the agreement summary, and
inference*.py --sleep-metrics on a tiny trained checkpoint."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

import evaluation
import inference_cli
import sleep_metrics as sm
import training


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


def test_a_predicted_night_leaves_its_no_data_epochs_out():
    """night_metrics (the reports and the service): the watch off is neither sleep nor wake."""
    # 2 W, 4 L, 6 no data, 2 W, 4 D, 2 no data, 2 R
    stages = np.array([0] * 2 + [1] * 4 + [-1] * 6 + [0] * 2 + [2] * 4 + [-1] * 2 + [3] * 2)
    m = sm.night_metrics(stages)
    assert m["no_data_min"] == 4.0 and m["time_in_bed_min"] == 7.0 and m["total_sleep_time_min"] == 5.0
    assert m["waso_min"] == 1.0 and m["awakenings"] == 1 and math.isclose(m["sleep_efficiency_pct"], 100 * 5 / 7)
    assert m["rem_latency_min"] == 5.0  # from onset, over the staged epochs only
    assert {k: v for k, v in m.items() if k != "no_data_min"} == sm.sleep_metrics(stages[stages >= 0])
    assert sm.night_metrics(np.full(4, -1))["time_in_bed_min"] == 0 and sm.night_metrics([])["no_data_min"] == 0


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


def test_scored_only_compares_the_psg_scored_period():
    true = np.array([-1] * 6 + [0] * 4 + [1] * 10 + [-1] * 2 + [3] * 6 + [-1] * 4)
    pred = np.array([1] * 6 + [0] * 2 + [1] * 12 + [1] * 2 + [3] * 6 + [1] * 4)
    frame = pd.DataFrame({"subject": "a", "epoch_start_s": 30 * np.arange(len(true)), "true_stage": true, "pred": pred})
    full = sm.compare(frame).set_index("metric")
    cut = sm.compare(frame, scored_only=True).set_index("metric")
    # whole recording: predicted sleep in unscored epochs counts against the PSG
    assert full.loc["total_sleep_time_min", "difference"] == (len(true) - 2 - 16) / 2
    # scored period (epochs 6-27): both hypnograms cover it, the 2 unscored epochs inside it are not sleep in both
    assert cut.loc["time_in_bed_min", "psg"] == cut.loc["time_in_bed_min", "predicted"] == 11.0
    assert cut.loc["total_sleep_time_min", "difference"] == 1.0 and cut.loc["sleep_onset_latency_min", "difference"] == -1.0
    assert cut.loc["waso_min", "psg"] == cut.loc["waso_min", "predicted"] == 1.0
    unscored = frame.assign(true_stage=-1)
    assert sm.compare(unscored, scored_only=True).empty


@pytest.fixture(scope="module")
def tiny_ckpt(small_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-hybrid")
    argv = ["--data-dir", str(small_data_dir), "--out-dir", str(out), "--epochs", "1", "--stride", "25",
            "--batch-size", "64"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert training.run("hybrid", {"channels": 16, "kernel_size": 3, "n_layers": 1, "n_heads": 2},
                            training.TrainConfig(), argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "model.pth"


def test_inference_sleep_metrics_prints_per_subject_agreement_and_plots(small_data_dir, tiny_ckpt, tmp_path, capsys):
    csv, plots = tmp_path / "preds.csv", tmp_path / "plots"
    assert inference_cli.main("hybrid", tiny_ckpt, ["--data-dir", str(small_data_dir), "--sleep-metrics",
                                                 "--predictions-out", str(csv), "--plots-dir", str(plots)]) == 0
    out = capsys.readouterr().out
    assert out.index("kappa") < out.index("sleep metrics per subject, PSG / predicted")
    frame = pd.read_csv(csv)
    comparison = sm.compare(frame, scored_only=True).set_index(["subject", "metric"])
    for subject in frame["subject"].unique():
        tst = comparison.loc[(subject, "total_sleep_time_min")]
        line = next(row for row in out.splitlines() if row.split() and row.split()[0] == str(subject))
        assert line.split()[1] == f"{tst['psg']:.1f}/{tst['predicted']:.1f}"
    assert "agreement over 6 subject(s)" in out
    table = sm.agreement(comparison.reset_index())
    row = next(r for r in out.splitlines() if r.startswith("total_sleep_time_min"))
    bias, sd, low, high, mae = table.loc["total_sleep_time_min", ["bias", "sd", "loa_low", "loa_high", "mean_abs_error"]]
    assert [float(v) for v in row.split()[4:]] == pytest.approx([round(v, 2) for v in (bias, sd, low, high, mae)])
    assert (plots / "hybrid_bland_altman.png").stat().st_size > 10_000
    # one subject: no SD, no limits of agreement, the plot still comes out
    assert inference_cli.main("hybrid", tiny_ckpt, ["--data-dir", str(small_data_dir), "--subjects", "46343",
                                                 "--sleep-metrics", "--plots-dir", str(tmp_path / "one")]) == 0
    assert "agreement over 1 subject(s)" in capsys.readouterr().out
    assert (tmp_path / "one" / "hybrid_bland_altman.png").is_file()


def test_cli_scored_only(tmp_path, capsys):
    true = np.array([-1] * 10 + [1] * 50 + [3] * 20)
    frame = pd.DataFrame({"subject": "x", "epoch_start_s": 30 * np.arange(80), "true_stage": true, "pred": 1})
    path = tmp_path / "p.csv"
    frame.to_csv(path, index=False)
    assert sm.main(["--predictions", str(path), "--per-subject", "--scored-only"]) == 0
    out = capsys.readouterr().out
    row = next(r for r in out.splitlines() if r.startswith("total_sleep_time_min"))
    assert [float(v) for v in row.split()[1:5]] == [1, 35, 35, 0] and row.split()[5] == "NaN"  # n, PSG, pred, bias, SD
