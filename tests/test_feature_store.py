"""The memory-mapped cohort feature store: same numbers as the in-memory path, built once, rebuilt on change."""
import gc
import gzip
import shutil
import warnings

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

import data_loader as dl
import features
import feature_store
from conftest import BUNDLED, copy_subjects


@pytest.mark.parametrize("causal", [False, True])
def test_store_holds_the_same_features_stages_and_times_as_each_night(small_data_dir, cache_dir, causal):
    store = feature_store.build_feature_store(small_data_dir, causal=causal, cache_dir=cache_dir)
    assert store.subjects == dl.find_subjects(small_data_dir) and store.causal == causal
    for subject_id in store.subjects:
        night = dl.load_night(small_data_dir, subject_id, cache_dir=None)
        np.testing.assert_array_equal(store.read(subject_id, "features"), features.night_features(night, causal, features.DEFAULT_FEATURES))
        np.testing.assert_array_equal(store.read(subject_id, "stage"), night.stage)
        np.testing.assert_array_equal(store.read(subject_id, "epoch_start_s"), night.epoch_start_s)
        idx = np.array([3, 0, 3, len(night) - 1])
        np.testing.assert_array_equal(store.read(subject_id, "features", idx), features.night_features(night, causal, features.DEFAULT_FEATURES)[idx])
    assert store.offsets[-1] == sum(store.n_epochs(s) for s in store.subjects)


def test_second_build_opens_the_store_without_reading_a_night(small_data_dir, cache_dir, monkeypatch):
    first = feature_store.build_feature_store(small_data_dir, causal=False, cache_dir=cache_dir)
    monkeypatch.setattr(feature_store, "load_night", lambda *a, **k: pytest.fail("the store should come from the cache"))
    second = feature_store.build_feature_store(small_data_dir, causal=False, cache_dir=cache_dir)
    assert second.path == first.path
    monkeypatch.undo()  # another mode or feature list is another store
    assert feature_store.build_feature_store(small_data_dir, causal=True, cache_dir=cache_dir).path != first.path
    assert feature_store.build_feature_store(small_data_dir, causal=False, cache_dir=cache_dir,
                                  features=features.DEFAULT_FEATURES[:5]).path != first.path


def test_a_changed_file_builds_a_new_store(tmp_path, cache_dir):
    data = copy_subjects(BUNDLED, tmp_path / "data", ("46343", "3509524", "4018081"))
    before = feature_store.build_feature_store(data, causal=False, cache_dir=cache_dir)
    hr_file = next((data / "heart_rate").glob("46343_*"))
    with gzip.open(hr_file, "rt") as f:
        rows = f.read().splitlines()
    rows = [f"{t},{float(bpm) + 10}" for t, bpm in (row.split(",") for row in rows if row)]
    with gzip.open(hr_file, "wt") as f:
        f.write("\n".join(rows) + "\n")
    after = feature_store.build_feature_store(data, causal=False, cache_dir=cache_dir)
    assert after.path != before.path
    assert not np.array_equal(after.read("46343", "features"), before.read("46343", "features"))


def test_a_damaged_store_is_rebuilt(small_data_dir, cache_dir):
    store = feature_store.build_feature_store(small_data_dir, causal=False, cache_dir=cache_dir)
    expected = store.read(store.subjects[-1], "features")
    path = store.path
    del store
    with open(path / "features.f32", "r+b") as f:
        f.truncate(100)
    with pytest.raises(dl.DataError, match="features.f32"):
        feature_store.FeatureStore(path)
    rebuilt = feature_store.build_feature_store(small_data_dir, causal=False, cache_dir=cache_dir)
    np.testing.assert_array_equal(rebuilt.read(rebuilt.subjects[-1], "features"), expected)


def test_a_bad_subject_is_skipped_with_a_warning_on_every_load_and_strict_raises(tmp_path, cache_dir):
    data = copy_subjects(BUNDLED, tmp_path / "data", ("46343", "3509524", "4018081"))
    labels = next((data / "labels").glob("3509524_*"))
    labels.unlink()
    (data / "labels" / "3509524_labeled_sleep.txt").write_text("0 0\n30 banana\n")
    for _ in range(2):  # built, then opened from the cache: the same warning both times
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", dl.DataWarning)
            store = feature_store.build_feature_store(data, causal=False, cache_dir=cache_dir)
        assert store.subjects == ["4018081", "46343"]
        assert any("3509524" in str(w.message) and "line 2" in str(w.message) for w in caught)
    with pytest.raises(dl.DataError, match="line 2"):
        feature_store.build_feature_store(data, causal=False, cache_dir=cache_dir, strict=True)


