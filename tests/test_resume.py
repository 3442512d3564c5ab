"""Issue 6: exact resume, atomic checkpoints, signals, NaN stops, safe loading."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from formats import make_split, python_archive
from safetensors.torch import load_file
from test_train import tiny_data

from cifarcnn import checkpoint
from cifarcnn import train as train_mod
from cifarcnn.config import TrainConfig
from cifarcnn.errors import CifarError
from cifarcnn.train import resume, train

# 2,000 training images in batches of 50: 120 steps over 3 epochs, long enough to kill
# mid-epoch, short enough for a test. Threads are pinned so both runs do the same arithmetic.
TRAIN_ARGS = ["--model", "paper-cnn", "--epochs", "3", "--batch-size", "50", "--lr", "0.03",
              "--checkpoint-every", "7", "--seed", "5"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    train_batches, test = make_split(n_per_batch=400, seed=3)
    return python_archive(tmp_path_factory.mktemp("data") / "cifar-10-python.tar.gz",
                          train_batches, test)


def _cli(args, env_home: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "CIFARCNN_HOME": str(env_home), "OMP_NUM_THREADS": "2",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cifarcnn", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "weights.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference_run(archive, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end up identical to."""
    home = tmp_path_factory.mktemp("home")
    run = tmp_path_factory.mktemp("ref") / "run"
    p = _cli([*TRAIN_ARGS, "--data", str(archive), "--out", str(run)], home)
    _out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return run


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (run / checkpoint.LAST).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)


def test_kill_9_mid_run_then_resume_gives_identical_weights(archive, reference_run, tmp_path):
    run = tmp_path / "run"
    p = _cli([*TRAIN_ARGS, "--data", str(archive), "--out", str(run)], tmp_path / "home")
    _wait_for_checkpoint(p, run)
    time.sleep(random.uniform(0.0, 0.6))  # a random instant: maybe mid-step, maybe mid-write
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert not (run / "summary.json").exists(), "the run ended before the kill; lengthen it"
    state = checkpoint.load(run / checkpoint.LAST)  # never torn, whatever the instant
    assert 0 < state["epoch"] * 40 + state["step"] < 120
    r = _cli(["--resume", str(run), "--data", str(archive)], tmp_path / "home")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    assert "resuming from" in out
    assert _same(_weights(run), _weights(reference_run))
    ref_rows = (reference_run / "metrics.jsonl").read_text().splitlines()
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len(ref_rows) == 3


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_exits_then_resumes_exactly(archive, reference_run, tmp_path,
                                                           sig, code):
    run = tmp_path / "run"
    p = _cli([*TRAIN_ARGS, "--data", str(archive), "--out", str(run)], tmp_path / "home")
    _wait_for_checkpoint(p, run)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    last = err.strip().splitlines()[-1]  # the lines before it are the data loader's
    assert last.startswith(f"cifarcnn train: {sig.name}: stopped at epoch")
    assert last.endswith(f"cifarcnn train --resume {run}") and "Traceback" not in err
    r = _cli(["--resume", str(run)], tmp_path / "home")  # data location from the run's config
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    assert _same(_weights(run), _weights(reference_run))


def test_resume_in_process_from_every_epoch_end_is_exact(tmp_path):
    # with training noise (seeded per step), which must repeat too, and does change the run
    data = tiny_data(200, 50)
    cfg = dict(epochs=3, batch_size=32, seed=1, checkpoint_every=2, noise=0.1)
    train(TrainConfig(**cfg, out=str(tmp_path / "ref")), data=data, quiet=True)
    train(TrainConfig(**{**cfg, "noise": 0.0}, out=str(tmp_path / "clean")), data=data,
          quiet=True)
    assert not _same(_weights(tmp_path / "clean"), _weights(tmp_path / "ref"))
    run = tmp_path / "cut"
    real_save = checkpoint.save
    calls = {"n": 0}

    def save_then_die(path, state):  # dies right after the 5th checkpoint: mid-epoch 2
        real_save(path, state)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    mp = pytest.MonkeyPatch()
    mp.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg, out=str(run)), data=data, quiet=True)
    mp.undo()
    s = resume(run, data=data, quiet=True)
    assert s["resumed"] is True
    assert _same(_weights(run), _weights(tmp_path / "ref"))
    assert (run / checkpoint.BEST).is_file()
    again = resume(run, data=data, quiet=True)  # a finished run: nothing to do
    assert again == s


