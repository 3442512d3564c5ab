"""The `cifarcnn` command: a thin argparse layer over the package's functions.

train, evaluate, predict, export, bench (modes, time-to-accuracy), experiment,
results, report, models. User errors (CifarError) print one line to stderr
and exit 2; an interrupted training exits 130 (SIGINT) or 143 (SIGTERM); output
piped into a reader that stops early (`| head`) ends quietly with 141, as
Unix tools do.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CifarError
from .runfiles import check_output_file, check_output_folder, write_text_atomic


def _add_train(sub: argparse._SubParsersAction, config: dict[str, Any] | None) -> None:
    p = sub.add_parser("train", help="train a model; writes a run directory",
                       description="Train a model on CIFAR-10. Flags left out come from the "
                       "model's own recipe (see `cifarcnn models NAME`).")
    _train_flags(p, config)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint, with its saved "
                   "config (--data may give the data's new location; flags that would "
                   "change the run are refused)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel on this machine: re-run this command under "
                   "`torchrun --standalone --nproc_per_node N` (--batch-size is per process)")


def _add_experiment_and_report(sub: argparse._SubParsersAction,
                               config: dict[str, Any] | None) -> None:
    e = sub.add_parser("experiment", help="R seeded runs of one config, then a results table",
                       description="Train seeds S..S+R-1 (--seed S, default 0) into one "
                       "folder (--out). Run it again to continue an interrupted experiment: "
                       "finished runs are skipped.")
    _train_flags(e, config)
    e.add_argument("--runs", type=int, default=3, help="number of runs (seeds S..S+R-1)")
    lf = sub.add_parser("lr-find", help="learning-rate range test: the loss as the rate "
                        "grows, and a rate to train at",
                        description="Train from the run's start for --steps steps while the "
                        "rate grows from --start to --end times --lr (every group in "
                        "proportion); print the loss and the rates where it fell fastest "
                        "and was lowest. Train flags set up the run as `train` would.")
    _train_flags(lf, config)
    lf.add_argument("--steps", type=int, default=100, help="steps to run (default 100)")
    lf.add_argument("--start", type=float, default=1e-3,
                    help="first rate, a multiple of --lr (default 0.001)")
    lf.add_argument("--end", type=float, default=10.0,
                    help="last rate, a multiple of --lr (default 10)")
    lf.add_argument("--json", metavar="FILE", help="write every step's rate and loss here")
    lf.add_argument("--plot", metavar="FILE.png", help="draw the loss against the rate "
                    "(needs matplotlib)")
    r = sub.add_parser("results", help="the results table of an experiment folder")
    r.add_argument("experiment", help="folder written by `cifarcnn experiment`")
    rep = sub.add_parser("report", help="HTML/Markdown report with charts from run and "
                         "experiment folders")
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="run or experiment folders")
    rep.add_argument("--out", default="report", help="output folder (default: report)")
    rep.add_argument("--data", help="CIFAR-10 for the test-set charts")
    rep.add_argument("--modes", metavar="MODES_JSON",
                     help="modes.json from `cifarcnn bench modes`, shown as a table")


def _train_flags(p: argparse.ArgumentParser, config: dict[str, Any] | None = None) -> None:
    """The training flags; `config`, the settings of a --config file, become their
    defaults, so a flag on the command line wins over the file."""
    p.add_argument("--config", metavar="FILE",
                   help="settings from a TOML or JSON file (TrainConfig's field names; a "
                   "run's config.json or run folder repeats that run); flags given win")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as JSON (a --config file) and exit")
    p.add_argument("--model", help="model name (default: paper-cnn, or with --init-from the "
                   "model those weights hold)")
    p.add_argument("--init-from", metavar="WEIGHTS",
                   help="fine-tune: start from these weights (.safetensors, run directory or "
                   "shipped name) with a fresh optimizer and schedule; for other classes the "
                   "head starts afresh")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor argument, VALUE in JSON (e.g. channels=[32,64,128])")
    p.add_argument("--epochs", type=int, help="epochs (paper-cnn: 25, as the paper)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adamw", "muon"],
                   help="muon: orthogonalised steps for conv filters, SGD for the rest (fast)")
    p.add_argument("--lr", type=float, help="peak learning rate (muon: the filters' rate)")
    p.add_argument("--momentum", type=float)
    p.add_argument("--schedule", choices=["onecycle", "cosine", "constant"],
                   help="LR schedule after the linear warm-up")
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--tta", choices=["none", "flip", "flip-shift"],
                   help="test-time augmentation for validation and saved weights "
                   "(paper-cnn: flip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CPUs with native bf16 and on recent GPUs")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout (default on: faster on CPU and CUDA)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop and flip")
    p.add_argument("--translate", type=int, metavar="PX",
                   help="random translation of up to PX pixels (paper-cnn: 4, fast: 2)")
    p.add_argument("--downscale", type=int, metavar="PX",
                   help="progressive resizing: train the first --downscale-epochs on whole "
                   "images shrunk to PXxPX (fast: 16 for 1 epoch; 0: off)")
    p.add_argument("--downscale-epochs", type=int, metavar="N")
    p.add_argument("--low-res", type=int, metavar="PX",
                   help="progressive resizing: train the next --low-res-epochs on PXxPX crops "
                   "(fast: 24 for 2 epochs; 0: off)")
    p.add_argument("--low-res-epochs", type=int, metavar="N")
    p.add_argument("--select-fraction", type=float, metavar="F",
                   help="from --select-from-epoch on, train each epoch on the fraction F of "
                   "images with the highest loss when last seen (fast: 0.7)")
    p.add_argument("--select-from-epoch", type=int, metavar="E",
                   help="the first epoch (counted from 0) that selects; default 1")
    p.add_argument("--lookahead", type=int, metavar="K",
                   help="Lookahead: every K steps the weights restart from a slow average "
                   "of themselves, which the run ends on (0: off)")
    p.add_argument("--lookahead-decay", type=float, metavar="D",
                   help="the slow average's per-step decay at the end of the run; default 0.95")
    p.add_argument("--pad-mode", choices=["zeros", "reflect"],
                   help="border filling for translations (paper-cnn: zeros, fast: reflect)")
    p.add_argument("--flip", choices=["random", "alternate", "alternate-seen"],
                   help="random: a coin per image and epoch; alternate: each image mirrored "
                   "every other epoch (fast); alternate-seen: every other time it is trained "
                   "on (differs from alternate only under --select-fraction)")
    p.add_argument("--noise", type=float, metavar="S",
                   help="Gaussian pixel noise on each training image, its standard deviation "
                   "drawn from [0, S] as a fraction of the range (0.1: robust to noisy "
                   "photos; default 0)")
    p.add_argument("--data", help="CIFAR-10 archive or folder (default: $CIFAR10_DATA, then "
                   "the cache folder)")
    p.add_argument("--download", action="store_true",
                   help="fetch the official archive (MD5-checked) if the data is missing")
    p.add_argument("--out", help="run directory to create (default: runs/<model>-<time>)")
    p.add_argument("--limit-train", type=int, metavar="N",
                   help="train on a fixed class-balanced subset of N images")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="hold N training images out as the validation set; test accuracy "
                   "is then reported once at the end")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images in image-folder data instead of stopping")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N steps (always at each epoch end)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only: the same seed gives the same weights")
    p.add_argument("--mode", default="eager", choices=["eager", "compile", "trace", "script"],
                   help="execution mode (default eager; compile/trace set-up time is reported "
                   "apart from training time)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files into the run directory")
    p.add_argument("--sync-bn", action="store_true",
                   help="under DDP, BatchNorm statistics over the global batch")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="S",
                   help="under DDP, seconds a rank waits for the others before the job fails")
    if config:
        defaults = dict(config)
        # --model-arg items are merged over the file's model_kwargs, key by key
        defaults["config_model_kwargs"] = defaults.pop("model_kwargs", {})
        p.set_defaults(**defaults)


def parse_model_args(items: list[str]) -> dict:
    """--model-arg items -> constructor keywords: each VALUE read as JSON, else kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CifarError(f"--model-arg {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_train(a: argparse.Namespace) -> int:
    from .train import resume, train

    if a.resume and (a.config or a.print_config):
        raise CifarError("--resume continues a run with its own saved settings; leave out "
                         "--config and --print-config (to repeat a run: --config RUN_DIR)")
    if a.resume:
        _refuse_changes_on_resume(a)
    if a.print_config:
        return _print_config(a)
    if a.nproc is not None:
        return _relaunch_under_torchrun(a.nproc, a.argv)
    try:
        if a.resume:
            resume(a.resume, data_path=a.data)
            return 0
        return _train_from_flags(a, train)
    finally:
        from .distributed import teardown

        teardown()


def _refuse_changes_on_resume(a: argparse.Namespace) -> None:
    """A resumed run follows its saved settings to the weights an uninterrupted run gives;
    a flag that would change them (`--epochs 40`) would otherwise be silently ignored."""
    plain = vars(build_parser().parse_args(["train"]))
    changed = [f"--{k.replace('_', '-')}" for k, v in vars(a).items()
               if k in plain and v != plain[k] and k not in ("resume", "data", "nproc")]
    if changed:
        finished = (Path(a.resume) / "weights.safetensors").is_file()
        raise CifarError(f"--resume {a.resume} continues the run with its own saved settings, "
                         f"which {', '.join(changed)} would change; leave "
                         f"{'them' if len(changed) > 1 else 'it'} out" + (
                             f" (to train on from its weights with new settings: --init-from "
                             f"{a.resume} --out NEW_RUN)" if finished else ""))


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """`cifarcnn train --nproc N ...` = torchrun on this node with the same flags."""
    import os
    import subprocess

    if nproc < 1:
        raise CifarError(f"--nproc {nproc}: must be at least 1")
    if "RANK" in os.environ:
        raise CifarError("--nproc inside torchrun: give one or the other")
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "cifarcnn", *rest]
    return subprocess.call(cmd)


