"""Model registry: every model is one module, selected by name.

Each entry pairs a constructor with the training recipe that suits it, so
`cifarcnn train --model NAME` needs no other flag to train it well; any
flag the user gives overrides the recipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CifarError
from . import fast, paper_cnn, paper_mlp


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    summary: str
    recipe: dict[str, Any] = field(default_factory=dict)
    # False where fully connected layers fix the input at 32x32: no progressive resizing
    any_size: bool = False


MODELS: dict[str, ModelSpec] = {
    "paper-cnn": ModelSpec("paper-cnn", paper_cnn.PaperCNN, paper_cnn.__doc__.splitlines()[0],
                           paper_cnn.RECIPE),
    "paper-mlp": ModelSpec("paper-mlp", paper_mlp.PaperMLP, paper_mlp.__doc__.splitlines()[0],
                           paper_mlp.RECIPE),
    "fast": ModelSpec("fast", fast.FastNet, fast.__doc__.splitlines()[0], fast.RECIPE,
                      any_size=True),  # it ends in a global pool
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise CifarError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}"
        ) from None


# Far beyond any CIFAR-10 net here (fast: 1.5 M); a typo in --model-arg widths=[...] could
# otherwise ask the allocator for hundreds of gigabytes.
MAX_PARAMETERS = 1_000_000_000


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model `name`; kwargs are its constructor arguments (widths...).

    It is built first on the meta device (shapes only, no memory), so that arguments
    that are out of range (a negative width, a billion channels) give one clear error
    before anything is allocated."""
    spec = get_spec(name)
    if "num_classes" in kwargs and not (type(kwargs["num_classes"]) is int
                                        and kwargs["num_classes"] > 0):
        raise CifarError(f"model {name}: num_classes={kwargs['num_classes']!r}: give a "
                         "whole number of classes > 0")
    for device in ("meta", None):
        try:
            with torch.device(device) if device else contextlib.nullcontext():
                model = spec.build(**kwargs)
        except TypeError as e:
            raise CifarError(f"model {name}: bad model arguments {kwargs} ({e})") from None
        except ValueError as e:  # a model's own check of its arguments' values
            raise CifarError(f"model {name}: {e}") from None
        except RuntimeError as e:  # e.g. torch refusing a negative size
            raise CifarError(f"model {name}: bad model arguments {kwargs} "
                             f"({str(e).splitlines()[0]})") from None
        if device and (n := count_parameters(model)) > MAX_PARAMETERS:
            raise CifarError(f"model {name}: arguments {kwargs} make {n:,} parameters, more "
                             f"than the {MAX_PARAMETERS:,} this tool builds; check the widths")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
