"""Whole-night smoothing of stage probabilities with the stage transitions seen in training.

Sleep stages follow each other in a pattern (Deep rarely jumps straight to REM, Wake between two
Light epochs is brief), which a window of 25 epochs only partly sees. Treating the model's
per-epoch probabilities as the emissions of a hidden Markov chain over the four stages, with the
transition matrix counted on the training subjects' hypnograms, the forward-backward algorithm
gives each epoch's stage probability given the whole night. Nothing is fitted: the matrix is
counted (with a pseudo-count of 1 per transition) and stored in the checkpoint (`transitions`).

Only offline models are smoothed: the backward pass reads later epochs, so causal checkpoints
carry no matrix (loading refuses one that does). The network's probabilities already lean towards
the stages its class weights favour less, and the matrix adds the training nights' stage mix
again: smoothing moves predictions towards long runs of Light and merges brief awakenings
(README, Results).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

N_STAGES = 4


def transition_matrix(stage_sequences: Iterable[np.ndarray], pseudo_count: float = 1.0) -> np.ndarray:
    """(4, 4) row-stochastic P(stage at t+1 | stage at t) from hypnograms (stages 0-3, -1 unscored).

    Only pairs of consecutive scored epochs count; `pseudo_count` keeps every transition possible.
    """
    counts = np.full((N_STAGES, N_STAGES), float(pseudo_count))
    for stages in stage_sequences:
        stages = np.asarray(stages, np.int64)
        scored = (stages[:-1] >= 0) & (stages[1:] >= 0)
        np.add.at(counts, (stages[:-1][scored], stages[1:][scored]), 1.0)
    return counts / counts.sum(axis=1, keepdims=True)


def check_transitions(transitions) -> np.ndarray:
    """The matrix as a float array, or ValueError saying what is wrong with it."""
    matrix = np.asarray(transitions, np.float64)
    if matrix.shape != (N_STAGES, N_STAGES):
        raise ValueError(f"transition matrix has shape {matrix.shape}, expected ({N_STAGES}, {N_STAGES})")
    if not np.isfinite(matrix).all() or (matrix < 0).any() or not np.allclose(matrix.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("transition matrix rows must be finite, non-negative and sum to 1")
    return matrix


def smooth_night(probs: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """Forward-backward posteriors (n, 4) of one night, from per-epoch probabilities (n, 4).

    The initial stage is uniform: the first epoch's own probabilities decide it. Rows of NaN (epochs
    without data) carry no evidence: the transitions bridge them, and they stay NaN in the output.
    """
    probs = np.asarray(probs, np.float64)
    n = len(probs)
    if n == 0:
        return probs.copy()
    missing = np.isnan(probs).any(axis=1)
    emission = np.clip(np.where(missing[:, None], 1.0, probs), 1e-12, None)
    forward = np.empty_like(emission)
    backward = np.ones_like(emission)
    forward[0] = emission[0] / emission[0].sum()
    for t in range(1, n):  # each step normalised, so a long night cannot underflow
        f = (forward[t - 1] @ transitions) * emission[t]
        forward[t] = f / f.sum()
    for t in range(n - 2, -1, -1):
        b = transitions @ (emission[t + 1] * backward[t + 1])
        backward[t] = b / b.sum()
    posterior = forward * backward
    posterior /= posterior.sum(axis=1, keepdims=True)
    posterior[missing] = np.nan
    return posterior
