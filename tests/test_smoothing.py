"""Whole-night smoothing: the counted transition matrix, forward-backward against brute force, and
its use by offline checkpoints."""
import itertools

import numpy as np
import pandas as pd
import pytest

from smoothing import check_transitions, smooth_night, transition_matrix


def test_transition_matrix_counts_consecutive_scored_pairs():
    matrix = transition_matrix([np.array([0, 0, 1, -1, 1, 2]), np.array([3, 3])], pseudo_count=0.0 + 1e-12)
    # pairs: 0->0, 0->1, (1->-1 and -1->1 skipped), 1->2, 3->3; across nights nothing
    np.testing.assert_allclose(matrix[0], [0.5, 0.5, 0, 0], atol=1e-9)
    np.testing.assert_allclose(matrix[1], [0, 0, 1, 0], atol=1e-9)
    np.testing.assert_allclose(matrix[3], [0, 0, 0, 1], atol=1e-9)
    np.testing.assert_allclose(matrix[2], [0.25] * 4)  # never left: only the pseudo-counts
    smoothed = transition_matrix([np.array([0, 1])])  # default pseudo-count keeps every transition possible
    assert (smoothed > 0).all() and np.allclose(smoothed.sum(axis=1), 1)


def brute_force_posterior(probs, transitions):
    """P(stage_t | all emissions) by enumerating every stage path (uniform initial stage)."""
    n = len(probs)
    posterior = np.zeros((n, 4))
    for path in itertools.product(range(4), repeat=n):
        weight = np.prod([probs[t, s] for t, s in enumerate(path)])
        weight *= np.prod([transitions[a, b] for a, b in zip(path, path[1:])])
        for t, s in enumerate(path):
            posterior[t, s] += weight
    return posterior / posterior.sum(axis=1, keepdims=True)


def test_forward_backward_equals_enumeration_over_all_paths():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=5)
    transitions = rng.dirichlet(np.ones(4), size=4)
    np.testing.assert_allclose(smooth_night(probs, transitions), brute_force_posterior(probs, transitions), atol=1e-10)


def test_uninformative_transitions_change_nothing_and_sticky_ones_remove_blips():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=40)
    np.testing.assert_allclose(smooth_night(probs, np.full((4, 4), 0.25)), probs, atol=1e-12)
    # a night of confident Light with one weakly REM epoch: a sticky chain calls it Light
    night = np.tile([0.05, 0.8, 0.05, 0.1], (30, 1))
    night[15] = [0.05, 0.35, 0.05, 0.55]
    sticky = np.full((4, 4), 0.02) + np.eye(4) * 0.92
    assert night.argmax(1)[15] == 3 and (smooth_night(night, sticky).argmax(1) == 1).all()


def test_long_nights_do_not_underflow_and_empty_nights_pass():
    probs = np.tile([1e-9, 1 - 3e-9, 1e-9, 1e-9], (20_000, 1))
    out = smooth_night(probs, transition_matrix([np.ones(10, int)]))
    assert np.isfinite(out).all() and np.allclose(out.sum(axis=1), 1)
    assert smooth_night(np.zeros((0, 4)), np.full((4, 4), 0.25)).shape == (0, 4)


@pytest.mark.parametrize("matrix, message", [
    (np.full((3, 4), 0.25), "shape"),
    (np.full((4, 4), 0.5), "sum to 1"),
    (np.array([[1.5, -0.5, 0, 0]] * 4), "non-negative"),
])
def test_bad_matrices_are_refused(matrix, message):
    with pytest.raises(ValueError, match=message):
        check_transitions(matrix)


