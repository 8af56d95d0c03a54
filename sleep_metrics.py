"""Standard sleep metrics from a hypnogram, and predicted-vs-PSG agreement (Bland-Altman).

    python sleep_metrics.py --predictions preds.csv            # a CSV from inference*.py
    python sleep_metrics.py --predictions preds.csv --plot out/bland_altman.png
    python inference_hybrid.py --sleep-metrics                 # the same in one command, on the scored period

Definitions (30 s epochs; stages 0 Wake, 1 Light, 2 Deep, 3 REM, -1 unscored):
- time in bed: the whole recording, first to last epoch.
- sleep onset: the first epoch of any sleep stage; sleep-onset latency: minutes from the start to it.
- total sleep time (TST): minutes in Light, Deep or REM. Sleep efficiency: TST / time in bed.
- WASO: minutes not asleep between sleep onset and the end of the last sleep epoch.
- REM latency: minutes from sleep onset to the first REM epoch (NaN without REM).
- awakenings: runs of one or more non-sleep epochs between sleep onset and the last sleep epoch.
- minutes and percent (of TST) per stage; Wake minutes over the whole recording.
Unscored epochs count as time in bed and as not asleep.
A predicted night (`night_metrics`: the reports, the Apple Health nights, the service's summary)
leaves its no-data epochs (stage -1: the watch off, no stage given) out of every figure instead,
and says how long they were (`no_data_min`): a watch-off stretch is neither sleep nor wake.
Against PSG (`compare(..., scored_only=True)`, `--scored-only`, `inference*.py --sleep-metrics`) each
night is cut to its PSG-scored period (first to last scored epoch) and the prediction counts the
unscored epochs inside it as not asleep too, so both hypnograms cover the same time.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation import save_figure

EPOCH_MIN = 0.5
METRICS = ("time_in_bed_min", "total_sleep_time_min", "sleep_efficiency_pct", "sleep_onset_latency_min",
           "waso_min", "rem_latency_min", "awakenings", "wake_min", "light_min", "deep_min", "rem_min",
           "light_pct", "deep_pct", "rem_pct")


def sleep_metrics(stages: np.ndarray) -> dict[str, float]:
    """The metrics above for one night's per-epoch stages."""
    stages = np.asarray(stages)
    n = len(stages)
    asleep = stages >= 1
    metrics = dict.fromkeys(METRICS, float("nan"))
    metrics["time_in_bed_min"] = n * EPOCH_MIN
    tst = asleep.sum() * EPOCH_MIN
    metrics["total_sleep_time_min"] = tst
    metrics["sleep_efficiency_pct"] = 100.0 * tst / metrics["time_in_bed_min"] if n else float("nan")
    metrics["wake_min"] = (stages == 0).sum() * EPOCH_MIN
    for stage, name in ((1, "light"), (2, "deep"), (3, "rem")):
        minutes = (stages == stage).sum() * EPOCH_MIN
        metrics[f"{name}_min"] = minutes
        metrics[f"{name}_pct"] = 100.0 * minutes / tst if tst else float("nan")
    if not asleep.any():
        metrics["awakenings"], metrics["waso_min"] = 0.0, 0.0
        return metrics
    onset, last = np.flatnonzero(asleep)[[0, -1]]
    metrics["sleep_onset_latency_min"] = onset * EPOCH_MIN
    within = ~asleep[onset:last + 1]
    metrics["waso_min"] = within.sum() * EPOCH_MIN
    metrics["awakenings"] = float(np.sum(within[1:] & ~within[:-1]) + within[0]) if within.size else 0.0
    rem = np.flatnonzero(stages[onset:] == 3)
    metrics["rem_latency_min"] = rem[0] * EPOCH_MIN if rem.size else float("nan")
    return metrics


def night_metrics(stages: np.ndarray) -> dict[str, float]:
    """sleep_metrics of a predicted night without its no-data epochs (stage -1), plus no_data_min."""
    stages = np.asarray(stages)
    staged = stages >= 0
    metrics = sleep_metrics(stages[staged])
    metrics["no_data_min"] = float((~staged).sum() * EPOCH_MIN)
    return metrics


def compare(predictions: pd.DataFrame, scored_only: bool = False) -> pd.DataFrame:
    """Per subject and metric: PSG value, predicted value, difference (predicted - PSG).

    Epochs the model gave no stage (pred -1: no data) are left out of both hypnograms.
    scored_only: compare over the PSG-scored period only: each night is cut to its first..last
    scored epoch, and unscored epochs inside it count as not asleep in the prediction too, so
    both hypnograms cover the same time (a subject without scored epochs is left out).
    """
    rows = []
    for subject, night in predictions.sort_values(["subject", "epoch_start_s"]).groupby("subject", sort=False):
        true, predicted = night["true_stage"].to_numpy(), night["pred"].to_numpy()
        staged = predicted >= 0  # epochs without data (pred -1) are left out of both hypnograms
        true, predicted = true[staged], predicted[staged]
        if scored_only:
            scored = np.flatnonzero(true >= 0)
            if not scored.size:
                continue
            true, predicted = true[scored[0]:scored[-1] + 1], predicted[scored[0]:scored[-1] + 1]
            predicted = np.where(true >= 0, predicted, -1)
        psg, pred = sleep_metrics(true), sleep_metrics(predicted)
        for name in METRICS:
            rows.append({"subject": subject, "metric": name, "psg": psg[name], "predicted": pred[name],
                         "difference": pred[name] - psg[name]})
    return pd.DataFrame(rows)


