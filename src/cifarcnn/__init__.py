"""cifarcnn: train, evaluate, benchmark and serve CNN classifiers on CIFAR-10."""

from typing import TYPE_CHECKING, Any

from .errors import CifarError

if TYPE_CHECKING:
    from .inference import Classifier, load

__all__ = ["CifarError", "Classifier", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`load` and `Classifier` on first use: they need torch, whose import takes ~2 s,
    which `cifarcnn --help`, `--version` and a mistyped flag should not wait for."""
    if name in ("Classifier", "load"):
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'cifarcnn' has no attribute {name!r}")
