import math
import re

import pytest
import torch

from cifarcnn.errors import CifarError
from cifarcnn.models import MODELS, build_model, count_parameters


@pytest.mark.parametrize("name", list(MODELS))
def test_output_shape(name):
    model = build_model(name).eval()
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 10)


def test_parameter_counts_match_the_documented_widths():
    # paper-cnn 16/32/64 conv (3x3), fc 1024->256->128->10
    conv = (3 * 9 * 16 + 16) + (16 * 9 * 32 + 32) + (32 * 9 * 64 + 64)
    fc = (1024 * 256 + 256) + (256 * 128 + 128) + (128 * 10 + 10)
    assert count_parameters(build_model("paper-cnn")) == conv + fc == 320_170
    mlp = (3072 * 1024 + 1024) + (1024 * 512 + 512) + (512 * 10 + 10)
    assert count_parameters(build_model("paper-mlp")) == mlp


PAPER_MODELS = ["paper-cnn", "paper-mlp"]  # dropout and Kaiming-uniform, as the paper says


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_dropout_active_in_train_and_off_in_eval(name):
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(8, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x)), "train mode: two passes should differ (dropout)"
    model.eval()
    assert torch.equal(model(x), model(x)), "eval mode: deterministic"


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_kaiming_uniform_relu_gain(name):
    torch.manual_seed(0)
    model = build_model(name)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = mod.weight[0].numel()
            bound = math.sqrt(2.0) * math.sqrt(3.0 / fan_in)
            w = mod.weight.detach()
            assert w.abs().max() <= bound + 1e-6
            if w.numel() > 1000:  # uniform(-b, b) has std b/sqrt(3)
                assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
            assert torch.count_nonzero(mod.bias) == 0


def test_pool_before_relu_equals_paper_order():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16)
    a = torch.relu(torch.nn.functional.max_pool2d(x, 2))
    b = torch.nn.functional.max_pool2d(torch.relu(x), 2)
    assert torch.equal(a, b)


def test_input_moved_to_model_device():
    model = build_model("paper-cnn").eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float32)
    assert model(x).device == next(model.parameters()).device


def test_unknown_model_is_a_clear_error():
    with pytest.raises(CifarError, match=r"unknown model 'resnet9000'.*paper-cnn"):
        build_model("resnet9000")


@pytest.mark.parametrize(("name", "kwargs", "says"), [
    ("fast", {"widths": [100000, 100000, 100000]}, "450,023,800,312 parameters, more than"),
    ("paper-cnn", {"channels": [100000, 100000, 100000]}, "parameters, more than"),
    ("fast", {"widths": [-1, 2, 3]}, "give three whole numbers of channels > 0"),
    ("fast", {"widths": [1.5, 2, 3]}, "give three whole numbers of channels > 0"),
    ("fast", {"widths": "abc"}, "give three whole numbers of channels > 0"),
    ("paper-cnn", {"channels": [-1, 2, 3]}, "negative dimension"),
    ("fast", {"num_classes": 0}, "num_classes=0: give a whole number of classes > 0"),
    ("paper-mlp", {"num_classes": -1}, "num_classes=-1"),
])
def test_out_of_range_model_arguments_are_refused_before_allocating(name, kwargs, says):
    """Built on the meta device first: a width of 100,000 asked the allocator for 1.8 TB
    (a RuntimeError with a traceback), a negative width raised one too."""
    with pytest.raises(CifarError, match=rf"model {name}: .*{says}"):
        build_model(name, **kwargs)


def test_top_k_counts_labels_among_the_five_highest_scores():
    from cifarcnn.inference import top_k_correct

    scores = torch.arange(10.0).repeat(3, 1)  # class 9 highest, then 8, ... 0 lowest
    assert int(top_k_correct(scores, torch.tensor([9, 5, 4]))) == 2  # 4 is sixth
    assert int(top_k_correct(scores[:, :3], torch.tensor([0, 1, 2]))) == 3  # k = 3 classes


def test_arrays_that_are_not_a_batch_of_images_say_how_to_make_one():
    import numpy as np

    from cifarcnn.inference import as_batch

    one = np.zeros((32, 32, 3), np.uint8)
    assert as_batch(one).shape == (1, 32, 32, 3)
    assert as_batch([one, one]).shape == (2, 32, 32, 3)  # a list, without torch's slow path
    assert as_batch([]).shape == (0, 32, 32, 3)
    for bad, hint in ((np.zeros((2, 3, 32, 32), np.uint8), "images.transpose(0, 2, 3, 1)"),
                      (np.zeros((2, 64, 64, 3), np.uint8), "predict_files(paths) resizes"),
                      (np.zeros((2, 32, 32, 3), np.float32), "* 255).round()"),
                      ([one, np.zeros((8, 8, 3), np.uint8)], "images of different shapes")):
        with pytest.raises(CifarError, match=re.escape(hint)):
            as_batch(bad)
