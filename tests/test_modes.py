"""Issue 4: execution modes (eager, compile, trace, script) behave like eager."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_data

from cifarcnn import modes
from cifarcnn.config import TrainConfig
from cifarcnn.models import build_model
from cifarcnn.train import train


def _model(dropout: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("paper-cnn", dropout=dropout).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", modes.MODES)
def test_eval_outputs_equal_eager(mode):
    model = _model()
    x = torch.randn(16, 3, 32, 32).to(memory_format=torch.channels_last)
    net = modes.wrap(model, mode, x)
    model.eval()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net(x[:3]), model(x[:3]), atol=1e-5, rtol=1e-5)  # any batch


@pytest.mark.parametrize("mode", ["trace", "script"])
def test_traced_and_scripted_apply_dropout_in_train_mode_only(mode):
    model = _model(dropout=0.5)
    x = torch.randn(8, 3, 32, 32).to(memory_format=torch.channels_last)
    net = modes.wrap(model, mode, x)
    net.train()
    with torch.no_grad():
        a, b = net(x), net(x)
    assert not torch.equal(a, b), "dropout is off in train mode"
    net.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=1e-5)


def test_traced_model_shares_parameters_and_gradients():
    model = _model()
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    net = modes.wrap(model, "trace", x)
    assert list(net.parameters()) == []  # the wrapper owns nothing: the model does
    net.train()
    net(x).sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["trace", "script"])
def test_training_in_a_graph_mode_matches_eager(tmp_path, mode):
    data = tiny_data(256, 100)
    common = dict(epochs=2, batch_size=64, seed=4, precision="fp32")
    e = train(TrainConfig(**common, out=str(tmp_path / "eager")), data=data, quiet=True)
    g = train(TrainConfig(**common, mode=mode, out=str(tmp_path / mode)), data=data, quiet=True)
    assert g["mode"] == mode and g["setup_seconds"] > 0
    # Same data, same dropout stream, same arithmetic up to fusion order: same losses.
    assert abs(g["train_accuracy"] - e["train_accuracy"]) < 0.05
    assert abs(g["val_accuracy"] - e["val_accuracy"]) < 0.05
