"""Issue 3 groundwork: the fast model's parts (whitening, shapes) and TTA."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from test_train import tiny_data

import cifarcnn
from cifarcnn import augment
from cifarcnn.config import TrainConfig
from cifarcnn.inference import TTA_VIEWS
from cifarcnn.models import build_model
from cifarcnn.models.fast import PATCH
from cifarcnn.train import train


def test_fast_output_shapes():
    m = build_model("fast", widths=[16, 32, 64]).eval()
    for n in (1, 5):
        assert m(torch.randn(n, 3, 32, 32)).shape == (n, 10)
    assert build_model("fast", num_classes=4)(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_whitening_layer_whitens_patches():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 1, 32, 32, generator=g)
    # strongly correlated channels and neighbouring pixels, far from white
    x = torch.cat([base, 0.8 * base + 0.2 * torch.randn(400, 1, 32, 32, generator=g),
                   torch.roll(base, 1, 3) + 0.1 * torch.randn(400, 1, 32, 32, generator=g)], 1)
    m = build_model("fast")
    m.init_from_data(x, eps=0.0)
    with torch.no_grad():
        out = m.whiten(x)[:, :3 * PATCH * PATCH]  # the + half; the - half mirrors it
    flat = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).double()
    cov = torch.cov(flat.T)
    torch.testing.assert_close(cov, torch.eye(len(cov), dtype=torch.float64), atol=2e-3,
                               rtol=0)
    assert flat.mean(0).abs().max() < 1e-3
    patches = F.unfold(x, PATCH).transpose(1, 2).reshape(-1, 12).double()
    before = torch.cov(patches.T)
    assert (before - torch.diag(before.diagonal())).abs().max() > 0.5  # it was correlated


def test_tta_equals_the_explicit_average_of_its_views(tmp_path):
    data = tiny_data(128, 40)
    train(TrainConfig(model="paper-cnn", epochs=1, batch_size=64, precision="fp32",
                      out=str(tmp_path / "r")), data=data, quiet=True)
    images = data.test_images
    for mode in ("flip", "flip-shift"):
        clf = cifarcnn.load(tmp_path / "r", tta=mode)
        got = clf.logits(images).numpy()
        want = sum(w * clf.logits(augment.view(torch.from_numpy(images), flip, shift),
                                  tta=False).numpy() for w, flip, shift in TTA_VIEWS[mode])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert abs(sum(w for w, _, _ in TTA_VIEWS["flip-shift"]) - 1.0) < 1e-12


def test_shift_view_moves_content_and_reflects_the_border():
    img = torch.arange(32 * 32 * 3, dtype=torch.int32).view(1, 32, 32, 3).to(torch.uint8)
    v = augment.view(img, flip=False, shift=1)
    assert torch.equal(v[0, 1:, 1:], img[0, :-1, :-1])  # moved down-right by one pixel
    assert torch.equal(v[0, 0, 1:], img[0, 1, :-1])  # border row filled by reflection
    assert torch.equal(augment.view(img, True, 0)[0], img[0].flip(1))
