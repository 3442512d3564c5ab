"""Common corruptions (`evaluate --corrupt`, benchmarks/robustness.py)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from formats import make_split, python_archive
from test_cli import ROOT, assert_one_line_error, here

from cifarcnn.corrupt import CORRUPTIONS, SEVERITIES, corrupt, parse
from cifarcnn.errors import CifarError


def smooth_images(n: int = 16) -> np.ndarray:
    """Photo-like images: smooth colour gradients with a bright square, then a little
    noise (pure noise would make blur and pixelation undo the noise, not the image)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.2, 0.8, 3)
        img = np.stack([a * xx + (1 - a) * yy, b * yy, c * (1 - xx)], axis=-1) * 200
        i, j = rng.integers(4, 20, 2)
        img[i:i + 8, j:j + 8] += 50
        out.append(img + rng.normal(0, 4, img.shape))
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_grows_with_its_severity_and_repeats_for_a_seed(name):
    x = smooth_images()
    out = [corrupt(x, name, s) for s in range(1, SEVERITIES + 1)]
    assert all(o.shape == x.shape and o.dtype == np.uint8 for o in out)
    change = [np.abs(o.astype(float) - x).mean() for o in out]
    assert change[0] > 0 and all(a <= b for a, b in itertools.pairwise(change)), change
    np.testing.assert_array_equal(corrupt(x, name, 3), out[2])  # deterministic for a seed
    if name == "gaussian_noise":
        assert not np.array_equal(corrupt(x, name, 3, seed=1), out[2])


def test_what_the_corruptions_keep():
    flat = np.full((2, 32, 32, 3), 100, dtype=np.uint8)
    np.testing.assert_array_equal(corrupt(flat, "gaussian_blur", 5), flat)  # a unit kernel
    x = smooth_images(4)
    low = corrupt(x, "contrast", 5).astype(float)
    assert np.allclose(low.mean(axis=(1, 2, 3)), x.astype(float).mean(axis=(1, 2, 3)), atol=1)
    assert low.std() < 0.3 * x.std()
    assert (corrupt(x, "brightness", 5) >= x).all()
    blocks = corrupt(x, "pixelate", 5)  # 21 of 32 pixels a side: repeated pixels
    assert len(np.unique(blocks[0].reshape(-1, 3), axis=0)) <= 21 * 21


def test_parse_names_and_severities():
    assert parse("jpeg:5") == ("jpeg", 5) and parse("contrast") == ("contrast", 3)
    for bad, needle in (("snow:2", "unknown corruption"), ("jpeg:0", r"1 \(mild\)"),
                        ("jpeg:x", "from 1"), ("jpeg:6", "from 1")):
        with pytest.raises(CifarError, match=needle):
            parse(bad)


def test_evaluate_corrupt_and_the_benchmark(tmp_path, capsys):
    assert_one_line_error(here(capsys, "evaluate", "--corrupt", "snow:2", "--data",
                               tmp_path / "none"), "unknown corruption")  # before any data
    arc = python_archive(tmp_path / "cifar-10-python.tar.gz", *make_split(60))
    r = here(capsys, "evaluate", "--weights", "paper-cnn", "--data", arc, "--corrupt",
             "gaussian_blur:2", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["corruption"] == {"name": "gaussian_blur", "severity": 2} and got["n"] == 60
    import cifarcnn
    from cifarcnn.datasets import load_cifar10

    data = load_cifar10(arc)
    want = cifarcnn.load("paper-cnn").evaluate(corrupt(data.test_images, "gaussian_blur", 2),
                                               data.test_labels)
    assert got["correct"] == want["correct"]
    text = here(capsys, "evaluate", "--weights", "paper-cnn", "--data", arc, "--corrupt",
                "jpeg:1").stdout
    assert "under jpeg, severity 1 of 5" in text and "recorded at training" not in text
    bench = ROOT / "benchmarks" / "robustness.py"
    r = subprocess.run([sys.executable, str(bench), "--data", str(arc), "--weights",
                        "paper-cnn", "--severities", "1", "5", "--corruptions", "contrast",
                        "--images", "60"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ")]
    assert [(row[0].strip(), row[1].strip()) for row in rows[1:]] == [
        ("clean", ""), ("contrast", "1"), ("contrast", "5"), ("mean, corrupted", "")]
    clean = cifarcnn.load("paper-cnn").predict(data.test_images).argmax(1)
    assert rows[1][2].strip() == f"{np.mean(clean == data.test_labels):.2%}"
    r = subprocess.run([sys.executable, str(bench), "--severities", "7"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "severities are 1 to 5" in r.stderr
    assert "Traceback" not in r.stderr
