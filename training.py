"""The one training loop behind train.py (LSTM) and train_hybrid.py (CNN + Transformer).

Recipe: focal loss (gamma 2) with balanced class weights and a REM boost, Gaussian-noise
augmentation of REM epochs, AdamW, cosine annealing with warm restarts, gradient clipping,
early stopping and model selection on validation subjects by a named metric (default Cohen's
kappa). Windows of SEQ_LEN epochs are trained sequence-to-sequence (a loss on every epoch of the
window), at a stride, which costs a fraction of one window per epoch; the evaluation reads each
epoch at its target position (centre offline, last epoch causal).

Runs unchanged under torchrun: DistributedDataParallel, a DistributedSampler seeded per epoch,
validation predictions gathered from every rank, one early-stopping decision broadcast from
rank 0, and only rank 0 writes files or prints.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import data_loader as dl
import degrade
import features
import feature_store
from checkpoint import ARCHITECTURES, Ensemble, atomic_write, build_model, make_checkpoint, read_checkpoint, save_checkpoint
from smoothing import smooth_night, transition_matrix
from evaluation import can_step, compute_metrics, format_report, predict_night, prediction_frame, save_figure, write_predictions

SELECT_METRICS = ("kappa", "macro_f1", "accuracy", "rem_accuracy")


@dataclass
class TrainConfig:
    seq_len: int = 25               # window of epochs; 0: the whole night in one pass (offline, sequence to sequence)
    crop_epochs: tuple[int, int] = (240, 960)  # seq_len 0: training crops of this many epochs (drawn per pass)
    crops_per_night: int = 3        # seq_len 0: crops of each training night per pass
    batch_size: int = 96
    epochs: int = 100
    lr: float = 8e-4
    min_lr: float = 1e-6
    restart_epochs: int = 10        # first cosine cycle length (warm restarts double it)
    weight_decay: float = 5e-5
    grad_clip: float = 0.5
    ema: float = 0.0                # >0: keep (select, save) an exponential moving average of the weights, this decay per step
    dropout: float = 0.25
    focal_gamma: float = 2.0
    rem_boost: float = 1.6          # extra weight on REM on top of the balanced class weights
    class_weight_power: float = 1.0  # 1: fully balanced weights; 0.5 tempers them (sqrt), 0: none
    rem_noise: float = 0.1          # std of Gaussian noise added to REM epochs (standardised units)
    ensemble: int = 1               # >1: train this many seeds (seed, seed+1, ...) and average them
    degraded_members: int = 0       # with ensemble: the last this many members draw every night degraded
                                    # (p_recorded 0): a mix of members that lean clean and sparse
    distill: float = 0.0            # >0 with ensemble: the members teach one student (the model kept), fitted to
                                    # their averaged stage probabilities with this weight, to the stages with 1 - it
    offline_teacher: float = 0.0    # >0, causal: an offline model (the script's offline recipe) trains first on the same
                                    # subjects; each training night's stages as it reads the whole night, under the
                                    # night's drawn condition, join the loss with this weight (the stages with 1 - it)
    smooth: bool = True             # offline: smooth each night with the training subjects' stage transitions
    degrade: bool = True            # train on real-world conditions drawn per night and pass (degrade.py),
                                    # select on validation nights under degrade.VALIDATION_CONDITIONS
    p_recorded: float = 0.0         # with degrade: share of training nights drawn as recorded
    hr_shift_bpm: float = 0.0       # with degrade: std of a heart-rate offset drawn per training night and pass
    train_mix: str = "mixed"        # with degrade: what degraded nights are drawn from (a degrade.TRAIN_MIXES name)
    middle_lag_weight: float = 1.0  # with a lookahead: loss weight of the lags between 0 and the revision's
    validate: bool = True           # False: no validation subjects; train every given subject for `epochs`
                                    # passes and keep the last (passes chosen by cross-validation)
    stride: int = 5                 # epochs between training windows
    causal: bool = False            # True: real-time model, the window ends at the predicted epoch
    patience: int = 12              # epochs without validation improvement before stopping
    select_metric: str = "kappa"
    seed: int = 1337
    split_seed: int = 1337          # fixes the 80/10/10 subject split, independent of the init seed
    fold: int | None = None         # with cv: train only this fold
    cv: int = 0                     # k-fold cross-validation by subject over the non-test subjects
    data_dir: str = str(dl.DEFAULT_DATA_DIR)
    out_dir: str = ""               # "": runs/<arch>_<mode>/; the shipped checkpoints/ only when named
    resume: bool = False
    device: str = "auto"
    bf16: bool = False
    features: tuple[str, ...] = features.DEFAULT_FEATURES
    model: str = ""                 # overrides of the script's MODEL config, e.g. "channels=32,n_heads=2"

    @property
    def smoothed(self) -> bool:
        """Whether this run's models smooth nights (offline only: smoothing reads later epochs)."""
        return self.smooth and not self.causal

    @property
    def target_pos(self) -> int:
        return max(self.seq_len - 1 if self.causal else self.seq_len // 2, 0)


# ----------------------------------------------------------------------------- distributed plumbing

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else single process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    # rank 0 builds the feature store while the others wait in a collective: allow a cohort's worth
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def broadcast(value, ctx: Dist):
    """Rank 0's value on every rank (decisions are made once)."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value, ctx: Dist) -> list:
    if not ctx.enabled:
        return [value]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


# ----------------------------------------------------------------------------- data

@dataclass
class Prepared:
    """The cohort's memory-mapped features, and what is fitted once on the training subjects: the scaler,
    the loss's class weights and, for smoothed (offline) models, the stage transition matrix (None: no
    smoothing).

    With real-world conditions (cfg.degrade) it also reads the nights themselves (`data_dir`, loaded
    when first needed) and holds, by key, nights under a condition (`degraded`: scaled features,
    stages with no-data epochs unscored, the no-data mask): a training subject's key is its id
    (`draw` replaces it every pass); `add_conditions` adds "<id>|<condition>" ("<id>" as recorded).
    """
    store: feature_store.FeatureStore
    scaler: dl.FeatureScaler
    weight: torch.Tensor = field(default_factory=lambda: torch.ones(4))
    transitions: np.ndarray | None = None
    data_dir: str | None = None
    causal: bool = False
    p_recorded: float = 0.0
    hr_shift_bpm: float = 0.0
    train_mix: str = "mixed"
    nights: dict[str, dl.Night] = field(default_factory=dict)
    degraded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    teacher: "OfflineTeacher | None" = None
    taught: dict[str, np.ndarray] = field(default_factory=dict)  # key -> the teacher's log-probabilities (n, 4)

    @property
    def degrades(self) -> bool:
        return self.data_dir is not None

    @property
    def reads_baseline(self) -> bool:
        """Whether the features read the personal baseline (then training drops it in half the nights)."""
        return features.reads_baseline(self.store.feature_names)

    def night(self, subject_id: str) -> dl.Night:
        if subject_id not in self.nights:
            self.nights[subject_id] = dl.load_night(self.data_dir, subject_id)
        return self.nights[subject_id]

    def x(self, key: str, index: np.ndarray | None = None) -> np.ndarray:
        """Scaled features of a subject or degraded night (rows at index, or all)."""
        if key in self.degraded:
            x = self.degraded[key][0]
            return x if index is None else x[index]
        return self.scaler.transform(self.store.read(key, "features", index))

    def y(self, key: str, index: np.ndarray | None = None) -> np.ndarray:
        if key in self.degraded:
            y = self.degraded[key][1]
            return y if index is None else y[index]
        return self.store.read(key, "stage", index).astype(np.int64)

    def no_data(self, key: str) -> np.ndarray | None:
        """Epochs without a stage (features.no_data) of a degraded night; None for a store subject."""
        return self.degraded[key][2] if key in self.degraded else None

    def _under(self, night: dl.Night) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = self.scaler.transform(features.night_features(night, self.causal, self.store.feature_names))
        no_data = features.no_data(night, self.causal)
        return x, np.where(no_data, -1, night.stage).astype(np.int64), no_data

    def draw(self, subjects: list[str], seed: int) -> None:
        """Each subject's night under a freshly drawn condition (degrade.draw_condition), same on every rank."""
        rng = np.random.default_rng(seed)
        for s in subjects:
            night = self.night(s)
            condition = degrade.draw_condition(rng, night, self.p_recorded,
                                               degrade.TRAIN_P_DROP_BASELINE if self.reads_baseline else 0.0,
                                               self.hr_shift_bpm, degrade.TRAIN_MIXES[self.train_mix])
            drawn = degrade.degrade(night, condition, rng)
            self.degraded[s] = self._under(drawn)
            if self.teacher is not None:
                self.taught[s] = self.teacher.log_probs(drawn)

    def add_conditions(self, subjects: list[str], conditions: tuple[str, ...]) -> list[str]:
        """Keys of the subjects' nights under each named condition (degrade.CONDITIONS), registered once;
        with real-world conditions off, the subjects themselves (as recorded, from the store)."""
        if not self.degrades:
            return list(subjects)
        keys = []
        for s in subjects:
            for name in conditions:
                key = s if name == "as recorded" else f"{s}|{name}"
                if key not in self.degraded:
                    self.degraded[key] = self._under(degrade.degrade(self.night(s), degrade.CONDITIONS[name]))
                keys.append(key)
        return keys