def _train_from_flags(a: argparse.Namespace, train) -> int:
    train(_config_from_flags(a))
    return 0


def _config_from_flags(a: argparse.Namespace):
    """The TrainConfig of train's or experiment's flags (with a --config file's settings
    as their defaults: see _train_flags)."""
    import dataclasses

    from .config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(a).items() if k in names}
    values["model_kwargs"] = {**getattr(a, "config_model_kwargs", {}),
                              **parse_model_args(a.model_arg)}
    return TrainConfig(**values)


def _print_config(a: argparse.Namespace) -> int:
    """--print-config: the settings a run would train with, every recipe value filled in,
    as a JSON object that --config reads back. Device and precision stay as given: with
    `auto`, a file written here trains in bf16 on a machine that has it."""
    cfg = _config_from_flags(a)
    settings = cfg.resolved().to_dict()
    settings["device"], settings["precision"] = cfg.device, cfg.precision
    print(json.dumps(settings, indent=2))
    return 0


def _bench_time_to_accuracy(a: argparse.Namespace) -> int:
    from .time_to_accuracy import time_to_accuracy

    if a.target is not None and not 0 < a.target <= 1:
        raise CifarError(f"--target {a.target}: give an accuracy between 0 and 1 (e.g. 0.91)")
    if a.json:
        check_output_file("--json", Path(a.json))
    if a.keep:
        check_output_folder("--keep", Path(a.keep))
    overrides = {"device": a.device, "mode": a.mode, "seed": a.seed,
                 "model_kwargs": parse_model_args(a.model_arg)}
    for key in ("epochs", "batch_size", "lr", "downscale", "downscale_epochs", "low_res",
                "low_res_epochs", "select_fraction", "select_from_epoch", "lookahead", "flip"):
        if getattr(a, key) is not None:
            overrides[key] = getattr(a, key)
    out = time_to_accuracy(a.model, a.runs, data_path=a.data, target=a.target,
                           overrides=overrides, keep=Path(a.keep) if a.keep else None,
                           log=lambda m: print(m, flush=True))
    if a.json:
        write_text_atomic("--json", Path(a.json), json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


def _cmd_experiment(a: argparse.Namespace) -> int:
    from .experiment import results_table, run_experiment

    if a.print_config:
        return _print_config(a)
    if not a.out:
        raise CifarError("--out DIR is required: the experiment's folder (run the same "
                         "command again to continue it)")
    cfg = _config_from_flags(a)
    run_experiment(cfg, a.runs, Path(a.out))
    print(results_table(Path(a.out)))
    return 0


def _cmd_lr_find(a: argparse.Namespace) -> int:
    from .lrfind import check_range, lr_range_test, plot

    check_range(a.steps, a.start, a.end)  # before any data loads
    for flag, path in (("--json", a.json), ("--plot", a.plot)):
        if path:
            check_output_file(flag, Path(path))
    if a.plot:
        from .report import _plt

        _plt()  # matplotlib missing: say so before the steps, not after
    if a.print_config:
        return _print_config(a)
    cfg = _config_from_flags(a)
    print(f"lr-find: {a.steps} steps, --lr from {a.start:g}x to {a.end:g}x the run's own",
          flush=True)
    r = lr_range_test(cfg, steps=a.steps, start=a.start, end=a.end,
                      log=lambda m: print(m, flush=True))
    if r["lowest_lr"] is None:
        print("too few steps before the loss diverged to suggest a rate; lower --end")
    else:
        blew = (f", and diverged at --lr {r['diverged_lr']:.3g}" if r["diverged_lr"]
                else "")
        print(f"{r['model']} ({r['optimizer']}, batch {r['batch_size']}): the loss was lowest "
              f"at --lr {r['lowest_lr']:.3g}{blew}; a one-cycle schedule's peak goes near "
              f"there (the recipe's --lr: {r['recipe_lr']:g})")
    if a.json:
        write_text_atomic("--json", Path(a.json), json.dumps(r, indent=1) + "\n")
        print(f"wrote {a.json}")
    if a.plot:
        plot(r, Path(a.plot))
        print(f"wrote {a.plot}")
    return 0


def _cmd_results(a: argparse.Namespace) -> int:
    from .experiment import results_table

    print(results_table(Path(a.experiment)))
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from .report import build_report

    page = build_report([Path(d) for d in a.dirs], Path(a.out), data_path=a.data,
                        modes_json=Path(a.modes) if a.modes else None)
    print(f"wrote {page} (PNGs embedded), {page.with_suffix('.md')} and the PNGs in {a.out}")
    return 0


def per_class_lines(r: dict[str, Any], classes: list[str], confusions: int = 3) -> str:
    """Each class's accuracy, five to a line, and the commonest mistakes: where a model
    falls short (the cat/dog pair, in CIFAR-10) matters as much as its overall score."""
    items = list(r["per_class_accuracy"].items())
    head = "per class: "
    if len(items) > 20:  # CIFAR-100: the weakest classes, not a hundred numbers
        items = sorted((x for x in items if x[1] is not None), key=lambda x: x[1])[:10]
        head = f"per class, the 10 lowest of {len(r['per_class_accuracy'])} (--json has all): "
    acc = [f"{c} {a:.1%}" if a is not None else f"{c} -" for c, a in items]
    lines = [head + "  ".join(acc[:5])]
    lines += [" " * 11 + "  ".join(acc[i:i + 5]) for i in range(5, len(acc), 5)]
    m = r["confusion"]
    mistakes = sorted(((m[t][p] / sum(m[t]), t, p) for t in range(len(m)) for p in range(len(m))
                       if t != p and m[t][p]), reverse=True)[:confusions]
    if mistakes:
        lines.append("most confused: " + ", ".join(f"{classes[t]} as {classes[p]} {f:.1%}"
                                                   for f, t, p in mistakes))
    return "\n".join(lines)


def model_labels(data: Any, classes: list[str], where: str | None) -> Any:
    """The test labels as indices into the model's `classes`. The data may hold any of
    them (a folder of one's own photos of cats and dogs, say), matched by name."""
    import numpy as np

    if data.classes == classes:
        return data.test_labels
    unknown = [c for c in data.classes if c not in classes]
    if unknown:
        raise CifarError(f"{where or 'data'}: classes {unknown} are not among the model's "
                         f"({', '.join(classes)}); name the class folders after them")
    return np.array([classes.index(c) for c in data.classes], dtype=np.int64)[data.test_labels]


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .datasets import load_cifar10
    from .inference import load

    shift = None
    if a.corrupt:
        from .corrupt import corrupt, parse

        shift = parse(a.corrupt)  # a typo stops here, before anything loads
    if a.predictions:
        check_output_file("--predictions", Path(a.predictions))
    clf = load(a.weights, device=a.device, tta=a.tta, tta_gate=a.tta_gate)
    data = load_cifar10(a.data, a.download, verbose=True)
    images = data.test_images if shift is None else corrupt(data.test_images, *shift)
    labels = model_labels(data, clf.classes, a.data)
    t0 = time.perf_counter()
    r = clf.evaluate(images, labels, keep_probabilities=bool(a.predictions))
    r["seconds"] = time.perf_counter() - t0
    if a.predictions:
        write_text_atomic("--predictions", Path(a.predictions),
                          predictions_csv(r.pop("probabilities"), labels, clf.classes))
    r["weights"] = str(clf.path)
    if shift is not None:
        r["corruption"] = {"name": shift[0], "severity": shift[1]}
    if a.json:
        print(json.dumps(r))
    else:
        tta = ""
        if clf.tta != "none":
            tta = f" with {clf.tta} TTA"
            if "accuracy_no_tta" in r:
                tta += f" ({r['accuracy_no_tta']:.2%} without)"
        gated = ""
        if clf.tta != "none" and clf.tta_gate is not None:
            gated = f"; TTA gated at {clf.tta_gate:g}: {r['views_per_image']:.2f} views per image"
        from .inference import TOP_K

        top = f", top-{TOP_K} {r[f'top{TOP_K}_accuracy']:.2%}" if len(clf.classes) > TOP_K else ""
        print(f"{clf.path}: {clf.meta['model']} test accuracy {r['accuracy']:.2%}{tta} "
              f"({r['correct']}/{r['n']}){top}, loss {r['loss']:.4f}, {r['seconds']:.1f}s{gated}"
              + (f"; the images under {shift[0]}, severity {shift[1]} of 5" if shift else ""))
        recorded = {clf.meta.get("tta", "none"): clf.meta.get("val_accuracy"),
                    "none": clf.meta.get("val_accuracy_no_tta", clf.meta.get("val_accuracy"))}
        if recorded.get(clf.tta) is not None and data.classes == clf.classes and not shift:
            every = ", every view of every image" if clf.tta_gate and clf.tta != "none" else ""
            print(f"(recorded at training time{every}: {recorded[clf.tta]:.2%})")
        print(per_class_lines(r, clf.classes))
        c = r["calibration"]
        if r["n"]:
            conf, acc = f"{c['confidence']:.1%}", f"{r['accuracy']:.1%}"
            # equal as printed, "under-confident" would read as a contradiction
            side = ("as confident as accurate" if conf == acc
                    else "over-confident" if c["confidence"] > r["accuracy"]
                    else "under-confident")
            print(f"calibration: mean confidence {conf} against accuracy {acc} ({side}), "
                  f"expected calibration error {c['ece']:.1%}")
    return 0


def predictions_csv(probs: Any, labels: Any, classes: list[str]) -> str:
    """One row per test image, in the data's order: its index, true and predicted class,
    the predicted class's probability, whether it was right, and every class's
    probability, for an analysis of one's own (pandas.read_csv)."""
    import csv
    import io

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["index", "true", "predicted", "confidence", "correct",
                *(f"p_{c}" for c in classes)])
    for i, (p, t) in enumerate(zip(probs, labels, strict=True)):
        k = int(p.argmax())
        w.writerow([i, classes[t], classes[k], f"{p[k]:.6f}", int(k == t),
                    *(f"{v:.6f}" for v in p)])
    return out.getvalue()


