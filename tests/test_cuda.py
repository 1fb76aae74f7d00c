"""CUDA paths (skipped on machines without a GPU, as CI is): exact threshold by topk on the device,
no host synchronisation in the per-step update, bf16 forward/backward."""
from __future__ import annotations

import pytest
import timm
import torch

from st3_hf import SparsityConfig, exact_quantile, sparsify

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.98, 1.0])
def test_cuda_quantile_equals_sort(q):
    x = torch.randn(1_000_003, device="cuda").abs()
    s = torch.sort(x).values
    pos = q * (x.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, x.numel() - 1)
    expected = s[lo] + (s[hi] - s[lo]) * (pos - lo)
    torch.testing.assert_close(exact_quantile(x, q), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["st3", "st3_sigma"])
def test_update_does_not_synchronise_with_the_host(method):
    model = timm.create_model("resnet18", num_classes=10).cuda()
    sp = sparsify(model, SparsityConfig(method=method, target=0.98, start_step=0, end_step=100))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x, y = torch.randn(8, 3, 64, 64, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for _ in range(2):  # warm up allocations
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sp.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sp.step_count == 3 and 0 < sp.sparsity() < 0.98
