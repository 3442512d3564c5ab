"""The package as `pip install` makes it: a wheel must work without this checkout."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_carries_the_shipped_weights_and_finds_them_once_installed(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info into the tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "src", "weights"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name)
    shutil.rmtree(src / "src" / "cifarcnn.egg-info", ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp_path / "dist").glob("cifarcnn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("paper-cnn", "paper-mlp", "fast"):
        assert f"cifarcnn/shipped/{model}.safetensors" in names
        assert f"cifarcnn/shipped/{model}.json" in names  # the record of how it was made
    assert "cifarcnn/native.cpp" in names and "cifarcnn/models/fast.py" in names

    site = tmp_path / "site"
    r = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # run from elsewhere, the installed copy ahead of this checkout's editable install
    code = ("import cifarcnn, numpy as np; from cifarcnn.weights import SHIPPED; "
            "print(cifarcnn.__file__); print(SHIPPED); c = cifarcnn.load('fast'); "
            "print(c.predict(np.zeros((2, 32, 32, 3), np.uint8)).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    file, shipped, shape = r.stdout.split("\n")[:3]
    assert Path(file).is_relative_to(site) and Path(shipped) == site / "cifarcnn" / "shipped"
    assert shape == "(2, 10)"
