"""Issue 7: DDP through torchrun (CPU, gloo, 2 processes on a small slice)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from formats import make_split, python_archive
from safetensors.torch import load_file

from cifarcnn import distributed
from cifarcnn.distributed import World

ARGS = ["--model", "paper-cnn", "--epochs", "2", "--lr", "0.03", "--seed", "2"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    train_batches, test = make_split(n_per_batch=130, seed=4)  # 650 train, 130 test
    return python_archive(tmp_path_factory.mktemp("data") / "cifar-10-python.tar.gz",
                          train_batches, test)


def _torchrun(nproc: int, args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CIFARCNN_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "cifarcnn", "train", *args],
                          env=env, capture_output=True, text=True, timeout=300)


def _plain(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CIFARCNN_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cifarcnn", "train", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("n, bs, world", [(650, 32, 2), (650, 32, 3), (100, 7, 4), (9, 4, 2)])
def test_shards_are_disjoint_and_cover_the_epoch(n, bs, world):
    steps = distributed.global_steps(n, bs, World(0, world))
    seen: list[int] = []
    for s in range(steps):
        pieces = [distributed.shard(s * bs * world, min(n, (s + 1) * bs * world), World(r, world))
                  for r in range(world)]
        assert all(p.stop > p.start for p in pieces), "a rank got an empty batch"
        assert max(p.stop - p.start for p in pieces) - min(p.stop - p.start for p in pieces) <= 1
        for p in pieces:
            seen.extend(range(p.start, p.stop))
    assert len(seen) == len(set(seen))  # no position twice
    assert n - len(seen) < world and seen == list(range(len(seen)))  # remainder < world, at end


def test_two_processes_train_and_only_rank_0_writes(archive, tmp_path):
    out = tmp_path / "runs"
    r = _torchrun(2, [*ARGS, "--batch-size", "32", "--data", str(archive),
                      "--out", str(out / "ddp")], tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["ddp"]  # no second run directory
    files = sorted(p.name for p in (out / "ddp").iterdir())
    assert files == ["ckpt-best.pt", "ckpt-last.pt", "config.json", "metrics.jsonl",
                     "summary.json", "weights.safetensors"]
    assert r.stdout.count("done: val accuracy") == 1  # rank 1 prints nothing
    summary = json.loads((out / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch_size"] == 64
    rows = (out / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2


def test_ddp_world_size_1_equals_plain_training(archive, tmp_path):
    common = [*ARGS, "--batch-size", "64", "--data", str(archive)]
    a = _torchrun(1, [*common, "--out", str(tmp_path / "ddp1")], tmp_path / "home")
    assert a.returncode == 0, a.stderr[-3000:]
    b = _plain([*common, "--out", str(tmp_path / "plain")], tmp_path / "home")
    assert b.returncode == 0, b.stderr[-3000:]
    wa = load_file(tmp_path / "ddp1" / "weights.safetensors")
    wb = load_file(tmp_path / "plain" / "weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


EVAL_SCRIPT = r"""
import json, os, sys, torch
from cifarcnn import distributed
from cifarcnn.inference import evaluate_arrays, load
world = distributed.setup("cpu")
clf = load(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (2300, 32, 32, 3), dtype=torch.uint8, generator=g)
y = torch.randint(0, 10, (2300,), generator=g)
r = evaluate_arrays(clf.model, x, y, device="cpu", precision=clf.precision, batch_size=500,
                    channels_last=True, tta="flip", world=world)
# one file per rank: two ranks printing at once may interleave their lines
with open(f"{sys.argv[2]}-{world.size}-{world.rank}.json", "w") as f:
    json.dump({"rank": world.rank, **r}, f)
distributed.teardown()
"""


def test_evaluation_under_ddp_equals_single_process(archive, tmp_path):
    r = _plain([*ARGS, "--batch-size", "64", "--epochs", "1", "--data", str(archive),
                "--out", str(tmp_path / "run")], tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    script = tmp_path / "eval_ddp.py"
    script.write_text(EVAL_SCRIPT)
    env = {**os.environ, "CIFARCNN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    results = []
    for nproc in (1, 2):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={nproc}", str(script), str(tmp_path / "run"),
                            str(tmp_path / "eval")],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        results.append([json.loads((tmp_path / f"eval-{nproc}-{r}.json").read_text())
                        for r in range(nproc)])
    single, (r0, r1) = results[0][0], sorted(results[1], key=lambda d: d["rank"])
    for r in (r0, r1):  # both ranks report exactly what one process reports
        assert r["correct"] == single["correct"] and r["n"] == 2300
        assert r["accuracy_no_tta"] == single["accuracy_no_tta"]
        assert r["confusion"] == single["confusion"]
        assert [b["images"] for b in r["calibration"]["bins"]] == [
            b["images"] for b in single["calibration"]["bins"]]
        assert abs(r["calibration"]["ece"] - single["calibration"]["ece"]) < 1e-6
        assert abs(r["loss"] - single["loss"]) < 1e-6


def test_distributed_run_resumes_to_identical_weights(archive, tmp_path):
    # with loss-based selection in epochs 2 and 3: the ranks share their losses each epoch
    # and must agree on the chosen images, after a resume too
    common = [*ARGS, "--epochs", "3", "--batch-size", "16", "--checkpoint-every", "5",
              "--select-fraction", "0.5", "--select-from-epoch", "1", "--data", str(archive)]
    ref = _torchrun(2, [*common, "--out", str(tmp_path / "ref")], tmp_path / "home")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "cut"
    env = {**os.environ, "CIFARCNN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "cifarcnn", "train", *common, "--out",
                          str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 120
    while not (run / "ckpt-last.pt").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    p.communicate(timeout=120)
    assert not (run / "summary.json").exists()
    r = _torchrun(2, ["--resume", str(run)], tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(run / "weights.safetensors")
    b = load_file(tmp_path / "ref" / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


FAIL_SCRIPT = r"""
import sys
from cifarcnn import distributed
from cifarcnn.config import TrainConfig
from cifarcnn.train import train
sys.path.insert(0, sys.argv[1])
from test_train import tiny_data
world = distributed.setup("cpu", timeout_s=20)
if world.rank == 1:
    raise SystemExit("rank 1 fails on purpose")
train(TrainConfig(epochs=1, batch_size=32, dist_timeout=20, out=sys.argv[2]),
      data=tiny_data(), quiet=True)
"""


def test_one_failing_rank_stops_the_job_instead_of_hanging(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAIL_SCRIPT)
    env = {**os.environ, "CIFARCNN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), str(Path(__file__).parent),
                        str(tmp_path / "run")], env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode != 0
    assert "rank 1 fails on purpose" in p.stderr
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "run" / "weights.safetensors").exists()


def test_fast_model_with_batchnorm_and_fp32_under_ddp(archive, tmp_path):
    args = ["--model", "fast", "--model-arg", "widths=[8,16,16]", "--epochs", "1",
            "--batch-size", "32", "--precision", "fp32", "--data", str(archive)]
    r = _torchrun(2, [*args, "--sync-bn", "--out", str(tmp_path / "sync")], tmp_path / "home")
    assert r.returncode != 0 and "--sync-bn needs CUDA" in r.stderr  # GPU-only in PyTorch
    r = _torchrun(2, [*args, "--out", str(tmp_path / "run")], tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "fast" and summary["precision"] == "fp32"
    assert summary["processes"] == 2
