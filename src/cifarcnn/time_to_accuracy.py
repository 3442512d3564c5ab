"""Time to accuracy: R seeded trainings of a model, accuracy with and without TTA, seconds.

Used by `benchmarks/time_to_accuracy.py` and `cifarcnn bench time-to-accuracy`.
Training seconds exclude evaluation and the one-time compile/trace set-up,
which is reported apart. With a target, it also reports when the mean
(over runs) validation accuracy first reached it, in mean training seconds.
"""

from __future__ import annotations

import signal
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import Interrupted
from .config import TrainConfig
from .datasets import CifarData, load_cifar10
from .errors import CifarError
from .runfiles import read_history, read_json


def time_to_accuracy(model: str = "fast", runs: int = 3, data: CifarData | None = None,
                     data_path: str | None = None, target: float | None = None,
                     overrides: dict[str, Any] | None = None, keep: Path | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `runs` seeds (from `overrides["seed"]`, default 0); returns {"runs": [...],
    "mean": ..., "target": ...}.

    The runs form a `cifarcnn experiment` folder (`keep`, or a temporary one),
    so a kept benchmark feeds `cifarcnn results` and `cifarcnn report`, and an
    interrupted one continues where it stopped.
    """
    from .experiment import run_experiment

    if runs < 1:
        raise CifarError(f"--runs {runs}: must be at least 1")
    cfg = TrainConfig(model=model, data=data_path, **(overrides or {}))
    with tempfile.TemporaryDirectory(prefix="cifarcnn-tta-bench-") as tmp:
        root = keep or Path(tmp) / "exp"
        data = data or load_cifar10(data_path, verbose=True)
        try:
            summaries = run_experiment(cfg, runs, root, data=data, quiet=True)
        except Interrupted as e:
            if keep:
                raise
            # the checkpoint's folder is the temporary one, removed on the way out
            signum = e.exit_code - 128
            raise Interrupted(signum, f"{signal.Signals(signum).name}: stopped; the runs "
                              "were in a temporary folder, now removed (with --keep DIR the "
                              "same command continues an interrupted benchmark)") from None
        histories = [read_history(root / s["run"]) for s in summaries]
        settings = read_json(root / summaries[0]["run"] / "config.json")
    results = []
    for s in summaries:
        results.append({"seed": s["seed"], "accuracy": s["val_accuracy_no_tta"],
                        "tta_accuracy": s["val_accuracy"], "tta": s["tta"],
                        "train_seconds": s["train_seconds"],
                        "setup_seconds": s["setup_seconds"], "epochs": s["epochs"],
                        "device": s["device"], "device_name": s.get("device_name"),
                        "precision": s["precision"],
                        "mode": s["mode"], "cpu": s["cpu"], "threads": s["threads"],
                        "torch": s["torch"]})
        log(f"seed {s['seed']}: accuracy {s['val_accuracy_no_tta']:.2%}, with TTA "
            f"({s['tta']}) {s['val_accuracy']:.2%}, {s['train_seconds']:.1f}s training"
            + (f" (+{s['setup_seconds']:.1f}s set-up)" if s["setup_seconds"] else ""))
    # what the runs trained with (the recipe plus the flags given), so a result file
    # says which recipe it measured; the per-run fields (seed, folders) are left out
    for key in ("seed", "out", "data", "download"):
        settings.pop(key, None)
    out: dict[str, Any] = {"model": model, "settings": settings, "runs": results, "mean": {}}
    for key in ("accuracy", "tta_accuracy", "train_seconds"):
        values = [r[key] for r in results]
        out["mean"][key] = statistics.mean(values)
        out["mean"][key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    if target is not None:
        out["target"] = {"accuracy": target, "epoch": None, "train_seconds": None}
        epochs = min(len(h) for h in histories)
        elapsed = [0.0] * len(histories)
        for e in range(epochs):
            for i, h in enumerate(histories):
                elapsed[i] += h[e]["seconds"]
            mean_acc = statistics.mean(h[e]["val_accuracy"] for h in histories)
            if mean_acc >= target:
                out["target"].update(epoch=e + 1, train_seconds=statistics.mean(elapsed),
                                     mean_accuracy=mean_acc)
                break
    print_table(out)
    return out


def print_table(out: dict[str, Any]) -> None:
    first = out["runs"][0]
    where = first.get("device_name") or first.get("cpu")  # older result files lack them
    if where:
        print(f"{first['device']}: {where}, {first['threads']} threads")
    print(f"{'seed':>4} {'accuracy':>9} {'TTA acc':>8} {'train s':>8} {'set-up s':>8}")
    for r in out["runs"]:
        print(f"{r['seed']:>4} {r['accuracy']:>9.2%} {r['tta_accuracy']:>8.2%} "
              f"{r['train_seconds']:>8.1f} {r['setup_seconds']:>8.1f}")
    m = out["mean"]
    print(f"mean {m['accuracy']:>6.2%} ± {m['accuracy_std']:.2%}  TTA {m['tta_accuracy']:.2%} "
          f"± {m['tta_accuracy_std']:.2%}  {m['train_seconds']:.1f} ± "
          f"{m['train_seconds_std']:.1f} s")
    t = out.get("target")
    if t:
        if t["epoch"] is None:
            print(f"target {t['accuracy']:.2%}: not reached by the mean")
        else:
            print(f"target {t['accuracy']:.2%}: mean reached {t['mean_accuracy']:.2%} after "
                  f"epoch {t['epoch']}, {t['train_seconds']:.1f} s of training")