def prepare(store: feature_store.FeatureStore, train_ids: list[str], cfg: TrainConfig | None = None) -> Prepared:
    """Fit the scaler, class weights and (smoothed runs) transition matrix on train_ids; with cfg.degrade
    load the nights, and fit the scaler on the training nights under every named condition."""
    cfg = cfg or TrainConfig(degrade=False, smooth=False)  # without a config: the store's features, nothing more
    if cfg.train_mix not in degrade.TRAIN_MIXES:
        raise ValueError(f"train_mix {cfg.train_mix!r}: expected one of {list(degrade.TRAIN_MIXES)}")
    transitions = None
    if cfg.smoothed:
        transitions = transition_matrix(store.read(s, "stage").astype(np.int64) for s in train_ids)
    weight = class_weights(store.class_counts(train_ids), cfg.rem_boost, cfg.class_weight_power)
    if not cfg.degrade:
        return Prepared(store, store.fit_scaler(train_ids), weight, transitions, causal=cfg.causal)
    nights = {s: dl.load_night(cfg.data_dir, s) for s in train_ids}
    # the no-baseline conditions repeat others for a model that does not read the baseline
    conditions = [c for c in degrade.CONDITIONS.values() if features.reads_baseline(store.feature_names)
                  or not c.drop_baseline]
    scaler = dl.FeatureScaler.fit(
        features.night_features(degrade.degrade(nights[s], condition), cfg.causal, store.feature_names)
        for s in train_ids for condition in conditions)
    return Prepared(store, scaler, weight, transitions, cfg.data_dir, cfg.causal, cfg.p_recorded, cfg.hr_shift_bpm,
                    cfg.train_mix, nights)


@dataclass
class OfflineTeacher:
    """An offline model (whole nights, both directions) that teaches a causal one: what it makes of a night,
    read through its own offline features and scaler."""
    model: torch.nn.Module
    scaler: dl.FeatureScaler
    features: tuple[str, ...]

    def log_probs(self, night: dl.Night) -> np.ndarray:
        x = self.scaler.transform(features.night_features(night, causal=False, features=self.features))
        with torch.no_grad():
            device = next(self.model.parameters()).device
            logits = self.model(torch.from_numpy(x).unsqueeze(0).to(device))[0]
        return F.log_softmax(logits.float(), dim=-1).cpu().numpy()