def agreement(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per metric: mean PSG value, bias (mean difference), SD, 95% limits of agreement, mean |error|."""
    def summary(group: pd.DataFrame) -> pd.Series:
        d = group["difference"].dropna()
        sd = d.std(ddof=1) if len(d) > 1 else float("nan")
        return pd.Series({"n": len(d), "psg_mean": group["psg"].mean(), "predicted_mean": group["predicted"].mean(),
                          "bias": d.mean(), "sd": sd, "loa_low": d.mean() - 1.96 * sd,
                          "loa_high": d.mean() + 1.96 * sd, "mean_abs_error": d.abs().mean()})
    return comparison.groupby("metric", sort=False)[["psg", "predicted", "difference"]].apply(summary)


def plot_bland_altman(comparison: pd.DataFrame, path: str | Path,
                      metrics: tuple[str, ...] = ("total_sleep_time_min", "sleep_efficiency_pct", "waso_min",
                                                  "sleep_onset_latency_min", "rem_min", "deep_min")) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, name in zip(axes.ravel(), metrics):
        rows = comparison[comparison["metric"] == name].dropna(subset=["difference"])
        mean = (rows["psg"] + rows["predicted"]) / 2
        ax.scatter(mean, rows["difference"], s=18)
        bias, sd = rows["difference"].mean(), rows["difference"].std(ddof=1)
        for y, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
            if np.isfinite(y):  # one subject: no SD, no limits of agreement
                ax.axhline(y, color="tab:red", ls=style, lw=1)
        ax.set_title(f"{name}: bias {bias:+.1f}")
        ax.set_xlabel("mean of PSG and predicted")
        ax.set_ylabel("predicted - PSG")
    fig.tight_layout()
    save_figure(fig, path)


# sleep metrics shown per subject by --sleep-metrics: (metric, column title)
SLEEP_METRICS_SHOWN = (("total_sleep_time_min", "TST min"), ("sleep_efficiency_pct", "SE %"),
                       ("sleep_onset_latency_min", "SOL min"), ("waso_min", "WASO min"),
                       ("rem_latency_min", "REM lat min"), ("awakenings", "awakenings"), ("wake_min", "Wake min"),
                       ("light_min", "Light min"), ("deep_min", "Deep min"), ("rem_min", "REM min"))


def format_sleep_metrics(comparison: pd.DataFrame) -> str:
    """--sleep-metrics: per subject PSG / predicted values, then the agreement table over subjects."""
    out = io.StringIO()
    n_subjects = comparison["subject"].nunique()
    print("sleep metrics per subject, PSG / predicted (over each night's PSG-scored period):", file=out)
    width = 15
    print(f"{'subject':>10}" + "".join(f"{title:>{width}}" for _, title in SLEEP_METRICS_SHOWN), file=out)
    cells = comparison.set_index(["subject", "metric"])
    for subject in comparison["subject"].unique():
        row = []
        for name, _ in SLEEP_METRICS_SHOWN:
            psg, pred = cells.loc[(subject, name), "psg"], cells.loc[(subject, name), "predicted"]
            row.append("/".join("-" if pd.isna(v) else f"{v:.0f}" if name == "awakenings" else f"{v:.1f}"
                                for v in (psg, pred)))
        print(f"{str(subject):>10}" + "".join(f"{c:>{width}}" for c in row), file=out)
    table = agreement(comparison)
    print(f"\nagreement over {n_subjects} subject(s) (difference = predicted - PSG; limits of agreement = "
          f"bias +- 1.96 SD):", file=out)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.round(2).to_string(), file=out)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions", required=True, help="CSV with subject,epoch_start_s,true_stage,pred")
    parser.add_argument("--per-subject", action="store_true", help="also print every subject's values")
    parser.add_argument("--plot", default=None, help="Bland-Altman PNG")
    parser.add_argument("--scored-only", action="store_true",
                        help="compare over each night's PSG-scored period only (as inference*.py --sleep-metrics)")
    args = parser.parse_args(argv)
    try:
        frame = pd.read_csv(args.predictions)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.predictions}: {exc}", file=sys.stderr)
        return 1
    missing = {"subject", "epoch_start_s", "true_stage", "pred"} - set(frame.columns)
    if missing:
        print(f"error: {args.predictions} lacks column(s) {sorted(missing)}", file=sys.stderr)
        return 1
    comparison = compare(frame, scored_only=args.scored_only)
    if args.per_subject:
        print(comparison.pivot(index="subject", columns="metric", values="difference")[list(METRICS)].round(1))
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"predicted vs PSG over {frame['subject'].nunique()} subject(s):")
        print(agreement(comparison).round(2))
    if args.plot:
        plot_bland_altman(comparison, args.plot)
        print(f"Bland-Altman plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
