"""Experiments: R seeds of one training config in one folder, and their results table.

Layout: `<dir>/experiment.json` (the config, the seeds asked for) and one run
directory per seed, `<dir>/seed-<i>/` (seeds 0..R-1, or from `--seed S` on).
Running the same experiment again skips finished runs (summary.json present)
and resumes an interrupted one from its checkpoint, so a killed experiment
continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .datasets import CifarData
from .errors import CifarError
from .runfiles import check_output_folder, read_json, read_summary, write_text_atomic

META = "experiment.json"


def run_dirs(exp: Path) -> list[Path]:
    return sorted((p for p in exp.glob("seed-*") if p.is_dir()),
                  key=lambda p: int(p.name.split("-", 1)[1]))


def is_experiment(path: Path) -> bool:
    return (path / META).is_file()


def is_run(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metrics.jsonl").is_file()


def run_experiment(cfg: TrainConfig, runs: int, out: Path, data: CifarData | None = None,
                   quiet: bool = False) -> list[dict[str, Any]]:
    """Train seeds cfg.seed..cfg.seed+runs-1 of `cfg` into `out`; returns those runs'
    summaries. A first seed other than 0 adds seeds to an experiment with the same
    settings (a confirming benchmark on other seeds), or starts one elsewhere."""
    from .datasets import load_cifar10
    from .train import resume, train

    if runs < 1:
        raise CifarError(f"--runs {runs}: must be at least 1")
    model = cfg.resolved().model  # bad settings stop here, before the folder is written
    seeds = range(cfg.seed, cfg.seed + runs)
    asked = set(seeds)  # with the seeds asked for before: the table counts them all
    spec: dict[str, Any] = {"model": model, "runs": runs,
                            "config": {**{k: v for k, v in dataclasses.asdict(cfg).items()
                                          if k not in ("seed", "out", "data")}, "model": model}}
    if (out / META).is_file():
        old = read_json(out / META, required=("config",))
        if not isinstance(old["config"], dict):
            raise CifarError(f"{out / META}: 'config' is not a JSON object; the folder is "
                             "damaged")
        # a setting added after the experiment was recorded matches when left at its default
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        recorded = {**{k: defaults.get(k) for k in spec["config"] if k not in old["config"]},
                    **old["config"]}
        if recorded != spec["config"]:
            raise CifarError(f"--out {out}: holds an experiment with other settings "
                             f"({_diff(recorded, spec['config'])}); choose another --out")
        before = old.get("seeds")  # absent before first seeds other than 0 existed
        if not (isinstance(before, list) and all(type(v) is int for v in before)):
            before = range(old["runs"]) if type(old.get("runs")) is int else []
        asked.update(before)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CifarError(f"--out {out}: exists and is not an experiment folder; choose another")
    check_output_folder("--out", out)
    spec.update(runs=len(asked), seeds=sorted(asked))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CifarError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    write_text_atomic("--out", out / META, json.dumps(spec, indent=2) + "\n")
    data = data or load_cifar10(cfg.data, cfg.download, skip_bad_images=cfg.skip_bad_images,
                                verbose=not quiet)
    say = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
    for i, seed in enumerate(seeds):
        run = out / f"seed-{seed}"
        if (run / "summary.json").is_file():
            say(f"run {i + 1}/{runs} (seed {seed}): finished earlier, skipped")
            continue
        say(f"run {i + 1}/{runs} (seed {seed})")
        if (run / "config.json").is_file():
            resume(run, data=data, quiet=quiet)
        else:
            train(dataclasses.replace(cfg, seed=seed, out=str(run)), data=data, quiet=quiet)
    return [s for s in summaries(out) if s["seed"] in seeds]


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:4])


def summaries(exp: Path) -> list[dict[str, Any]]:
    """One row per finished run: the summary plus its per-epoch history."""
    rows = []
    for run in run_dirs(exp):
        if not (run / "summary.json").is_file():
            continue
        s = read_summary(run / "summary.json")
        s["run"] = run.name
        rows.append(s)
    return rows


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, min(values), max(values)


def results_table(exp: Path) -> str:
    """The experiment's table: per run, then mean ± std, min and max (Markdown)."""
    if not is_experiment(exp):
        raise CifarError(f"{exp}: not an experiment folder (no {META}); give a folder that "
                         "`cifarcnn experiment` wrote")
    rows = summaries(exp)
    spec = read_json(exp / META, numbers=("runs",), required=("model", "runs"))
    lines = [f"{spec['model']}: {len(rows)} of {spec['runs']} runs finished",
             "", "| run | epochs | train accuracy | val accuracy | best val accuracy | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['epochs']} | {r['train_accuracy']:.2%} | "
                     f"{r['val_accuracy']:.2%} | {r['best_val_accuracy']:.2%} | "
                     f"{r['train_seconds']:.1f} |")
    if rows:
        cols = {k: _stats([r[k] for r in rows]) for k in
                ("train_accuracy", "val_accuracy", "best_val_accuracy", "train_seconds")}

        def fmt(k: str, i: int) -> str:
            v = cols[k][i]
            return f"{v:.1f}" if k == "train_seconds" else f"{v:.2%}"

        lines.append("| **mean ± std** | | " + " | ".join(
            f"{fmt(k, 0)} ± {fmt(k, 1)}" for k in cols) + " |")
        lines.append("| min | | " + " | ".join(fmt(k, 2) for k in cols) + " |")
        lines.append("| max | | " + " | ".join(fmt(k, 3) for k in cols) + " |")
    return "\n".join(lines)
