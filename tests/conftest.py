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
