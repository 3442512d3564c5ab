"""`cifarcnn bench modes`: the paper's Fig. 2 (time per execution mode), regenerated.

For each available device and each mode: (a) the training time of E epochs
over R runs, best and worst as the paper reports them, with the one-time
compile/trace cost apart; (b) inference of the trained model: images/s at a
large batch and single-image latency p50/p99, both from uint8 images to
probabilities (normalisation included, no TTA). ONNX Runtime is one more
inference row on the CPU when the optional `export` packages are installed.
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import modes
from .config import TrainConfig
from .datasets import MEAN, STD, CifarData, load_cifar10
from .errors import CifarError
from .inference import autocast, input_dtype

PAPER_25_EPOCHS = {"cpu": 2324.0, "cuda": 150.0}  # the paper's eager times, seconds


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def time_inference(fn: Callable[[torch.Tensor], Any], images: torch.Tensor, device: str,
                   batch: int = 1000, latency_runs: int = 300) -> dict[str, float]:
    """Images/s at `batch` (best of 3 passes) and single-image latency p50/p99 in ms."""
    big = images[:batch]
    for _ in range(3):
        fn(big)
        fn(images[:1])
    _sync(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn(big)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    lat = []
    for i in range(latency_runs):
        one = images[i % len(images):i % len(images) + 1]
        t0 = time.perf_counter()
        fn(one)
        _sync(device)
        lat.append(time.perf_counter() - t0)
    return {"images_per_second": len(big) / best,
            "latency_p50_ms": float(np.percentile(lat, 50) * 1e3),
            "latency_p99_ms": float(np.percentile(lat, 99) * 1e3)}


def torch_predictor(net: torch.nn.Module, device: str, precision: str, channels_last: bool,
                    mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NHWC batch -> probabilities through `net` (already in its mode, eval)."""
    mean = torch.tensor(MEAN, device=device) * 255.0
    inv = 1.0 / (torch.tensor(STD, device=device) * 255.0)
    dtype = input_dtype(precision) if mode in ("eager", "compile") else torch.float32

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).to(dtype).sub_(mean).mul_(inv).permute(0, 3, 1, 2)
        if not channels_last:
            x = x.contiguous()
        with autocast(device, precision):
            return torch.softmax(net(x).float(), dim=1)

    return run


def bench_modes(model: str = "paper-cnn", epochs: int = 25, runs: int = 2,
                data: CifarData | None = None, data_path: str | None = None,
                limit_train: int | None = None, devices: list[str] | None = None,
                mode_list: tuple[str, ...] = modes.MODES, out: Path | None = None,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train and time every (device, mode); returns the rows also written to out/."""
    from .inference import load
    from .train import train

    data = data or load_cifar10(data_path, verbose=True)
    devices = devices or available_devices()
    test = torch.from_numpy(data.test_images)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cifarcnn-bench-") as tmp:
        for device in devices:
            last_run = None
            for mode in mode_list:
                times, setups, accs = [], [], []
                for r in range(runs):
                    run = Path(tmp) / f"{device}-{mode}-{r}"
                    s = train(TrainConfig(model=model, epochs=epochs, limit_train=limit_train,
                                          device=device, mode=mode, seed=r, tta="none",
                                          out=str(run)), data=data, quiet=True)
                    times.append(s["train_seconds"])
                    setups.append(s["setup_seconds"])
                    accs.append(s["val_accuracy"])
                    last_run = run
                    log(f"{device} {mode:<8} run {r + 1}/{runs}: {s['train_seconds']:.1f}s "
                        f"training (+{s['setup_seconds']:.1f}s set-up), val accuracy "
                        f"{s['val_accuracy']:.2%}")
                clf = load(last_run, device=device, tta=False)
                precision = s["precision"]  # infer as it trained (script on CUDA: fp32)
                example = torch.zeros(8, 3, 32, 32, device=device)
                if clf.channels_last:
                    clf.model = clf.model.to(memory_format=torch.channels_last)
                    example = example.to(memory_format=torch.channels_last)
                t0 = time.perf_counter()
                net = modes.wrap(clf.model.eval(), mode, example).eval()
                fn = torch_predictor(net, device, precision, clf.channels_last, mode)
                fn(test[:1000])
                fn(test[:1])
                infer_setup = time.perf_counter() - t0
                inf = time_inference(fn, test, device)
                rows.append({"device": device, "mode": mode, "model": model, "epochs": epochs,
                             "runs": runs, "precision": precision,
                             "train_best_s": min(times), "train_worst_s": max(times),
                             "setup_s": float(np.mean(setups)),
                             "val_accuracy_mean": float(np.mean(accs)),
                             "inference_setup_s": infer_setup, **inf})
                log(f"{device} {mode:<8} inference: {inf['images_per_second']:,.0f} img/s, "
                    f"latency p50 {inf['latency_p50_ms']:.3f} ms p99 "
                    f"{inf['latency_p99_ms']:.3f} ms")
            if device == "cpu" and last_run is not None:
                row = _onnx_row(last_run, test, model, epochs, log)
                if row:
                    rows.append(row)
    print_table(rows)
    if out:
        write(rows, Path(out))
    return rows


def _onnx_row(run: Path, test: torch.Tensor, model: str, epochs: int,
              log: Callable[[str], None]) -> dict[str, Any] | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log("onnxruntime not installed: no ONNX Runtime row (pip install 'cifarcnn[export]')")
        return None
    from .export import export, load_exported
    from .inference import load

    onnx_file = run / "model.onnx"
    export(load(run, device="cpu", tta=False), "onnx", onnx_file)
    exp = load_exported(onnx_file)
    inf = time_inference(lambda x: exp.predict(x.numpy()), test, "cpu")
    log(f"cpu onnxruntime inference: {inf['images_per_second']:,.0f} img/s, latency p50 "
        f"{inf['latency_p50_ms']:.3f} ms p99 {inf['latency_p99_ms']:.3f} ms")
    return {"device": "cpu", "mode": "onnxruntime", "model": model, "epochs": epochs,
            "precision": "fp32", **inf}


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'device':<6} {'mode':<12} {'train best':>10} {'worst':>8} {'set-up':>7} "
            f"{'paper':>7} {'val acc':>8} {'infer img/s':>12} {'p50 ms':>7} {'p99 ms':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        train = (f"{r['train_best_s']:>9.1f}s {r['train_worst_s']:>7.1f}s {r['setup_s']:>6.1f}s"
                 if "train_best_s" in r else f"{'-':>10} {'-':>8} {'-':>7}")
        paper = PAPER_25_EPOCHS.get(r["device"]) if r["mode"] == "eager" and \
            r["epochs"] == 25 else None
        acc = f"{r['val_accuracy_mean']:>7.2%}" if "val_accuracy_mean" in r else f"{'-':>7}"
        print(f"{r['device']:<6} {r['mode']:<12} {train} "
              f"{(f'{paper:.0f}s' if paper else '-'):>7} {acc:>8} "
              f"{r['images_per_second']:>12,.0f} {r['latency_p50_ms']:>7.3f} "
              f"{r['latency_p99_ms']:>7.3f}")


def write(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        (out / "modes.json").write_text(json.dumps({"rows": rows, "torch": torch.__version__,
                                                    "gpu": gpu,
                                                    "paper_25_epochs_s": PAPER_25_EPOCHS},
                                                   indent=2) + "\n")
        keys = sorted({k for r in rows for k in r})
        with open(out / "modes.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    except OSError as e:
        raise CifarError(f"--out {out}: cannot write the results ({e.strerror or e})") from None