def _cmd_export(a: argparse.Namespace) -> int:
    from .datasets import load_cifar10, sample
    from .export import export, export_path
    from .inference import load

    if not a.no_check and a.check_images < 1:
        raise CifarError(f"--check-images {a.check_images}: check at least 1 image, or pass "
                         "--no-check")
    clf = load(a.weights, device="cpu", tta=a.tta)
    if not hasattr(clf, "model"):
        raise CifarError(f"--weights {a.weights}: already an export; give safetensors weights")
    if a.int8 and a.format != "onnx":
        raise CifarError(f"--int8: an ONNX graph only (ONNX Runtime runs it); give --format "
                         f"onnx, not {a.format}")
    if a.calibration_images is not None and not a.int8:
        raise CifarError("--calibration-images: only an --int8 export is calibrated; add "
                         "--int8 or leave it out")
    calibration_images = 1000 if a.calibration_images is None else a.calibration_images
    if a.int8 and calibration_images < 1:
        raise CifarError(f"--calibration-images {calibration_images}: calibrate on at "
                         "least 1 image")
    # where it goes, checked before minutes of data loading, tracing and checking
    out = export_path(clf.path, a.format, a.out, int8=a.int8)
    check_output_file("--out", out)
    images = labels = calibration = None
    if not a.no_check or a.int8:
        data = load_cifar10(a.data, verbose=True)
        if not a.no_check:
            # a fixed random sample, not the first N: the JPEG copy stores its test set
            # sorted by class, so its first 2,000 are airplanes and cars only
            pick = sample(len(data.test_labels), a.check_images)
            images = data.test_images[pick]
        if not a.no_check and a.int8:  # int8 is checked by its accuracy
            labels = model_labels(data, clf.classes, a.data)[pick]
        if a.int8:
            from .datasets import balanced_subset

            n = min(calibration_images, len(data.train_labels))
            calibration = data.train_images[balanced_subset(data.train_labels, n)]
    r = export(clf, a.format, out, check_images=images, check_labels=labels,
               int8_calibration=calibration)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"wrote {r['file']} ({a.format}{', int8' if a.int8 else ''}, {r['bytes']:,} bytes): "
          f"uint8 (N, 32, 32, 3) -> probabilities, TTA {clf.tta}")
    if images is not None and a.int8:
        print(f"checked on {r['checked_images']:,} real test images after reloading: accuracy "
              f"{r['accuracy']:.2%} (fp32 graph {r['accuracy_fp32']:.2%}; at most "
              f"{r['max_drop']:.0%} lower is accepted), same top-1 class {r['same_top1']:.2%}")
    elif images is not None:
        print(f"checked on {r['checked_images']:,} real test images after reloading: max "
              f"|p - p_eager| = {r['max_abs_diff']:.2e} (tolerance {r['tolerance']:g}), "
              f"same top-1 class {r['same_top1']:.2%}")
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from .inference import check_top, image_files, load, top_classes

    check_top(a.top)  # before any work
    files = image_files(a.images)
    clf = load(a.weights, device=a.device, tta=a.tta, tta_gate=a.tta_gate)
    probs = clf.predict_files(files)
    results = [{"file": str(path), "top": top_classes(p, clf.classes, a.top)}
               for path, p in zip(files, probs, strict=True)]
    if a.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=None))
    else:
        for r in results:
            tops = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"])
            print(f"{r['file']}: {tops}")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import signal

    from .inference import load
    from .serve import make_server

    if not 0 <= a.port <= 65535:
        raise CifarError(f"--port {a.port}: give a port number from 0 to 65535")
    clf = load(a.weights, device=a.device, tta=a.tta, tta_gate=a.tta_gate)
    server = make_server(clf, a.host, a.port, top=a.top, max_batch=a.max_batch,
                         max_wait=a.max_wait_ms / 1000)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # a service manager's SIGTERM stops it as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    host, port = server.server_address[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"serving {clf.path} ({clf.meta.get('model')}, TTA {clf.tta}) on {url}/ : POST an "
          f"image file to /predict (curl --data-binary @photo.jpg {url}/predict, or several: "
          f"curl -F file=@a.jpg -F file=@b.png {url}/predict); GET /health; Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from .info import describe, format_info

    d = describe(a.weights)
    print(json.dumps(d) if a.json else format_info(d))
    return 0


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from .calibrate import calibrate, output_path, save_temperature
    from .datasets import load_cifar10
    from .inference import load

    if a.images < 100:
        raise CifarError(f"--images {a.images}: fit on at least 100 images (10,000 by default)")
    clf = load(a.weights, device=a.device)
    if not hasattr(clf, "model"):
        raise CifarError(f"--weights {a.weights}: an export; calibrate the safetensors weights, "
                         "then export them again")
    out = output_path(clf.path, Path(a.out) if a.out else None)
    data = load_cifar10(a.data, verbose=not a.json)
    if data.classes != clf.classes:
        raise CifarError(f"{a.data or 'data'}: classes {data.classes} differ from the "
                         f"model's {clf.classes}")
    fit = calibrate(clf, data, a.split, a.images)
    save_temperature(clf.path, fit, out)
    fit["weights"] = str(out)
    if a.json:
        print(json.dumps(fit))
    else:
        print(f"temperature {fit['temperature']:.4f}, fitted on {fit['images']:,} {fit['split']} "
              f"images ({fit['tta']} TTA): their loss {fit['nll_before']:.4f} -> "
              f"{fit['nll_after']:.4f}, calibration error {fit['ece_before']:.1%} -> "
              f"{fit['ece_after']:.1%}\nwrote {out}; predict, serve, evaluate and export "
              "apply it from now on")
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    """Each model with the recipe `train` gives it and the arguments --model-arg sets."""
    import inspect
    import textwrap

    from .config import DEFAULTS
    from .models import MODELS, build_model, count_parameters, get_spec

    rows = []
    for name in [a.name] if a.name else list(MODELS):
        spec = get_spec(name)
        arguments = {k: list(v.default) if isinstance(v.default, tuple) else v.default
                     for k, v in inspect.signature(spec.build).parameters.items()
                     if v.default is not inspect.Parameter.empty}
        rows.append({"name": name, "parameters": count_parameters(build_model(name)),
                     "summary": spec.summary, "recipe": {**DEFAULTS, **spec.recipe},
                     "arguments": arguments})
    if a.json:
        print(json.dumps(rows if not a.name else rows[0]))
        return 0
    for r in rows:
        print(f"{r['name']:<10} {r['parameters']:>10,} params  {r['summary']}")
        if not a.name:
            continue
        # as flags, the form a user changes them in (tta_every_epoch has no flag); a
        # no-break space keeps each flag on the line of its value
        flags = " ".join(f"--{k.replace('_', '-')}\xa0{v}" for k, v in r["recipe"].items()
                         if k != "tta_every_epoch")
        args = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}"
                        for k, v in r["arguments"].items())
        for label, text in (("recipe", flags), ("--model-arg", args)):
            print(textwrap.fill(text, width=88, initial_indent=f"  {label:<12}",
                                subsequent_indent=" " * 14, break_on_hyphens=False
                                ).replace("\xa0", " "))
    return 0