def test_offline_checkpoints_carry_the_training_transitions_and_evaluation_applies_them(small_data_dir, tmp_path):
    import torch

    import data_loader as dl
    import features
    import evaluation
    import inference_cli
    import training
    from checkpoint import CheckpointError, load_model_from_checkpoint, read_checkpoint
    from tests.test_training import tiny_run

    assert tiny_run("hybrid", small_data_dir, tmp_path / "offline", "--epochs", "1") == 0
    assert tiny_run("hybrid", small_data_dir, tmp_path / "causal", "--epochs", "1", "--causal") == 0
    model, scaler, ckpt = load_model_from_checkpoint(tmp_path / "offline" / "model.pth")
    nights = {n.subject_id: n for n in dl.load_nights(small_data_dir, cache_dir=None)}
    expected = transition_matrix(nights[s].stage for s in ckpt["train_subjects"])
    np.testing.assert_allclose(ckpt["transitions"], expected)
    causal_ckpt = load_model_from_checkpoint(tmp_path / "causal" / "model.pth")[2]
    assert causal_ckpt["transitions"] is None
    assert evaluation.describe_mode(ckpt) == "offline (both-sided context, night-smoothed)"
    assert evaluation.describe_mode(causal_ckpt) == "causal (real-time)"

    night = nights[ckpt["test_subjects"][0]]
    x = scaler.transform(features.night_features(night, causal=False, features=tuple(ckpt["features"])))
    raw = evaluation.predict_night(model, x, ckpt["seq_len"], ckpt["target_pos"])
    frame = evaluation.predict_nights(model, scaler, ckpt, [night])
    np.testing.assert_allclose(frame[["p_wake", "p_light", "p_deep", "p_rem"]].to_numpy(),
                               smooth_night(raw, expected), atol=1e-6)
    assert not np.allclose(raw, smooth_night(raw, expected), atol=1e-3)  # smoothing did something

    tampered = read_checkpoint(tmp_path / "offline" / "model.pth")
    tampered["transitions"] = [[1.0, 0.0], [0.0, 1.0]]
    torch.save(tampered, tmp_path / "tampered.pth")
    with pytest.raises(CheckpointError, match=r"tampered.pth: transitions: transition matrix has shape \(2, 2\)"):
        load_model_from_checkpoint(tmp_path / "tampered.pth")
    tampered["transitions"] = {}
    torch.save(tampered, tmp_path / "tampered.pth")
    with pytest.raises(CheckpointError, match="tampered.pth: transitions"):
        load_model_from_checkpoint(tmp_path / "tampered.pth")
    causal = read_checkpoint(tmp_path / "causal" / "model.pth")
    causal["transitions"] = expected.tolist()
    torch.save(causal, tmp_path / "causal_smoothed.pth")
    with pytest.raises(CheckpointError, match="a causal model with a smoothing matrix"):
        load_model_from_checkpoint(tmp_path / "causal_smoothed.pth")
    # evaluation scores each epoch on its own by default (with one process or two); --smooth smooths
    for workers in ("1", "2"):
        csv = tmp_path / f"raw{workers}.csv"
        assert inference_cli.main("hybrid", tmp_path / "offline" / "model.pth",
                               ["--data-dir", str(small_data_dir), "--subjects", night.subject_id,
                                "--workers", workers, "--predictions-out", str(csv), "--plots-dir", ""]) == 0
        np.testing.assert_allclose(pd.read_csv(csv)[["p_wake", "p_light", "p_deep", "p_rem"]].to_numpy(), raw, atol=1e-4)
    csv = tmp_path / "smoothed.csv"
    assert inference_cli.main("hybrid", tmp_path / "offline" / "model.pth",
                              ["--data-dir", str(small_data_dir), "--subjects", night.subject_id, "--smooth",
                               "--predictions-out", str(csv), "--plots-dir", ""]) == 0
    np.testing.assert_allclose(pd.read_csv(csv)[["p_wake", "p_light", "p_deep", "p_rem"]].to_numpy(),
                               frame[["p_wake", "p_light", "p_deep", "p_rem"]].to_numpy(), atol=1e-4)
    # --no-smooth trains and saves without a matrix
    assert training.parse_args(training.TrainConfig(), ["--no-smooth"], "train.py").smooth is False


def test_ensemble_checkpoint_averages_its_members_and_resumes(small_data_dir, tmp_path):
    import torch

    import evaluation
    from checkpoint import Ensemble, load_model_from_checkpoint
    from tests.test_training import tiny_run

    out = tmp_path / "ens"
    assert tiny_run("hybrid", small_data_dir, out, "--epochs", "1", "--ensemble", "2") == 0
    model, scaler, ckpt = load_model_from_checkpoint(out / "model.pth")
    assert isinstance(model, Ensemble) and ckpt["ensemble_size"] == 2 and len(ckpt["epoch"]) == 2
    assert evaluation.describe_mode(ckpt).endswith(", 2-model ensemble)")
    members = [load_model_from_checkpoint(out / "members" / f"seed{s}" / "model.pth")[0] for s in (1337, 1338)]
    x = torch.randn(3, ckpt["seq_len"], len(ckpt["features"]))
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(x), -1) for m in members]).mean(0)
        torch.testing.assert_close(torch.softmax(model(x), -1), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.softmax(model.forward_last(x), -1), expected[:, -1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(torch.softmax(members[0](x), -1), torch.softmax(members[1](x), -1))  # seeds differ
    # a tampered member count is refused before any model is built
    from checkpoint import CheckpointError, read_checkpoint
    tampered = read_checkpoint(out / "model.pth")
    tampered["ensemble_size"] = 10**9
    torch.save(tampered, tmp_path / "tampered.pth")
    with pytest.raises(CheckpointError, match="ensemble_size 1000000000 does not match the 2 model"):
        load_model_from_checkpoint(tmp_path / "tampered.pth")
    # resuming a finished ensemble retrains nothing (the members' logs stay as they were) and rebuilds
    # the same averaged model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = {p: (p.stat().st_mtime_ns, p.read_text()) for p in out.glob("members/seed*/train_log.csv")}
    assert len(logs) == 2
    assert tiny_run("hybrid", small_data_dir, out, "--epochs", "1", "--ensemble", "2", "--resume") == 0
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in logs} == logs
    after = load_model_from_checkpoint(out / "model.pth")[0].state_dict()
    for k in before:
        torch.testing.assert_close(before[k], after[k])
