"""Pruning where the weight is read: parents' F.linear(x, child.weight), Conv2dSame, refusals, unread layers.

The EVA case is the regression the issue found: timm's EvaAttention calls
``F.linear(x, self.qkv.weight)``, so a layer-forward-only pruning trained those
layers dense while reporting them sparse, and the output jumped at ``freeze()``.
"""
from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d

from st3_hf import SparsityConfig, count_macs, sparsify
from st3_hf.errors import St3Error, ConfigError
from st3_hf.sparse.layers import SparseLayerMixin
from reference_formulas import soft_threshold_rescaled


def _train(model: nn.Module, sp, x: torch.Tensor, steps: int = 3) -> None:
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    y = torch.arange(x.shape[0]) % 3
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.slow
def test_eva_output_unchanged_across_freeze_and_qkv_pruned() -> None:
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=3, img_size=28, depth=2)
    sp = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=2))
    x = torch.randn(2, 3, 28, 28)
    _train(model, sp, x)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, SparseLayerMixin)
    # what the attention reads is the pruned weight, and the MAC count sees that read
    assert float((qkv.weight == 0).float().mean()) > 0.5
    assert "blocks.0.attn.qkv" in {layer.name for layer in count_macs(model, (3, 28, 28)).layers}
    assert sp.unread_layers == {}
    model.eval()
    with torch.no_grad():
        before = model(x)
    sp.freeze()
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == list(timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, num_classes=3, img_size=28, depth=2).state_dict())


