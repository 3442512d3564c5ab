"""Temperature scaling (`cifarcnn calibrate`): the fit, where it is stored, who applies it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from formats import python_archive
from test_cli import assert_one_line_error, here

import cifarcnn
from cifarcnn.calibrate import calibrate, fit_temperature
from cifarcnn.datasets import CLASSES, CifarData


def test_the_fit_recovers_the_temperature_the_labels_were_drawn_at():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=g) * 3
    for t in (0.5, 2.0):
        labels = torch.multinomial(torch.softmax(logits / t, 1), 1, generator=g).squeeze(1)
        assert fit_temperature(logits, labels) == pytest.approx(t, rel=0.05)


def labelled_by(clf, n: int, t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random images labelled by drawing from the classifier's own probabilities at
    temperature t: the temperature that fits them is t."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    p = torch.softmax(clf.logits(x).float() / t, 1)
    y = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
    return x, y.numpy()


def test_calibrate_fits_the_models_own_logits_and_scales_with_them():
    clf = cifarcnn.load("paper-cnn", device="cpu")
    x, y = labelled_by(clf, 4000, 2.0)
    data = CifarData(x[:100], y[:100], x, y, list(CLASSES), "drawn")
    fit = calibrate(clf, data, "test", images=4000)
    assert fit["temperature"] == pytest.approx(2.0, rel=0.15) == clf.temperature
    assert fit["nll_after"] <= fit["nll_before"] and fit["split"] == "test"
    # logits three times larger (the head scaled: TTA averages linearly) need a T three
    # times larger
    head = [m for m in clf.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight *= 3
        head.bias *= 3
    assert calibrate(clf, data, "test", images=4000)["temperature"] == pytest.approx(
        3 * fit["temperature"], rel=1e-3)


def test_calibrate_from_the_cli_stores_the_temperature_that_everything_applies(tmp_path, capsys):
    from safetensors.torch import load_file

    clf = cifarcnn.load("paper-cnn", device="cpu")
    x, y = labelled_by(clf, 1200, 0.5, seed=1)
    train = [(x[i:i + 40], y[i:i + 40]) for i in range(0, 200, 40)]
    arc = python_archive(tmp_path / "cifar-10-python.tar.gz", train, (x, y))
    shipped = clf.path
    # shipped weights are not changed in place; exports and bad counts are refused
    assert_one_line_error(here(capsys, "calibrate", "--weights", "paper-cnn", "--data", arc),
                          "shipped", "--out")
    assert_one_line_error(here(capsys, "calibrate", "--weights", "paper-cnn", "--data", arc,
                               "--images", "5", "--out", tmp_path / "c.safetensors"),
                          "--images 5")
    out = tmp_path / "c.safetensors"
    r = here(capsys, "calibrate", "--weights", "paper-cnn", "--data", arc, "--out", out,
             "--json")
    assert r.returncode == 0, r.stderr
    fit = json.loads(r.stdout)
    # split val: these weights had no --holdout, so their validation images are the tests
    assert fit["split"] == "test" and fit["images"] == 1200 and fit["ece_after"] < fit[
        "ece_before"]
    assert fit["temperature"] == pytest.approx(0.5, rel=0.2)
    a, b = load_file(str(shipped)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tensors as they were
    cal = cifarcnn.load(out, device="cpu")
    assert cal.temperature == fit["temperature"] and cal.meta["temperature_fit"]["images"] == 1200
    probs = cal.predict(x[:50])
    np.testing.assert_allclose(probs, torch.softmax(clf.logits(x[:50]) / cal.temperature, 1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(probs.argmax(1), clf.predict(x[:50]).argmax(1))
    # evaluate: the same accuracy, the calibration of the temperature
    before, after = clf.evaluate(x, y), cal.evaluate(x, y)
    assert after["correct"] == before["correct"]
    assert after["calibration"]["ece"] == pytest.approx(fit["ece_after"], abs=1e-6)
    assert f"temperature {fit['temperature']:.4f}" in here(capsys, "info", out).stdout
    # an export carries it inside its graph
    ts = tmp_path / "c.pt"
    assert here(capsys, "export", "--weights", out, "--format", "torchscript", "--out", ts,
                "--no-check").returncode == 0
    # (in fp32, its graph's precision: where bf16 pays, the classifier serves in bf16)
    cal.precision = "fp32"
    np.testing.assert_allclose(cifarcnn.load(ts).predict(x[:50]), cal.predict(x[:50]),
                               atol=1e-5)
    assert_one_line_error(here(capsys, "calibrate", "--weights", ts, "--data", arc),
                          "an export")
    # in place for weights that are not shipped: the file is rewritten, the fit replaced
    r = here(capsys, "calibrate", "--weights", out, "--data", arc, "--split", "train")
    assert r.returncode == 0 and f"wrote {out.resolve()}" in r.stdout
    assert cifarcnn.load(out).meta["temperature_fit"]["split"] == "train"


def test_the_val_split_is_the_runs_own_holdout(tmp_path):
    from test_train import tiny_data

    from cifarcnn.calibrate import split_images
    from cifarcnn.config import TrainConfig
    from cifarcnn.train import train

    data = tiny_data()
    train(TrainConfig(epochs=1, batch_size=64, holdout=50, out=str(tmp_path / "r")),
          data=data, quiet=True)
    clf = cifarcnn.load(tmp_path / "r", device="cpu")
    name, x, y = split_images(clf, data, "val")
    assert name == "held-out training" and len(y) == 50 == clf.meta["holdout"]
    # exactly the images the run validated on: its recorded accuracy, reproduced
    assert np.mean(clf.predict(x).argmax(1) == y) == clf.meta["val_accuracy"]
    assert split_images(cifarcnn.load("paper-cnn"), data, "val")[0] == "test"