def build_parser(config: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; `config`: a --config file's settings, the training flags'
    defaults."""
    parser = argparse.ArgumentParser(prog="cifarcnn", description="Train, evaluate and serve "
                                     "CNN classifiers on CIFAR-10.")
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:  # read from the installed package's metadata: importing torch takes seconds
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    # the versions a bug report needs
    parser.add_argument("--version", action="version", version=f"cifarcnn {__version__} "
                        f"(torch {torch_version}, Python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub, config)
    _add_experiment_and_report(sub, config)
    for name, helptext in (("evaluate", "test accuracy of saved weights"),
                           ("predict", "classify image files"),
                           ("serve", "classify images sent over HTTP (POST /predict)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--weights", default="paper-cnn",
                       help="weights .safetensors, run directory, or shipped model name "
                       "(default: paper-cnn)")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
        if name != "serve":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--tta", choices=["none", "flip", "flip-shift"], default=None,
                       help="test-time augmentation (default: the one recorded with the "
                       "weights, from the model's recipe)")
        p.add_argument("--no-tta", dest="tta", action="store_const", const="none",
                       help="a single view per image")
        p.add_argument("--tta-gate", type=float, metavar="P",
                       help="run the TTA's other views only on images whose single view "
                       "gives its top class less than P (e.g. 0.7 for fast, 0.9 for paper-cnn; "
                       "default: all images)")
    evaluate = sub.choices["evaluate"]
    evaluate.add_argument("--data", help="CIFAR-10 archive or folder")
    evaluate.add_argument("--download", action="store_true")
    evaluate.add_argument("--predictions", metavar="FILE.csv",
                          help="also write each test image's true and predicted class and "
                          "its class probabilities, one CSV row per image")
    evaluate.add_argument("--corrupt", metavar="NAME:SEVERITY",
                          help="accuracy under a common corruption of the test images: "
                          "gaussian_noise, gaussian_blur, contrast, brightness, jpeg or "
                          "pixelate, severity 1-5 (e.g. gaussian_noise:3)")
    predict = sub.choices["predict"]
    predict.add_argument("images", nargs="+", metavar="IMG",
                         help="image files, any size/mode, or folders of them; - reads one "
                         "from standard input")
    predict.add_argument("--top", type=int, default=3, help="classes to show per image")
    serve = sub.choices["serve"]
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; "
                       "0.0.0.0: every network)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000; 0: any free one")
    serve.add_argument("--top", type=int, default=3, help="classes in each answer's top list")
    serve.add_argument("--max-batch", type=int, default=64, metavar="N",
                       help="most requests classified in one forward pass (default 64)")
    serve.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                       help="while other requests are still being read, how long a batch "
                       "waits for them to join (default 2; none waits when none is arriving)")
    ex = sub.add_parser("export", help="write TorchScript or ONNX and prove it equals eager")
    ex.add_argument("--weights", default="paper-cnn",
                    help="weights .safetensors, run directory or shipped model name")
    ex.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    ex.add_argument("--out", help="output file (default: beside the weights, .pt / .onnx, "
                    "-int8.onnx with --int8; a shipped model's in the current folder)")
    ex.add_argument("--tta", choices=["none", "flip", "flip-shift"], default=None,
                    help="TTA built into the graph (default: the weights' recipe)")
    ex.add_argument("--no-tta", dest="tta", action="store_const", const="none")
    ex.add_argument("--data", help="CIFAR-10 for the equality check (real test images)")
    ex.add_argument("--check-images", type=int, default=2000, metavar="N",
                    help="test images compared with eager after reloading (default 2000)")
    ex.add_argument("--no-check", action="store_true", help="skip the equality check")
    ex.add_argument("--int8", action="store_true",
                    help="ONNX only: quantize to int8 (faster on CPUs), calibrated on training "
                    "images; checked by its accuracy instead (needs --data)")
    ex.add_argument("--calibration-images", type=int, metavar="N",
                    help="with --int8: class-balanced training images to calibrate on "
                    "(default 1000)")
    ex.add_argument("--json", action="store_true")
    cal = sub.add_parser("calibrate", help="fit a temperature that makes the probabilities "
                         "match the accuracy (temperature scaling), stored in the weights")
    cal.add_argument("--weights", required=True,
                     help="weights .safetensors or run directory (changed in place unless "
                     "--out), or a shipped model name (with --out)")
    cal.add_argument("--data", help="CIFAR-10 archive or folder")
    cal.add_argument("--split", choices=["val", "train", "test"], default="val",
                     help="images to fit on (default val: those the run validated on, its "
                     "--holdout images or else the test images; train: biased, the net has "
                     "fitted them)")
    cal.add_argument("--images", type=int, default=10_000, metavar="N",
                     help="class-balanced images of the split to fit on (default 10,000)")
    cal.add_argument("--out", help="write the calibrated weights here instead")
    cal.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    cal.add_argument("--json", action="store_true", help="machine-readable output")
    info = sub.add_parser("info", help="what a weights file or export holds: model, classes, "
                          "TTA, recorded accuracy, how it was trained, checksum")
    info.add_argument("weights", help="weights .safetensors, run directory, shipped model name, "
                      "or a .onnx / .pt export")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench",
                                                                       required=True)
    bm = bench.add_parser("modes", help="time training and inference per execution mode "
                          "(the paper's Fig. 2)")
    bm.add_argument("--model", default="paper-cnn")
    bm.add_argument("--epochs", type=int, default=25)
    bm.add_argument("--runs", type=int, default=2, help="training runs per mode (best/worst)")
    bm.add_argument("--data", help="CIFAR-10 archive or folder")
    bm.add_argument("--limit-train", type=int, metavar="N", help="train on N images only")
    bm.add_argument("--modes", default="eager,compile,trace,script",
                    help="comma-separated subset of eager,compile,trace,script")
    bm.add_argument("--devices", help="comma-separated (default: every available device)")
    bm.add_argument("--out", default="bench-modes", help="folder for modes.csv / modes.json")
    tb = bench.add_parser("time-to-accuracy", help="R seeded trainings: accuracy with and "
                          "without TTA, training seconds, mean ± std")
    tb.add_argument("--model", default="fast")
    tb.add_argument("--runs", type=int, default=3)
    tb.add_argument("--seed", type=int, default=0, metavar="S",
                    help="first seed: the runs are seeds S..S+R-1 (a confirming benchmark "
                    "on other seeds)")
    tb.add_argument("--data", help="CIFAR-10 archive or folder")
    tb.add_argument("--target", type=float, metavar="ACC",
                    help="report when the mean validation accuracy first reached ACC (0-1)")
    tb.add_argument("--json", metavar="FILE", help="write the results as JSON")
    tb.add_argument("--epochs", type=int, help="override the recipe's epochs")
    tb.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="model constructor argument, VALUE in JSON (e.g. widths=[64,256,256])")
    tb.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    tb.add_argument("--lr", type=float, help="override the recipe's learning rate")
    tb.add_argument("--downscale", type=int, metavar="PX", help="override the recipe's "
                    "downscaled first epochs (0: off)")
    tb.add_argument("--downscale-epochs", type=int, metavar="N")
    tb.add_argument("--low-res", type=int, metavar="PX", help="override the recipe's "
                    "cropped low-resolution epochs (0: off)")
    tb.add_argument("--low-res-epochs", type=int, metavar="N")
    tb.add_argument("--select-fraction", type=float, metavar="F",
                    help="override the recipe's loss-based selection (1: off)")
    tb.add_argument("--select-from-epoch", type=int, metavar="E")
    tb.add_argument("--lookahead", type=int, metavar="K",
                    help="override the recipe's Lookahead interval (0: off)")
    tb.add_argument("--flip", choices=["random", "alternate", "alternate-seen"],
                    help="override the recipe's mirroring (see `cifarcnn train --help`)")
    tb.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    tb.add_argument("--mode", default="eager", choices=["eager", "compile", "trace", "script"])
    tb.add_argument("--keep", metavar="DIR", help="keep the run folders here")
    mo = sub.add_parser("models", help="list the models; with a name, its recipe and "
                        "arguments")
    mo.add_argument("name", nargs="?", help="one model: the settings `train --model NAME` "
                    "uses and the --model-arg keys it takes")
    mo.add_argument("--json", action="store_true")
    return parser


def _cmd_bench(a: argparse.Namespace) -> int:
    from .bench import bench_modes
    from .modes import MODES

    if a.bench == "time-to-accuracy":
        return _bench_time_to_accuracy(a)
    chosen = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    unknown = [m for m in chosen if m not in MODES]
    if unknown or not chosen:
        raise CifarError(f"--modes {a.modes!r}: choose from {', '.join(MODES)}")
    if a.runs < 1 or a.epochs < 1:
        raise CifarError("--runs and --epochs must be at least 1")
    devices = [d.strip() for d in a.devices.split(",")] if a.devices else None
    check_output_folder("--out", Path(a.out))
    bench_modes(a.model, a.epochs, a.runs, data_path=a.data, limit_train=a.limit_train,
                devices=devices, mode_list=chosen, out=Path(a.out),
                log=lambda m: print(m, flush=True))
    print(f"wrote {a.out}/modes.csv and {a.out}/modes.json")
    return 0


COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
            "serve": _cmd_serve, "export": _cmd_export, "bench": _cmd_bench,
            "experiment": _cmd_experiment, "results": _cmd_results, "report": _cmd_report,
            "models": _cmd_models, "info": _cmd_info, "calibrate": _cmd_calibrate,
            "lr-find": _cmd_lr_find}


# errno values that mean "the disk or stream can't take what we write", not a bug
OUTPUT_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from .checkpoint import Interrupted

    plain = warnings.showwarning

    def one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
        """Our own warnings as one line, without the source path and line a user can't act
        on; other libraries' in their usual form."""
        if str(message).startswith("cifarcnn: "):
            print(f"cifarcnn {args.command}: warning: {str(message).removeprefix('cifarcnn: ')}",
                  file=sys.stderr)
        else:
            plain(message, category, filename, lineno, file, line)

    try:
        if getattr(args, "config", None) is not None:
            from .config import read_config_file

            # parsed again with the file's settings as the defaults: given flags win
            args = build_parser(read_config_file(args.config)).parse_args(argv)
            args.argv = argv
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # inside the try: a reader that left is caught below
            return code
    except BrokenPipeError:
        # The reader of our output has gone (`cifarcnn models | head -1`): stop without
        # a traceback. Point stdout at /dev/null so the interpreter's last flush of what
        # is still buffered does not raise again; 141 is the shell's code for SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if e.errno not in OUTPUT_FAILURES:
            raise
        # the disk or the output stream failed (`> /dev/full`, a full or read-only disk)
        # somewhere no command checks for it: one line, as for any other bad input
        if e.filename is None:  # the stream: what is still buffered must not raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"cifarcnn {args.command}: error: cannot write {e.filename or 'the output'} "
              f"({e.strerror}); free space or choose another place", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"cifarcnn {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except CifarError as e:
        print(f"cifarcnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cifarcnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
