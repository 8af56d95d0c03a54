"""Classical reference: gradient-boosted trees averaged with a balanced logistic regression.

Evaluated exactly like the deep models: the same per-epoch features (plus rolling context
windows), the same subject folds and test split, the same metrics. Tells whether the deep
models earn their cost.

    python baseline.py --cv 5            # k-fold by subject over the non-test subjects
    python baseline.py                   # fit on train+val subjects, score the test subjects
    python baseline.py --causal          # only past context (real-time comparison)

Offline, its probabilities are smoothed over the night like the deep models' (smoothing.py, the
stage transitions of the fitting subjects); --no-smooth scores each epoch on its own. Like the deep
models it also fits on copies of its nights under real-world conditions (degrade.py) and gives no
stage where there is no data (features.no_data).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

import data_loader as dl
import degrade
import features
from checkpoint import atomic_write
from evaluation import compute_metrics, format_report, prediction_frame, write_predictions
from smoothing import smooth_night, transition_matrix
from training import format_cv_summary, summarize_folds

CONTEXT_EPOCHS = (5, 11, 21)   # rolling windows (epochs) over which context features are averaged
CONTEXT_FEATURES = ("heart_rate_bpm", "hr_night_z", "hrv_5min_bpm", "log_activity")


def design_matrix(night: dl.Night, causal: bool) -> np.ndarray:
    """Per-epoch features plus rolling means of a few of them (trailing if causal, centred if not)."""
    x = features.night_features(night, causal=causal, features=features.DEFAULT_FEATURES)
    frame = pd.DataFrame(x, columns=features.DEFAULT_FEATURES)
    extra = []
    for name in CONTEXT_FEATURES:
        for w in CONTEXT_EPOCHS:
            extra.append(frame[name].rolling(w, min_periods=1, center=not causal).mean().to_numpy())
    return np.column_stack([x, *extra]).astype(np.float32)


DEGRADED_COPIES = 3  # training copies of each fitting night under drawn real-world conditions (degrade.py)


class Reference(NamedTuple):
    trees: object
    linear: object
    transitions: np.ndarray | None
    causal: bool


def fit(nights: dict[str, dl.Night], fit_ids: list[str], causal: bool, seed: int, smooth: bool = True,
        copies: int = DEGRADED_COPIES) -> Reference:
    """Fit on the nights as recorded plus `copies` copies of each under drawn conditions, as the deep
    models train; epochs without data (features.no_data) are left out."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(seed)
    fitting = [nights[s] for s in fit_ids]
    fitting += [degrade.degrade(n, degrade.draw_condition(rng, n), rng) for n in fitting for _ in range(copies)]
    x = np.concatenate([design_matrix(n, causal) for n in fitting])
    y = np.concatenate([np.where(features.no_data(n, causal), -1, n.stage) for n in fitting]).astype(int)
    x, y = x[y >= 0], y[y >= 0]
    trees = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=31,
                                           class_weight="balanced", random_state=seed).fit(x, y)
    linear = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)).fit(x, y)
    transitions = transition_matrix(nights[s].stage for s in fit_ids) if smooth and not causal else None
    return Reference(trees, linear, transitions, causal)


def predict(reference: Reference, night: dl.Night) -> np.ndarray:
    """Stage probabilities (n, 4) of one night; NaN where it has no data, smoothed offline."""
    x = design_matrix(night, reference.causal)
    probs = (reference.trees.predict_proba(x) + reference.linear.predict_proba(x)) / 2
    probs[features.no_data(night, reference.causal)] = np.nan
    return probs if reference.transitions is None else smooth_night(probs, reference.transitions)


def fit_predict(nights: dict[str, dl.Night], fit_ids: list[str], score_ids: list[str], causal: bool,
                seed: int, smooth: bool = True) -> dict[str, np.ndarray]:
    reference = fit(nights, fit_ids, causal, seed, smooth)
    return {s: predict(reference, nights[s]) for s in score_ids}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(dl.DEFAULT_DATA_DIR))
    parser.add_argument("--cv", type=int, default=0)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=True,
                        help="offline: smooth each night with the fitting subjects' stage transitions")
    parser.add_argument("--split-seed", type=int, default=1337)
    parser.add_argument("--out-dir", default="runs/baseline")
    args = parser.parse_args(argv)
    nights = {n.subject_id: n for n in dl.load_nights(args.data_dir)}
    train_ids, val_ids, test_ids = dl.split_subjects(list(nights), seed=args.split_seed)
    out_dir = Path(args.out_dir) / ("causal" if args.causal else "offline")
    t0 = time.perf_counter()
    if not args.cv:
        probs = fit_predict(nights, train_ids + val_ids, test_ids, args.causal, args.split_seed, args.smooth)
        frame = pd.concat([prediction_frame(nights[s], probs[s]) for s in test_ids], ignore_index=True)
        metrics = compute_metrics(frame["true_stage"].to_numpy(), frame["pred"].to_numpy())
        print(f"classical reference [{'causal' if args.causal else 'offline'}], test subjects {', '.join(test_ids)}:")
        print(format_report(metrics, frame["true_stage"].to_numpy(), frame["pred"].to_numpy()))
        write_predictions(frame, out_dir / "test_predictions.csv")
        atomic_write(out_dir / "test_metrics.json", lambda f: f.write(json.dumps(metrics, indent=1).encode()))
        return 0
    per_fold, frames = [], []
    for k, (fit_ids, held_ids) in enumerate(dl.kfold_subjects(train_ids + val_ids, args.cv, seed=args.split_seed)):
        probs = fit_predict(nights, fit_ids, held_ids, args.causal, args.split_seed + k, args.smooth)
        fold = pd.concat([prediction_frame(nights[s], probs[s]) for s in held_ids], ignore_index=True)
        metrics = compute_metrics(fold["true_stage"].to_numpy(), fold["pred"].to_numpy())
        per_fold.append(metrics)
        frames.append(fold.assign(fold=k))
        print(f"fold {k}: kappa {metrics['kappa']:.3f}  acc {metrics['accuracy']:.3f}  F1 {metrics['macro_f1']:.3f}",
              flush=True)
    oof = pd.concat(frames, ignore_index=True)
    summary = summarize_folds(per_fold, compute_metrics(oof["true_stage"].to_numpy(), oof["pred"].to_numpy()))
    print(format_cv_summary(summary))
    print(f"({time.perf_counter() - t0:.0f} s)")
    write_predictions(oof, out_dir / "cv_predictions.csv")
    atomic_write(out_dir / "cv_summary.json", lambda f: f.write(json.dumps({**summary, "folds": per_fold}, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