class WindowDataset(Dataset):
    """Training windows of seq_len epochs from each night, every `stride` epochs, read from the store.

    The cuts shift with the training epoch (set_epoch), so successive passes see different windows,
    while every epoch of the night is in some window of every pass; the number of windows stays
    fixed, as DistributedSampler needs. The index is two integer arrays, not a Python list, so it
    stays small for a cohort of thousands of nights.
    Padded positions (nights shorter than seq_len) carry label -1 and are not trained on.
    """

    def __init__(self, data: Prepared, subjects: list[str], seq_len: int, stride: int, seed: int):
        self.data, self.subjects, self.seq_len, self.stride, self.seed = data, list(subjects), seq_len, stride, seed
        self.lengths = np.array([data.store.n_epochs(s) for s in self.subjects], np.int64)
        # one window more than fits, so shifted cuts still reach both ends of the night
        per_night = np.where(self.lengths <= seq_len, 1,
                             -(-(self.lengths - seq_len + stride - 1) // stride) + 1).astype(np.int64)
        self.window_night = np.repeat(np.arange(len(self.subjects), dtype=np.int32), per_night)
        self.window_k = (np.arange(per_night.sum()) - np.repeat(np.cumsum(per_night) - per_night, per_night)).astype(np.int32)
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Shift the cuts; with real-world conditions, draw every night's condition afresh."""
        self.offset = int(np.random.default_rng(self.seed + epoch).integers(self.stride))
        if self.data.degrades:
            self.data.draw(self.subjects, self.seed * 100_003 + epoch)

    def __len__(self) -> int:
        return len(self.window_night)

    def __getitem__(self, i: int):
        night, k = int(self.window_night[i]), int(self.window_k[i])
        n = int(self.lengths[night])
        return self.read(night, int(np.clip(k * self.stride - self.offset, 0, max(n - self.seq_len, 0))))

    def read(self, night: int, start: int):
        """(features, labels) of seq_len epochs of a night from `start`, and with an offline teacher its
        log-probabilities there; past the night's end the last epoch repeats, labelled -1."""
        subject_id, n = self.subjects[night], int(self.lengths[night])
        idx = start + np.arange(self.seq_len)
        valid = idx < n
        idx = np.minimum(idx, n - 1)
        labels = np.where(valid, self.data.y(subject_id, idx), -1)
        out = torch.from_numpy(self.data.x(subject_id, idx)), torch.from_numpy(labels)
        if self.data.teacher is not None:
            out += (torch.from_numpy(self.data.taught[subject_id][idx]),)
        return out


class CropDataset(WindowDataset):
    """Training crops for whole-night models (seq_len 0): crops_per_night per night and pass, all of one
    length drawn per pass from crop_epochs (so a batch stacks), each at a random start. The model
    labels every epoch of a crop; at inference it reads the whole night."""

    def __init__(self, data: Prepared, subjects: list[str], crop_epochs: tuple[int, int], crops_per_night: int,
                 seed: int):
        super().__init__(data, subjects, max(crop_epochs), 1, seed)
        self.crop_epochs = (int(min(crop_epochs)), int(max(crop_epochs)))
        self.window_night = np.repeat(np.arange(len(self.subjects), dtype=np.int32), crops_per_night)
        self.start_frac = np.zeros(len(self.window_night))

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        rng = np.random.default_rng(self.seed * 7919 + epoch)
        self.seq_len = int(rng.integers(self.crop_epochs[0], self.crop_epochs[1] + 1))
        self.start_frac = rng.random(len(self.window_night))

    def __getitem__(self, i: int):
        night = int(self.window_night[i])
        room = max(int(self.lengths[night]) - self.seq_len, 0)
        return self.read(night, int(round(self.start_frac[i] * room)))


def class_weights(counts: np.ndarray, rem_boost: float, power: float = 1.0) -> torch.Tensor:
    """From scored epochs per stage (4,): balanced weights (n / (k * count_c)) ** power, REM times
    rem_boost; absent classes weigh 0."""
    counts = np.asarray(counts, np.float64)
    weights = np.where(counts > 0, (counts.sum() / (4 * np.maximum(counts, 1))) ** power, 0.0)
    weights[3] *= rem_boost
    return torch.tensor(weights, dtype=torch.float32)


def loss_weights(target: torch.Tensor, weight: torch.Tensor,
                 position_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Each position's weight in the loss (target's shape): its class weight, times position_weight
    (broadcast to target's shape) where given, 0 where unscored (target -1)."""
    w = weight[target.clamp_min(0)] * (target >= 0)
    return w if position_weight is None else w * position_weight


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float,
               normaliser: torch.Tensor | None = None, position_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted focal loss over positions with target >= 0, divided by the summed weights
    (or by `normaliser`: under DDP the global weight sum per rank, so ranks average exactly);
    position_weight (broadcast to target's shape) scales each position's weight."""
    w = loss_weights(target, weight, position_weight)
    logits, target, w = logits.reshape(-1, logits.shape[-1]), target.reshape(-1), w.reshape(-1)
    keep = target >= 0
    logits, target, w = logits[keep], target[keep], w[keep]
    if normaliser is None:
        normaliser = w.sum()
    if target.numel() == 0:
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
    return (-w * (1 - log_p.exp()) ** gamma * log_p).sum() / normaliser.clamp_min(1e-8)


def distill_loss(logits: torch.Tensor, teacher_log_probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                 normaliser: torch.Tensor | None = None, position_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against a teacher's stage probabilities, weighted and normalised as focal_loss
    (so the two add up in one scale): positions without a scored stage count for nothing."""
    w = loss_weights(target, weight, position_weight)
    if normaliser is None:
        normaliser = w.sum()
    per_position = -(teacher_log_probs.float().exp() * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return (w * per_position).sum() / normaliser.clamp_min(1e-8)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def lag_weights(lookahead: int, middle_lag_weight: float) -> torch.Tensor:
    """Each lag's weight in the loss (1 + lookahead,): lag 0 (the immediate stage) and lag lookahead
    (the revision's latest window) weigh 1, those between middle_lag_weight. The lags a revision_span
    averages keep middle_lag_weight: at full weight they cost the immediate stage (docs/experiments.md, MS)."""
    weight = torch.full((lookahead + 1,), float(middle_lag_weight))
    weight[[0, lookahead]] = 1.0
    return weight


def lag_targets(y: torch.Tensor, lookahead: int, fill: float = -1) -> torch.Tensor:
    """(batch, L, ...) per epoch -> (batch, L, 1 + lookahead, ...): [:, t, j] = y[:, t - j], `fill` before
    the window (stages, or a teacher's probabilities)."""
    length = y.shape[1]
    padded = torch.cat([y.new_full((y.shape[0], lookahead, *y.shape[2:]), fill), y], dim=1)
    return torch.stack([padded[:, lookahead - j:lookahead - j + length] for j in range(lookahead + 1)], dim=2)


def train_step(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               weight: torch.Tensor, cfg: TrainConfig, ctx: Dist, teacher: torch.nn.Module | torch.Tensor | None = None
               ) -> torch.Tensor:
    """One optimisation step on this rank's share of the global batch; returns the loss. With a teacher, the
    loss also fits its stage probabilities: a model (eval mode) on the same inputs (cfg.distill), or an
    offline teacher's log-probabilities per epoch (batch, L, 4) (cfg.offline_teacher)."""
    if cfg.rem_noise > 0:  # REM-specific augmentation: jitter the inputs of REM epochs
        x = x + torch.randn_like(x) * cfg.rem_noise * (y == 3).unsqueeze(-1)
    lookahead = unwrap(ddp_model).config.lookahead
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and x.device.type == "cuda"):
        logits = ddp_model(x, lags=lookahead > 0)
    lag_weight = None
    if lookahead > 0:  # the revision: position t also learns epoch t - j's stage, for every lag j
        y = lag_targets(y, lookahead)
        lag_weight = lag_weights(lookahead, cfg.middle_lag_weight).to(y.device)
    normaliser = None
    if ctx.enabled:  # DDP averages gradients over ranks: divide by the global weight sum / world size
        normaliser = loss_weights(y, weight, lag_weight).sum().detach()
        dist.all_reduce(normaliser)
        normaliser = normaliser / ctx.world_size
    loss = focal_loss(logits, y, weight, cfg.focal_gamma, normaliser, lag_weight)
    if teacher is not None:
        share = cfg.distill
        if isinstance(teacher, torch.Tensor):  # the offline teacher's, per epoch: per lag as the stages
            share = cfg.offline_teacher
            teacher_log_probs = lag_targets(teacher, lookahead, 0.0) if lookahead > 0 else teacher
        else:
            with torch.no_grad():
                teacher_log_probs = teacher(x, lags=lookahead > 0)
        loss = (1 - share) * loss + share * distill_loss(logits, teacher_log_probs, y, weight, normaliser, lag_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------- evaluation during training

def evaluate_subjects(model: torch.nn.Module, data: Prepared, subjects: list[str], cfg: TrainConfig,
                      ctx: Dist, device: torch.device) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    """Metrics over the whole subject list: each rank predicts its share, rank 0 gets all of it.

    Metrics and the returned probabilities are smoothed when data.transitions is set; the loss is the
    network's own (unsmoothed), comparable with the training loss."""
    mine = {}
    model.eval()
    for s in subjects[ctx.rank::ctx.world_size]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda"):
            mine[s] = predict_night(model, data.x(s), cfg.seq_len, cfg.target_pos, no_data=data.no_data(s))
    raw = {}
    for part in gather(mine, ctx):
        raw.update(part)
    transitions = data.transitions
    merged = raw if transitions is None else {s: smooth_night(p, transitions) for s, p in raw.items()}
    y_true = np.concatenate([data.y(s) for s in subjects])
    y_pred = features.stages_of(np.concatenate([merged[s] for s in subjects]))
    raw_all = np.concatenate([raw[s] for s in subjects])
    metrics = compute_metrics(y_true, y_pred)
    if transitions is not None:  # the same model's figures without smoothing: a paired comparison
        unsmoothed = compute_metrics(y_true, features.stages_of(raw_all))
        metrics["unsmoothed"] = {k: unsmoothed[k] for k in CV_KEYS}
    scored = y_true >= 0
    with torch.no_grad():
        logp = torch.log(torch.from_numpy(raw_all[scored]).clamp_min(1e-8)).float()
        metrics["loss"] = float(focal_loss(logp, torch.from_numpy(y_true[scored]), data.weight, cfg.focal_gamma))
    metrics["rem_accuracy"] = metrics["recall_rem"]
    return metrics, y_true, y_pred, merged


def validation_keys(data: Prepared, val_ids: list[str]) -> list[str]:
    """What model selection scores: the validation nights, under every degrade.VALIDATION_CONDITIONS
    when training on real-world conditions."""
    return data.add_conditions(val_ids, degrade.VALIDATION_CONDITIONS)


# ----------------------------------------------------------------------------- one training run

def train_one(arch: str, model_config: dict, cfg: TrainConfig, data: Prepared, train_ids: list[str],
              val_ids: list[str], out_dir: Path | None, ctx: Dist, device: torch.device,
              extra: dict | None = None, quiet: bool = False, teacher: torch.nn.Module | None = None
              ) -> tuple[torch.nn.Module, dict]:
    """Train on train_ids, select on val_ids; writes model.pth/scaler.pkl/last.pth/log/curves to out_dir (rank 0).
    teacher: a trained model whose stage probabilities the loss also fits (cfg.distill)."""
    torch.manual_seed(cfg.seed)
    model_config = {**model_config, "n_features": len(cfg.features), "causal": cfg.causal, "dropout": cfg.dropout}
    model = build_model(arch, model_config).to(device)
    # the weights kept (evaluated, selected, saved): the trained ones, or their moving average, which
    # smooths the step-to-step noise of a small cohort
    averaged = None
    if cfg.ema > 0:
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    kept = model if averaged is None else averaged.module
    if cfg.seq_len == 0:
        dataset = CropDataset(data, train_ids, cfg.crop_epochs, cfg.crops_per_night, cfg.seed)
    else:
        dataset = WindowDataset(data, train_ids, cfg.seq_len, cfg.stride, cfg.seed)
    val_keys = validation_keys(data, val_ids) if cfg.validate else []
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=False)
    weight = data.weight.to(device)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if ctx.enabled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_epochs, T_mult=2,
                                                                     eta_min=cfg.min_lr)
    state = {"epoch": 0, "best": -math.inf, "best_epoch": -1, "stale": 0, "log": []}
    last_path = out_dir / "last.pth" if out_dir else None
    best_path = out_dir / "model.pth" if out_dir else None
    if cfg.resume and last_path is not None and last_path.exists():
        saved = read_checkpoint(last_path)
        model.load_state_dict(saved["trained_state_dict"] if averaged is not None else saved["state_dict"])
        if averaged is not None:  # the saved weights are the average; the count says how far it has come
            averaged.module.load_state_dict(saved["state_dict"])
            averaged.n_averaged.fill_(int(saved["ema_n_averaged"]))
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng_state"])
        state = saved["train_state"]
        if ctx.is_main:
            print(f"resumed from {last_path} after epoch {state['epoch']} (best {cfg.select_metric} "
                  f"{state['best']:.4f} at epoch {state['best_epoch']})")
    checkpoint_extra = _checkpoint_extra(cfg, train_ids, val_ids, data.transitions, extra)
    best_model_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
    if best_path is not None and best_path.exists() and state["best_epoch"] >= 0:
        best_model_state = read_checkpoint(best_path)["state_dict"]
    from tqdm import tqdm
    while state["epoch"] < cfg.epochs and state["stale"] < cfg.patience:
        epoch = state["epoch"]
        t0 = time.perf_counter()
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        ddp_model.train()
        total, n_batches = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not ctx.is_main or quiet or None)
        for step, (x, y, *taught) in enumerate(bar):
            loss = train_step(ddp_model, optimizer, x.to(device), y.to(device), weight, cfg, ctx,
                              taught[0].to(device) if taught else teacher)
            if averaged is not None:
                averaged.update_parameters(model)
            scheduler.step(epoch + (step + 1) / len(loader))
            total += loss.item()
            n_batches += 1
            if ctx.is_main and bar is not None and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total / n_batches:.4f}")
        train_loss = float(np.mean([v for v in gather(total / max(n_batches, 1), ctx)]))
        windows_per_s = len(dataset) / (time.perf_counter() - t0)  # all ranks together (the global pass)
        if cfg.validate:
            metrics, *_ = evaluate_subjects(kept, data, val_keys, cfg, ctx, device)
        else:  # no selection: every pass "improves", the last one is kept
            metrics = dict.fromkeys(("loss", "accuracy", "kappa", "macro_f1", "recall_rem", cfg.select_metric), math.nan)
        improved, row = False, None
        if ctx.is_main:
            score = metrics[cfg.select_metric]
            improved = score > state["best"] or not cfg.validate
            row = {"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_loss": round(metrics["loss"], 5),
                   "val_accuracy": round(metrics["accuracy"], 4), "val_kappa": round(metrics["kappa"], 4),
                   "val_macro_f1": round(metrics["macro_f1"], 4), "val_rem_recall": round(metrics["recall_rem"], 4),
                   "lr": optimizer.param_groups[0]["lr"], "windows_per_s": round(windows_per_s, 1),
                   "seconds": round(time.perf_counter() - t0, 2)}
            if not quiet:
                print(f"epoch {epoch + 1:3d}  train {train_loss:.4f}  val {metrics['loss']:.4f}  "
                      f"acc {metrics['accuracy']:.3f}  kappa {metrics['kappa']:.3f}  F1 {metrics['macro_f1']:.3f}  "
                      f"REM {metrics['recall_rem']:.3f}  {windows_per_s:,.0f} windows/s  {row['seconds']:.1f}s"
                      + ("  *" if improved else ""), flush=True)
        improved = broadcast(improved, ctx)  # one decision, obeyed by every rank
        state["epoch"] = epoch + 1
        if improved:
            state.update(best=metrics[cfg.select_metric] if ctx.is_main else state["best"], best_epoch=epoch + 1, stale=0)
            best_model_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
        else:
            state["stale"] += 1
        state = broadcast(state if ctx.is_main else None, ctx) if ctx.enabled else state
        if ctx.is_main:
            state["log"].append(row)
            if out_dir is not None:
                if improved:
                    save_checkpoint(make_checkpoint(kept, arch, features=list(cfg.features), seq_len=cfg.seq_len,
                                                    target_pos=cfg.target_pos, scaler=data.scaler,
                                                    extra={**checkpoint_extra, "val_metrics": _jsonable(metrics),
                                                           "epoch": epoch + 1}),
                                    best_path, out_dir / "scaler.pkl")
                _write_log(state["log"], out_dir / "train_log.csv")
                last = make_checkpoint(kept, arch, features=list(cfg.features), seq_len=cfg.seq_len,
                                       target_pos=cfg.target_pos, scaler=data.scaler, extra=checkpoint_extra)
                if averaged is not None:  # resuming needs the trained weights beside the average
                    last.update(trained_state_dict=model.state_dict(), ema_n_averaged=int(averaged.n_averaged))
                last.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            rng_state=torch.get_rng_state(), train_state=state)
                save_checkpoint(last, last_path)
    kept.load_state_dict(best_model_state)
    if ctx.is_main and out_dir is not None and state["log"]:
        plot_curves(state["log"], out_dir / "curves.png", cfg.select_metric)
    return kept, state


