"""`cifarcnn lr-find`: the learning-rate range test."""

import json
import math

import numpy as np
import pytest
from test_cli import assert_one_line_error, here
from test_train import tiny_data

from cifarcnn.config import TrainConfig
from cifarcnn.lrfind import lowest_rate, lr_range_test, set_by_lr


def test_the_rate_grows_geometrically_and_the_loss_is_recorded_each_step():
    cfg = TrainConfig(model="paper-cnn", batch_size=32, lr=0.05)
    r = lr_range_test(cfg, data=tiny_data(256, 10), steps=30, start=1e-3, end=10.0)
    lrs = np.array([p["lr"] for p in r["points"]])
    assert r["steps"] == len(lrs) == 30 and r["diverged_lr"] is None
    assert math.isclose(lrs[0], 0.05e-3) and math.isclose(lrs[-1], 0.5)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (1e4) ** (1 / 29))
    assert all(math.isfinite(p["loss"]) for p in r["points"])
    assert r["lowest_lr"] in lrs[3:]  # the first tenth (3 steps) is passed over
    assert (r["model"], r["optimizer"], r["batch_size"], r["recipe_lr"]) == (
        "paper-cnn", "sgd", 32, 0.05)


def test_a_rate_far_too_large_stops_the_test_where_the_loss_blows_up():
    cfg = TrainConfig(model="paper-cnn", batch_size=32, lr=0.05)
    r = lr_range_test(cfg, data=tiny_data(256, 10), steps=40, start=1e-2, end=1e6)
    assert r["diverged_lr"] is not None and r["steps"] < 40
    assert r["lowest_lr"] < r["diverged_lr"] == r["points"][-1]["lr"]


def test_the_lowest_rate_skips_the_start_and_needs_a_few_points():
    points = [{"lr": 10.0 ** i, "smoothed": s} for i, s in
              enumerate([0.1, 5, 4, 3, 2, 2.5, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9])]
    assert lowest_rate(points) == 1e4  # not the settling start's 0.1 at 1e0
    assert lowest_rate(points[:4]) is None


def test_the_cli_prints_the_rate_writes_json_and_a_chart_and_refuses_bad_ranges(tmp_path,
                                                                                capsys):
    from formats import make_split, python_archive

    arc = python_archive(tmp_path / "cifar-10-python.tar.gz", *make_split(60))
    r = here(capsys, "lr-find", "--data", arc, "--batch-size", "50", "--steps", "20",
             "--json", tmp_path / "lr.json", "--plot", tmp_path / "lr.png")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "lr.json").read_text())
    assert len(saved["points"]) == 20 and saved["recipe_lr"] > 0
    assert f"the loss was lowest at --lr {saved['lowest_lr']:.3g}" in r.stdout
    pytest.importorskip("matplotlib")
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for args, needle in ((["--steps", "3"], "--steps 3: give at least 10"),
                         (["--start", "1", "--end", "0.5"], "0 < start < end"),
                         (["--end", "nan"], "0 < start < end"),
                         (["--json", tmp_path / "no" / "x.json"], "does not exist")):
        assert_one_line_error(here(capsys, "lr-find", "--data", arc, *args), needle)


def test_only_the_groups_lr_sets_grow():
    """fast's whitening bias, BatchNorm biases and head keep per-image SGD rates of their
    own, as `train --lr` leaves them: only its Muon filters' rate is --lr's. paper-cnn's
    SGD groups all take --lr."""
    from cifarcnn.models import build_model
    from cifarcnn.train import make_optimizer

    for name, kwargs, want in (("fast", {"widths": [8, 16, 16]}, [True, False, False, False]),
                               ("paper-cnn", {}, [True, True])):
        cfg = TrainConfig(model=name, model_kwargs=kwargs).resolved()
        model = build_model(name, **kwargs)
        opt = make_optimizer(model, cfg, cfg.batch_size)
        assert set_by_lr(model, cfg, opt) == want, name
