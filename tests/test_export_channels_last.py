"""A channels_last model (the ImageNet recipes train that way) exports, and plain timm loads the same weights
(the ResNet-50 recipes' exports failed at the end of training before: safetensors refuses strided tensors)."""
from __future__ import annotations

import timm
import torch

from st3_hf import SparsityConfig, sparsify
from st3_hf.hub.export import export_pretrained

DATA_CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def test_channels_last_model_exports_in_standard_layout(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=1))
    sparsifier.apply(0.8)
    model = model.to(memory_format=torch.channels_last)
    strided = [n for n, t in model.state_dict().items() if not t.is_contiguous()]
    assert strided  # the case under test: safetensors refuses these as they are
    folder = export_pretrained(model, sparsifier, tmp_path / "export", data_pretrained_cfg=DATA_CFG)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    zeros = sum(int((m.weight == 0).sum()) for m in loaded.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    total = sum(m.weight.numel() for m in loaded.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert abs(zeros / total - sparsifier.sparsity()) < 1e-6