def train_offline_teacher(arch: str, recipe: tuple[dict, TrainConfig], cfg: TrainConfig, train_ids: list[str],
                          out_dir: Path | None, ctx: Dist, device: torch.device, quiet: bool = False) -> OfflineTeacher:
    """The offline model that teaches a causal run (cfg.offline_teacher): the offline recipe (model config,
    defaults) trained on the same subjects and seed, all of them, for the recipe's passes; saved in out_dir."""
    model_config, defaults = recipe
    if defaults.seq_len != 0:  # it reads each training night whole
        raise ValueError(f"offline_teacher needs an offline recipe of whole nights (seq_len 0), not seq_len {defaults.seq_len}")
    teacher_cfg = replace(defaults, causal=False, seed=cfg.seed, data_dir=cfg.data_dir, degrade=True, validate=False,
                          ensemble=1, features=cfg.features, device=cfg.device, bf16=cfg.bf16, resume=cfg.resume)
    if ctx.is_main and not quiet:
        print(f"offline teacher (seed {teacher_cfg.seed}, {teacher_cfg.epochs} passes)", flush=True)
    store = _load_store(teacher_cfg, ctx, lambda *args, **kwargs: None)
    data = prepare(store, train_ids, teacher_cfg)
    model, _ = train_one(arch, model_config, teacher_cfg, data, train_ids, [], out_dir, ctx, device, quiet=quiet)
    return OfflineTeacher(model.eval(), data.scaler, teacher_cfg.features)


