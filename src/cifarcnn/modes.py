"""Execution modes: the same model run eagerly, compiled, traced or scripted.

The paper times its network in four modes (base, compiled, traced,
scripted); `wrap` gives the callable for each. The parameters always stay
in the original module (traced and scripted modules share them), so the
optimizer, the checkpoints and the saved weights do not depend on the mode.

Tracing records the operations one call ran, with everything else frozen
into constants: dropout's `training` flag and BatchNorm's choice between
batch and running statistics become part of the graph. A model traced in
train mode would keep dropping units in eval mode, and one traced in eval
mode would never drop any. `Traced` therefore traces twice, once in each
mode, and dispatches on `self.training` like any module; dropout stays
random in the train trace, because the trace records the random op, not
the mask it drew. Scripting compiles the Python source instead, so the
`self.training` tests survive and one scripted module serves both modes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import CifarError

MODES = ("eager", "compile", "trace", "script")
# torch.jit (trace, script) is deprecated in recent PyTorch in favour of torch.compile and
# torch.export, but it is what the paper times and what many deployments still load.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated",
                        category=DeprecationWarning)


class Traced(nn.Module):
    """Two traces of `model` (train mode and eval mode) sharing its parameters."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        was_training = model.training
        with torch.no_grad():
            model.train()
            train_graph = torch.jit.trace(model, example, check_trace=False)
            model.eval()
            eval_graph = torch.jit.trace(model, example, check_trace=False)
        model.train(was_training)
        # Kept out of the module tree: the parameters belong to `model`, not to this wrapper.
        self._graphs = {True: train_graph, False: eval_graph}
        self.train(was_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._graphs[self.training](x)


def wrap(model: nn.Module, mode: str, example: torch.Tensor) -> nn.Module:
    """The callable that runs `model` in `mode`; `example` is a batch shaped like the input."""
    if mode == "eager":
        return model
    if mode == "compile":
        return torch.compile(model)
    if mode == "trace":
        return Traced(model, example)
    if mode == "script":
        try:
            return torch.jit.script(model)
        except Exception as e:  # TorchScript rejects some Python; say which model
            raise CifarError(f"--mode script: this model cannot be scripted ({e}); "
                             "use --mode trace") from None
    raise CifarError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
