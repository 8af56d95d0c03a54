"""Real-world conditions (degrade.py) and how training uses them: thinning keeps the first reading per
interval, watch-off stretches remove both channels, drawn conditions are reproducible per seed (every
torchrun rank draws the same), and no-data epochs are not trained or scored."""
import dataclasses

import numpy as np
import pytest

import data_loader as dl
import degrade
import feature_store
import features
import training
from conftest import BUNDLED

SUBJECT = "46343"


@pytest.fixture(scope="module")
def night():
    return dl.load_night(BUNDLED, SUBJECT, cache_dir=None)


def test_thinning_keeps_the_first_reading_in_each_interval():
    samples = np.column_stack([np.arange(0.0, 600.0, 5.0), np.arange(120.0)])
    kept = degrade.thin(samples, 60.0, phase_s=-20.0)  # intervals [-20, 40), [40, 100), ...
    np.testing.assert_array_equal(kept[:, 0], [0.0, 40.0, 100.0, 160.0, 220.0, 280.0, 340.0, 400.0, 460.0, 520.0,
                                               580.0])
    assert (np.diff(kept[:, 0])[1:] == 60.0).all()  # the first interval began before the readings


@pytest.mark.parametrize("period", [15.0, 60.0, 300.0])
def test_a_thinned_night_has_one_reading_per_period_and_the_same_stages(night, period):
    thinned = degrade.degrade(night, degrade.Condition("x", hr_period_s=period), np.random.default_rng(0))
    gaps = np.diff(thinned.heart_rate_samples[:, 0])[1:]  # the first interval began before the night
    assert gaps.min() > period - 10 and np.median(gaps) == pytest.approx(period, abs=6)
    np.testing.assert_array_equal(thinned.stage, night.stage)
    np.testing.assert_array_equal(thinned.activity_count, night.activity_count)
    if period >= 60:  # about one epoch in period / 30 has a heart rate
        assert (~np.isnan(thinned.heart_rate_bpm)).sum() == pytest.approx(len(night) * 30 / period, rel=0.15)
    for t, bpm in thinned.heart_rate_samples[:50]:  # each kept reading is a recorded one, in its epoch
        k = int((t - night.epoch_start_s[0]) // 30)
        assert bpm in night.heart_rate_samples[:, 1] and not np.isnan(thinned.heart_rate_bpm[k])


def test_dropping_channels_and_a_watch_off_stretch(night):
    hr_only = degrade.degrade(night, degrade.CONDITIONS["heart rate only"])
    assert np.isnan(hr_only.activity_count).all() and not np.isnan(hr_only.heart_rate_bpm).all()
    motion_only = degrade.degrade(night, degrade.CONDITIONS["motion only"])
    assert np.isnan(motion_only.heart_rate_bpm).all() and len(motion_only.heart_rate_samples) == 0
    condition = degrade.CONDITIONS["2 h watch off"]
    off = degrade.watch_off_epochs(night, condition)
    assert off.sum() in (240, 241) and np.flatnonzero(off)[0] > 0  # 2 h, centred, inside the night
    watch_off = degrade.degrade(night, condition)
    assert np.isnan(watch_off.heart_rate_bpm[off]).all() and np.isnan(watch_off.activity_count[off]).all()
    np.testing.assert_array_equal(watch_off.heart_rate_bpm[~off][:100], night.heart_rate_bpm[~off][:100])
    # offline: no stage anywhere in the stretch; causal: only after NO_DATA_EPOCHS without a reading
    np.testing.assert_array_equal(features.no_data(watch_off, causal=False), off)
    causal = features.no_data(watch_off, causal=True)
    assert causal.sum() == off.sum() - features.NO_DATA_EPOCHS and not causal[~off].any()


def test_dropping_the_baseline_clears_the_resting_heart_rate_and_nothing_else(night):
    assert np.isfinite(night.resting_hr_bpm)
    assert degrade.degrade(night, degrade.CONDITIONS["as recorded"]).resting_hr_bpm == night.resting_hr_bpm
    dropped = degrade.degrade(night, degrade.CONDITIONS["as recorded, no baseline"])
    assert np.isnan(dropped.resting_hr_bpm)
    np.testing.assert_array_equal(dropped.heart_rate_bpm, night.heart_rate_bpm)
    np.testing.assert_array_equal(dropped.activity_count, night.activity_count)
    x = features.night_features(dropped, causal=True, features=("hr_minus_resting_bpm", "resting_hr_missing"))
    assert (x[:, 0] == 0).all() and (x[:, 1] == 1).all()
    hr_only = degrade.degrade(night, degrade.CONDITIONS["heart rate only, no baseline"])
    assert np.isnan(hr_only.resting_hr_bpm) and np.isnan(hr_only.activity_count).all()
    assert not np.isnan(hr_only.heart_rate_bpm).all()


@pytest.mark.parametrize("p_recorded", [0.0, 1.0])
def test_drawn_conditions_drop_the_baseline_half_the_time_as_recorded_or_not(night, p_recorded):
    rng = np.random.default_rng(0)
    drawn = [degrade.draw_condition(rng, night, p_recorded, degrade.TRAIN_P_DROP_BASELINE) for _ in range(2000)]
    assert 0.46 < np.mean([c.drop_baseline for c in drawn]) < 0.54
    if p_recorded == 1.0:  # every one as recorded, with or without the baseline
        assert {dataclasses.replace(c, drop_baseline=False) for c in drawn} == {degrade.Condition("drawn")}
    rng = np.random.default_rng(0)
    assert [degrade.draw_condition(rng, night, p_recorded, degrade.TRAIN_P_DROP_BASELINE)
            for _ in range(2000)] == drawn  # reproducible
    # without the baseline drawn, nothing more is drawn: the other fields are those drawn with it
    rng = np.random.default_rng(0)
    without = [degrade.draw_condition(rng, night, p_recorded) for _ in range(2000)]
    assert not any(c.drop_baseline for c in without)
    assert without[0] == dataclasses.replace(drawn[0], drop_baseline=False)
    if p_recorded == 0.0:  # and after the first draw the streams part
        assert without[1:] != [dataclasses.replace(c, drop_baseline=False) for c in drawn[1:]]


def test_drawn_conditions_cover_the_documented_range_and_repeat_per_seed(night):
    conditions = [degrade.draw_condition(np.random.default_rng(s), night) for s in range(400)]
    periods = {c.hr_period_s for c in conditions}
    assert periods == set(degrade.TRAIN_HR_PERIODS_S)
    assert 0.2 < np.mean([c.drop_motion for c in conditions]) < 0.4
    assert 0.05 < np.mean([c.drop_heart_rate for c in conditions]) < 0.2
    assert not any(c.drop_motion and c.drop_heart_rate for c in conditions)
    offs = [c.watch_off_s for c in conditions if c.watch_off_s]
    assert 0.2 < len(offs) / 400 < 0.4 and 600 <= min(offs) and max(offs) <= 3 * 3600
    again = [degrade.draw_condition(np.random.default_rng(s), night) for s in range(400)]
    assert again == conditions


def test_training_draws_a_condition_per_night_and_pass_and_unscores_no_data_epochs(small_data_dir):
    cfg = training.TrainConfig(causal=True, data_dir=str(small_data_dir))
    store = feature_store.build_feature_store(small_data_dir, causal=True, features=cfg.features, cache_dir=None)
    subjects = store.subjects[:4]
    data = training.prepare(store, subjects, cfg)
    data.draw(subjects, seed=1)
    first = {s: data.x(s).copy() for s in subjects}
    data.draw(subjects, seed=2)
    assert any(not np.array_equal(first[s], data.x(s)) for s in subjects)  # drawn afresh each pass
    data.draw(subjects, seed=1)
    for s in subjects:  # the same seed draws the same conditions (every torchrun rank agrees)
        np.testing.assert_array_equal(first[s], data.x(s))
    (key,) = data.add_conditions(subjects[:1], ("2 h watch off",))
    no_data = data.no_data(key)
    assert no_data.sum() >= 200 and (data.y(key)[no_data] == -1).all()
    stages = store.read(subjects[0], "stage")
    np.testing.assert_array_equal(data.y(key)[~no_data], stages[~no_data])
    assert data.add_conditions(subjects[:1], ("as recorded",)) == subjects[:1]


def test_a_heart_rate_offset_shifts_every_reading_and_training_draws_it_per_night(night, small_data_dir):
    shifted = degrade.degrade(night, degrade.Condition("offset", hr_offset_bpm=7.5))
    np.testing.assert_allclose(shifted.heart_rate_samples[:, 1], night.heart_rate_samples[:, 1] + 7.5)
    has = ~np.isnan(night.heart_rate_bpm)
    np.testing.assert_allclose(shifted.heart_rate_bpm[has], night.heart_rate_bpm[has] + 7.5)
    np.testing.assert_array_equal(shifted.activity_count, night.activity_count)
    cfg = training.TrainConfig(causal=True, data_dir=str(small_data_dir), p_recorded=1.0)
    store = feature_store.build_feature_store(small_data_dir, causal=True, features=cfg.features, cache_dir=None)
    subjects = store.subjects[:3]
    column = list(cfg.features).index("heart_rate_bpm")
    means = {}
    for shift in (0.0, 10.0):
        data = training.prepare(store, subjects, training.replace(cfg, hr_shift_bpm=shift))
        data.draw(subjects, seed=1)
        means[shift] = [(data.x(s)[:, column] * data.scaler.scale[column]).mean() for s in subjects]
    offsets = np.subtract(means[10.0], means[0.0])
    assert np.abs(offsets).max() > 1.0 and len(set(np.round(offsets, 3))) == len(subjects)  # one offset per night


@pytest.fixture
def draws(monkeypatch) -> list[dict]:
    """The arguments of every degrade.draw_condition call made while the test runs, in order."""
    calls = []
    real = degrade.draw_condition

    def spy(rng, night, p_recorded=0.0, p_drop_baseline=0.0, hr_shift_bpm=0.0, mix=degrade.TrainMix()):
        calls.append({"p_recorded": p_recorded, "p_drop_baseline": p_drop_baseline, "mix": mix})
        return real(rng, night, p_recorded, p_drop_baseline, hr_shift_bpm, mix)

    monkeypatch.setattr(degrade, "draw_condition", spy)
    return calls


def test_a_named_training_mix_draws_only_its_input_profile(night, small_data_dir, draws):
    """"sparse no motion": heart rate every 2-10 min, motion always dropped, heart rate never; the
    default mix draws what draw_condition drew before it had one (the same generator draws)."""
    sparse = degrade.TRAIN_MIXES["sparse no motion"]
    drawn = [degrade.draw_condition(np.random.default_rng(s), night, mix=sparse) for s in range(400)]
    assert {c.hr_period_s for c in drawn} == {120.0, 300.0, 600.0}
    assert all(c.drop_motion and not c.drop_heart_rate for c in drawn)
    assert 0.2 < np.mean([c.watch_off_s > 0 for c in drawn]) < 0.4  # the watch still comes off
    assert [degrade.draw_condition(np.random.default_rng(s), night, mix=degrade.TRAIN_MIXES["mixed"])
            for s in range(50)] == [degrade.draw_condition(np.random.default_rng(s), night) for s in range(50)]
    cfg = training.TrainConfig(causal=True, data_dir=str(small_data_dir), train_mix="sparse no motion")
    store = feature_store.build_feature_store(small_data_dir, causal=True, features=cfg.features, cache_dir=None)
    data = training.prepare(store, store.subjects[:2], cfg)
    draws.clear()
    data.draw(store.subjects[:2], seed=1)
    assert [d["mix"] for d in draws] == [sparse, sparse]
    with pytest.raises(ValueError, match="train_mix 'sparse': expected one of \\['mixed', 'sparse no motion'\\]"):
        training.prepare(store, store.subjects[:2], dataclasses.replace(cfg, train_mix="sparse"))


def test_training_drops_the_baseline_only_for_models_that_read_it(small_data_dir, draws):
    for names, expected in ((features.DEFAULT_FEATURES, 0.0),
                            (features.DEFAULT_FEATURES + features.BASELINE_FEATURES, degrade.TRAIN_P_DROP_BASELINE)):
        cfg = training.TrainConfig(causal=True, data_dir=str(small_data_dir), features=names)
        store = feature_store.build_feature_store(small_data_dir, causal=True, features=names, cache_dir=None)
        data = training.prepare(store, store.subjects[:2], cfg)
        draws.clear()
        data.draw(store.subjects[:2], seed=1)
        assert [d["p_drop_baseline"] for d in draws] == [expected, expected]


def test_an_ensemble_can_mix_members_that_draw_every_night_degraded(small_data_dir, tmp_path, draws, capsys):
    from checkpoint import read_checkpoint
    from tests.test_training import tiny_run
    out = tmp_path / "mixed"
    assert tiny_run("hybrid", small_data_dir, out, "--epochs", "1", "--ensemble", "2", "--degraded-members", "1",
                    "--p-recorded", "0.7") == 0
    passed = [d["p_recorded"] for d in draws]
    # member 1 draws at the run's p_recorded, then member 2 with every night degraded; one draw a night a pass
    assert len(set(passed)) == 2 and passed == sorted(passed, reverse=True) and passed[0] == 0.7 and passed[-1] == 0.0
    assert passed.count(0.7) == passed.count(0.0)
    members = [read_checkpoint(out / "members" / f"seed{s}" / "model.pth")["train_config"] for s in (1337, 1338)]
    assert [m["p_recorded"] for m in members] == [0.7, 0.0]
    with pytest.raises(SystemExit):
        training.parse_args(training.TrainConfig(), ["--ensemble", "2", "--degraded-members", "3"], "train.py")
    assert "--degraded-members must be 0 to --ensemble (2), got 3" in capsys.readouterr().err
