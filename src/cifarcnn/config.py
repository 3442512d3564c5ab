"""Training configuration: one dataclass, filled from flags, then the model's recipe.

A field left as None means "the model's recipe decides" (see models/*.py),
and where the recipe is silent too, `DEFAULTS` does. The resolved config is
what lands in the run's config.json and the weights' metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CifarError
from .models import build_model, get_spec

DEFAULTS: dict[str, Any] = {
    "epochs": 25,
    "batch_size": 256,
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "warmup_epochs": 1.0,
    "label_smoothing": 0.0,
    "tta": "none",
    "tta_every_epoch": True,
    "downscale": 0,
    "downscale_epochs": 0,
    "low_res": 0,
    "low_res_epochs": 0,
    "translate": 4,
    "pad_mode": "zeros",
    "noise": 0.0,
    "flip": "random",
    "select_fraction": 1.0,
    "select_from_epoch": 1,
    "lookahead": 0,
    "lookahead_decay": 0.95,
}
OPTIMIZERS = ("sgd", "adamw", "muon")  # muon: see optim.py
SCHEDULES = ("onecycle", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
PAD_MODES = ("zeros", "reflect")
FLIP_MODES = ("random", "alternate", "alternate-seen")  # see augment.epoch_plan
TTA_MODES = ("none", "flip", "flip-shift")  # the views are defined in inference.TTA_VIEWS
EXEC_MODES = ("eager", "compile", "trace", "script")  # see modes.py


@dataclass
class TrainConfig:
    model: str | None = None  # None: paper-cnn, or with init_from the model those weights hold
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # fine-tuning: start from these weights (a .safetensors file, run directory or shipped
    # name) instead of a fresh initialisation; their model and arguments are the run's, and
    # a head for other classes starts afresh (weights.init_from_weights)
    init_from: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    tta: str | None = None  # test-time augmentation for validation and for the saved weights
    tta_every_epoch: bool | None = None  # False: plain-view validation until the last epoch
    # > 0: the first downscale_epochs train on whole images shrunk to this size, then
    # (low_res > 0) the next low_res_epochs on crops of low_res pixels, then the rest at 32
    downscale: int | None = None
    downscale_epochs: int | None = None
    low_res: int | None = None
    low_res_epochs: int | None = None
    translate: int | None = None  # random crops move images by up to this many pixels
    pad_mode: str | None = None  # what fills the border uncovered by a translation
    flip: str | None = None  # random: a coin per image and epoch; alternate: see augment.py
    # > 0: Gaussian pixel noise on each training image, its standard deviation drawn from
    # [0, noise] (a fraction of the range): robustness to noisy photos (augment.add_noise)
    noise: float | None = None
    # < 1: from epoch select_from_epoch (counted from 0) on, each epoch trains on this fraction
    # of the images, those with the highest loss when last seen (see train.epoch_images)
    select_fraction: float | None = None
    select_from_epoch: int | None = None
    # > 0: Lookahead every this many steps, the slow weights' per-step decay lookahead_decay
    # (see optim.Lookahead); the saved weights are the slow ones
    lookahead: int | None = None
    lookahead_decay: float | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None  # None: on for conv nets (faster on CPU and CUDA)
    augment: bool = True
    data: str | None = None
    download: bool = False
    out: str | None = None
    limit_train: int | None = None
    holdout: int = 0
    eval_batch_size: int = 1000
    skip_bad_images: bool = False
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    sync_bn: bool = False  # under DDP: BatchNorm statistics over the global batch
    dist_timeout: float = 300.0  # seconds any collective may wait before the job fails
    tensorboard: bool = False  # event files beside metrics.jsonl (needs the tensorboard extra)
    mode: str = "eager"  # eager | compile | trace | script (see modes.py)
    deterministic: bool = False  # deterministic kernels only (CUDA needs this for exact repeats)

    def resolved(self) -> TrainConfig:
        """A copy with every None filled in and every choice checked."""
        c = dataclasses.replace(self, model_kwargs=dict(self.model_kwargs))
        if c.init_from is not None:
            from .weights import read_meta, resolve_weights_path

            path = resolve_weights_path(c.init_from)
            if path.suffix.lower() in (".onnx", ".pt", ".ts"):
                raise CifarError(f"--init-from {c.init_from}: an export, a graph for inference; "
                                 "give the .safetensors weights it was exported from")
            meta = read_meta(path)
            if c.model is not None and c.model != meta["model"]:
                raise CifarError(f"--init-from {c.init_from}: holds a {meta['model']} model, "
                                 f"not {c.model}; leave --model out, or give --model "
                                 f"{meta['model']}")
            # an absolute path: a resumed run finds it from any folder
            c.init_from, c.model = str(path.resolve()), meta["model"]
            # the weights' own arguments (widths...), but their class count is the data's
            c.model_kwargs = {**{k: v for k, v in meta.get("model_kwargs", {}).items()
                                 if k != "num_classes"}, **c.model_kwargs}
            if c.model_kwargs != {k: v for k, v in meta.get("model_kwargs", {}).items()
                                  if k != "num_classes"}:
                from .weights import shape_mismatches

                diff = shape_mismatches(path, meta, c.model_kwargs)
                if diff:
                    raise CifarError(f"--init-from {self.init_from}: its tensors do not fit "
                                     f"{c.model} with arguments {c.model_kwargs} (first "
                                     f"differences, name and shape: {diff}); leave out the "
                                     "--model-arg that changes them")
        elif c.model is None:
            c.model = "paper-cnn"
        spec = get_spec(c.model)
        # the model's own checks of its arguments, before any data is read or run written
        build_model(c.model, **c.model_kwargs)
        for k, v in DEFAULTS.items():
            if getattr(c, k) is None:
                setattr(c, k, spec.recipe.get(k, v))
        c.device = resolve_device(c.device)
        if c.mode == "script" and c.device == "cuda":
            # TorchScript's autocast breaks the backward of a scripted max-pool on CUDA
            # (a bf16/fp32 mismatch, seen with PyTorch 2.11 on an H100): train in fp32
            if c.precision in ("bf16", "fp16"):
                raise CifarError(f"--mode script --precision {c.precision}: on CUDA, "
                                 "TorchScript's mixed precision fails in the backward pass; "
                                 "use --precision fp32 with script, or --mode trace/compile")
            c.precision = "fp32"
        c.precision = resolve_precision(c.precision, c.device)
        if c.channels_last is None:
            c.channels_last = True
        for name, value, choices in (("optimizer", c.optimizer, OPTIMIZERS),
                                     ("schedule", c.schedule, SCHEDULES),
                                     ("tta", c.tta, TTA_MODES),
                                     ("pad-mode", c.pad_mode, PAD_MODES),
                                     ("flip", c.flip, FLIP_MODES),
                                     ("mode", c.mode, EXEC_MODES)):
            if value not in choices:
                raise CifarError(f"--{name} {value!r}: choose one of {', '.join(choices)}")
        if c.epochs < 1 or c.batch_size < 1:
            raise CifarError("--epochs and --batch-size must be at least 1")
        if c.seed < 0:  # run folders (seed-<i>) and the augmentation seeds assume it
            raise CifarError(f"--seed {c.seed}: give a seed of 0 or more")
        if not 0 <= c.translate <= 8:
            raise CifarError(f"--translate {c.translate}: choose 0 to 8 pixels")
        if c.downscale and not (8 <= c.downscale <= 32 and c.downscale_epochs >= 0):
            raise CifarError(f"--downscale {c.downscale} for {c.downscale_epochs} epochs: "
                             "choose a size of 8 to 32 pixels and a number of epochs >= 0")
        if c.low_res and not (8 <= c.low_res <= 32 and c.low_res_epochs >= 0):
            raise CifarError(f"--low-res {c.low_res} for {c.low_res_epochs} epochs: choose a "
                             "crop of 8 to 32 pixels and a number of epochs >= 0")
        # the last epoch always sees whole images: BatchNorm statistics and the head must
        # end on the size the model is evaluated at (a short --epochs shortens the small
        # epochs, the cropped ones first)
        c.downscale_epochs = min(c.downscale_epochs, c.epochs - 1) if c.downscale else 0
        c.low_res_epochs = min(c.low_res_epochs, c.epochs - 1 - c.downscale_epochs)
        small = (c.downscale_epochs and c.downscale != 32) or (
            c.low_res and c.low_res_epochs and c.low_res != 32)
        if small and not spec.any_size:
            raise CifarError(f"--downscale/--low-res: {c.model} takes 32x32 images only (its "
                             "fully connected layers fix the input size); train it without "
                             "them, or resize progressively with --model fast")
        if not 0 < c.select_fraction <= 1 or c.select_from_epoch < 1:
            raise CifarError(f"--select-fraction {c.select_fraction} from epoch "
                             f"{c.select_from_epoch}: choose a fraction in (0, 1] and a first "
                             "epoch >= 1 (the first epoch sees every image once)")
        if c.lookahead < 0 or not 0 <= c.lookahead_decay < 1:
            raise CifarError(f"--lookahead {c.lookahead} --lookahead-decay {c.lookahead_decay}: "
                             "choose every >= 0 steps (0: off) and a decay in [0, 1)")
        # NaN passes every comparison below, so finiteness is checked first
        for flag, value in (("--lr", c.lr), ("--momentum", c.momentum),
                            ("--weight-decay", c.weight_decay),
                            ("--warmup-epochs", c.warmup_epochs),
                            ("--label-smoothing", c.label_smoothing),
                            ("--lookahead-decay", c.lookahead_decay),
                            ("--select-fraction", c.select_fraction), ("--noise", c.noise),
                            ("--dist-timeout", c.dist_timeout)):
            if not math.isfinite(value):
                raise CifarError(f"{flag} {value}: give a finite number")
        if not 0 <= c.noise <= 1:
            raise CifarError(f"--noise {c.noise}: choose a standard deviation in [0, 1], a "
                             "fraction of the pixel range (0.1 is strong noise)")
        if c.lr <= 0:
            raise CifarError(f"--lr {c.lr}: must be positive")
        if not 0 <= c.momentum < 1:
            raise CifarError(f"--momentum {c.momentum}: choose a value in [0, 1)")
        if c.weight_decay < 0 or c.warmup_epochs < 0:
            raise CifarError(f"--weight-decay {c.weight_decay} --warmup-epochs "
                             f"{c.warmup_epochs}: neither may be negative")
        if not 0 <= c.label_smoothing < 1:
            raise CifarError(f"--label-smoothing {c.label_smoothing}: choose a value in [0, 1)")
        if c.dist_timeout <= 0:
            raise CifarError(f"--dist-timeout {c.dist_timeout}: give a positive number of "
                             "seconds")
        if c.eval_batch_size < 1:
            raise CifarError(f"eval_batch_size {c.eval_batch_size}: must be at least 1")
        if c.checkpoint_every < 0:
            raise CifarError(f"--checkpoint-every {c.checkpoint_every}: must be >= 0")
        if c.holdout < 0 or (c.limit_train is not None and c.limit_train < 1):
            raise CifarError("--holdout must be >= 0 and --limit-train >= 1")
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, saved: Any, where: str) -> TrainConfig:
        """A config from a run's config.json or checkpoint, each field's JSON type checked
        against its annotation (a damaged or edited file would otherwise fail later, as
        a TypeError deep in training); fields this version does not know are left out."""
        if not isinstance(saved, dict):
            raise CifarError(f"{where}: the saved config is not a JSON object; the run "
                             "folder is damaged")
        return cls(**checked_fields(saved, f"{where}: the saved config's",
                                    "the run folder is damaged or was edited"))


def checked_fields(saved: dict[str, Any], whose: str, hint: str) -> dict[str, Any]:
    """The TrainConfig fields in `saved`, each value's type checked against the field's
    annotation; keys that are no field are left out. `whose` and `hint` frame the error
    ("run/config.json: the saved config's", "the run folder is damaged")."""
    kinds = {"int": int, "float": (int, float), "str": str, "bool": bool, "None": type(None),
             "dict[str, Any]": dict}
    values = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in saved:
            continue
        v = saved[f.name]
        allowed = tuple(kinds[t] for t in str(f.type).split(" | "))
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            raise CifarError(f"{whose} {f.name!r} is {v!r}, not {f.type}; {hint}")
        values[f.name] = v
    return values


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of a `--config` file: TOML or JSON, keyed by TrainConfig's field
    names (the flags' names with _ for -, and model_kwargs for --model-arg).

    A run's config.json, or the run folder itself, is such a file, so any run can be
    repeated or varied (`--config runs/f --seed 1`). Every key must be a field: a
    misspelt one would otherwise be dropped, and the run would silently use the recipe.
    Its `out` is not used (a rerun must not land in the run it came from).
    """
    import difflib
    import json
    from pathlib import Path

    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
        if not file.is_file():
            raise CifarError(f"--config {path}: a folder without config.json; give a TOML "
                             "or JSON file, or a run folder")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CifarError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CifarError(f"--config {path}: cannot read it ({e})") from None
    if file.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise CifarError(f"--config {path}: TOML needs Python 3.11 or later; write the "
                             "settings as JSON") from None
        try:
            saved = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise CifarError(f"--config {path}: not valid TOML ({e})") from None
    else:
        try:
            saved = json.loads(text)
        except json.JSONDecodeError as e:
            raise CifarError(f"--config {path}: not valid JSON ({e}); name a TOML file "
                             "*.toml") from None
        if not isinstance(saved, dict):
            raise CifarError(f"--config {path}: holds no JSON object of settings")
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in saved:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            raise CifarError(f"--config {path}: {key!r} is no setting"
                             + (f" (did you mean {near[0]!r}?)" if near else "")
                             + "; the settings are TrainConfig's fields, listed in "
                             "`cifarcnn train --print-config`")
    values = checked_fields(saved, f"--config {path}: its", "fix the file")
    values.pop("out", None)
    return values