@pytest.mark.parametrize("flip", ["alternate", "alternate-seen"])
def test_fast_recipe_resumes_exactly_after_its_whitening_bias_froze(tmp_path, flip):
    # fast's recipe changes course mid-run: whole images shrunk to 16x16 in epoch 1, 24x24
    # crops in epochs 2-3, then whole images,
    # the whitening bias stops training after epoch 3, and from epoch 4 each epoch trains
    # on the 140 of 200 images with the highest remembered loss (3 steps), and Lookahead
    # keeps slow weights (and with alternate-seen, each image's mirroring follows how often
    # it was trained on); a resume in epoch 4 must rebuild all of that from the checkpoint
    # and the config alone.
    data = tiny_data(200, 50)
    cfg = dict(model="fast", model_kwargs={"widths": [8, 16, 16]}, epochs=5, batch_size=50,
               precision="fp32", checkpoint_every=2, lookahead=3, flip=flip)
    train(TrainConfig(**cfg, out=str(tmp_path / "ref")), data=data, quiet=True)
    run = tmp_path / "cut"
    train_killed_inside_epoch(TrainConfig(**cfg, out=str(run)), data, epoch=3)
    assert resume(run, data=data, quiet=True)["resumed"] is True
    assert _same(_weights(run), _weights(tmp_path / "ref"))


def train_killed_inside_epoch(cfg: TrainConfig, data, epoch: int) -> None:
    """Train until the first mid-epoch checkpoint of `epoch` (from 0) is written, then die."""
    real_save = checkpoint.save

    def save_then_die(path, state):
        real_save(path, state)
        if state["epoch"] == epoch and state["step"] > 0:
            raise KeyboardInterrupt

    mp = pytest.MonkeyPatch()
    mp.setattr(checkpoint, "save", save_then_die)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, data=data, quiet=True)
    finally:
        mp.undo()


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_ce = torch.nn.functional.cross_entropy

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real_ce(*a, **k)
        return loss * float("nan") if calls["n"] >= 11 else loss

    monkeypatch.setattr(train_mod, "F", types.SimpleNamespace(cross_entropy=poisoned))
    run = tmp_path / "r"
    # 200 images / batch 50 = 4 steps an epoch: step 11 is in epoch 3
    with pytest.raises(CifarError, match=r"nan at step 11 \(epoch 3, batch 3\).*last good"):
        train(TrainConfig(epochs=5, batch_size=50, out=str(run)), data=tiny_data(), quiet=True)
    state = checkpoint.load(run / checkpoint.LAST)
    assert (state["epoch"], state["step"]) == (2, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run / "weights.safetensors").exists()


def test_outputs_past_every_range_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path,
                                                                                 monkeypatch):
    """A loss can stay finite while the weights grow until the validation outputs overflow
    (`--limit-train 5` at paper-cnn's rate did, and evaluation crashed in its calibration
    bins): the epoch's evaluation stops the run with one line instead."""
    real_eval = train_mod.evaluate_arrays
    calls = {"n": 0}

    def overflowing(net, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                list(net.parameters())[-1].fill_(float("inf"))  # the head's bias
        return real_eval(net, *a, **k)

    monkeypatch.setattr(train_mod, "evaluate_arrays", overflowing)
    run = tmp_path / "r"
    with pytest.raises(CifarError, match=r"after epoch 3, the model's outputs are NaN or "
                                         r"infinite for 100 of the 100 images.*last good"):
        train(TrainConfig(epochs=5, batch_size=50, precision="fp32", out=str(run)),
              data=tiny_data(), quiet=True)
    assert checkpoint.load(run / checkpoint.LAST)["epoch"] == 2
    assert not (run / "weights.safetensors").exists()


@pytest.mark.parametrize("where, code", [("fsync", errno.ENOSPC), ("open", errno.EACCES),
                                         ("replace", errno.EIO)])
def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, where, code):
    target = tmp_path / checkpoint.LAST
    checkpoint.write_atomic(target, b"old checkpoint")
    real_open = open

    def fail(*args, **kwargs):
        if where == "open" and not str(args[0]).endswith(".tmp"):
            return real_open(*args, **kwargs)
        raise OSError(code, os.strerror(code))

    if where == "open":
        monkeypatch.setattr(checkpoint, "open", fail, raising=False)
    else:
        monkeypatch.setattr(checkpoint.os, where, fail)
    with pytest.raises(CifarError, match=f"{os.strerror(code)}.*previous one is intact"):
        checkpoint.write_atomic(target, b"new checkpoint, never completed")
    assert target.read_bytes() == b"old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.LAST]  # no temp file left


def test_failed_write_during_training_is_a_clear_error(tmp_path, monkeypatch):
    real_write = checkpoint.write_atomic
    calls = {"n": 0}

    def fails_on_second_checkpoint(path, payload):
        if path.name == checkpoint.LAST:
            calls["n"] += 1
            if calls["n"] == 2:
                raise CifarError(f"cannot write checkpoint {path}: No space left on device")
        real_write(path, payload)

    monkeypatch.setattr(checkpoint, "write_atomic", fails_on_second_checkpoint)
    run = tmp_path / "r"
    with pytest.raises(CifarError, match="No space left"):
        train(TrainConfig(epochs=3, batch_size=64, out=str(run)), data=tiny_data(), quiet=True)
    assert checkpoint.load(run / checkpoint.LAST)["epoch"] == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores folder permissions")
