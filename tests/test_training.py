"""The shared training loop, checkpoints and the evaluation path, on tiny models and real data."""
import json
import pickle

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import data_loader as dl
import features
import feature_store
import evaluation
import inference_cli
import training
from checkpoint import CheckpointError, load_model_from_checkpoint, read_checkpoint

TINY_HYBRID = {"channels": 16, "kernel_size": 3, "n_layers": 1, "n_heads": 2}
TINY_LSTM = {"hidden": 16, "n_layers": 1, "n_heads": 2}


def tiny_run(arch, data_dir, out_dir, *extra):
    model_config = TINY_HYBRID if arch == "hybrid" else TINY_LSTM
    argv = ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--epochs", "2", "--batch-size", "64",
            "--stride", "10", *extra]
    return training.run(arch, model_config, training.TrainConfig(), argv)


def test_focal_loss_reduces_to_weighted_cross_entropy_and_ignores_unscored():
    torch.manual_seed(0)
    logits, target = torch.randn(50, 4), torch.randint(0, 4, (50,))
    weight = torch.tensor([1.0, 0.5, 2.0, 3.0])
    expected = F.cross_entropy(logits, target, weight=weight)
    torch.testing.assert_close(training.focal_loss(logits, target, weight, gamma=0.0), expected)
    target_with_unscored = target.clone()
    target_with_unscored[:10] = -1
    torch.testing.assert_close(training.focal_loss(logits, target_with_unscored, weight, 0.0),
                               F.cross_entropy(logits[10:], target[10:], weight=weight))
    # gamma > 0 down-weights easy (confident, correct) examples
    easy = torch.full((1, 4), -5.0)
    easy[0, 2] = 5.0
    assert training.focal_loss(easy, torch.tensor([2]), weight, 2.0) < F.cross_entropy(easy, torch.tensor([2])) * 1e-3


def test_class_weights_balanced_with_rem_boost():
    labels = np.array([0] * 10 + [1] * 50 + [2] * 20 + [3] * 20 + [-1] * 7)
    w = training.class_weights(np.bincount(labels[labels >= 0]), rem_boost=2.0).numpy()
    np.testing.assert_allclose(w, [100 / 40, 100 / 200, 100 / 80, 2 * 100 / 80])


def test_window_dataset_covers_every_epoch_with_fixed_length(tmp_path):
    nights = [("long", np.arange(103, dtype=np.float32)[:, None], np.arange(103) % 4, 30.0 * np.arange(103)),
              ("short", np.arange(9, dtype=np.float32)[:, None], np.arange(9) % 4, 30.0 * np.arange(9))]
    store = feature_store.FeatureStore.write(tmp_path / "store", nights, ("value",), causal=False)
    identity = dl.FeatureScaler(np.zeros(1, np.float32), np.ones(1, np.float32))
    ds = training.WindowDataset(training.Prepared(store, identity), ["long", "short"], seq_len=25, stride=10, seed=0)
    n = len(ds)
    first_windows = set()
    for epoch in range(5):
        ds.set_epoch(epoch)
        assert len(ds) == n
        seen = set()
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (25, 1) and y.shape == (25,)
            if ds.window_night[i] == 0:
                seen.update(int(v) for v in x[:, 0])
        assert seen == set(range(103))  # every epoch is trained on in every pass
        first_windows.add(tuple(int(v) for v in ds[1][0][:, 0]))
        x, y = ds[len(ds) - 1]  # the short night: padded positions carry no label
        assert (y[9:] == -1).all() and (y[:9] >= 0).all()
    assert len(first_windows) > 1  # passes cut the night differently