def train_model(arch: str, model_config: dict, cfg: TrainConfig, data: Prepared, train_ids: list[str],
                val_ids: list[str], out_dir: Path | None, ctx: Dist, device: torch.device,
                extra: dict | None = None, quiet: bool = False,
                teacher_recipe: tuple[dict, TrainConfig] | None = None) -> tuple[torch.nn.Module, dict]:
    """train_one, or with cfg.ensemble > 1 that many members (seeds seed, seed+1, ...), each trained and
    selected on val_ids like a single model in out_dir/members/seed<S>/, then averaged (checkpoint.Ensemble)
    and saved as one model.pth in out_dir; with cfg.distill the average instead teaches one student (seed
    seed + ensemble), trained in out_dir and kept: an ensemble's accuracy at one model's cost. --resume
    continues the unfinished member or student. With cfg.offline_teacher, teacher_recipe (the offline
    recipe) first trains the teacher of every member, in out_dir/teacher/."""
    if cfg.offline_teacher > 0:
        if teacher_recipe is None or not cfg.causal or not data.degrades:
            raise ValueError("offline_teacher needs a causal run on drawn conditions (degrade) and the offline recipe")
        data.teacher = train_offline_teacher(arch, teacher_recipe, cfg, train_ids,
                                             out_dir / "teacher" if out_dir is not None else None, ctx, device, quiet)
    if cfg.ensemble <= 1:
        return train_one(arch, model_config, cfg, data, train_ids, val_ids, out_dir, ctx, device, extra, quiet)
    members, best_epochs = [], []
    for i in range(cfg.ensemble):
        degraded = i >= cfg.ensemble - cfg.degraded_members
        member_cfg = replace(cfg, seed=cfg.seed + i, p_recorded=0.0 if degraded else cfg.p_recorded)
        if ctx.is_main and not quiet:
            print(f"ensemble member {i + 1}/{cfg.ensemble} (seed {member_cfg.seed}, "
                  f"{member_cfg.p_recorded:.0%} of nights as recorded)", flush=True)
        member_dir = out_dir / "members" / f"seed{member_cfg.seed}" if out_dir is not None else None
        member_data = replace(data, p_recorded=member_cfg.p_recorded)  # the same nights and scaler
        member, state = train_one(arch, model_config, member_cfg, member_data, train_ids, val_ids, member_dir, ctx,
                                  device, extra, quiet)
        members.append(member)
        best_epochs.append(state["best_epoch"])
    model = Ensemble(members).eval()
    if cfg.distill > 0:
        if ctx.is_main and not quiet:
            print(f"student of the {cfg.ensemble} members (seed {cfg.seed + cfg.ensemble})", flush=True)
        return train_one(arch, model_config, replace(cfg, seed=cfg.seed + cfg.ensemble), data, train_ids, val_ids,
                         out_dir, ctx, device, extra, quiet, teacher=model)
    metrics = {}
    if cfg.validate:
        metrics, *_ = evaluate_subjects(model, data, validation_keys(data, val_ids), cfg, ctx, device)
    if ctx.is_main and out_dir is not None:
        save_checkpoint(make_checkpoint(model, arch, features=list(cfg.features), seq_len=cfg.seq_len,
                                        target_pos=cfg.target_pos, scaler=data.scaler,
                                        extra={**_checkpoint_extra(cfg, train_ids, val_ids, data.transitions, extra),
                                               "val_metrics": _jsonable(metrics), "epoch": best_epochs}),
                        out_dir / "model.pth", out_dir / "scaler.pkl")
    return model, {"best_epoch": best_epochs, "best": metrics.get(cfg.select_metric, math.nan)}


