"""The CUDA path: what the CPU tests check, on a GPU. Skipped where there is none (CI).

Run on a lent GPU by scripts/device_check.sh. Exactness on CUDA needs
--deterministic (cuDNN and cuBLAS otherwise pick kernels whose sums vary
from run to run), so the resume and repeat tests use it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_resume import train_killed_inside_epoch
from test_train import tiny_data

import cifarcnn
from cifarcnn.config import TrainConfig
from cifarcnn.optim import orthogonalize, orthogonalize_stacked
from cifarcnn.train import resume, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# the fast recipe's whole course on a tiny net: 24x24 crops, the whitening bias freezing
# after epoch 3, loss-based selection from epoch 4
FAST = dict(model="fast", model_kwargs={"widths": [8, 16, 16]}, epochs=5, batch_size=50,
            device="cuda", deterministic=True, checkpoint_every=2)


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "weights.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cuda_deterministic_runs_repeat_and_resume_exactly(tmp_path):
    data = tiny_data(200, 50)
    for name in ("a", "b"):
        s = train(TrainConfig(**FAST, out=str(tmp_path / name)), data=data, quiet=True)
    assert s["device"] == "cuda" and s["precision"] in ("bf16", "fp16")
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))

    # killed inside epoch 4, a selected epoch
    train_killed_inside_epoch(TrainConfig(**FAST, out=str(tmp_path / "cut")), data, epoch=3)
    assert resume(tmp_path / "cut", data=data, quiet=True)["resumed"] is True
    assert _same(_weights(tmp_path / "cut"), _weights(tmp_path / "a"))
    torch.use_deterministic_algorithms(False)


def test_cuda_stacked_orthogonalize_matches_the_per_matrix_one():
    # MuonSGD batches the filter banks' Newton-Schulz iterations on CUDA only
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(s, generator=gen).cuda() for s in [(48, 216), (192, 1728), (300, 40)]]
    for g, stacked in zip(gs, orthogonalize_stacked(gs), strict=True):
        assert stacked.is_cuda and stacked.shape == g.shape
        torch.testing.assert_close(stacked, orthogonalize(g), atol=1e-2, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_weights_round_trip_on_gpu_and_cpu(tmp_path, precision):
    data = tiny_data(300, 200)
    s = train(TrainConfig(model="paper-cnn", epochs=2, batch_size=64, device="cuda",
                          precision=precision, out=str(tmp_path / "r")), data=data, quiet=True)
    assert s["precision"] == precision and np.isfinite(s["val_accuracy"])
    gpu = cifarcnn.load(tmp_path / "r", device="cuda")
    assert gpu.evaluate(data.test_images, data.test_labels)["correct"] == s["val_correct"]
    cpu = cifarcnn.load(tmp_path / "r", device="cpu")  # fp16-trained weights serve on CPU too
    p_gpu, p_cpu = gpu.predict(data.test_images), cpu.predict(data.test_images)
    assert p_cpu.shape == (200, 10)
    assert (p_gpu.argmax(1) == p_cpu.argmax(1)).mean() > 0.9


def test_cuda_compile_mode_trains(tmp_path):
    data = tiny_data(200, 50)
    s = train(TrainConfig(**{**FAST, "deterministic": False, "epochs": 4}, mode="compile",
                          out=str(tmp_path / "r")), data=data, quiet=True)
    assert s["mode"] == "compile" and s["setup_seconds"] > 0 and np.isfinite(s["val_accuracy"])


@pytest.mark.parametrize("model", ["paper-cnn", "fast"])
def test_shipped_weights_on_cuda_match_their_cpu_record(real_data, model):
    from cifarcnn.weights import SHIPPED

    record = json.loads((SHIPPED / f"{model}.json").read_text())
    probs = cifarcnn.load(model, device="cuda").predict(real_data.test_images)
    correct = int((probs.argmax(1) == real_data.test_labels).sum())
    # other kernels, other roundings: a handful of the 10,000 answers may flip
    assert abs(correct - record["val_correct"]) <= 20, (correct, record["val_correct"])


def test_cuda_script_mode_trains_in_fp32(tmp_path):
    s = train(TrainConfig(model="paper-cnn", epochs=1, batch_size=64, device="cuda",
                          mode="script", out=str(tmp_path / "r")), data=tiny_data(200, 50),
              quiet=True)
    assert s["mode"] == "script" and s["precision"] == "fp32"