def test_train_writes_loadable_checkpoint_and_inference_uses_it(small_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert tiny_run("hybrid", small_data_dir, out) == 0
    for name in ("model.pth", "scaler.pkl", "last.pth", "train_log.csv", "curves.png", "test_metrics.json"):
        assert (out / name).is_file(), name
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["epoch"]) == [1, 2] and log["val_kappa"].between(-1, 1).all()
    model, scaler, ckpt = load_model_from_checkpoint(out / "model.pth")
    assert ckpt["features"] == list(features.DEFAULT_FEATURES) and ckpt["target_pos"] == 12 and not ckpt["causal"]
    train, val, test = dl.split_subjects(dl.find_subjects(small_data_dir))
    assert ckpt["test_subjects"] == test and ckpt["train_subjects"] == train
    # scaler.pkl holds the same standardisation as the checkpoint's own arrays
    import joblib
    x = np.random.default_rng(0).normal(size=(5, len(ckpt["features"])))
    np.testing.assert_allclose(joblib.load(out / "scaler.pkl").transform(x), scaler.transform(x), rtol=1e-4, atol=1e-4)
    csv = tmp_path / "preds.csv"
    code = inference_cli.main("hybrid", out / "model.pth", ["--data-dir", str(small_data_dir), "--predictions-out",
                                                         str(csv), "--plots-dir", str(tmp_path / "plots")])
    assert code == 0
    frame = pd.read_csv(csv)
    assert list(frame.columns) == evaluation.PREDICTION_COLUMNS
    nights = dl.load_nights(small_data_dir, cache_dir=None)
    assert len(frame) == sum(len(n) for n in nights)
    np.testing.assert_allclose(frame[["p_wake", "p_light", "p_deep", "p_rem"]].sum(axis=1), 1.0, atol=1e-4)
    assert (frame["pred"] == frame[["p_wake", "p_light", "p_deep", "p_rem"]].to_numpy().argmax(1)).all()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir())[0] == "hybrid_confusion.png"
    assert "kappa" in capsys.readouterr().out


