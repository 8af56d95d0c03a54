"""Checkpoints: one self-describing `.pth` per model (weights + everything needed to use them).

A checkpoint holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`, which cannot run code from a tampered file. The feature scaler
is restored from the checkpoint's own arrays; `scaler.pkl` is written beside it because users
ask for it, but nothing here reads a pickle.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data_loader import PSG_STAGE_TO_CLASS, STAGE_NAMES, FeatureScaler
from features import FEATURES
from model import LSTMConfig, SleepLSTM
from model_hybrid import HybridConfig, SleepHybrid, init_member_states, step_members
from smoothing import check_transitions

FORMAT = "sleep-staging-checkpoint/1"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask once (setting it is the only way to read it)
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


@dataclass(frozen=True)
class Architecture:
    """An architecture's model class, its config, and the scripts that train and run it."""
    name: str
    model_cls: type
    config_cls: type
    train_script: str
    inference_script: str

    def shipped(self, causal: bool) -> Path:
        """The shipped checkpoint of this architecture in one mode."""
        return CHECKPOINT_DIR / f"{self.name}_{'causal' if causal else 'offline'}" / "model.pth"


ARCHITECTURES = {"lstm": Architecture("lstm", SleepLSTM, LSTMConfig, "train.py", "inference.py"),
                 "hybrid": Architecture("hybrid", SleepHybrid, HybridConfig, "train_hybrid.py", "inference_hybrid.py")}
MAX_ENSEMBLE = 64  # members a checkpoint may hold: a tampered count cannot make the loader build millions


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and what differs."""


class Ensemble(torch.nn.Module):
    """Models of one architecture trained with different seeds, used as one: forward returns the log
    of their mean stage probabilities, so a softmax of it is the averaged probabilities. Averaging
    seeds steadies what one small-cohort run gets by chance (README, Results)."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.config = members[0].config

    def forward(self, x: torch.Tensor, lags: bool = False) -> torch.Tensor:
        return _log_mean_probs([member(x, lags) for member in self.members])

    def forward_last(self, x: torch.Tensor, lags: bool = False) -> torch.Tensor:
        """forward(x, lags)[:, -1] (eval mode), through each member's own last-position path."""
        return _log_mean_probs([member.forward_last(x, lags) for member in self.members])

    def init_state(self, batch: int) -> list:
        """Empty step state of `batch` nights for every member (model_hybrid.init_member_states)."""
        return init_member_states(list(self.members), batch)

    def step(self, x: torch.Tensor, state: list, lags: bool = False) -> tuple[torch.Tensor, list]:
        """One epoch of every member at once (model_hybrid.step_members): (log mean probabilities, state)."""
        logits, state = step_members(list(self.members), x, state, lags)
        return _log_mean_probs(list(logits.unbind(1))), state


def _log_mean_probs(logits: list[torch.Tensor]) -> torch.Tensor:
    probs = torch.stack([torch.softmax(z.float(), dim=-1) for z in logits]).mean(dim=0)
    return probs.clamp_min(1e-12).log()


def build_model(arch: str, config: dict, ensemble_size: int = 1) -> torch.nn.Module:
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    model_cls, config_cls = ARCHITECTURES[arch].model_cls, ARCHITECTURES[arch].config_cls
    if ensemble_size > 1:
        return Ensemble([model_cls(config_cls(**config)) for _ in range(ensemble_size)])
    return model_cls(config_cls(**config))


