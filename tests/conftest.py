"""Shared test set-up: the repo root on sys.path, small fixtures on the bundled real data."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUNDLED = ROOT / "data" / "sleep-accel"


@pytest.fixture
def cache_dir(tmp_path):
    """A private cache so tests never share or depend on the user's .cache/."""
    return tmp_path / "cache"


def count_forward_last(monkeypatch, model) -> list:
    """The batch size of every model.forward_last call from now on (what predict_windows runs for a
    window's last position), until monkeypatch.undo()."""
    sizes = []
    forward_last = model.forward_last

    def counted(x):
        sizes.append(x.shape[0])
        return forward_last(x)

    monkeypatch.setattr(model, "forward_last", counted)
    return sizes


SMALL_SUBJECTS = ("46343", "3509524", "4018081", "5132496", "9961348", "1360686")


def copy_subjects(source: Path, root: Path, subject_ids) -> Path:
    """A PhysioNet-layout folder at root with the given subjects' files from source."""
    import shutil
    for folder in ("labels", "heart_rate", "counts"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for path in (source / folder).iterdir():
            if path.name.split("_")[0] in subject_ids:
                shutil.copy(path, root / folder / path.name)
    return root


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """Six real bundled subjects (the shortest nights) in a PhysioNet-layout folder of their own."""
    return copy_subjects(BUNDLED, tmp_path_factory.mktemp("small-data"), SMALL_SUBJECTS)
