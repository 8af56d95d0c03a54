"""One evaluation path for both models: checkpoint + nights -> per-epoch predictions -> metrics,
report, CSV and plots. `inference.py` and `inference_hybrid.py` are thin wrappers around `main`;
training uses `predict_night` and `compute_metrics` for validation, so every figure is computed
the same way. `--realtime` computes the same CSV and metrics by streaming every night's files
through realtime.StreamingStager; `--follow` stages growing files live. `--sleep-metrics` adds
the standard sleep metrics against PSG (sleep_metrics.py: per subject, agreement table,
Bland-Altman PNG). `--hr FILE --motion FILE [--steps FILE]` stages a user's own recording
(user_data.py): stages CSV, hypnogram and night summary in --out-dir.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import data_loader as dl
from checkpoint import CheckpointError, atomic_write, load_model_from_checkpoint
from smoothing import smooth_night

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
PREDICTION_COLUMNS = ["subject", "epoch_start_s", "true_stage", "pred", "p_wake", "p_light", "p_deep", "p_rem"]


@torch.no_grad()
def predict_night(model: torch.nn.Module, x_scaled: np.ndarray, seq_len: int, target_pos: int,
                  batch_size: int = 1024, device: torch.device | str = "cpu",
                  transitions: np.ndarray | None = None) -> np.ndarray:
    """Stage probabilities (n_epochs, 4): each epoch read at `target_pos` of its own window, then
    smoothed over the whole night when a transition matrix is given (offline checkpoints)."""
    model.eval()
    windows = dl.make_windows(x_scaled, seq_len, target_pos)
    probs = []
    for start in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[start:start + batch_size]).to(device)
        probs.append(torch.softmax(model(batch)[:, target_pos].float(), dim=-1).cpu().numpy())
    probs = np.concatenate(probs).astype(np.float64)
    return probs if transitions is None else smooth_night(probs, transitions)


def describe_mode(checkpoint: dict) -> str:
    """How a checkpoint stages, for report headers and plot titles."""
    if checkpoint["causal"]:
        mode = "causal (real-time"
    else:
        mode = "offline (both-sided context" + (", night-smoothed" if checkpoint.get("transitions") is not None else "")
    size = int(checkpoint.get("ensemble_size", 1))
    return mode + (f", {size}-model ensemble)" if size > 1 else ")")


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, Cohen's kappa, macro-F1, per-class recall on scored epochs (y_true >= 0)."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score
    scored = y_true >= 0
    y_true, y_pred = y_true[scored], y_pred[scored]
    labels = list(range(len(dl.STAGE_NAMES)))
    confusion = confusion_matrix(y_true, y_pred, labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(confusion.sum(1) > 0, np.diag(confusion) / confusion.sum(1), np.nan)
    metrics = {
        "n_epochs": int(scored.sum()),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        "kappa": float(cohen_kappa_score(y_true, y_pred, labels=labels)) if len(y_true) else float("nan"),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "confusion": confusion.tolist(),
    }
    for name, r in zip(dl.STAGE_NAMES, recall):
        metrics[f"recall_{name.lower()}"] = float(r)
    return metrics


def format_report(metrics: dict, y_true: np.ndarray, y_pred: np.ndarray) -> str:
    """The printed evaluation: headline figures, classification report, confusion, REM analysis."""
    from sklearn.metrics import classification_report
    scored = y_true >= 0
    out = io.StringIO()
    print(f"epochs scored: {metrics['n_epochs']}", file=out)
    print(f"accuracy {metrics['accuracy']:.3f}  kappa {metrics['kappa']:.3f}  macro-F1 {metrics['macro_f1']:.3f}", file=out)
    print("per-class accuracy (recall): " + "  ".join(
        f"{n} {metrics['recall_' + n.lower()]:.3f}" for n in dl.STAGE_NAMES), file=out)
    print("\n" + classification_report(y_true[scored], y_pred[scored], labels=range(4), target_names=dl.STAGE_NAMES,
                                       digits=3, zero_division=0), file=out)
    confusion = np.array(metrics["confusion"])
    print("confusion matrix (rows true, columns predicted):", file=out)
    print(" " * 8 + "".join(f"{n:>8}" for n in dl.STAGE_NAMES), file=out)
    for name, row in zip(dl.STAGE_NAMES, confusion):
        print(f"{name:>8}" + "".join(f"{v:>8d}" for v in row), file=out)
    rem = confusion[3]
    if rem.sum():
        where = ", ".join(f"{n} {100 * v / rem.sum():.1f}%" for n, v in zip(dl.STAGE_NAMES, rem))
        print(f"\nREM epochs ({rem.sum()}) predicted as: {where}", file=out)
        predicted_rem = confusion[:, 3]
        if predicted_rem.sum():
            came = ", ".join(f"{n} {100 * v / predicted_rem.sum():.1f}%" for n, v in zip(dl.STAGE_NAMES, predicted_rem))
            print(f"epochs predicted REM ({predicted_rem.sum()}) were truly: {came}", file=out)
    return out.getvalue()


def predict_nights(model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict,
                   nights: list[dl.Night]) -> pd.DataFrame:
    """One row per epoch of every night, in PREDICTION_COLUMNS."""
    frames = []
    for night in nights:
        x = scaler.transform(dl.night_features(night, causal=checkpoint["causal"], features=tuple(checkpoint["features"])))
        probs = predict_night(model, x, checkpoint["seq_len"], checkpoint["target_pos"],
                              transitions=checkpoint.get("transitions"))
        frames.append(prediction_frame(night, probs))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PREDICTION_COLUMNS)


_WORKER_MODEL: tuple | None = None


def _init_worker(checkpoint_path: str, smooth: bool) -> None:
    """Load the model once per worker process; one torch thread each, so K workers use K cores."""
    global _WORKER_MODEL
    torch.set_num_threads(1)
    model, scaler, checkpoint = load_model_from_checkpoint(checkpoint_path)
    if not smooth:
        checkpoint["transitions"] = None
    _WORKER_MODEL = model, scaler, checkpoint


def _score_chunk(nights: list[dl.Night]) -> pd.DataFrame:
    return predict_nights(*_WORKER_MODEL, nights)


def predict_nights_parallel(checkpoint_path: str | Path, nights: list[dl.Night], workers: int,
                            smooth: bool = True) -> pd.DataFrame:
    """predict_nights over `workers` processes; rows in the same order as one process gives."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    chunks = [list(c) for c in np.array_split(np.array(nights, dtype=object), min(workers * 4, len(nights))) if len(c)]
    # spawn, not fork: a forked child of a process that already ran torch's thread pool can hang
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(str(checkpoint_path), smooth)) as pool:
        frames = list(pool.map(_score_chunk, chunks))  # map keeps the chunks' order
    return pd.concat(frames, ignore_index=True)