def atomic_write(path: str | Path, write) -> None:
    """Call write(file_object) on a temp file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_checkpoint(model: torch.nn.Module, arch: str, *, features: list[str], seq_len: int, target_pos: int,
                    scaler: FeatureScaler, extra: dict | None = None) -> dict:
    """The dict saved as `.pth`: state dict, model config, inputs contract, scaler, versions."""
    config = asdict(model.config)
    return {
        "format": FORMAT,
        "arch": arch,
        "model_config": config,
        "ensemble_size": len(model.members) if isinstance(model, Ensemble) else 1,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "features": list(features),
        "seq_len": int(seq_len),
        "target_pos": int(target_pos),
        "causal": bool(config["causal"]),
        "stage_names": list(STAGE_NAMES),
        "psg_stage_to_class": {str(k): v for k, v in PSG_STAGE_TO_CLASS.items()},
        "scaler_mean": [float(v) for v in scaler.mean],
        "scaler_scale": [float(v) for v in scaler.scale],
        "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},
        **(extra or {}),
    }


def save_checkpoint(checkpoint: dict, path: str | Path, scaler_pkl: str | Path | None = None) -> None:
    """Write the .pth atomically, and the sklearn scaler as scaler.pkl beside it when asked."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    if scaler_pkl is not None:
        import joblib
        scaler = FeatureScaler(np.asarray(checkpoint["scaler_mean"], np.float32),
                               np.asarray(checkpoint["scaler_scale"], np.float32))
        atomic_write(scaler_pkl, lambda f: joblib.dump(scaler.to_sklearn(), f))


def read_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) with clear errors for missing, truncated or tampered files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (train one with train.py / train_hybrid.py)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors: truncated, corrupted, or a pickle that wants code
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file "
                              f"(format: {checkpoint.get('format') if isinstance(checkpoint, dict) else type(checkpoint).__name__})")
    return checkpoint


def load_model_from_checkpoint(path: str | Path, expected_arch: str | None = None,
                               expected_features: list[str] | None = None
                               ) -> tuple[torch.nn.Module, FeatureScaler, dict]:
    """(model in eval mode, scaler, checkpoint dict); says what differs when it does not fit."""
    checkpoint = read_checkpoint(path)
    arch = checkpoint["arch"]
    if expected_arch is not None and arch != expected_arch:
        raise CheckpointError(f"checkpoint {path} holds a {arch!r} model, this script runs {expected_arch!r} "
                              f"models (use {ARCHITECTURES[arch].inference_script if arch in ARCHITECTURES else 'another script'})")
    if expected_features is not None and list(expected_features) != checkpoint["features"]:
        missing = [f for f in expected_features if f not in checkpoint["features"]]
        extra = [f for f in checkpoint["features"] if f not in expected_features]
        raise CheckpointError(f"checkpoint {path} was trained on other features: missing {missing}, "
                              f"extra {extra}, order {checkpoint['features']}")
    unknown = [f for f in checkpoint.get("features", []) if f not in FEATURES]
    if unknown:
        raise CheckpointError(f"checkpoint {path} was trained on feature(s) {unknown} that this version no longer "
                              "computes (an older release); retrain it, or use the shipped checkpoints")
    size = checkpoint.get("ensemble_size", 1)
    members = {k.split(".")[1] for k in checkpoint["state_dict"] if k.startswith("members.")}
    if (not isinstance(size, int) or not 1 <= size <= MAX_ENSEMBLE
            or (size > 1 and members != {str(i) for i in range(size)})):
        raise CheckpointError(f"checkpoint {path}: ensemble_size {size!r} does not match the "
                              f"{len(members) or 1} model(s) in its state dict")
    try:
        model = build_model(arch, checkpoint["model_config"], size)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint {path}: model config does not fit {arch}: {exc}") from None
    if model.config.n_features != len(checkpoint["features"]):
        raise CheckpointError(f"checkpoint {path}: model expects {model.config.n_features} features but the "
                              f"checkpoint lists {len(checkpoint['features'])}")
    own, saved = model.state_dict(), checkpoint["state_dict"]
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    wrong_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                   for k, v in saved.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(f"checkpoint {path} does not match the {arch} architecture: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}, shapes {wrong_shape[:5]}")
    model.load_state_dict(saved)
    model.eval()
    if checkpoint.get("transitions") is not None:
        if checkpoint["causal"]:  # smoothing reads later epochs: a causal model must not carry a matrix
            raise CheckpointError(f"checkpoint {path}: a causal model with a smoothing matrix (transitions)")
        try:
            checkpoint["transitions"] = check_transitions(checkpoint["transitions"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: transitions: {exc}") from None
    scaler = FeatureScaler(np.asarray(checkpoint["scaler_mean"], np.float32),
                           np.asarray(checkpoint["scaler_scale"], np.float32))
    return model, scaler, checkpoint