def test_without_a_cache_the_store_is_temporary(small_data_dir):
    store = feature_store.build_feature_store(small_data_dir, causal=False, cache_dir=None)
    folder = store.path.parent
    assert folder.is_dir()
    del store
    gc.collect()
    assert not folder.exists()


def test_two_writers_of_the_same_store_both_succeed(tmp_path):
    nights = [("a", np.ones((4, 2), np.float32), np.zeros(4, np.int8), 30.0 * np.arange(4))]
    first = feature_store.FeatureStore.write(tmp_path / "store", nights, ("f1", "f2"), causal=False)
    second = feature_store.FeatureStore.write(tmp_path / "store", nights, ("f1", "f2"), causal=False)  # lost the race
    assert first.path == second.path and sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    with pytest.raises(ValueError, match="subject b"):
        feature_store.FeatureStore.write(tmp_path / "bad", [("b", np.ones((4, 3), np.float32), np.zeros(4), np.zeros(4))],
                              ("f1", "f2"), causal=False)
    assert not (tmp_path / "bad").exists() and len(list(tmp_path.iterdir())) == 1  # no temporary left


def test_reads_across_fresh_memory_maps_return_the_same_rows(small_data_dir, cache_dir, monkeypatch):
    store = feature_store.build_feature_store(small_data_dir, causal=False, cache_dir=cache_dir)
    expected = {s: store.read(s, "features") for s in store.subjects}
    monkeypatch.setattr(feature_store, "REMAP_BYTES", 10_000)
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = store.subjects[rng.integers(len(store))]
        idx = rng.integers(store.n_epochs(s), size=25)
        np.testing.assert_array_equal(store.read(s, "features", idx), expected[s][idx])


def test_streaming_scaler_equals_sklearn_on_the_concatenation(small_data_dir, cache_dir):
    store = feature_store.build_feature_store(small_data_dir, causal=True, cache_dir=cache_dir)
    matrices = [store.read(s, "features") for s in store.subjects]
    matrices[0][:, -1] = 0.0  # a constant column in one night only
    reference = StandardScaler().fit(np.concatenate(matrices))
    ours = dl.FeatureScaler.fit(iter(matrices))
    np.testing.assert_allclose(ours.mean, reference.mean_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.scale, reference.scale_, rtol=1e-6)
    constant = dl.FeatureScaler.fit([np.full((5, 2), 3.0)])
    np.testing.assert_array_equal(constant.scale, [1.0, 1.0])
    with pytest.raises(ValueError, match="no rows"):
        dl.FeatureScaler.fit([])


def test_class_counts_match_the_labels(small_data_dir, cache_dir):
    store = feature_store.build_feature_store(small_data_dir, causal=False, cache_dir=cache_dir)
    stages = np.concatenate([dl.load_night(small_data_dir, s, cache_dir=None).stage for s in store.subjects[:4]])
    np.testing.assert_array_equal(store.class_counts(store.subjects[:4]), np.bincount(stages[stages >= 0], minlength=4))


def test_scale_check_read_pass_reads_every_training_window(small_data_dir, cache_dir):
    import scale_check
    import training
    out = scale_check.child("read", str(small_data_dir), str(cache_dir), stride=5)
    store = feature_store.build_feature_store(small_data_dir, causal=False, cache_dir=cache_dir)
    dataset = training.WindowDataset(training.prepare(store, store.subjects), store.subjects, features.SEQ_LEN, 5, seed=0)
    assert out["subjects"] == len(store) and out["epochs"] == store.offsets[-1]
    assert out["windows"] == len(dataset) and out["peak_rss_mib"] > 0


def test_a_damaged_gzip_skips_its_subject_and_an_unwritable_cache_falls_back_to_a_temporary_store(tmp_path):
    data = copy_subjects(BUNDLED, tmp_path / "data", ("46343", "3509524", "4018081"))
    hr_file = next((data / "heart_rate").glob("4018081_*"))
    damaged = bytearray(hr_file.read_bytes())
    damaged[len(damaged) // 2:len(damaged) // 2 + 64] = bytes(64)  # a hole in the deflate stream
    hr_file.write_bytes(bytes(damaged))
    not_a_folder = tmp_path / "cache-is-a-file"
    not_a_folder.write_text("")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dl.DataWarning)
        store = feature_store.build_feature_store(data, causal=False, cache_dir=not_a_folder)
    messages = [str(w.message) for w in caught]
    assert store.subjects == ["3509524", "46343"]
    assert any("4018081" in m and hr_file.name in m for m in messages)
    assert any("cannot write the feature store" in m for m in messages)
    folder = store.path.parent
    assert folder != not_a_folder and folder.is_dir()
    del store
    gc.collect()
    assert not folder.exists()