def _checkpoint_extra(cfg: TrainConfig, train_ids: list[str], val_ids: list[str], transitions: np.ndarray | None,
                      extra: dict | None) -> dict:
    """What a checkpoint records of its training besides the weights."""
    return {"train_subjects": train_ids, "val_subjects": val_ids, "train_config": _jsonable(asdict(cfg)),
            "transitions": None if transitions is None else transitions.tolist(), **(extra or {})}


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def _write_log(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


def plot_curves(rows: list[dict], path: Path, select_metric: str) -> None:
    """Train/validation loss and validation metrics per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("focal loss")
    ax_loss.legend()
    for key in ("val_kappa", "val_macro_f1", "val_accuracy", "val_rem_recall"):
        ax_metric.plot(epochs, [r[key] for r in rows], label=key[4:])
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title(f"validation (selected on {select_metric})")
    ax_metric.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- entry point

def parse_args(defaults: TrainConfig, argv: list[str] | None, script: str) -> TrainConfig:
    """Command-line flags over the script's defaults; env vars SEQ_LEN, BATCH_SIZE, EPOCHS, LR too."""
    env = {"seq_len": "SEQ_LEN", "batch_size": "BATCH_SIZE", "epochs": "EPOCHS", "lr": "LR"}
    parser = argparse.ArgumentParser(prog=script, description=__doc__.split("\n")[0])
    for f in fields(TrainConfig):
        if f.name in ("features", "crop_epochs"):
            continue
        default = getattr(defaults, f.name)
        if f.name in env and os.environ.get(env[f.name]):
            default = type(default)(os.environ[env[f.name]])
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "fold":
            parser.add_argument(flag, type=int, default=default, help="with --cv K: train only this fold (0-based)")
        elif f.name == "select_metric":
            parser.add_argument(flag, choices=SELECT_METRICS, default=default)
        elif f.name == "train_mix":
            parser.add_argument(flag, choices=tuple(degrade.TRAIN_MIXES), default=default)
        elif f.name == "device":
            parser.add_argument(flag, choices=("auto", "cpu", "cuda"), default=default)
        elif f.name == "model":
            parser.add_argument(flag, default=default, metavar="KEY=VALUE,...",
                                help="override the script's MODEL config, e.g. channels=32,n_heads=2")
        else:
            parser.add_argument(flag, type=type(default), default=default)
    parser.add_argument("--features", default=",".join(defaults.features),
                        help=f"comma-separated; known: {','.join(features.FEATURES)}")
    parser.add_argument("--crop-epochs", default=",".join(map(str, defaults.crop_epochs)), metavar="MIN,MAX",
                        help="with --seq-len 0: training crops of MIN to MAX epochs")
    args = vars(parser.parse_args(argv))
    args["features"] = tuple(s for s in args["features"].split(",") if s)
    try:
        args["crop_epochs"] = tuple(int(v) for v in args["crop_epochs"].split(","))
    except ValueError:
        parser.error(f"--crop-epochs {args['crop_epochs']!r}: expected MIN,MAX (epochs), e.g. 240,960")
    if len(args["crop_epochs"]) != 2 or min(args["crop_epochs"]) < 1:
        parser.error(f"--crop-epochs {args['crop_epochs']}: expected two positive numbers MIN,MAX")
    unknown = [s for s in args["features"] if s not in features.FEATURES]
    if unknown:
        parser.error(f"unknown feature(s) {unknown}")
    if args["seq_len"] < 0 or args["batch_size"] < 1 or args["epochs"] < 0 or args["stride"] < 1:
        parser.error("--batch-size and --stride must be >= 1, --seq-len and --epochs >= 0 (--seq-len 0: whole nights)")
    if args["ensemble"] < 1:
        parser.error(f"--ensemble must be >= 1 (models averaged), got {args['ensemble']}")
    if not 0 <= args["distill"] <= 1 or (args["distill"] > 0 and args["ensemble"] < 2):
        parser.error(f"--distill must be 0 to 1 and needs --ensemble 2 or more (the teacher), got --distill "
                     f"{args['distill']} with --ensemble {args['ensemble']}")
    if not 0 <= args["offline_teacher"] < 1 or (args["offline_teacher"] > 0 and not (
            args["causal"] and args["degrade"] and args["distill"] == 0)):
        parser.error(f"--offline-teacher must be 0 to below 1 and needs --causal and --degrade, without --distill; "
                     f"got --offline-teacher {args['offline_teacher']}")
    if not 0 <= args["degraded_members"] <= args["ensemble"]:
        parser.error(f"--degraded-members must be 0 to --ensemble ({args['ensemble']}), got {args['degraded_members']}")
    return TrainConfig(**args)


def override_model_config(model_config: dict, overrides: str) -> dict:
    """model_config with "key=value,..." applied; each value takes the type of the key's default."""
    out = dict(model_config)
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in model_config or key == "n_classes":  # four stages, fixed
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(k for k in model_config if k != 'n_classes')}")
        kind = type(model_config[key])
        try:
            if kind is tuple:  # e.g. crop_epochs=240:960
                out[key] = tuple(type(model_config[key][0])(v) for v in value.split(":"))
            else:
                out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a {kind.__name__}") from None
    return out


