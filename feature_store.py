"""A cohort's per-epoch features in memory-mapped flat files: thousands of nights never sit in RAM.

`build_feature_store` reads nights one at a time (data_loader, through its per-night cache), turns
each into its feature matrix (features.night_features) and streams them into a `FeatureStore`
that training reads by subject and row.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from data_loader import (DEFAULT_CACHE_DIR, DataError, DataWarning, FeatureScaler, cache_path, find_subjects,
                         load_night, require_folder, subject_files)
from features import DEFAULT_FEATURES, FEATURES_VERSION, night_features


STORE_VERSION = 1
REMAP_BYTES = 16 << 20  # bytes mapped in between fresh memory maps: pages read earlier leave the process's RSS
FAULT_AROUND_BYTES = 64 << 10  # Linux maps up to this much of the page cache around each page fault


class EpochTimeline(NamedTuple):
    """What a prediction row needs of a night: who, when each epoch starts, the scored stage."""
    subject_id: str
    epoch_start_s: np.ndarray
    stage: np.ndarray


class FeatureStore:
    """A cohort's per-epoch features, stages and epoch times in flat files on disk, memory-mapped.

    Layout, as nanoGPT's train.bin: `features.f32` (rows, F) float32, `stage.i8` (rows,) int8,
    `epoch_start_s.f64` (rows,) float64, subject i owning rows offsets[i]:offsets[i + 1], and
    `index.json` (subjects, offsets, feature names, causal, skipped subjects). Only the offsets live
    in RAM; reads go through a memory map that is replaced after every REMAP_BYTES read (the
    pages a map has touched count in the process's RSS until it is dropped; nanoGPT remaps per
    batch for the same reason), so the cohort's size does not show in the resident memory.
    """

    FILES = {"features": ("features.f32", np.float32), "stage": ("stage.i8", np.int8),
             "epoch_start_s": ("epoch_start_s.f64", np.float64)}

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = json.loads((self.path / "index.json").read_text())
        if index.get("version") != STORE_VERSION:
            raise DataError(f"{self.path}: feature store version {index.get('version')}, expected {STORE_VERSION}")
        self.subjects: list[str] = index["subjects"]
        self.feature_names: tuple[str, ...] = tuple(index["features"])
        self.causal: bool = index["causal"]
        self.skipped: dict[str, str] = index.get("skipped", {})
        self.offsets = np.asarray(index["offsets"], np.int64)
        self._position = {s: i for i, s in enumerate(self.subjects)}
        rows, width = int(self.offsets[-1]), len(self.feature_names)
        for name, (filename, dtype) in self.FILES.items():
            expected = rows * (width if name == "features" else 1) * np.dtype(dtype).itemsize
            actual = (self.path / filename).stat().st_size
            if actual != expected:
                raise DataError(f"{self.path / filename}: {actual} bytes, index says {expected}")
        self._maps: dict[str, np.ndarray] | None = None
        self._bytes_read = 0

    @classmethod
    def write(cls, path: str | Path, nights: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
              features: tuple[str, ...], causal: bool, skipped: dict[str, str] | None = None) -> "FeatureStore":
        """Stream (subject_id, features (n, F), stage (n,), epoch_start_s (n,)) into a new store at path.

        Written in a temporary folder renamed into place, so a reader never sees half a store.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
        try:
            subjects, offsets = [], [0]
            with contextlib.ExitStack() as stack:
                handles = {name: stack.enter_context(open(tmp / filename, "wb"))
                           for name, (filename, _) in cls.FILES.items()}
                for subject_id, x, stage, epoch_start_s in nights:
                    if (len(stage) == 0 or x.shape != (len(stage), len(features))
                            or len(epoch_start_s) != len(stage)):
                        raise ValueError(f"subject {subject_id}: features {x.shape}, {len(stage)} stages, "
                                         f"{len(epoch_start_s)} epoch starts, {len(features)} feature names")
                    for name, values in (("features", x), ("stage", stage), ("epoch_start_s", epoch_start_s)):
                        handles[name].write(np.ascontiguousarray(values, cls.FILES[name][1]).tobytes())
                    subjects.append(subject_id)
                    offsets.append(offsets[-1] + len(stage))
            index = {"version": STORE_VERSION, "subjects": subjects, "offsets": offsets,
                     "features": list(features), "causal": causal, "skipped": skipped or {}}
            (tmp / "index.json").write_text(json.dumps(index))
            try:
                os.replace(tmp, path)
            except OSError:  # another process (a torchrun rank) finished the same store first
                if not (path / "index.json").exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path)

    def __len__(self) -> int:
        return len(self.subjects)

    def _rows(self, subject_id: str) -> tuple[int, int]:
        i = self._position[subject_id]
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def _map(self, name: str) -> np.ndarray:
        if self._maps is None or self._bytes_read >= REMAP_BYTES:
            self._bytes_read = 0
            rows, width = int(self.offsets[-1]), len(self.feature_names)
            self._maps = {key: np.memmap(self.path / filename, dtype, "r",
                                         shape=(rows, width) if key == "features" else (rows,))
                          if rows else np.zeros((0, width) if key == "features" else (0,), dtype)
                          for key, (filename, dtype) in self.FILES.items()}
        return self._maps[name]

    def n_epochs(self, subject_id: str) -> int:
        start, end = self._rows(subject_id)
        return end - start

    def read(self, subject_id: str, name: str, index: np.ndarray | None = None) -> np.ndarray:
        """A copy of one subject's `features`, `stage` or `epoch_start_s`, all rows or the rows at index."""
        start, end = self._rows(subject_id)
        values = self._map(name)[start:end]
        out = np.array(values if index is None else values[index])
        self._bytes_read += out.nbytes + FAULT_AROUND_BYTES  # what the read may have added to RSS
        return out

    def timeline(self, subject_id: str) -> "EpochTimeline":
        return EpochTimeline(subject_id, self.read(subject_id, "epoch_start_s"), self.read(subject_id, "stage"))

    def class_counts(self, subjects: Iterable[str]) -> np.ndarray:
        """Scored epochs per stage (4,) over the subjects."""
        counts = np.zeros(4, np.int64)
        for s in subjects:
            stage = self.read(s, "stage")
            counts += np.bincount(stage[stage >= 0], minlength=4)[:4]
        return counts

    def fit_scaler(self, subjects: Iterable[str]) -> FeatureScaler:
        return FeatureScaler.fit(self.read(s, "features") for s in subjects)