def test_read_only_folder_is_a_clear_error_and_keeps_the_file(tmp_path):
    target = tmp_path / checkpoint.LAST
    checkpoint.write_atomic(target, b"old")
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(CifarError, match=r"Permission denied.*intact"):
            checkpoint.write_atomic(target, b"new")
    finally:
        tmp_path.chmod(0o755)
    assert target.read_bytes() == b"old"


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_checkpoint_crafted_to_run_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = marker
    path = tmp_path / checkpoint.LAST
    if how == "pickle":
        path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "model": evil}))
    else:
        torch.save({"format": checkpoint.FORMAT, "model": evil}, path)
    with pytest.raises(CifarError, match="refused"):
        checkpoint.load(path)
    assert not marker.exists()


def test_resume_of_a_crafted_checkpoint_from_the_cli(tmp_path):
    run = tmp_path / "r"
    train(TrainConfig(epochs=1, batch_size=64, out=str(run)), data=tiny_data(), quiet=True)
    (run / "summary.json").unlink()
    evil = _RunsCode()
    evil.marker = tmp_path / "pwned"
    (run / checkpoint.LAST).write_bytes(pickle.dumps(evil))
    r = subprocess.run([sys.executable, "-m", "cifarcnn", "train", "--resume", str(run)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "refused" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not evil.marker.exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(CifarError, match="not a run directory"):
        resume(tmp_path, quiet=True)


@pytest.mark.parametrize(("name", "text", "says"), [
    ("config.json", "{", "config.json: unreadable"),
    ("config.json", "[]", "config.json: not a JSON object"),
    ("config.json", '{"model": "paper-cnn", "epochs": "abc"}', "saved config's 'epochs' is 'abc'"),
    ("config.json", '{"model": 5}', "saved config's 'model' is 5"),
    ("config.json", '{"model_kwargs": [1]}', "saved config's 'model_kwargs' is [1]"),
    ("config.json", '{"lr": true}', "saved config's 'lr' is True"),
    ("config.json", '{"lr": "fast"}', "saved config's 'lr' is 'fast'"),
    ("summary.json", "{", "summary.json: unreadable"),
    ("summary.json", "[1]", "summary.json: not a JSON object")])
def test_resume_of_a_damaged_run_folder_is_one_line(tmp_path, capsys, name, text, says):
    """Each of these raised a JSONDecodeError, TypeError, AttributeError or KeyError."""
    from cifarcnn.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": "paper-cnn", "epochs": 1}')
    (run / "metrics.jsonl").write_text("")
    (run / name).write_text(text)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "--data", str(tmp_path / "none")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "damaged" in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing changed


def test_resume_refuses_flags_that_would_change_the_run(tmp_path, capsys):
    """`--resume RUN --epochs 40` used to run RUN's own settings and ignore --epochs."""
    from cifarcnn.cli import main

    run = tmp_path / "run"
    train(TrainConfig(epochs=1, batch_size=50, out=str(run)), data=tiny_data(), quiet=True)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "--epochs", "40", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "which --epochs, --lr would change; leave them out" in err[0]
    assert f"--init-from {run}" in err[0]  # finished: train on from its weights
    (run / "weights.safetensors").unlink()
    assert main(["train", "--resume", str(run), "--seed=3"]) == 2
    err = capsys.readouterr().err
    assert "which --seed would change; leave it out" in err and "--init-from" not in err
    del before["weights.safetensors"]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_deterministic_runs_repeat_exactly(tmp_path):
    for name in ("a", "b"):
        train(TrainConfig(epochs=2, batch_size=32, seed=7, deterministic=True,
                          out=str(tmp_path / name)), data=tiny_data(), quiet=True)
    torch.use_deterministic_algorithms(False)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    import numpy as np

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    checkpoint.save(tmp_path / "c.pt", {"rng": checkpoint.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_resume_of_a_run_recorded_before_a_setting_existed_trains_as_it_did(tmp_path):
    # fast's recipe now selects and shrinks its first epoch; a run recorded before
    # selection, Lookahead and shrinking existed must resume without them, not pick them
    # up from today's recipe
    data = tiny_data(200, 50)
    train(TrainConfig(model="fast", model_kwargs={"widths": [8, 16, 16]}, epochs=5,
                      batch_size=50, precision="fp32", select_fraction=1.0, lookahead=0,
                      downscale=0, low_res_epochs=3, out=str(tmp_path / "ref")),
          data=data, quiet=True)
    saved = json.loads((tmp_path / "ref" / "config.json").read_text())
    for key in ("select_fraction", "select_from_epoch", "lookahead", "lookahead_decay",
                "downscale", "downscale_epochs"):
        del saved[key]
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**saved, "out": str(run)}))
    s = resume(run, data=data, quiet=True)
    assert s["images_trained_on"] == 5 * 200
    assert _same(_weights(run), _weights(tmp_path / "ref"))