def script_config(model) -> dict:
    """A script's MODEL dataclass as the dict run() takes (what the flags set is left out)."""
    return {k: v for k, v in asdict(model).items() if k not in ("n_features", "causal", "dropout")}


def run(arch: str, model_config: dict, defaults: TrainConfig, argv: list[str] | None = None,
        causal_recipe: tuple[dict, TrainConfig] | None = None) -> int:
    """Full CLI behaviour for one architecture: train + test evaluation, or --cv K. causal_recipe:
    the (model_config, defaults) that --causal starts from, where the real-time recipe differs."""
    script = ARCHITECTURES[arch].train_script
    wants_causal = argparse.ArgumentParser(add_help=False)
    wants_causal.add_argument("--causal", action=argparse.BooleanOptionalAction, default=defaults.causal)
    teacher_recipe = (model_config, defaults)  # the offline recipe: what teaches a causal run (--offline-teacher)
    if causal_recipe is not None and wants_causal.parse_known_args(argv)[0].causal:
        model_config, defaults = causal_recipe
    cfg = parse_args(defaults, argv, script)
    try:
        model_config = override_model_config(model_config, cfg.model)
        check = build_model(arch, {**model_config, "n_features": len(cfg.features), "causal": cfg.causal,
                                   "dropout": cfg.dropout}).eval()
        with torch.no_grad():  # a config that cannot run one window fails here, not mid-training
            check(torch.zeros(1, cfg.seq_len or min(cfg.crop_epochs), len(cfg.features)))
    except Exception as exc:
        raise SystemExit(f"{script}: error: --model {cfg.model!r}: {type(exc).__name__}: {exc}") from None
    if cfg.causal and cfg.seq_len == 0 and not can_step(check):  # real time stages it one epoch at a time
        raise SystemExit(f"{script}: error: --causal --seq-len 0 (whole nights, staged an epoch at a time) needs the "
                         "hybrid without a Transformer (--model n_layers=0)")
    if not cfg.out_dir:  # a run of its own: replacing a shipped checkpoint takes an explicit --out-dir checkpoints/...
        cfg.out_dir = str(Path("runs") / f"{arch}_{'causal' if cfg.causal else 'offline'}")
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    ctx = setup_distributed(device)
    try:
        return _run(arch, model_config, cfg, ctx, device, teacher_recipe)
    finally:
        if ctx.enabled:
            dist.destroy_process_group()


def _run(arch: str, model_config: dict, cfg: TrainConfig, ctx: Dist, device: torch.device,
         teacher_recipe: tuple[dict, TrainConfig] | None = None) -> int:
    say = print if ctx.is_main else (lambda *a, **k: None)
    t_start = time.perf_counter()
    try:
        store = _load_store(cfg, ctx, say)
    except dl.DataError as exc:
        say(f"error: {exc}", file=sys.stderr)
        return 1
    if len(store) < 3:
        say(f"error: {cfg.data_dir} has {len(store)} usable subject(s); training needs at least 3", file=sys.stderr)
        return 1
    say(f"feature store {store.path} ({len(store)} subjects, {store.offsets[-1]:,} epochs, memory-mapped)")
    train_ids, val_ids, test_ids = dl.split_subjects(store.subjects, seed=cfg.split_seed)
    if not cfg.validate:  # the validation subjects train too
        train_ids, val_ids = train_ids + val_ids, []
    out_dir = Path(cfg.out_dir)
    mode = "causal" if cfg.causal else "offline"
    say(f"{arch} [{mode}] on {device} x{ctx.world_size}: {len(train_ids)} train / {len(val_ids)} val / "
        f"{len(test_ids)} test subjects, seq_len {cfg.seq_len} (target position {cfg.target_pos}), "
        f"{len(cfg.features)} features")
    if cfg.cv:
        return _cross_validate(arch, model_config, cfg, store, train_ids + val_ids, out_dir, ctx, device, say,
                               teacher_recipe)
    data = prepare(store, train_ids, cfg)
    model, state = train_model(arch, model_config, cfg, data, train_ids, val_ids, out_dir, ctx, device,
                               extra={"test_subjects": test_ids}, teacher_recipe=teacher_recipe)
    test_keys = data.add_conditions(test_ids, ("as recorded",))  # no-data epochs unscored, as inference leaves them
    metrics, y_true, y_pred, _ = evaluate_subjects(model, data, test_keys, cfg, ctx, device)
    if ctx.is_main:
        minutes = (time.perf_counter() - t_start) / 60
        say(f"\nbest epoch {state['best_epoch']} ({cfg.select_metric} {state['best']:.4f} on validation); "
            f"trained in {minutes:.1f} min; checkpoint {out_dir / 'model.pth'} (evaluate it: python "
            f"{ARCHITECTURES[arch].inference_script} --checkpoint {out_dir / 'model.pth'})")
        say(f"test subjects {', '.join(test_ids)}:\n" + format_report(metrics, y_true, y_pred))
        atomic_write(out_dir / "test_metrics.json",
                     lambda f: f.write(json.dumps({**_jsonable(metrics), "test_subjects": test_ids,
                                                   "train_minutes": round(minutes, 2)}, indent=1).encode()))
    return 0


