"""Shared fixtures: the real data set (skipped, with the reason, where absent) and tiny fakes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REAL_DATA = Path(os.environ.get("CIFAR10_DATA")
                 or Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Each test gets its own cache folder, except the real data set's decode cache."""
    monkeypatch.setenv("CIFARCNN_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="session")
def real_data():
    """The real CIFAR-10 (JPEG copy), decoded once per session into a shared cache."""
    if not REAL_DATA.exists():
        pytest.skip(f"real CIFAR-10 not found at {REAL_DATA} (set CIFAR10_DATA)")
    from cifarcnn.datasets import load_source

    old = os.environ.get("CIFARCNN_HOME")
    os.environ["CIFARCNN_HOME"] = str(Path.home() / ".cache" / "cifarcnn-tests")
    try:
        return load_source(REAL_DATA)
    finally:
        if old is None:
            del os.environ["CIFARCNN_HOME"]
        else:
            os.environ["CIFARCNN_HOME"] = old


def fake_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 images and labels cycling through the 10 classes."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            np.arange(n, dtype=np.int64) % 10)
