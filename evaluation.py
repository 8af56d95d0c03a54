"""The evaluation library: checkpoint + nights -> per-epoch predictions -> metrics, report text, CSV, figures.

One model-call path (`predict_windows`) serves every caller: whole nights offline
(`predict_night`, `predict_nights`), training's validation, the stream and the batched server.
The command lines built on it live in inference_cli.py (inference.py, inference_hybrid.py).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pandas as pd
import torch

import data_loader as dl
import feature_store
import features
from checkpoint import atomic_write, load_model_from_checkpoint
from model import check_revision_span
from smoothing import smooth_night

PREDICTION_COLUMNS = ["subject", "epoch_start_s", "true_stage", "pred", "p_wake", "p_light", "p_deep", "p_rem"]
SPLIT_ABOVE = 64         # predict_windows: more windows than this go to the model in power-of-two calls
# the stage palette of every picture: the PNG hypnograms and the service's live page (serve.py sends it)
STAGE_COLORS = {"Wake": "#d62728", "Light": "#9ecae1", "Deep": "#08519c", "REM": "#2ca02c"}
NO_DATA_COLOR = "#cccccc"  # no stage: the watch off
T, R = TypeVar("T"), TypeVar("R")


# ----------------------------------------------------------------------------- the model call

@torch.inference_mode()
def predict_windows(model: torch.nn.Module, windows: np.ndarray, target_pos: int,
                    batch_size: int = 1024, every_lag: bool = False) -> np.ndarray:
    """Stage probabilities (n, 4) of scaled windows (n, seq_len, n_features), read at target_pos
    (every_lag, a model with a lookahead: (n, 1 + lookahead, 4), lag 0 the immediate stage, lag j
    the window's output for the epoch j before its last, which revisions average: a stream's one call).

    The one model call: whole nights (predict_night), streams and batches gather windows and come here. Up to
    SPLIT_ABOVE windows go to the model in one call; more go in power-of-two calls of at most
    batch_size (1000 = 512 + 256 + 128 + 64 + 32 + 8): a pool's batch size changes every call,
    and every new input shape leaves allocator fragmentation and cached kernels behind (a
    200-wearer soak grew ~60 MiB per simulated hour with one call of any size; with power-of-two
    shapes it stays flat). Outputs are per window: only the last bits depend on the split.
    Reading the last position of a model with forward_last (both architectures) runs that instead:
    the same logits (~1e-6), without the work that only the other positions' outputs need.
    On CPU with several torch threads, more than SPLIT_ABOVE windows are split into one part per
    thread (each chunked as above) and the parts run side by side (in_parallel).
    """
    if model.training:
        model.eval()
    windows = np.asarray(windows, dtype=np.float32)
    if len(windows) == 0:
        return np.zeros((0, 1 + lookahead_of(model), 4) if every_lag else (0, 4))
    device = next(model.parameters()).device
    last_only = target_pos in (-1, windows.shape[1] - 1) and hasattr(model, "forward_last")
    if every_lag and not last_only:
        raise ValueError("every lag (the revision) is read at a window's last position: a causal model with forward_last")

    def predict_part(part: np.ndarray) -> np.ndarray:
        out, start = [], 0
        while start < len(part):
            rest = len(part) - start
            size = min(batch_size, rest if len(windows) <= SPLIT_ABOVE else 1 << (rest.bit_length() - 1))
            batch = torch.from_numpy(np.ascontiguousarray(part[start:start + size])).to(device)
            if every_lag:
                logits = model.forward_last(batch, lags=True)
            else:
                logits = model.forward_last(batch) if last_only else model(batch)[:, target_pos]
            out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
            start += size
        return np.concatenate(out)

    parts = [windows[part] for part in thread_parts(len(windows), SPLIT_ABOVE, device)]
    return np.concatenate(in_parallel(predict_part, parts)).astype(np.float64)


def lookahead_of(model: torch.nn.Module) -> int:
    """Epochs a causal model's revision looks ahead (its config's `lookahead`; 0: no revision)."""
    return int(getattr(getattr(model, "config", None), "lookahead", 0) or 0)


def revision_span_of(model: torch.nn.Module) -> int:
    """How many of the latest lags a causal model's revision averages (its config's `revision_span`;
    1, and for checkpoints from before it: lag `lookahead` alone)."""
    return int(getattr(getattr(model, "config", None), "revision_span", 1) or 1)


@torch.inference_mode()
def predict_whole_night(model: torch.nn.Module, x_scaled: np.ndarray, every_lag: bool = False) -> np.ndarray:
    """Stage probabilities (n_epochs, 4) of a whole-night model: the night as one sequence (every_lag, a
    causal model with a lookahead: (n_epochs, 1 + lookahead, 4), as predict_windows gives one per epoch)."""
    if model.training:
        model.eval()
    if len(x_scaled) == 0:
        return np.zeros((0, 1 + lookahead_of(model), 4) if every_lag else (0, 4))
    device = next(model.parameters()).device
    # one torch thread: the same sums in the same order however many threads or worker processes
    # the caller has, so a night's probabilities never depend on how it was scheduled
    with single_thread():
        logits = model(torch.from_numpy(np.asarray(x_scaled, np.float32)[None]).to(device), lags=every_lag)[0]
    return torch.softmax(logits.float(), dim=-1).cpu().numpy().astype(np.float64)


def can_step(model: torch.nn.Module) -> bool:
    """Whether a causal model can be staged one epoch at a time over whole nights (SleepHybrid.step:
    the hybrid without a Transformer)."""
    if not hasattr(model, "init_state"):
        return False
    try:
        model.init_state(1)
    except ValueError:  # a model of the class that cannot step (init_state says why)
        return False
    return True


class NightSteps:
    """A causal whole-night model (checkpoint seq_len 0) staged one epoch at a time for many nights at once
    (a stream's row, a pool's or a batch's wearers): each row's step state (SleepHybrid.step), gathered
    and scattered by row. In the place of features.WindowRing: `push` takes each row's new feature row
    and gives its every-lag probabilities, which equal predict_whole_night's on the night so far (tested).
    A row's epoch 0 starts its night afresh. The state is a list of tensors, rows first (the model's
    init_state), the running sum and the epoch count last."""

    def __init__(self, model: torch.nn.Module, scaler: dl.FeatureScaler | None, n_rows: int):
        if not can_step(model):
            raise ValueError("this causal checkpoint reads whole nights (seq_len 0), and only the hybrid without a "
                             "Transformer (n_layers 0) stages them an epoch at a time: score its nights with "
                             "evaluation.predict_night")
        if model.training:
            model.eval()
        self.model, self.scaler = model, scaler
        self.state = model.init_state(int(n_rows))

    def add_rows(self, count: int) -> None:
        self.state = [torch.cat([a, b]) for a, b in zip(self.state, self.model.init_state(int(count)))]

    def take_row(self, row: int) -> "NightSteps":
        """A one-row copy of one row."""
        out = NightSteps(self.model, self.scaler, 0)
        out.state = [a[row:row + 1].clone() for a in self.state]
        return out

    @torch.inference_mode()
    def push(self, epoch: np.ndarray, feature_rows: np.ndarray, rows: np.ndarray | list[int] | None = None
             ) -> tuple[np.ndarray, None]:
        """Step each row (default all, distinct) through its epoch `epoch` (m,) with these feature rows (raw,
        scaled here; already scaled without a scaler): (every-lag probabilities (m, 1 + lookahead, 4), None)."""
        n = len(self.state[-1])
        every = rows is None or (len(rows) == n and bool((np.asarray(rows) == np.arange(n)).all()))
        x = np.asarray(feature_rows, np.float32)  # as the windows' rows
        device = self.state[-1].device
        x = torch.from_numpy(x if self.scaler is None else self.scaler.transform(x)).to(device)
        if every:  # every row in order (a stream, a batch): the state as it is, no gathering
            state = self.state
        else:
            index = torch.from_numpy(np.asarray(rows, np.int64)).to(device)
            state = [a[index] for a in self.state]
        first = np.asarray(epoch) == 0
        if first.any():  # a night's first epoch: count 0 (step then pads with its inputs)
            first = torch.from_numpy(first).to(device)
            state[-2][first], state[-1][first] = 0.0, 0.0
        logits, state = self.model.step(x, state, lags=True)
        if every:
            self.state = state
        else:
            for kept, new in zip(self.state, state):
                kept.index_copy_(0, index, new)
        return torch.softmax(logits.float(), dim=-1).cpu().numpy().astype(np.float64), None


def thread_parts(n: int, min_size: int, device: torch.device) -> list[slice]:
    """Split n items into one part per torch thread on CPU, each at least min_size (one part on GPU)."""
    n_parts = max(min(torch.get_num_threads(), n // min_size), 1) if device.type == "cpu" else 1
    bounds = np.linspace(0, n, n_parts + 1).astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


_WORKERS: ThreadPoolExecutor | None = None


def in_parallel(fn: Callable[[T], R], parts: list[T]) -> list[R]:
    """[fn(part) for part in parts] (in inference mode), each part on its own worker thread running
    torch on one thread; a single part runs here with the caller's settings.

    For a model made of many small ops (a chunk of ~100 windows through the encoder), splitting the
    windows across threads holds up better than splitting every op across OpenMP threads, where
    each op waits for the slowest thread (compare `python benchmark.py --threads 1` and 2).
    """
    if len(parts) <= 1:
        return [fn(part) for part in parts]
    global _WORKERS
    if _WORKERS is None:
        _WORKERS = ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2), thread_name_prefix="realtime")
    threads = torch.get_num_threads()

    def run(part: T) -> R:
        torch.set_num_threads(1)  # this worker's OpenMP and MKL threads (per-thread settings)
        with torch.inference_mode():
            return fn(part)

    futures = [_WORKERS.submit(run, part) for part in parts]
    try:
        concurrent.futures.wait(futures)  # every part has finished before a failure is raised
        return [f.result() for f in futures]
    finally:  # set_num_threads also sets the default that new threads start from: put it back
        torch.set_num_threads(threads)


def _forget_workers() -> None:
    global _WORKERS
    _WORKERS = None  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_workers)


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block: a stream calls the model on one window at a time,
    where intra-op threads only add overhead (and stall badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- nights

def revision_lags(lookahead: int, span: int, later: int | np.ndarray | None = None) -> tuple:
    """The lags, (first, last) inclusive, whose windows revise an epoch with `later` epochs after it in
    its night (None: the night goes on): the revision is the mean of the model's outputs for the epoch
    from the windows that end lookahead - span + 1 .. lookahead epochs after it. Near a night's end,
    those of them the night has; where it has none, its last window (the lag `later`). Ints or arrays."""
    first, last = lookahead - span + 1, lookahead
    if later is None:
        return first, last
    return np.minimum(first, later), np.minimum(last, later)


def revise_night(every_lag: np.ndarray, span: int) -> np.ndarray:
    """Revised probabilities (n, 4) of a night's epochs from every window's output at every lag
    (n, 1 + lookahead, 4; predict_windows(every_lag=True)), by revision_lags: summed in order of lag,
    as a stream adds them up."""
    n, lookahead = len(every_lag), every_lag.shape[1] - 1
    check_revision_span(lookahead, span)
    first, last = revision_lags(lookahead, span, n - 1 - np.arange(n))
    total = np.zeros((n, every_lag.shape[2]))
    for lag in range(lookahead + 1):
        epoch = np.flatnonzero((first <= lag) & (lag <= last))
        total[epoch] += every_lag[epoch + lag, lag]
    return total / (last - first + 1)[:, None]


def predict_night(model: torch.nn.Module, x_scaled: np.ndarray, seq_len: int, target_pos: int,
                  transitions: np.ndarray | None = None, no_data: np.ndarray | None = None,
                  batch_size: int = 1024, revised: bool = False, revision_span: int | None = None) -> np.ndarray:
    """Stage probabilities (n_epochs, 4): each epoch read at `target_pos` of its own window (seq_len 0:
    every epoch of the whole night from one pass; revised: a causal model's revision of each epoch,
    from the windows up to `lookahead` epochs later, revise_night; revision_span: another span than the
    model's, for comparing them), NaN where `no_data` (features.no_data), then smoothed
    over the whole night when a transition matrix is given (offline checkpoints)."""
    if seq_len == 0:
        probs = predict_whole_night(model, x_scaled, every_lag=revised)
        if revised:
            probs = revise_night(probs, revision_span or revision_span_of(model))
    elif revised:
        probs = revise_night(predict_windows(model, features.make_windows(x_scaled, seq_len, target_pos), target_pos,
                                             batch_size, every_lag=True), revision_span or revision_span_of(model))
    else:
        probs = predict_windows(model, features.make_windows(x_scaled, seq_len, target_pos), target_pos, batch_size)
    if no_data is not None:
        probs[no_data] = np.nan
    return probs if transitions is None else smooth_night(probs, transitions)


def describe_mode(checkpoint: dict, smooth: bool = True) -> str:
    """How a checkpoint stages, for report headers and plot titles."""
    if checkpoint["causal"]:
        mode = "causal (real-time"
    else:
        smoothed = smooth and checkpoint.get("transitions") is not None
        mode = "offline (both-sided context" + (", night-smoothed" if smoothed else "")
    size = int(checkpoint.get("ensemble_size", 1))
    return mode + (f", {size}-model ensemble)" if size > 1 else ")")


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, Cohen's kappa, macro-F1, per-class recall on scored epochs that got a stage
    (y_true >= 0, y_pred >= 0); `n_no_data` counts the scored epochs without one (y_pred -1)."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score
    scored = (y_true >= 0) & (y_pred >= 0)
    n_no_data = int(((y_true >= 0) & (y_pred < 0)).sum())
    y_true, y_pred = y_true[scored], y_pred[scored]
    labels = list(range(len(dl.STAGE_NAMES)))
    if not len(y_true):  # nothing both scored and staged: no figure rather than a guess
        return {"n_epochs": 0, "n_no_data": n_no_data, "accuracy": float("nan"), "kappa": float("nan"),
                "macro_f1": float("nan"), "confusion": [[0] * len(labels) for _ in labels],
                **{f"recall_{name.lower()}": float("nan") for name in dl.STAGE_NAMES}}
    confusion = confusion_matrix(y_true, y_pred, labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(confusion.sum(1) > 0, np.diag(confusion) / confusion.sum(1), np.nan)
    metrics = {
        "n_epochs": int(scored.sum()),
        "n_no_data": n_no_data,
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
    scored = (y_true >= 0) & (y_pred >= 0)
    out = io.StringIO()
    no_data = metrics.get("n_no_data", 0)
    print(f"epochs scored: {metrics['n_epochs']}" + (f" (and {no_data} PSG-scored epochs without data, not staged)"
                                                      if no_data else ""), file=out)
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
                   nights: list[dl.Night], smooth: bool = True, revised: bool = False,
                   revision_span: int | None = None) -> pd.DataFrame:
    """One row per epoch of every night, in PREDICTION_COLUMNS; smooth=False skips an offline
    checkpoint's whole-night smoothing; revised: a causal model's revised stages (predict_night; over
    revision_span windows where given, else the model's span)."""
    transitions = checkpoint.get("transitions") if smooth else None
    frames = []
    for night in nights:
        x = scaler.transform(features.night_features(night, causal=checkpoint["causal"],
                                                     features=tuple(checkpoint["features"])))
        probs = predict_night(model, x, checkpoint["seq_len"], checkpoint["target_pos"], transitions,
                              features.no_data(night, checkpoint["causal"]), revised=revised, revision_span=revision_span)
        frames.append(prediction_frame(night, probs))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PREDICTION_COLUMNS)


_WORKER_MODEL: tuple | None = None


def _init_worker(checkpoint_path: str, smooth: bool) -> None:
    """Load the model once per worker process; one torch thread each, so K workers use K cores."""
    global _WORKER_MODEL
    torch.set_num_threads(1)
    model, scaler, checkpoint = load_model_from_checkpoint(checkpoint_path)
    _WORKER_MODEL = model, scaler, checkpoint, smooth


def _score_chunk(nights: list[dl.Night]) -> pd.DataFrame:
    model, scaler, checkpoint, smooth = _WORKER_MODEL
    return predict_nights(model, scaler, checkpoint, nights, smooth)


def predict_nights_parallel(checkpoint_path: str | Path, nights: list[dl.Night], workers: int,
                            smooth: bool = True) -> pd.DataFrame:
    """predict_nights over `workers` processes; rows in the same order as one process gives."""
    chunks = [list(c) for c in np.array_split(np.array(nights, dtype=object), min(workers * 4, len(nights))) if len(c)]
    # spawn, not fork: a forked child of a process that already ran torch's thread pool can hang
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(str(checkpoint_path), smooth)) as pool:
        frames = list(pool.map(_score_chunk, chunks))  # map keeps the chunks' order
    return pd.concat(frames, ignore_index=True)