def test_resume_continues_to_the_same_result(small_data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert tiny_run("lstm", small_data_dir, straight, "--epochs", "3", "--causal") == 0
    assert tiny_run("lstm", small_data_dir, resumed, "--epochs", "2", "--causal") == 0
    assert tiny_run("lstm", small_data_dir, resumed, "--epochs", "3", "--causal", "--resume") == 0
    a, b = pd.read_csv(straight / "train_log.csv"), pd.read_csv(resumed / "train_log.csv")
    assert list(b["epoch"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(a.drop(columns=["seconds", "windows_per_s"]), b.drop(columns=["seconds", "windows_per_s"]))
    sa, sb = read_checkpoint(straight / "last.pth")["state_dict"], read_checkpoint(resumed / "last.pth")["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k])


def test_cross_validation_holds_out_every_subject_once(small_data_dir, tmp_path, capsys):
    out = tmp_path / "cv"
    assert tiny_run("hybrid", small_data_dir, out, "--cv", "3", "--epochs", "1") == 0
    oof = pd.read_csv(out / "cv_predictions.csv")
    _, _, test = dl.split_subjects(dl.find_subjects(small_data_dir))
    pool = sorted(set(dl.find_subjects(small_data_dir)) - set(test))
    assert sorted(oof["subject"].astype(str).unique()) == pool
    assert oof.groupby("subject")["fold"].nunique().eq(1).all()
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["n_folds"] == 3 and len(summary["folds"]) == 3
    # offline runs are smoothed; the same models' unsmoothed figures come along for comparison
    assert set(summary["unsmoothed"]["mean"]) == set(summary["mean"])
    assert all(-1 <= f["unsmoothed"]["kappa"] <= 1 for f in summary["folds"])
    assert "mean +- sd" in capsys.readouterr().out


def test_checkpoint_mismatch_and_damage_give_clear_errors(small_data_dir, tmp_path):
    out = tmp_path / "run"
    assert tiny_run("hybrid", small_data_dir, out, "--epochs", "1") == 0
    path = out / "model.pth"
    with pytest.raises(CheckpointError, match="holds a 'hybrid' model, this script runs 'lstm'"):
        load_model_from_checkpoint(path, expected_arch="lstm")
    with pytest.raises(CheckpointError, match=r"other features: missing \['steps'\]"):
        load_model_from_checkpoint(path, expected_features=list(features.DEFAULT_FEATURES) + ["steps"])
    ckpt = read_checkpoint(path)
    ckpt["model_config"]["channels"] = 32
    torch.save(ckpt, tmp_path / "wrong_shape.pth")
    with pytest.raises(CheckpointError, match="does not match the hybrid architecture"):
        load_model_from_checkpoint(tmp_path / "wrong_shape.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_model_from_checkpoint(truncated)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))
    tampered = tmp_path / "tampered.pth"
    torch.save({"format": "x", "payload": Exploit()}, tampered)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_model_from_checkpoint(tampered)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_from_checkpoint(tmp_path / "nope.pth")
    assert inference_cli.main("lstm", path, ["--plots-dir", ""]) == 1  # the script says so, no traceback


def test_bad_flags_are_rejected(capsys):
    with pytest.raises(SystemExit):
        training.parse_args(training.TrainConfig(), ["--features", "heart_rate_bpm,pulse"], "train.py")
    assert "unknown feature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        training.parse_args(training.TrainConfig(), ["--ensemble", "0"], "train.py")
    assert "--ensemble must be >= 1" in capsys.readouterr().err


def test_env_vars_set_defaults(monkeypatch):
    monkeypatch.setenv("EPOCHS", "7")
    monkeypatch.setenv("SEQ_LEN", "11")
    cfg = training.parse_args(training.TrainConfig(), [], "train.py")
    assert (cfg.epochs, cfg.seq_len, cfg.target_pos) == (7, 11, 5)
    assert training.parse_args(training.TrainConfig(), ["--epochs", "3"], "train.py").epochs == 3


def test_model_overrides_change_the_trained_architecture(small_data_dir, tmp_path):
    assert training.override_model_config({"channels": 64, "n_heads": 4}, "channels=32, n_heads=2") == \
        {"channels": 32, "n_heads": 2}
    for bad in ("width=3", "channels", "channels=wide"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            training.override_model_config({"channels": 64}, bad)
    out = tmp_path / "small"
    assert tiny_run("hybrid", small_data_dir, out, "--epochs", "1", "--model", "channels=8,n_heads=2") == 0
    model, _, checkpoint = load_model_from_checkpoint(out / "model.pth")
    assert model.config.channels == 8 and model.config.n_heads == 2
    for bad in ("depth=2", "n_classes=2", "channels=15"):  # unknown, fixed, not divisible by the 2 heads
        with pytest.raises(SystemExit, match="--model"):
            tiny_run("hybrid", small_data_dir, out, "--model", bad)


def test_metrics_of_a_night_without_any_staged_epoch_are_nan_not_an_error():
    metrics = evaluation.compute_metrics(np.array([0, 1, 2, -1]), np.array([-1, -1, -1, 2]))
    assert metrics["n_epochs"] == 0 and metrics["n_no_data"] == 3 and np.isnan(metrics["kappa"])
    partly = evaluation.compute_metrics(np.array([0, 1, 2, 3]), np.array([0, 1, -1, 3]))
    assert partly["n_epochs"] == 3 and partly["n_no_data"] == 1 and partly["accuracy"] == 1.0


# ----------------------------------------------------------------------------- whole nights, revision, recipe


def test_a_plain_run_writes_to_runs_and_never_replaces_a_shipped_checkpoint(small_data_dir, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--data-dir", str(small_data_dir), "--epochs", "1", "--batch-size", "64", "--stride", "10"]
    assert training.run("hybrid", TINY_HYBRID, training.TrainConfig(), argv) == 0
    assert (tmp_path / "runs" / "hybrid_offline" / "model.pth").is_file()
    assert not (tmp_path / "checkpoints").exists()
    out = capsys.readouterr().out
    assert "python inference_hybrid.py --checkpoint runs/hybrid_offline/model.pth" in out


def test_whole_night_training_labels_every_epoch_in_one_pass(small_data_dir, tmp_path):
    out = tmp_path / "night"
    argv = ["--data-dir", str(small_data_dir), "--out-dir", str(out), "--epochs", "2", "--batch-size", "4",
            "--seq-len", "0", "--crop-epochs", "60,200", "--crops-per-night", "2", "--no-validate", "--no-smooth"]
    model_config = {**TINY_HYBRID, "dilated": 2, "pool": 4}
    assert training.run("hybrid", model_config, training.TrainConfig(), argv) == 0
    model, scaler, checkpoint = load_model_from_checkpoint(out / "model.pth")
    assert checkpoint["seq_len"] == 0 and checkpoint["val_subjects"] == []
    # no validation hold-out: every non-test subject trains
    train, val, test = dl.split_subjects(dl.find_subjects(small_data_dir))
    assert sorted(checkpoint["train_subjects"]) == sorted(train + val)
    night = dl.load_nights(small_data_dir, cache_dir=None)[0]
    frame = evaluation.predict_nights(model, scaler, checkpoint, [night], smooth=False)
    x = scaler.transform(features.night_features(night, causal=False, features=tuple(checkpoint["features"])))
    with torch.no_grad():
        direct = torch.softmax(model(torch.from_numpy(x[None]))[0], dim=-1).numpy()
    staged = frame["pred"].to_numpy() >= 0
    np.testing.assert_allclose(frame[["p_wake", "p_light", "p_deep", "p_rem"]].to_numpy()[staged], direct[staged],
                               atol=1e-5)


def test_crops_have_one_length_per_pass_and_pad_short_nights_unlabelled(tmp_path):
    nights = [("long", np.arange(300, dtype=np.float32)[:, None], np.arange(300) % 4, 30.0 * np.arange(300)),
              ("short", np.arange(40, dtype=np.float32)[:, None], np.arange(40) % 4, 30.0 * np.arange(40))]
    store = feature_store.FeatureStore.write(tmp_path / "store", nights, ("value",), causal=False)
    identity = dl.FeatureScaler(np.zeros(1, np.float32), np.ones(1, np.float32))
    ds = training.CropDataset(training.Prepared(store, identity), ["long", "short"], (50, 120), 3, seed=0)
    assert len(ds) == 6
    lengths = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        items = [ds[i] for i in range(len(ds))]
        assert {len(x) for x, _ in items} == {ds.seq_len} and 50 <= ds.seq_len <= 120
        lengths.add(ds.seq_len)
        for i, (x, y) in enumerate(items):
            n = 300 if ds.window_night[i] == 0 else 40
            start = int(x[0, 0])
            valid = np.arange(start, start + ds.seq_len) < n
            assert (y.numpy()[~valid] == -1).all() and (y.numpy()[valid] == (np.arange(start, start + ds.seq_len)[valid] % 4)).all()
    assert len(lengths) > 1  # the length is drawn afresh each pass


def test_lag_targets_shift_the_labels_back_by_each_lag():
    y = torch.tensor([[0, 1, 2, 3, 1]])
    lagged = training.lag_targets(y, 2)
    assert lagged.shape == (1, 5, 3)
    assert lagged[0, :, 0].tolist() == [0, 1, 2, 3, 1]
    assert lagged[0, :, 1].tolist() == [-1, 0, 1, 2, 3]
    assert lagged[0, :, 2].tolist() == [-1, -1, 0, 1, 2]


def test_lag_targets_shift_a_teachers_probabilities_per_epoch_as_the_stages():
    teacher = torch.log_softmax(torch.randn(2, 6, 4), -1)
    lagged = training.lag_targets(teacher, 3, 0.0)
    assert lagged.shape == (2, 6, 4, 4)
    for j in range(4):
        torch.testing.assert_close(lagged[:, j:, j], teacher[:, :6 - j])
        assert (lagged[:, :j, j] == 0).all()


def test_an_offline_teacher_trains_first_and_teaches_each_causal_step_what_it_makes_of_the_drawn_night(
        small_data_dir, tmp_path, monkeypatch, capsys):
    import degrade
    from checkpoint import load_model_from_checkpoint
    taught, drawn = [], []
    real_loss, real_degrade = training.distill_loss, degrade.degrade

    def loss_spy(logits, teacher_log_probs, *args):
        taught.append((logits.shape, teacher_log_probs.detach().clone()))
        return real_loss(logits, teacher_log_probs, *args)

    def degrade_spy(night, *args, **kwargs):
        drawn.append(real_degrade(night, *args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(training, "distill_loss", loss_spy)
    monkeypatch.setattr(degrade, "degrade", degrade_spy)
    out = tmp_path / "causal"
    whole_nights = training.TrainConfig(seq_len=0, crop_epochs=(40, 60), crops_per_night=2, batch_size=4, epochs=1,
                                        validate=False, smooth=False)
    argv = ["--data-dir", str(small_data_dir), "--out-dir", str(out), "--causal", "--offline-teacher", "0.5"]
    assert training.run("hybrid", {**TINY_HYBRID, "n_layers": 0}, whole_nights, argv,
                        causal_recipe=({**TINY_HYBRID, "n_layers": 0, "lookahead": 3}, replace(whole_nights, causal=True))) == 0
    teacher, teacher_scaler, teacher_ckpt = load_model_from_checkpoint(out / "teacher" / "model.pth")
    assert not teacher.config.causal and teacher_ckpt["seq_len"] == 0
    student, _, ckpt = load_model_from_checkpoint(out / "model.pth")
    assert student.config.causal and ckpt["train_config"]["offline_teacher"] == 0.5
    # every step of the causal run was taught, per lag: (batch, L, 1 + lookahead, 4) as the logits
    assert taught and all(shape == lagged.shape and shape[2] == 4 for shape, lagged in taught)
    # each crop's lag 0 is the saved teacher's own output on a stretch of a night as drawn (by the pass)
    outputs = []
    for night in drawn:
        x = teacher_scaler.transform(features.night_features(night, causal=False, features=tuple(ckpt["features"])))
        with torch.no_grad():
            outputs.append(F.log_softmax(teacher(torch.from_numpy(x)[None])[0], -1))
    for _, lagged in taught:
        for crop in lagged[:, :, 0]:
            assert any(torch.allclose(crop, out[i:i + len(crop)], atol=1e-5)
                       for out in outputs for i in range(len(out) - len(crop) + 1))
    with pytest.raises(SystemExit):
        training.parse_args(training.TrainConfig(), ["--offline-teacher", "0.5"], "train.py")
    assert "needs --causal" in capsys.readouterr().err


def test_a_causal_model_with_lookahead_trains_and_revises_from_later_windows(small_data_dir, tmp_path):
    out = tmp_path / "causal"
    argv = ["--data-dir", str(small_data_dir), "--out-dir", str(out), "--epochs", "1", "--batch-size", "64",
            "--stride", "10", "--causal", "--seq-len", "15", "--no-validate"]
    assert training.run("hybrid", {**TINY_HYBRID, "lookahead": 4}, training.TrainConfig(), argv) == 0
    model, scaler, checkpoint = load_model_from_checkpoint(out / "model.pth")
    night = dl.load_nights(small_data_dir, cache_dir=None)[0]
    x = scaler.transform(features.night_features(night, causal=True, features=tuple(checkpoint["features"])))
    revised = evaluation.predict_night(model, x, 15, 14, revised=True)
    windows = features.make_windows(x, 15, 14)
    with torch.no_grad():
        every_lag = torch.softmax(model.forward_last(torch.from_numpy(windows), lags=True), dim=-1).numpy()
    n = len(x)
    np.testing.assert_allclose(revised[10], every_lag[14, 4], atol=1e-5)     # 4 epochs later, at lag 4
    np.testing.assert_allclose(revised[n - 2], every_lag[n - 1, 1], atol=1e-5)  # the night's end: the last window
    immediate = evaluation.predict_night(model, x, 15, 14)
    np.testing.assert_allclose(immediate, every_lag[:, 0], atol=1e-5)


def test_p_recorded_draws_that_share_of_nights_as_recorded():
    import degrade
    night = dl.load_night(dl.DEFAULT_DATA_DIR, "46343", cache_dir=None)
    rng = np.random.default_rng(0)
    drawn = [degrade.draw_condition(rng, night, p_recorded=0.5) for _ in range(2000)]
    recorded = [c for c in drawn if c.hr_period_s is None and not c.drop_motion and not c.drop_heart_rate
                and c.watch_off_s == 0]
    # half drawn as recorded, plus the drawn conditions that happen to be clean (about 6%)
    assert 0.5 <= len(recorded) / len(drawn) <= 0.58
    none = [degrade.draw_condition(np.random.default_rng(s), night) for s in range(400)]
    assert sum(c.hr_period_s is None and not c.drop_motion and not c.drop_heart_rate and c.watch_off_s == 0
               for c in none) / 400 < 0.12


def test_lag_weights_scale_each_lag_of_the_revision_loss():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 6, 3, 4), torch.randint(0, 4, (2, 6))
    target = training.lag_targets(y, 2)
    weight = torch.tensor([1.0, 0.5, 2.0, 3.0])
    dropped_middle = training.focal_loss(logits, target, weight, 2.0, position_weight=torch.tensor([1.0, 0.0, 1.0]))
    ends = training.focal_loss(logits[:, :, [0, 2]], target[:, :, [0, 2]], weight, 2.0)
    torch.testing.assert_close(dropped_middle, ends)
    ones = training.focal_loss(logits, target, weight, 2.0, position_weight=torch.ones(3))
    torch.testing.assert_close(ones, training.focal_loss(logits, target, weight, 2.0))
    # lag 0 and the last lag weigh 1, the lags between middle_lag_weight
    torch.testing.assert_close(training.lag_weights(4, 0.1), torch.tensor([1.0, 0.1, 0.1, 0.1, 1.0]))
    torch.testing.assert_close(training.lag_weights(1, 0.1), torch.ones(2))


def test_ema_keeps_the_moving_average_and_resumes_to_the_same_weights(small_data_dir, tmp_path):
    plain, straight, resumed = tmp_path / "plain", tmp_path / "straight", tmp_path / "resumed"
    assert tiny_run("hybrid", small_data_dir, plain, "--epochs", "3", "--no-validate") == 0
    assert tiny_run("hybrid", small_data_dir, straight, "--epochs", "3", "--no-validate", "--ema", "0.9") == 0
    assert tiny_run("hybrid", small_data_dir, resumed, "--epochs", "2", "--no-validate", "--ema", "0.9") == 0
    assert tiny_run("hybrid", small_data_dir, resumed, "--epochs", "3", "--no-validate", "--ema", "0.9", "--resume") == 0
    last = read_checkpoint(straight / "last.pth")
    kept, trained = last["state_dict"], last["trained_state_dict"]
    # the same seed trains the same weights; what is kept is their average, not the last step
    for k, v in read_checkpoint(plain / "last.pth")["state_dict"].items():
        torch.testing.assert_close(trained[k], v)
    assert any(not torch.allclose(kept[k], trained[k]) for k in kept if kept[k].is_floating_point())
    torch.testing.assert_close(read_checkpoint(straight / "model.pth")["state_dict"], kept)
    for k, v in read_checkpoint(resumed / "last.pth")["state_dict"].items():
        torch.testing.assert_close(v, kept[k])


def test_distill_loss_is_cross_entropy_against_the_teacher_weighted_as_the_focal_loss():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 50, 4), torch.randint(0, 4, (6, 50))
    target[:, :5] = -1  # unscored: they count for nothing
    weight = torch.tensor([1.0, 0.5, 2.0, 3.0])
    one_hot = F.one_hot(target.clamp_min(0), 4).float()
    # a teacher sure of the true stage: the focal loss without focusing
    torch.testing.assert_close(training.distill_loss(logits, one_hot.log(), target, weight),
                               training.focal_loss(logits, target, weight, gamma=0.0))
    teacher = torch.log_softmax(torch.randn(6, 50, 4), -1)
    expected = -(teacher.exp() * F.log_softmax(logits, -1)).sum(-1)[:, 5:]
    w = weight[target[:, 5:]]
    torch.testing.assert_close(training.distill_loss(logits, teacher, target, weight), (w * expected).sum() / w.sum())


def test_distilling_an_ensemble_keeps_one_student_taught_by_the_members(small_data_dir, tmp_path, monkeypatch, capsys):
    from checkpoint import Ensemble, load_model_from_checkpoint, read_checkpoint
    steps, taught = [], []  # per step: taught or not; the teacher's outputs
    real_step, real_loss = training.train_step, training.distill_loss

    def step_spy(*args):
        steps.append(args[-1] is not None)
        return real_step(*args)

    def loss_spy(logits, teacher_log_probs, *args):
        taught.append(teacher_log_probs.shape == logits.shape and bool(torch.isfinite(teacher_log_probs).all()))
        return real_loss(logits, teacher_log_probs, *args)

    monkeypatch.setattr(training, "train_step", step_spy)
    monkeypatch.setattr(training, "distill_loss", loss_spy)
    out = tmp_path / "student"
    assert tiny_run("hybrid", small_data_dir, out, "--epochs", "1", "--ensemble", "2", "--distill", "0.7") == 0
    model, _, ckpt = load_model_from_checkpoint(out / "model.pth")
    assert not isinstance(model, Ensemble) and ckpt.get("ensemble_size", 1) == 1
    assert ckpt["train_config"]["seed"] == 1339 and ckpt["train_config"]["distill"] == 0.7  # after members 1337, 1338
    assert all((out / "members" / f"seed{s}" / "model.pth").is_file() for s in (1337, 1338))
    # two members untaught, then the student, the same number of steps each, every one of them taught
    n = len(steps) // 3
    assert n > 0 and steps == [False] * 2 * n + [True] * n and taught == [True] * n
    assert read_checkpoint(out / "last.pth")["train_state"]["epoch"] == 1
    with pytest.raises(SystemExit):
        training.parse_args(training.TrainConfig(), ["--distill", "0.5"], "train.py")
    assert "needs --ensemble 2 or more" in capsys.readouterr().err