class _ParentReadsChild(nn.Module):
    """Like EvaAttention: uses its child's weight directly, never calls the child."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(x, self.proj.weight, self.proj.bias).relu())


def test_parent_read_gets_effective_weight_and_straight_through_gradient() -> None:
    torch.manual_seed(0)
    model = _ParentReadsChild()
    sp = sparsify(model, SparsityConfig(method="st3", target=0.5, start_step=0, end_step=1))
    sp.apply(0.5)
    layer = model.proj
    t = float(layer.threshold)
    latent = layer.latent_weight.detach().clone()
    x = torch.randn(4, 12)
    out = model(x)
    # independent: the method page's q, used by the parent's F.linear
    w_ref = latent.clone().requires_grad_(True)
    q = soft_threshold_rescaled(latent, t)
    ref = model.head(F.linear(x, w_ref + (q - w_ref.detach()), layer.bias).relu())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(layer.latent_weight.grad, w_ref.grad, rtol=1e-5, atol=1e-6)  # straight through
    assert isinstance(layer.latent_weight, nn.Parameter)
    assert any(p is layer.latent_weight for p in model.parameters())


def test_conv2d_same_is_pruned_with_its_padding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 3, 9, 9))
    sp = sparsify(model, SparsityConfig(method="st3", target=0.5, start_step=0, end_step=1))
    sp.apply(0.5)
    conv = model[0]
    assert isinstance(conv, Conv2dSame) and isinstance(conv, SparseLayerMixin)
    x = torch.randn(2, 3, 9, 9)
    q = soft_threshold_rescaled(conv.latent_weight.detach(), float(conv.threshold))
    # TF "same" padding for 9 -> 5 with k=3, s=2: pad 1 on each side (independent of timm's helper)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1)), q, conv.bias, stride=2)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [StdConv2d, ScaledStdConv2d])
def test_weight_standardised_convs_are_refused_with_the_reason(cls) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), cls(4, 4, 3))
    with pytest.raises(ConfigError) as info:
        sparsify(model, method="st3", target=0.9)
    message = str(info.value)
    assert isinstance(info.value, St3Error) and "\n" not in message
    assert "layer '1'" in message and "standardises" in message and "exclude=['1']" in message
    assert type(model[0]) is nn.Conv2d  # nothing was changed before the refusal
    sp = sparsify(model, method="st3", target=0.9, exclude=["1"])  # the suggested fix works
    assert list(sp.layers) == ["0"]


def test_parametrized_layer_is_refused_clearly() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    torch.nn.utils.parametrizations.weight_norm(model[1])
    with pytest.raises(ConfigError, match="parametriz.*remove_parametrizations.*exclude=\\['1'\\]"):
        sparsify(model, method="st3", target=0.9)


class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_unread_layer_is_reported_once_with_its_share(caplog) -> None:
    model = _WithUnusedLayer()
    sp = sparsify(model, SparsityConfig(method="st3", target=0.5, start_step=0, end_step=2))
    with caplog.at_level(logging.WARNING, logger="st3_hf.sparse.sparsifier"):
        _train(model, sp, torch.randn(4, 8))
    share = 64 / (64 + 24)
    assert sp.unread_layers == pytest.approx({"unused": share})
    reports = [r for r in caplog.records if "never read" in r.getMessage()]
    assert len(reports) == 1 and "unused" in reports[0].getMessage()


def test_sparsity_of_all_parameters_counts_every_parameter() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    sp = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=1, exclude=("fc",)))
    sp.apply(0.9)
    zeros = sum(int((layer.weight == 0).sum()) for layer in sp.layers.values())
    assert sp.sparsity() == zeros / sum(m.latent_weight.numel() for m in sp.layers.values())
    assert sp.sparsity_of_all_parameters() == zeros / sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_eva_through_the_cli_exports_pruned_attention_weights(tmp_path) -> None:
    """The real CLI on the quickstart recipe with EVA-02: the qkv weights the attention reads are exported sparse."""
    import json

    from safetensors.torch import load_file

    from data_utils import fashion_mnist_available
    from train_utils import SMALL, records, train_in_process

    if not fashion_mnist_available():
        pytest.skip("needs the Debian dataset-fashion-mnist package (make test installs it)")
    out = tmp_path / "eva"
    kwargs = dict(img_size=28, depth=2)
    train_in_process("recipes/quickstart.yaml", "model.name=eva02_tiny_patch14_224",
         "model.kwargs={img_size: 28, depth: 2}", *SMALL, f"output_dir={out}", check=True)  # SMALL: 2 epochs, the ramp ends at 1.2
    final = [r for r in records(out) if r["kind"] == "final"][-1]
    assert final["frozen"] is True and abs(final["sparsity"] - 0.9) < 2e-3
    assert 0 < final["sparsity_all_params"] < final["sparsity"]
    config = json.loads((out / "config.json").read_text())["sparsity"]
    assert config["unread_layers"] == {}
    assert config["achieved_sparsity_all_params"] == pytest.approx(final["sparsity_all_params"])
    weights = load_file(str(out / "model.safetensors"))
    qkv = weights["blocks.0.attn.qkv.weight"]
    recorded = config["per_layer"]["blocks.0.attn.qkv"]["sparsity"]
    assert recorded > 0.5 and float((qkv == 0).float().mean()) == pytest.approx(recorded)
    plain = timm.create_model(f"local-dir:{out}", pretrained=True, **kwargs)
    assert torch.equal(plain.blocks[0].attn.qkv.weight, qkv)


def test_wholly_pruned_depthwise_filters_stay_finite_and_zero() -> None:
    # EfficientNet's NaN question: a depthwise filter (or a channel) with every weight below the threshold
    # has mean(|w| m) = 0, and an all-zero filter also mean(|w|) = 0; the method's 1e-6 terms keep the
    # rescale finite (r = 1e-6 / (mean|w| + 1e-6), resp. r = 1) and q of those filters is 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight[0].mul_(1e-4)  # wholly below any 50 % threshold
        model[1].weight[3].zero_()     # all-zero filter: both means 0
    sp = sparsify(model, SparsityConfig(method="st3", target=0.5, start_step=0, end_step=1))
    sp.apply(0.5)
    depthwise = model[1]
    latent = depthwise.latent_weight.detach()
    q = depthwise.weight.detach()
    assert torch.isfinite(q).all()
    assert not depthwise.mask[0].any() and not depthwise.mask[3].any()
    assert (q[0] == 0).all() and (q[3] == 0).all()
    torch.testing.assert_close(q, soft_threshold_rescaled(latent, float(depthwise.threshold)), rtol=1e-5, atol=1e-7)
    x = torch.randn(2, 3, 3, 3)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