def _load_store(cfg: TrainConfig, ctx: Dist, say) -> feature_store.FeatureStore:
    """The cohort's feature store; rank 0 builds it while the other ranks wait, then they open it."""
    store, error = None, None
    if ctx.is_main:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", dl.DataWarning)
                store = feature_store.build_feature_store(cfg.data_dir, causal=cfg.causal, features=cfg.features, progress=True)
            for w in caught:
                say(f"warning: {w.message}", file=sys.stderr)
        except Exception as exc:  # any failure reaches every rank, so none waits forever
            error = str(exc) if isinstance(exc, dl.DataError) else f"{type(exc).__name__}: {exc}"
            if not ctx.enabled and not isinstance(exc, dl.DataError):
                raise
    error = broadcast(error, ctx)  # also the barrier: the other ranks open what rank 0 built
    if error is not None:
        raise dl.DataError(error)
    if store is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dl.DataWarning)  # rank 0 has said it
            store = feature_store.build_feature_store(cfg.data_dir, causal=cfg.causal, features=cfg.features)
    return store


def fit_split(fit_ids: list[str], cfg: TrainConfig, fold: int = 0) -> tuple[list[str], list[str]]:
    """(training, validation) subjects of a fold's fit set: 12% held for model selection, or none
    (cfg.validate False: fixed passes)."""
    if not cfg.validate:
        return list(fit_ids), []
    inner_train, inner_val, _ = dl.split_subjects(fit_ids, seed=cfg.split_seed + fold, val_frac=0.12, test_frac=0.0)
    return inner_train, inner_val


def _cross_validate(arch, model_config, cfg, store, pool_ids, out_dir, ctx, device, say, teacher_recipe=None) -> int:
    """k folds by subject over pool_ids; each fold early-stops on a slice of its own training subjects."""
    folds = dl.kfold_subjects(pool_ids, cfg.cv, seed=cfg.split_seed)
    chosen = range(len(folds)) if cfg.fold is None else [cfg.fold]
    per_fold, frames = [], []
    for k in chosen:
        fit_ids, held_ids = folds[k]
        inner_train, inner_val = fit_split(fit_ids, cfg, k)
        t0 = time.perf_counter()
        data = prepare(store, inner_train, cfg)
        model, state = train_model(arch, model_config, cfg, data, inner_train, inner_val, None, ctx, device, quiet=True,
                                   teacher_recipe=teacher_recipe)
        metrics, _, _, probs = evaluate_subjects(model, data, data.add_conditions(held_ids, ("as recorded",)), cfg, ctx,
                                                 device)
        if ctx.is_main:
            metrics["subjects"], metrics["best_epoch"] = held_ids, state["best_epoch"]
            metrics["minutes"] = round((time.perf_counter() - t0) / 60, 2)
            per_fold.append(metrics)
            for s in held_ids:
                frames.append(prediction_frame(store.timeline(s), probs[s]).assign(fold=k))
            say(f"fold {k}: kappa {metrics['kappa']:.3f}  acc {metrics['accuracy']:.3f}  F1 {metrics['macro_f1']:.3f}  "
                f"recall W/L/D/R {metrics['recall_wake']:.2f}/{metrics['recall_light']:.2f}/"
                f"{metrics['recall_deep']:.2f}/{metrics['recall_rem']:.2f}  (best epoch {state['best_epoch']}, "
                f"{metrics['minutes']:.1f} min, held out {','.join(held_ids)})", flush=True)
    if not ctx.is_main:
        return 0
    oof = pd.concat(frames, ignore_index=True)
    pooled = compute_metrics(oof["true_stage"].to_numpy(), oof["pred"].to_numpy())
    summary = summarize_folds(per_fold, pooled)
    say("\n" + format_cv_summary(summary))
    suffix = "" if cfg.fold is None else f"_fold{cfg.fold}"
    write_predictions(oof, out_dir / f"cv_predictions{suffix}.csv")
    atomic_write(out_dir / f"cv_summary{suffix}.json",
                 lambda f: f.write(json.dumps(_jsonable({**summary, "folds": per_fold, "config": asdict(cfg)}),
                                              indent=1).encode()))
    say(f"out-of-fold predictions: {out_dir / f'cv_predictions{suffix}.csv'}")
    return 0


CV_KEYS = ("kappa", "accuracy", "macro_f1", "recall_wake", "recall_light", "recall_deep", "recall_rem")


def _mean_sd(per_fold: list[dict]) -> dict:
    return {"mean": {k: float(np.nanmean([m[k] for m in per_fold])) for k in CV_KEYS},
            "sd": {k: float(np.nanstd([m[k] for m in per_fold], ddof=1)) if len(per_fold) > 1 else 0.0 for k in CV_KEYS}}


def summarize_folds(per_fold: list[dict], pooled: dict) -> dict:
    """Mean and sd over folds, pooled figures; for smoothed runs also the same models unsmoothed."""
    summary = {**_mean_sd(per_fold), "pooled": {k: pooled[k] for k in CV_KEYS}, "n_folds": len(per_fold)}
    if per_fold and all("unsmoothed" in m for m in per_fold):
        summary["unsmoothed"] = _mean_sd([m["unsmoothed"] for m in per_fold])
    return summary


def format_cv_summary(summary: dict) -> str:
    lines = [f"{'':>14}" + "".join(f"{k:>14}" for k in CV_KEYS)]
    lines.append(f"{'mean +- sd':>14}" + "".join(f"{summary['mean'][k]:>8.3f}+-{summary['sd'][k]:<4.3f}" for k in CV_KEYS))
    lines.append(f"{'pooled':>14}" + "".join(f"{summary['pooled'][k]:>14.3f}" for k in CV_KEYS))
    if "unsmoothed" in summary:  # same models, each epoch on its own
        plain = summary["unsmoothed"]
        lines.append(f"{'unsmoothed':>14}" + "".join(f"{plain['mean'][k]:>8.3f}+-{plain['sd'][k]:<4.3f}" for k in CV_KEYS))
    return f"cross-validation over {summary['n_folds']} fold(s):\n" + "\n".join(lines)