def build_feature_store(data_dir: str | Path, subjects: list[str] | None = None, *, causal: bool,
                        features: tuple[str, ...] = DEFAULT_FEATURES, cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                        strict: bool = False, progress: bool = False) -> FeatureStore:
    """The cohort's features in a memory-mapped FeatureStore, built once per input and reused.

    Key: every subject's source files (size, mtime), causal, the feature list and the cache and
    store versions; a changed file builds a new store. Nights are read one at a time (through the
    per-subject cache) and never held together. A bad subject is skipped with a DataWarning,
    repeated on every load of the store, unless strict. With cache_dir None the store lives in a
    temporary folder removed when the store is garbage-collected; the same happens, with a
    warning, when the cache folder cannot be written.
    """
    data_dir = Path(data_dir)
    require_folder(data_dir)
    subjects = find_subjects(data_dir) if subjects is None else list(subjects)
    # each night's cache key (its files' sizes and mtimes), then what turns nights into the store
    key = [cache_path(Path(), data_dir, s, subject_files(data_dir, s)).name for s in subjects]
    key += [str(STORE_VERSION), str(FEATURES_VERSION), str(causal), ",".join(features)]
    digest = hashlib.sha256("|".join(key).encode()).hexdigest()[:24]
    store, night_cache = None, cache_dir
    if cache_dir is not None:
        store_path = Path(cache_dir) / f"store-{digest}"
        if (store_path / "index.json").exists():
            try:
                store = FeatureStore(store_path)
            except (DataError, OSError, ValueError, KeyError, TypeError, AttributeError):  # damaged: rebuild
                shutil.rmtree(store_path, ignore_errors=True)
    if store is None:
        skipped: dict[str, str] = {}

        def nights():
            iterator = subjects
            if progress:
                from tqdm import tqdm
                iterator = tqdm(subjects, desc="building feature store", unit="subject", leave=False)
            for subject_id in iterator:
                try:
                    night = load_night(data_dir, subject_id, night_cache)
                except DataError as exc:
                    if strict:
                        raise
                    skipped[subject_id] = str(exc)
                    continue
                yield subject_id, night_features(night, causal, features), night.stage, night.epoch_start_s

        store = None
        if cache_dir is not None:
            try:
                store = FeatureStore.write(store_path, nights(), features, causal, skipped)
            except OSError as exc:  # read-only or full cache folder: build a temporary store instead
                warnings.warn(f"cannot write the feature store in {cache_dir} ({exc}); using a temporary one",
                              DataWarning, stacklevel=2)
                skipped.clear()
        if store is None:
            folder = Path(tempfile.mkdtemp(prefix="sleep-staging-store-"))
            try:
                store = FeatureStore.write(folder / "store", nights(), features, causal, skipped)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            weakref.finalize(store, shutil.rmtree, folder, True)  # the folder goes when the store does
    if strict and store.skipped:
        raise DataError(next(iter(store.skipped.values())))
    for subject_id, message in store.skipped.items():
        warnings.warn(f"skipping subject {subject_id}: {message}", DataWarning, stacklevel=2)
    return store
