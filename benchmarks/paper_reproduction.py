"""Regenerate the paper's Fig. 1, 2 and 3/4 on this machine and write docs/paper-reproduction.md.

    python benchmarks/paper_reproduction.py --data ../shared/data/cifar10-jpeg.tar.gz

Runs (each step skips what an earlier, interrupted invocation finished):
  1. `cifarcnn experiment` paper-cnn, 15 runs x 25 epochs (the paper's Fig. 1);
  2. `cifarcnn experiment` paper-mlp, --mlp-runs runs x 25 epochs (the "previous project");
  3. `cifarcnn bench modes` paper-cnn, 25 epochs, --mode-runs runs per mode (Fig. 2);
  4. `cifarcnn report` over both experiments (Fig. 3/4 as one comparison chart), and
     over the `fast` recipe's runs when --fast names them (the folder that
     `cifarcnn bench time-to-accuracy --keep DIR` or `cifarcnn experiment --model fast`
     wrote): its line then joins the comparison chart;
then writes the Markdown page with the paper's numbers beside ours; --gpu-modes adds the
rows of `bench modes` files written on a GPU machine (this machine has none), e.g. by
scripts/device_check.sh on a lent one, to Fig. 2's table. The
script's time is summed over invocations (<out>/script-seconds.json), so a
re-run that only adds --fast does not replace the time the runs took.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The paper's Fig. 1 (training, validation accuracy per run) and Fig. 2 (seconds).
PAPER_RUNS = [(91.77, 41.98), (94.15, 77.45), (96.60, 75.66), (97.45, 78.24), (97.54, 77.82),
              (94.84, 77.21), (96.87, 74.31), (97.60, 77.84), (97.99, 77.69), (95.92, 77.36),
              (96.81, 77.12), (97.50, 74.66), (97.63, 76.83), (97.50, 74.66), (93.25, 76.58)]
PAPER_TIMES = [("Base model (CPU)", 2, 2324, 2413), ("Base model (CUDA)", 3, 150.3, 151.1),
               ("Compiled model (CUDA)", 3, 160.3, 165.9),
               ("Traced model (CUDA)", 3, 144.5, 148.8),
               ("Scripted model (CUDA)", 3, 145.1, 149.8)]


def cifarcnn(*args: str) -> None:
    cmd = [sys.executable, "-m", "cifarcnn", *args]
    print("$ cifarcnn " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def summaries(exp: Path) -> list[dict]:
    return [json.loads((d / "summary.json").read_text())
            for d in sorted(exp.glob("seed-*"), key=lambda p: int(p.name[5:]))
            if (d / "summary.json").is_file()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default=str(ROOT / "runs" / "paper-reproduction"))
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--mlp-runs", type=int, default=3)
    ap.add_argument("--mode-runs", type=int, default=2)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "paper-reproduction.md"))
    ap.add_argument("--fast", metavar="DIR", help="experiment folder of the fast recipe")
    ap.add_argument("--gpu-modes", nargs="+", default=[], metavar="JSON",
                    help="modes.json files of `bench modes --devices cuda` runs on a GPU")
    a = ap.parse_args()
    out = Path(a.out)
    t0 = time.time()
    cifarcnn("experiment", "--model", "paper-cnn", "--runs", str(a.runs), "--epochs", "25",
             "--data", a.data, "--out", str(out / "paper-cnn"))
    cifarcnn("experiment", "--model", "paper-mlp", "--runs", str(a.mlp_runs), "--epochs", "25",
             "--data", a.data, "--out", str(out / "paper-mlp"))
    modes_json = out / "modes" / "modes.json"
    if not modes_json.is_file():
        cifarcnn("bench", "modes", "--model", "paper-cnn", "--epochs", "25", "--runs",
                 str(a.mode_runs), "--data", a.data, "--out", str(out / "modes"))
    sources = [str(out / "paper-mlp"), str(out / "paper-cnn")] + ([a.fast] if a.fast else [])
    cifarcnn("report", *sources, "--data", a.data, "--modes", str(modes_json),
             "--out", str(out / "report"))
    spent = out / "script-seconds.json"
    seconds = time.time() - t0 + (json.loads(spent.read_text()) if spent.is_file() else 0.0)
    spent.write_text(json.dumps(seconds) + "\n")
    write_doc(out, Path(a.doc), seconds, Path(a.fast) if a.fast else None,
              [Path(p) for p in a.gpu_modes])


def shown(path: Path) -> str:
    """The path as the page prints it: relative to the repository when inside it."""
    full = path.resolve()
    return str(full.relative_to(ROOT) if full.is_relative_to(ROOT) else path)


def write_doc(out: Path, doc: Path, seconds: float, fast: Path | None,
              gpu_modes: list[Path]) -> None:
    cnn, mlp = summaries(out / "paper-cnn"), summaries(out / "paper-mlp")
    modes = json.loads((out / "modes" / "modes.json").read_text())["rows"]
    gpu = [(path, json.loads(path.read_text())) for path in gpu_modes]
    modes += [r for _, g in gpu for r in g["rows"] if r["device"] == "cuda"]
    val = [s["val_accuracy"] * 100 for s in cnn]
    paper_val = [v for _, v in PAPER_RUNS]
    paper_ok = [v for v in paper_val if v > 50]
    total_train = sum(s["train_seconds"] for s in cnn + mlp)
    lines = [
        "# The paper, reproduced on a 2-core CPU",
        "",
        "Generated by `python benchmarks/paper_reproduction.py --data "
        "../shared/data/cifar10-jpeg.tar.gz"
        + (f" --fast {shown(fast)}" if fast else "")
        + "".join(f" --gpu-modes {shown(path)}" for path, _ in gpu[:1])
        + "".join(f" {shown(path)}" for path, _ in gpu[1:])
        + "` on this machine (2 cores, AMD EPYC, "
        f"torch {cnn[0]['torch']}, CPU only). Data: the JPEG (q75) copy of CIFAR-10, official "
        "split. What was run: "
        f"{len(cnn)} x 25-epoch runs of `paper-cnn` (seeds 0..{len(cnn) - 1}), "
        f"{len(mlp)} x 25-epoch runs of `paper-mlp`, and `cifarcnn bench modes` "
        f"(25 epochs, {modes[0].get('runs', '?')} runs per mode). Training time of the "
        f"experiments: {total_train / 60:.1f} min; the whole script, with evaluation, "
        f"the modes benchmark and the report: {seconds / 60:.1f} min.",
        "",
        "Validation accuracy is on the 10,000 test images, as in the paper; ours uses the "
        "recipe's flip test-time augmentation (the single-view number is beside it).",
        "",
        "## Fig. 1: 15 runs of 25 epochs",
        "",
        "| run | paper: train | paper: val | ours: train | ours: val (flip TTA) | "
        "ours: val, single view | ours: seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i in range(max(len(cnn), len(PAPER_RUNS))):
        p = PAPER_RUNS[i] if i < len(PAPER_RUNS) else None
        s = cnn[i] if i < len(cnn) else None
        lines.append(
            f"| {i + 1} | {f'{p[0]:.2f}%' if p else ''} | {f'{p[1]:.2f}%' if p else ''} | "
            + (f"{s['train_accuracy']:.2%} | {s['val_accuracy']:.2%} | "
               f"{s['val_accuracy_no_tta']:.2%} | {s['train_seconds']:.1f} |" if s else "| | | |"))
    single = [s["val_accuracy_no_tta"] * 100 for s in cnn]
    lines += [
        "",
        "| | paper (all 15) | paper (without the failed 41.98% run) | ours (flip TTA) | "
        "ours (single view) |",
        "|---|---:|---:|---:|---:|",
        f"| mean ± std | {statistics.mean(paper_val):.2f} ± {statistics.stdev(paper_val):.2f}% "
        f"| {statistics.mean(paper_ok):.2f} ± {statistics.stdev(paper_ok):.2f}% | "
        f"{statistics.mean(val):.2f} ± {statistics.stdev(val) if len(val) > 1 else 0:.2f}% | "
        f"{statistics.mean(single):.2f} ± {statistics.stdev(single) if len(single) > 1 else 0:.2f}%"
        " |",
        f"| min – max | {min(paper_val):.2f} – {max(paper_val):.2f}% | {min(paper_ok):.2f} – "
        f"{max(paper_ok):.2f}% | {min(val):.2f} – {max(val):.2f}% | {min(single):.2f} – "
        f"{max(single):.2f}% |",
        "",
        "The paper's training accuracy (91–98%) is far above its validation accuracy: its "
        "network overfits. Ours trains with random crops and flips and light dropout, so "
        "training accuracy (measured on augmented batches, with dropout on) stays near "
        "validation accuracy.",
        "",
        "## Fig. 2: time for 25 epochs, per execution mode",
        "",
        "| process | epochs | runs | paper best | paper worst | ours best | ours worst | "
        "ours one-time set-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ours = {(r["device"], r["mode"]): r for r in modes if "train_best_s" in r}
    names = {"eager": "Base model", "compile": "Compiled model", "trace": "Traced model",
             "script": "Scripted model"}
    for device in ("cpu", "cuda"):
        for mode, name in names.items():
            label = f"{name} ({'CUDA' if device == 'cuda' else 'CPU'})"
            paper = next((t for t in PAPER_TIMES if t[0] == label), None)
            r = ours.get((device, mode))
            if r is not None:
                lines.append(f"| {label} | {r['epochs']} | {r['runs']} | "
                             f"{f'{paper[2]}s' if paper else '-'} | "
                             f"{f'{paper[3]}s' if paper else '-'} | {r['train_best_s']:.1f}s | "
                             f"{r['train_worst_s']:.1f}s | {r['setup_s']:.1f}s |")
            elif paper is not None:
                lines.append(f"| {label} | 25 | {paper[1]} | {paper[2]}s | {paper[3]}s | "
                             "(no results file) | | |")
    if gpu:
        lines += ["", "The CUDA rows come from a lent GPU machine (this one has none): "
                  + "; ".join(f"`{shown(path)}` ({g.get('gpu') or 'GPU not recorded'}, "
                              f"torch {g.get('torch', '?')})" for path, g in gpu) + "."]
    lines += [
        "",
        "Inference of the trained `paper-cnn` (uint8 images to probabilities, no TTA):",
        "",
        "| device | mode | images/s (batch 1000) | latency p50 (ms) | latency p99 (ms) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in modes:
        lines.append(f"| {r['device']} | {r['mode']} | {r['images_per_second']:,.0f} | "
                     f"{r['latency_p50_ms']:.3f} | {r['latency_p99_ms']:.3f} |")
    mlp_val = [s["val_accuracy"] * 100 for s in mlp]
    lines += [
        "",
        "## Fig. 3/4: the previous project (MLP) against the CNN",
        "",
        "![validation accuracy per epoch, paper-mlp against paper-cnn]"
        "(img/paper-compare.png)",
        "",
    ]
    if fast is not None:
        runs = summaries(fast)
        fast_val = [s["val_accuracy"] * 100 for s in runs]
        lines += [
            f"The third line is this project's own `fast` recipe ({len(runs)} runs of "
            f"{runs[0]['epochs']} epochs, {statistics.mean(fast_val):.2f}% mean with its "
            f"flip-and-shift TTA, {statistics.mean(s['train_seconds'] for s in runs):.0f} s "
            "of training each; README, \"Fast recipe\"). Its intermediate epochs are "
            "validated on the single view only and its first epochs train on smaller "
            "images (shrunk, then cropped), hence the low early points and the jump at the "
            "end.",
            "",
        ]
    lines += [
        "![paper-cnn: accuracy and loss per epoch over the runs](img/paper-cnn-curves.png)",
        "",
        "![paper-cnn: confusion matrix and per-class accuracy](img/paper-cnn-confusion.png)",
        "",
        f"Best validation accuracy: paper-mlp {max(mlp_val):.2f}%, paper-cnn {max(val):.2f}%: "
        f"a difference of {max(val) - max(mlp_val):.1f} points (the paper: ~40% against "
        "78.24%, 38.5 points). The full report, with per-epoch curves, confusion matrices "
        "and the most confident mistakes, is `runs/paper-reproduction/report/report.html`.",
        "",
    ]
    img = doc.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    report = out / "report"
    for src, dst in (("compare.png", "paper-compare.png"),
                     ("curves-paper-cnn.png", "paper-cnn-curves.png"),
                     ("confusion-paper-cnn.png", "paper-cnn-confusion.png")):
        shutil.copyfile(report / src, img / dst)
    doc.write_text("\n".join(lines))
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