def prediction_frame(night: dl.Night | feature_store.EpochTimeline, probs: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({
        "subject": night.subject_id, "epoch_start_s": night.epoch_start_s.astype(np.int64),
        "true_stage": night.stage.astype(np.int64),
        "pred": features.stages_of(probs),
        "p_wake": probs[:, 0], "p_light": probs[:, 1], "p_deep": probs[:, 2], "p_rem": probs[:, 3],
    })


def write_predictions(frame: pd.DataFrame, path: str | Path) -> None:
    """CSV with PREDICTION_COLUMNS, written atomically."""
    atomic_write(path, lambda f: f.write(frame.to_csv(index=False, float_format="%.5f").encode()))


# ----------------------------------------------------------------------------- plots

def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_hypnogram(frame: pd.DataFrame, path: str | Path, title: str = "", start_clock=None,
                   reference: np.ndarray | None = None, reference_label: str = "PSG") -> None:
    """True vs predicted stages over the night, and the stage probabilities beneath.

    Epochs without a PSG stage (true_stage -1, e.g. a user's own recording) draw the prediction
    only; `reference` (stages per epoch, -1 none) replaces true_stage, drawn as `reference_label`
    (e.g. a watch's own stages). start_clock (a datetime: the wall-clock time of epoch_start_s 0)
    labels the time axis with clock times instead of hours since the start.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hours = frame["epoch_start_s"].to_numpy() / 3600.0
    depth = np.array([0, 2, 3, 1])  # draw order top-down: Wake, REM, Light, Deep
    fig, (ax_stage, ax_prob) = plt.subplots(2, 1, figsize=(12, 5), sharex=True, height_ratios=[1.3, 1])
    true = frame["true_stage"].to_numpy() if reference is None else np.asarray(reference)
    if (true >= 0).any():
        shown = np.where(true >= 0, depth[np.clip(true, 0, 3)], np.nan)
        ax_stage.step(hours, shown, where="post", color="black", lw=1.2, label=reference_label)
    pred = frame["pred"].to_numpy()
    ax_stage.step(hours, np.where(pred >= 0, depth[np.clip(pred, 0, 3)], np.nan), where="post", color="tab:orange",
                  lw=1.0, alpha=0.85, label="predicted")
    no_data = pred < 0
    if no_data.any():  # grey bands: no heart rate or motion, no stage
        edges = np.flatnonzero(np.diff(np.concatenate([[0], no_data.astype(int), [0]])))
        for i, (a, b) in enumerate(zip(edges[::2], edges[1::2])):
            for ax in (ax_stage, ax_prob):
                ax.axvspan(hours[a], hours[b - 1] + features.EPOCH_S / 3600.0, color=NO_DATA_COLOR, zorder=0,
                           label="no data" if i == 0 and ax is ax_stage else None)
    ax_stage.set_yticks([0, 1, 2, 3], ["Wake", "REM", "Light", "Deep"])
    ax_stage.invert_yaxis()
    ax_stage.legend(loc="upper right", fontsize=8)
    ax_stage.set_title(title)
    probs = np.nan_to_num(frame[["p_wake", "p_light", "p_deep", "p_rem"]].to_numpy(dtype=float)).T
    ax_prob.stackplot(hours, probs, labels=dl.STAGE_NAMES, colors=[STAGE_COLORS[s] for s in dl.STAGE_NAMES])
    ax_prob.set_ylabel("probability")
    if start_clock is None:
        ax_prob.set_xlabel("hours since recording start")
    else:
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
    save_figure(fig, path)


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
    save_figure(fig, path)
