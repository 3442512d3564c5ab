"""`cifarcnn report`: charts and tables from run and experiment folders, no plotting code needed.

Writes into OUT: one PNG per chart, `report.md` (linking them) and
`report.html` (the same, with the PNGs embedded: one file to send around).
Charts: accuracy and loss per epoch (one line per run, an experiment's mean
with a min-max band), a comparison of all sources (the paper's MLP-vs-CNN
figure), a confusion matrix with per-class accuracy, a reliability diagram
(confidence against accuracy), and a grid of the most confident mistakes;
plus the `bench modes` table when its JSON is given.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import experiment
from .datasets import CifarData
from .errors import CifarError
from .runfiles import read_history, read_json, read_summary


@dataclass
class Source:
    """A run folder, or an experiment folder and its finished runs."""

    name: str
    path: Path
    kind: str  # "run" or "experiment"
    runs: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.runs[0][2].get("model", "?") if self.runs else "?"

    @property
    def label(self) -> str:
        """"name (model)", or just the name when it already is the model's."""
        return self.name if self.name == self.model else f"{self.name} ({self.model})"


def load_source(path: Path) -> Source:
    path = Path(path)
    if experiment.is_experiment(path):
        src = Source(path.name, path, "experiment")
        for run in experiment.run_dirs(path):
            if (run / "summary.json").is_file():
                src.runs.append((run.name, read_history(run), read_summary(run / "summary.json")))
        if not src.runs:
            raise CifarError(f"{path}: experiment with no finished run yet")
        return src
    if experiment.is_run(path):
        summary = path / "summary.json"
        s = read_summary(summary) if summary.is_file() else read_json(path / "config.json")
        return Source(path.name, path, "run", [(path.name, read_history(path), s)])
    raise CifarError(f"{path}: neither a run folder (config.json + metrics.jsonl) nor an "
                     "experiment folder (experiment.json); give folders that `cifarcnn train` "
                     "or `cifarcnn experiment` wrote")


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise CifarError("reports need matplotlib: pip install 'cifarcnn[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(src: Source, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and a (runs, epochs) array of `key`, cut to the shortest run."""
    n = min(len(h) for _, h, _ in src.runs)
    values = np.array([[row[key] for row in h[:n]] for _, h, _ in src.runs], dtype=float)
    return np.arange(1, n + 1), values


def chart_curves(src: Source, out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    panels = [("val_accuracy", "Validation accuracy", "%"), ("train_accuracy",
              "Training accuracy", "%"), ("val_loss", "Validation loss", "cross-entropy"),
              ("train_loss", "Training loss", "cross-entropy")]
    for ax, (key, title, unit) in zip(axes.flat, panels, strict=True):
        epochs, v = _series(src, key)
        scale = 100.0 if unit == "%" else 1.0
        for (name, _, _), row in zip(src.runs, v, strict=True):
            ax.plot(epochs, row * scale, lw=0.8, alpha=0.35 if len(v) > 1 else 1.0,
                    label=name if len(v) <= 5 else None)
        if len(v) > 1:
            ax.fill_between(epochs, v.min(0) * scale, v.max(0) * scale, alpha=0.15,
                            color="C0", label="min-max over runs")
            ax.plot(epochs, v.mean(0) * scale, lw=2.2, color="black",
                    label=f"mean of {len(v)} runs")
        ax.set_title(title)
        ax.set_ylabel(f"{title.split()[-1]} ({unit})")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{src.label}: accuracy and loss per epoch", fontsize=13)
    fig.tight_layout()
    path = out / f"curves-{src.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart_compare(sources: list[Source], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, src in enumerate(sources):
        epochs, v = _series(src, "val_accuracy")
        mean = v.mean(0) * 100
        final = v[:, -1] * 100
        spread = f" ± {final.std(ddof=1):.2f}" if len(final) > 1 else ""
        ax.plot(epochs, mean, lw=2.2, color=f"C{i}",
                label=f"{src.label}: {final.mean():.2f}{spread}% after "
                      f"{epochs[-1]} epochs, {len(v)} run{'s' if len(v) > 1 else ''}")
        if len(v) > 1:
            ax.fill_between(epochs, v.min(0) * 100, v.max(0) * 100, color=f"C{i}", alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy on the 10,000 test images (%)")
    ax.set_title("Validation accuracy per epoch, model against model\n(line: mean over runs; "
                 "band: min to max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="lower right")
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _best_run(src: Source) -> Path:
    best = max(src.runs, key=lambda r: r[2].get("val_accuracy", 0))
    return src.path if src.kind == "run" else src.path / best[0]


BARS = 25  # per-class accuracy bars at most (CIFAR-100 has 100 classes)


def chart_confusion(src: Source, data: CifarData, probs: np.ndarray, out: Path) -> Path:
    plt = _plt()
    pred = probs.argmax(1)
    k = len(data.classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (data.test_labels, pred), 1)
    per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1.25, 1]})
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(frac * 100, cmap="Blues", vmin=0, vmax=100)
    if k <= 20:  # numbers in the cells, names on the axes, where they fit (not CIFAR-100's)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{frac[i, j] * 100:.0f}", ha="center", va="center",
                        fontsize=7, color="white" if frac[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), data.classes, rotation=45, ha="right")
        ax.set_yticks(range(k), data.classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (% of each true class)")
    fig.colorbar(im, ax=ax, fraction=0.046, label="% of the true class")
    order = np.argsort(per_class)[:BARS]  # with many classes, the hardest ones
    bx.barh([data.classes[i] for i in order], per_class[order] * 100, color="C0")
    for y, i in enumerate(order):
        bx.text(per_class[i] * 100 + 0.5, y, f"{per_class[i] * 100:.1f}%", va="center",
                fontsize=8)
    bx.set_xlim(0, 105)
    bx.set_xlabel("accuracy on the class's test images (%)")
    hardest = f"the {BARS} hardest of {k} classes, " if k > BARS else ""
    bx.set_title(f"Per-class accuracy ({hardest}overall {np.mean(pred == data.test_labels):.2%})")
    bx.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{src.label}: where it goes wrong, {len(pred):,} test images",
                 fontsize=13)
    fig.tight_layout()
    path = out / f"confusion-{src.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart_calibration(src: Source, data: CifarData, probs: np.ndarray, out: Path) -> Path:
    """A reliability diagram: accuracy against confidence, bin by bin, beside how many
    images fall in each bin; bars under the diagonal are over-confident bins."""
    import torch

    from .inference import calibration, calibration_sums

    plt = _plt()
    c = calibration(calibration_sums(torch.from_numpy(probs).clamp_min(1e-30).log(),
                                     torch.from_numpy(data.test_labels.astype(np.int64))
                                     ).tolist())
    bins = c["bins"]
    width = bins[0]["to"] - bins[0]["from"]
    mids = np.array([(b["from"] + b["to"]) / 2 for b in bins]) * 100
    acc = np.array([b["accuracy"] if b["images"] else np.nan for b in bins]) * 100
    conf = np.array([b["confidence"] if b["images"] else np.nan for b in bins]) * 100
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.5))
    ax.bar(mids, acc, width=width * 100 * 0.9, color="C0", label="accuracy in the bin")
    ax.plot(mids, conf, "o", color="C3", ms=4, label="mean confidence in the bin")
    ax.plot([0, 100], [0, 100], "k--", lw=1, label="calibrated")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("confidence: the top class's probability (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Reliability (expected calibration error {c['ece']:.1%})")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    bx.bar(mids, [b["images"] for b in bins], width=width * 100 * 0.9, color="C1")
    bx.set_xlim(0, 100)
    bx.set_xlabel("confidence: the top class's probability (%)")
    bx.set_ylabel("test images")
    bx.set_title(f"Confidence (mean {c['confidence']:.1%}, accuracy "
                 f"{np.mean(probs.argmax(1) == data.test_labels):.1%})")
    bx.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{src.label}: do its probabilities mean what they say?", fontsize=13)
    fig.tight_layout()
    path = out / f"calibration-{src.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart_mistakes(src: Source, data: CifarData, probs: np.ndarray, out: Path,
                   rows: int = 4, cols: int = 8) -> Path:
    plt = _plt()
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != data.test_labels)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][:rows * cols]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9))
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(data.test_images[i], interpolation="nearest")
        ax.set_title(f"true: {data.classes[data.test_labels[i]]}\npred: "
                     f"{data.classes[pred[i]]} {probs[i, pred[i]]:.0%}", fontsize=7.5,
                     color="darkred")
    fig.suptitle(f"{src.label}: the {len(wrong)} most confident mistakes "
                 "(true class, predicted class and its probability)", fontsize=11)
    fig.tight_layout()
    path = out / f"mistakes-{src.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _modes_table(modes_json: Path) -> str:
    lines = ["| device | mode | epochs | runs | train best (s) | worst (s) | set-up (s) | "
             "inference img/s | latency p50 (ms) | p99 (ms) |", "|" + "---|" * 10]
    # a missing key or a wrong type anywhere in the file is the same one-line error
    try:
        for r in json.loads(Path(modes_json).read_text())["rows"]:
            t = (f"{r['train_best_s']:.1f} | {r['train_worst_s']:.1f} | {r['setup_s']:.1f}"
                 if "train_best_s" in r else "- | - | -")
            lines.append(f"| {r['device']} | {r['mode']} | {r.get('epochs', '-')} | "
                         f"{r.get('runs', '-')} | {t} | {r['images_per_second']:,.0f} | "
                         f"{r['latency_p50_ms']:.3f} | {r['latency_p99_ms']:.3f} |")
    except (OSError, KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        why = e.strerror if isinstance(e, OSError) and e.strerror else (
            f"no {e}" if isinstance(e, KeyError) else str(e))
        raise CifarError(f"--modes {modes_json}: not a `bench modes` modes.json ({why})"
                         ) from None
    return "\n".join(lines)


def _pm(a: np.ndarray) -> str:
    return f"{a.mean():.2%} ± {a.std(ddof=1):.2%}" if len(a) > 1 else f"{a.mean():.2%}"


def _source_table(sources: list[Source]) -> str:
    lines = ["| source | model | runs | epochs | final val accuracy | best val accuracy | "
             "training s |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in sources:
        val = np.array([r[2].get("val_accuracy", r[1][-1]["val_accuracy"]) for r in s.runs])
        best = np.array([r[2].get("best_val_accuracy", max(x["val_accuracy"] for x in r[1]))
                         for r in s.runs])
        secs = np.array([r[2].get("train_seconds", sum(x["seconds"] for x in r[1]))
                         for r in s.runs])
        lines.append(f"| {s.name} | {s.model} | {len(s.runs)} | {len(s.runs[0][1])} | "
                     f"{_pm(val)} | {_pm(best)} | {secs.mean():.1f} |")
    return "\n".join(lines)


def build_report(dirs: list[Path], out: Path, data: CifarData | None = None,
                 data_path: str | None = None, modes_json: Path | None = None) -> Path:
    """Make the report; returns the path of report.html."""
    from .datasets import load_cifar10
    from .inference import load

    if not dirs:
        raise CifarError("give at least one run or experiment folder")
    # every input is read and checked before the slow part (a test-set pass per source)
    modes = _modes_table(Path(modes_json)) if modes_json else None
    sources = [load_source(Path(d)) for d in dirs]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):  # two folders with one name: make them distinct
        for i, s in enumerate(sources):
            s.name = f"{i + 1}-{s.name}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CifarError(f"--out {out}: cannot create it ({e.strerror})") from None
    data = data or load_cifar10(data_path)
    sections: list[tuple[str, str | Path]] = [("h2", "Summary"), ("table", _source_table(sources))]
    for s in sources:
        if s.kind == "experiment":
            sections += [("h3", f"{s.name}: results table"),
                         ("table", experiment.results_table(s.path).split("\n", 2)[2])]
    if len(sources) > 1:
        sections += [("h2", "Comparison"), ("img", chart_compare(sources, out))]
    for s in sources:
        clf = load(_best_run(s), device="cpu")
        probs = clf.predict(data.test_images)
        sections += [("h2", s.label), ("img", chart_curves(s, out)),
                     ("p", f"Test-set analysis of {_best_run(s).name} (TTA: {clf.tta})."),
                     ("img", chart_confusion(s, data, probs, out)),
                     ("img", chart_calibration(s, data, probs, out)),
                     ("img", chart_mistakes(s, data, probs, out))]
    if modes:
        sections += [("h2", "Execution modes (cifarcnn bench modes)"), ("table", modes)]
    _write_markdown(sections, out / "report.md")
    return _write_html(sections, out / "report.html")


def _write_markdown(sections: list[tuple[str, str | Path]], path: Path) -> None:
    md = ["# cifarcnn report", ""]
    for kind, body in sections:
        if kind == "h2":
            md += [f"## {body}", ""]
        elif kind == "h3":
            md += [f"### {body}", ""]
        elif kind == "img":
            md += [f"![{Path(body).stem}]({Path(body).name})", ""]
        else:
            md += [str(body), ""]
    path.write_text("\n".join(md))


def _md_table_to_html(table: str) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in table.splitlines() if line.strip() and not set(line) <= set("|-: ")]
    head, body = rows[0], rows[1:]
    th = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c.replace('**', ''))}</td>" for c in r)
                  + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _write_html(sections: list[tuple[str, str | Path]], path: Path) -> Path:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>cifarcnn report</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}"
             "</style></head><body><h1>cifarcnn report</h1>"]
    for kind, body in sections:
        if kind in ("h2", "h3"):
            parts.append(f"<{kind}>{html.escape(str(body))}</{kind}>")
        elif kind == "img":
            b64 = base64.b64encode(Path(body).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(Path(body).stem)}' "
                         f"src='data:image/png;base64,{b64}'></p>")
        elif kind == "table":
            parts.append(_md_table_to_html(str(body)))
        else:
            parts.append(f"<p>{html.escape(str(body))}</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path