def recipe_changes(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved training settings in which a run departs from its model's recipe.

    Kept in the weights' metadata, so weights that travel without their run folder
    still say how they were made (`cifarcnn info`: trained with `--noise 0.1`, say).
    A setting whose feature is off (the epochs of a `--downscale 0`) is left out.
    """
    recipe = get_spec(cfg.model).recipe
    off = {"downscale_epochs": not cfg.downscale, "low_res_epochs": not cfg.low_res,
           "lookahead_decay": not cfg.lookahead, "select_from_epoch": cfg.select_fraction >= 1}
    changes = {k: getattr(cfg, k) for k, v in DEFAULTS.items()
               if getattr(cfg, k) != recipe.get(k, v) and not off.get(k)}
    if not cfg.augment:
        changes["augment"] = False
    return changes


def resolve_device(name: str) -> str:
    if name not in DEVICES:
        raise CifarError(f"--device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CifarError("--device cuda: no CUDA GPU is visible to this PyTorch; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise CifarError("--device mps: Apple MPS is not available here; use --device cpu")
    return name


@functools.cache
def cpu_has_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated,
    and on an AVX2 AMD EPYC its convolutions ran 5-65x slower than fp32, its matrix products
    50-100x."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CPUINFO = Path("/proc/cpuinfo")


def _paired_best(first: Any, second: Any, rounds: int) -> tuple[float, float]:
    """Best-of-`rounds` seconds of two calls, timed in turn so that a burst of other work on
    the machine lands on both: timed one after the other, a busy moment during the first
    alone once made a 2x slower product look the faster."""
    first(), second()  # the first call picks and JIT-compiles the kernel: not timed
    best = [math.inf, math.inf]
    for _ in range(rounds):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


BF16_MARGIN = 0.8
"""bf16 must take under this fraction of fp32's time to be picked: the CPUs measured sit far
from 1 (0.5 on AMD Zen 4/5, 2.0 on a Xeon without AMX), and a near tie is left to fp32,
which is the more accurate of the two."""


@functools.cache
def cpu_bf16_pays() -> bool:
    """True where bf16 arithmetic is faster than fp32 on this CPU, measured once a process.

    Native bf16 is not always the faster one: on the AMD Zen 4/5 of this project a core
    issues one 512-bit bf16 dot product (64 FLOP) a cycle against one fp32 FMA (32 FLOP), but
    on an Intel Xeon with AVX512-BF16 and no AMX it was the other way round (28.7 against
    57.9 FLOP a cycle: `benchmarks/cpu_peak.py`), and the fast net's step took 2.53 s in bf16
    against 1.88 s in fp32 (README, "A fourth CPU"). So the two products are timed (a
    768-square matrix product each, in turn, best of 7 after a warm-up: ~70 ms in all); AMX
    multiplies bf16 several times faster than fp32, so it needs no timing."""
    if not cpu_has_bf16():
        return False
    try:
        if "amx_bf16" in CPUINFO.read_text():
            return True
    except OSError:
        pass
    # on the CPU by name: a call can come from inside a model's constructor, which
    # `build_model` runs under `torch.device("meta")` first, where the products take no
    # time and tie (`int8.pays()` made such a first call, and a Zen 5 trained in fp32:
    # docs/fast-recipe.md, "A twenty-fourth round")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(768, 768, generator=gen, device="cpu")
    b16 = a.bfloat16()
    fp32, bf16 = _paired_best(lambda: a @ a, lambda: b16 @ b16, 7)
    return bf16 < BF16_MARGIN * fp32


def resolve_precision(name: str, device: str) -> str:
    """`auto` picks the fastest precision that keeps accuracy on the device."""
    if name not in PRECISIONS:
        raise CifarError(f"--precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name != "auto":
        if name == "fp16" and device == "cpu":
            raise CifarError("--precision fp16 is not supported for training on CPU; "
                             "use bf16 or fp32")
        if name == "bf16" and device == "cpu" and not cpu_has_bf16():
            warnings.warn("cifarcnn: --precision bf16 on a CPU without bf16 hardware: PyTorch "
                          "emulates it, 5-65x slower than fp32 for convolutions (README, "
                          "'A third CPU'); --precision auto picks fp32 here", stacklevel=2)
        return name
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu":
        return "bf16" if cpu_bf16_pays() else "fp32"
    return "fp32"


def amp_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