def prediction_frame(night: dl.Night | dl.EpochTimeline, probs: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({
        "subject": night.subject_id, "epoch_start_s": night.epoch_start_s.astype(np.int64),
        "true_stage": night.stage.astype(np.int64), "pred": probs.argmax(axis=1),
        "p_wake": probs[:, 0], "p_light": probs[:, 1], "p_deep": probs[:, 2], "p_rem": probs[:, 3],
    })


def write_predictions(frame: pd.DataFrame, path: str | Path) -> None:
    """CSV with PREDICTION_COLUMNS, written atomically."""
    atomic_write(path, lambda f: f.write(frame.to_csv(index=False, float_format="%.5f").encode()))


# ----------------------------------------------------------------------------- plots

def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_hypnogram(frame: pd.DataFrame, path: str | Path, title: str = "", start_clock=None) -> None:
    """True vs predicted stages over the night, and the stage probabilities beneath.

    Epochs without a PSG stage (true_stage -1, e.g. a user's own recording) draw the prediction
    only. start_clock (a datetime: the wall-clock time of epoch_start_s 0) labels the time axis
    with clock times instead of hours since the start.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hours = frame["epoch_start_s"].to_numpy() / 3600.0
    depth = np.array([0, 2, 3, 1])  # draw order top-down: Wake, REM, Light, Deep
    fig, (ax_stage, ax_prob) = plt.subplots(2, 1, figsize=(12, 5), sharex=True, height_ratios=[1.3, 1])
    true = frame["true_stage"].to_numpy()
    if (true >= 0).any():
        shown = np.where(true >= 0, depth[np.clip(true, 0, 3)], np.nan)
        ax_stage.step(hours, shown, where="post", color="black", lw=1.2, label="PSG")
    ax_stage.step(hours, depth[frame["pred"].to_numpy()], where="post", color="tab:orange", lw=1.0, alpha=0.85,
                  label="predicted")
    ax_stage.set_yticks([0, 1, 2, 3], ["Wake", "REM", "Light", "Deep"])
    ax_stage.invert_yaxis()
    ax_stage.legend(loc="upper right", fontsize=8)
    ax_stage.set_title(title)
    probs = frame[["p_wake", "p_light", "p_deep", "p_rem"]].to_numpy().T
    ax_prob.stackplot(hours, probs, labels=dl.STAGE_NAMES, colors=["#d62728", "#9ecae1", "#08519c", "#2ca02c"])
    ax_prob.set_ylabel("probability")
    if start_clock is None:
        ax_prob.set_xlabel("hours since recording start")
    else:
        from datetime import timedelta
        from matplotlib.ticker import FuncFormatter, MultipleLocator
        base = 1.0 if hours[-1] > 4 else 0.5 if hours[-1] > 1.5 else 0.25  # ticks on round clock times
        past_hour = (start_clock.minute * 60 + start_clock.second) / 3600.0
        ax_prob.xaxis.set_major_locator(MultipleLocator(base, offset=(-past_hour) % base))
        ax_prob.xaxis.set_major_formatter(FuncFormatter(
            lambda h, _: (start_clock + timedelta(hours=float(h))).strftime("%H:%M")))
        offset = start_clock.strftime("%z")
        ax_prob.set_xlabel(f"clock time (UTC{offset[:3]}:{offset[3:]})" if offset else "clock time")
    ax_prob.set_ylim(0, 1)
    ax_prob.legend(loc="upper right", fontsize=7, ncol=4)
    _save_figure(fig, Path(path))


def plot_confusion(confusion: list[list[int]], path: str | Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    confusion = np.asarray(confusion, dtype=float)
    share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(4):
        for j in range(4):
            ax.text(j, i, f"{100 * share[i, j]:.0f}%\n({int(confusion[i, j])})", ha="center", va="center",
                    color="white" if share[i, j] > 0.55 else "black", fontsize=8)
    ax.set_xticks(range(4), dl.STAGE_NAMES)
    ax.set_yticks(range(4), dl.STAGE_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("PSG")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save_figure(fig, Path(path))


# ----------------------------------------------------------------------------- CLI shared by both scripts

def main(arch: str, default_checkpoint: Path, argv: list[str] | None = None,
         realtime_checkpoint: Path | None = None) -> int:
    script = "inference.py" if arch == "lstm" else "inference_hybrid.py"
    realtime_checkpoint = realtime_checkpoint or CHECKPOINT_DIR / f"{arch}_causal" / "model.pth"
    parser = argparse.ArgumentParser(prog=script, description=f"Evaluate a {arch} checkpoint: metrics, "
                                     "per-epoch CSV, hypnograms, confusion matrix.")
    parser.add_argument("--checkpoint", default=None,
                        help=f"model .pth (default: shipped, {default_checkpoint}; with --realtime or --follow "
                             f"the shipped causal one, {realtime_checkpoint})")
    parser.add_argument("--data-dir", default=None,
                        help="PhysioNet-layout folder: evaluate every subject in it (default: the bundled "
                             "data's test subjects, which the shipped model never saw)")
    parser.add_argument("--subjects", nargs="*", default=None, help="only these subject ids")
    parser.add_argument("--predictions-out", default=None, help="CSV, one row per epoch")
    parser.add_argument("--plots-dir", default="out/plots", help="hypnogram and confusion PNGs ('' for none)")
    parser.add_argument("--workers", type=int, default=1,
                        help="score nights in K processes (same rows, same order as K=1)")
    parser.add_argument("--realtime", action="store_true",
                        help="replay every night's files reading by reading through the streaming predictor "
                             "(causal checkpoint); same CSV and metrics as the offline evaluation")
    parser.add_argument("--follow", nargs="+", metavar="FILE", default=None,
                        help="live demo: tail growing heart-rate / motion / counts / steps CSVs (t,bpm  t,x,y,z  "
                             "t,count  t,steps; KIND=FILE to name the kind) and print a line per closed epoch")
    parser.add_argument("--follow-timeout", type=float, default=None, metavar="S",
                        help="with --follow: stop after S seconds without new data (default: run until Ctrl-C)")
    parser.add_argument("--max-delay", type=float, default=0.0, metavar="S",
                        help="streaming: wait S seconds past an epoch's end for late readings (default 0)")
    parser.add_argument("--start-s", default=0.0, type=lambda v: None if v == "auto" else float(v),
                        help="with --follow: start of epoch 0 in the files' time base, or 'auto' (the first "
                             "reading, floored to 30 s); default 0 (PhysioNet files count from the PSG start)")
    parser.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=True,
                        help="offline checkpoints: smooth each night with the checkpoint's stage transitions "
                             "(--no-smooth: each epoch on its own, e.g. to count brief awakenings)")
    parser.add_argument("--sleep-metrics", action="store_true",
                        help="also compare sleep metrics (TST, efficiency, latencies, WASO, stage minutes) with PSG: "
                             "per subject, agreement table (bias, SD, limits of agreement, MAE), Bland-Altman PNG")
    report = parser.add_argument_group("sleep report on your own recordings (user_data.py)")
    report.add_argument("--hr", metavar="FILE", default=None,
                        help="heart-rate CSV/TSV with header (time column: timestamp/time/t/seconds/datetime, in "
                             "seconds or ISO-8601; heart_rate/hr/bpm), or headerless t,bpm: stage this night")
    report.add_argument("--motion", metavar="FILE", default=None,
                        help="with --hr: raw acceleration x,y,z (g) or activity counts count/counts/activity")
    report.add_argument("--steps", metavar="FILE", default=None, help="with --hr: steps/step_count (optional)")
    report.add_argument("--out-dir", default=None,
                        help="with --hr: where stages.csv, hypnogram.png, summary.json/.txt go (default out/report)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.hr is None:
        given = [flag for flag, value in (("--motion", args.motion), ("--steps", args.steps),
                                          ("--out-dir", args.out_dir)) if value is not None]
        if given:
            parser.error(f"{', '.join(given)} belong(s) to a report on your own recording: give --hr FILE too")
    else:
        if args.motion is None:
            parser.error("--hr needs --motion FILE (raw acceleration x,y,z or activity counts)")
        given = [flag for flag, on in (("--realtime", args.realtime), ("--follow", args.follow is not None),
                                       ("--data-dir", args.data_dir is not None), ("--subjects", args.subjects is not None),
                                       ("--predictions-out", args.predictions_out is not None),
                                       ("--sleep-metrics", args.sleep_metrics)) if on]
        if given:
            parser.error(f"--hr (a report on your own recording, written to --out-dir) does not go with "
                         f"{', '.join(given)}")
    streaming = args.realtime or args.follow is not None
    if args.realtime and args.follow is not None:
        parser.error("--realtime and --follow are separate modes")
    if args.checkpoint is None:
        args.checkpoint = str(realtime_checkpoint if streaming else default_checkpoint)
    try:
        model, scaler, checkpoint = load_model_from_checkpoint(args.checkpoint, expected_arch=arch)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.smooth:
        checkpoint["transitions"] = None
    if args.hr is not None:
        return _user_report(arch, args, model, scaler, checkpoint)
    if streaming:
        import realtime
        try:
            stager = realtime.StreamingStager(model, scaler, checkpoint, start_s=args.start_s,
                                              max_delay_s=args.max_delay)
        except ValueError as exc:
            print(f"error: {args.checkpoint}: {exc}", file=sys.stderr)
            return 1
        if args.follow is not None:
            print(f"{arch} checkpoint {args.checkpoint} [real-time]: following {', '.join(args.follow)} "
                  f"(Ctrl-C to stop)", flush=True)
            with realtime.single_thread():
                realtime.follow(stager, args.follow, timeout_s=args.follow_timeout)
            return 0
    data_dir = Path(args.data_dir) if args.data_dir else dl.DEFAULT_DATA_DIR
    subjects = args.subjects
    if subjects is None and args.data_dir is None:
        subjects = checkpoint.get("test_subjects")
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", dl.DataWarning)
            nights = dl.load_nights(data_dir, subjects)
    except dl.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if not nights:
        print(f"error: no usable subjects in {data_dir}", file=sys.stderr)
        return 1
    if args.realtime:
        with realtime.single_thread():
            frame = realtime.replay_nights(model, scaler, checkpoint, data_dir, nights, max_delay_s=args.max_delay)
        mode = "causal, streamed reading by reading"
    else:
        if args.workers > 1:
            frame = predict_nights_parallel(args.checkpoint, nights, args.workers, args.smooth)
        else:
            frame = predict_nights(model, scaler, checkpoint, nights)
        mode = describe_mode(checkpoint)
    print(f"{arch} checkpoint {args.checkpoint} [{mode}] on {len(nights)} subject(s) from {data_dir}: "
          f"{', '.join(n.subject_id for n in nights[:10])}{', ...' if len(nights) > 10 else ''} "
          f"({time.perf_counter() - t0:.1f} s)")
    y_true, y_pred = frame["true_stage"].to_numpy(), frame["pred"].to_numpy()
    if (y_true >= 0).any():
        metrics = compute_metrics(y_true, y_pred)
        print(format_report(metrics, y_true, y_pred))
    else:
        metrics = None
        print("no scored epochs: predictions only")
    comparison = None
    if args.sleep_metrics:
        if metrics is None:
            print("no scored epochs: no sleep metrics against PSG")
        else:
            import sleep_metrics as sm
            comparison = sm.compare(frame, scored_only=True)
            print(format_sleep_metrics(comparison))
    if args.predictions_out:
        write_predictions(frame, args.predictions_out)
        print(f"wrote {len(frame)} rows to {args.predictions_out}")
    if args.plots_dir:
        plots = Path(args.plots_dir)
        for subject, rows in frame.groupby("subject", sort=False):
            plot_hypnogram(rows, plots / f"{arch}_hypnogram_{subject}.png", f"{arch} [{mode}] subject {subject}")
        if metrics:
            plot_confusion(metrics["confusion"], plots / f"{arch}_confusion.png",
                           f"{arch} [{mode}]: kappa {metrics['kappa']:.2f}")
        if comparison is not None:
            import sleep_metrics as sm
            sm.plot_bland_altman(comparison, plots / f"{arch}_bland_altman.png")
        print(f"plots in {plots}/")
    return 0


# sleep metrics shown per subject by --sleep-metrics: (metric, column title)
SLEEP_METRICS_SHOWN = (("total_sleep_time_min", "TST min"), ("sleep_efficiency_pct", "SE %"),
                       ("sleep_onset_latency_min", "SOL min"), ("waso_min", "WASO min"),
                       ("rem_latency_min", "REM lat min"), ("awakenings", "awakenings"), ("wake_min", "Wake min"),
                       ("light_min", "Light min"), ("deep_min", "Deep min"), ("rem_min", "REM min"))


def format_sleep_metrics(comparison: pd.DataFrame) -> str:
    """--sleep-metrics: per subject PSG / predicted values, then the agreement table over subjects."""
    import sleep_metrics as sm
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
    table = sm.agreement(comparison)
    print(f"\nagreement over {n_subjects} subject(s) (difference = predicted - PSG; limits of agreement = "
          f"bias +- 1.96 SD):", file=out)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.round(2).to_string(), file=out)
    return out.getvalue()


def _user_report(arch: str, args, model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict) -> int:
    """--hr/--motion/--steps: stage a user's own recording; stages CSV, hypnogram, night summary."""
    import user_data
    t0 = time.perf_counter()
    try:
        recording = user_data.load_recording(args.hr, args.motion, args.steps)
    except dl.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    frame = user_data.predict_recording(model, scaler, checkpoint, recording)
    mode = describe_mode(checkpoint)
    summary = user_data.night_summary(frame, recording, args.checkpoint, mode)
    out_dir = Path(args.out_dir or "out/report")
    tst = summary["metrics"]["total_sleep_time_min"]
    title = (f"{arch} [{mode}] {recording.night.subject_id}: total sleep {int(tst // 60)} h {tst % 60:.0f} min, "
             f"efficiency {summary['metrics']['sleep_efficiency_pct'] or 0:.0f}%")
    paths = user_data.write_report(frame, summary, recording, out_dir, title)
    print(user_data.format_summary(summary))
    print(f"\n{len(frame)} epochs staged in {time.perf_counter() - t0:.1f} s; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0
