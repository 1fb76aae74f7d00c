"""CPU sparse inference (issue 22): every kernel against the dense torch op, whole models against themselves,
the per-layer choice from an injected cost table (no timing), refusals, and the evaluation flag of the CLI."""
from __future__ import annotations

import json
import math
import sys
from typing import Dict, Mapping

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from st3_hf import SparsityConfig, sparse_inference, sparsify
from st3_hf.errors import ConfigError
from st3_hf.inference.benchmark import global_magnitude_prune, randomize_norm_layers, time_side_by_side
from st3_hf.inference import native
from st3_hf.inference.kernels import DenseConv2d, DenseLinear, SparseConv2d, SparseLinear
from st3_hf.inference.native import DirectSparseConv2d
from st3_hf.inference.planner import CSR, DENSE, DIRECT, MODEL
from test_from_pretrained import offline_hub, populate_cache  # noqa: F401  (offline_hub is a fixture)

HAS_NATIVE = native.native_library()[0] is not None
CONV_KERNELS = (SparseConv2d, DenseConv2d) + ((DirectSparseConv2d,) if HAS_NATIVE else ())
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="no C compiler: the direct conv is not offered")

TOL = dict(atol=1e-4, rtol=1e-4)


def sparse_tensor(shape, sparsity: float = 0.8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return w * (torch.rand(shape, generator=g) >= sparsity)


def prefer(kernel: str, table: Mapping[str, Mapping[str, float]] = {}):
    """A timer from a cost table: ``table[layer][k]`` seconds, else ``kernel`` is the cheapest, then the other
    sparse kernels, then dense (the whole-model check: ``"sparse"`` / ``"dense"``)."""
    def default(k: str) -> float:
        return 1.0 if k == kernel or (kernel != DENSE and k == "sparse") else 3.0 if k == DENSE else 2.0

    def timer(layer: str, candidates) -> Dict[str, float]:
        return {k: table.get(layer, {}).get(k, default(k)) for k in candidates}
    return timer


# ------------------------------------------------------------------ kernels against F.conv2d / F.linear
CONVS = [  # (in, out, kernel, stride, padding, dilation, groups, H, W)
    (6, 8, 3, 1, 1, 1, 1, 9, 11),
    (6, 8, 3, 2, 1, 1, 1, 9, 11),
    (6, 8, 3, 2, 0, 1, 1, 10, 10),
    (4, 6, 5, 3, 2, 1, 1, 13, 12),
    (4, 6, 3, 1, 2, 2, 1, 8, 9),
    (4, 6, (1, 3), (2, 1), (0, 1), 1, 1, 7, 8),
    (8, 8, 3, 1, 1, 1, 2, 7, 7),
    (8, 8, 3, 2, 1, 1, 8, 9, 9),   # depthwise, strided
    (8, 16, 5, 1, 2, 1, 8, 6, 6),  # depthwise multiplier 2
    (8, 12, 1, 1, 0, 1, 1, 5, 6),  # pointwise
    (8, 12, 1, 2, 0, 1, 1, 5, 6),
    (3, 4, 4, 4, 0, 1, 1, 16, 16),  # patch embedding
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("config", CONVS, ids=str)
def test_conv_kernels_match_conv2d(config, bias):
    cin, cout, k, stride, padding, dilation, groups, h, w = config
    k, stride, padding = (k, k) if isinstance(k, int) else k, (stride,) * 2 if isinstance(stride, int) else stride, \
        (padding,) * 2 if isinstance(padding, int) else padding
    weight = sparse_tensor((cout, cin // groups, *k))
    b = torch.randn(cout) if bias else None
    x = torch.randn(2, cin, h, w)
    expected = F.conv2d(x, weight, b, stride, padding, (dilation,) * 2, groups)
    pads = (padding[0], padding[0], padding[1], padding[1])
    for kernel in CONV_KERNELS:
        module = kernel(weight, b, stride, pads, (dilation,) * 2, groups)
        torch.testing.assert_close(module(x), expected, **TOL)
        torch.testing.assert_close(module(x.to(memory_format=torch.channels_last)), expected, **TOL)


def test_conv_kernel_skips_empty_taps_and_handles_an_all_zero_weight():
    weight = sparse_tensor((4, 3, 3, 3), 0.0)
    weight[:, :, 0, :] = 0  # the whole top row of taps is empty
    conv = SparseConv2d(weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert conv.taps == 6
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(conv(x), F.conv2d(x, weight, padding=1), **TOL)
    bias = torch.randn(4)
    empty = SparseConv2d(torch.zeros(4, 3, 3, 3), bias, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert empty.taps == 0
    torch.testing.assert_close(empty(x), bias.view(1, -1, 1, 1).expand(1, 4, 6, 6))


def test_conv_kernel_asymmetric_padding_as_same():
    layer = nn.Conv2d(3, 5, 4, padding="same", bias=False)
    with torch.no_grad():
        layer.weight.copy_(sparse_tensor(layer.weight.shape))
    x = torch.randn(2, 3, 7, 8)
    for kernel in (CSR, DIRECT) if HAS_NATIVE else (CSR,):
        fast = sparse_inference(nn.Sequential(layer), x, timer=prefer(kernel), min_sparsity=0.0)
        assert fast.plan[0].kernel == kernel
        torch.testing.assert_close(fast(x), layer(x), **TOL)
    assert sparse_inference(nn.Sequential(layer), x, force="sparse").plan[0].kernel == (DIRECT if HAS_NATIVE else CSR)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12), (3, 1, 4, 12)])
def test_linear_kernels_match_linear(shape, bias):
    weight = sparse_tensor((9, 12))
    b = torch.randn(9) if bias else None
    x = torch.randn(shape)
    for kernel in (SparseLinear, DenseLinear):
        torch.testing.assert_close(kernel(weight, b)(x), F.linear(x, weight, b), **TOL)
    torch.testing.assert_close(SparseLinear(weight, b)(x.transpose(0, -2)), F.linear(x.transpose(0, -2), weight, b), **TOL)


# ------------------------------------------------------------------ whole models
MODELS = [  # (timm name, input size, extra kwargs): ResNet, ConvNeXt, MobileNet (depthwise, SE), ViT
    ("resnet10t", (2, 3, 48, 48), {}),
    ("convnext_atto", (1, 3, 64, 64), {}),
    ("mobilenetv3_small_050", (2, 3, 64, 64), {}),
    ("vit_tiny_patch16_224", (2, 3, 32, 32), {"img_size": 32}),
]


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [CSR, pytest.param(DIRECT, marks=needs_native)])
@pytest.mark.parametrize("name,size,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_whole_model_matches_dense_with_every_layer_sparse(name, size, kwargs, kernel):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    randomize_norm_layers(model)  # else ResNet's zero-initialised last BNs would hide its branches' convs
    global_magnitude_prune(model, 0.9)
    x = torch.randn(size)
    fast = sparse_inference(model, x, timer=prefer(kernel), min_sparsity=0.0)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(fast(x), expected, **TOL)
    chosen = {(p.op.split()[0] == "linear", p.kernel) for p in fast.plan if not p.reason.startswith("original layer")}
    # the direct kernel is a conv kernel: linear layers take CSR
    assert chosen <= {(False, kernel), (True, CSR)} and (False, kernel) in chosen, fast.summary()["kernels"]
    # the planned copy is independent of the model, which still runs its own layers
    assert not any(isinstance(m, SparseConv2d) for m in model.modules())


@pytest.mark.slow
def test_st3_layers_are_read_through_their_effective_weight():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    randomize_norm_layers(model)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.9, end_step=1))
    sparsifier.apply(0.9)  # pruned mode: the latent weights hold no zeros, the effective ones do
    x = torch.randn(1, 3, 48, 48)
    fast = sparse_inference(model, x, timer=prefer(CSR), min_sparsity=0.0)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), **TOL)
    conv = fast.plan[[p.layer for p in fast.plan].index("layer1.0.conv1")]
    assert conv.kernel == CSR and conv.sparsity > 0.5
    assert float((model.layer1[0].conv1.latent_weight == 0).float().mean()) == 0.0
    sparsifier.freeze()
    frozen = sparse_inference(model, x, timer=prefer(CSR), min_sparsity=0.0)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), **TOL)


@pytest.mark.slow
def test_default_timer_plans_a_model_that_computes_the_same():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    randomize_norm_layers(model)
    global_magnitude_prune(model, 0.95)
    x = torch.randn(1, 3, 32, 32)
    fast = sparse_inference(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), **TOL)
    timed = [p for p in fast.plan if p.times_ms]
    assert timed and all(set(p.times_ms) == ({DENSE, CSR} | ({DIRECT} if HAS_NATIVE and "conv" in p.op else set()))
                         for p in timed)
    for p in timed:  # the rule: the fastest kernel, sparse only with a 10 % gain, unless the whole model said no
        fastest = min(p.times_ms, key=p.times_ms.get)
        if p.kernel != DENSE:
            assert p.kernel == fastest and p.times_ms[fastest] <= 0.9 * p.times_ms[DENSE] + 1e-3, p
        else:
            assert fastest == DENSE or "less than 10% faster" in p.reason or "whole model" in p.reason, p
    assert set(fast.whole_model_ms) <= {"dense", "sparse"}
    json.dumps(fast.summary())


# ------------------------------------------------------------------ the choice, from a cost table
def test_plan_takes_the_cheaper_kernel_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 25, 3))
    global_magnitude_prune(model, 0.9)
    x = torch.randn(1, 4, 5, 5)
    table = {"0": {DENSE: 1.0, CSR: 3.0, DIRECT: 2.0}, "2": {DENSE: 2.0, CSR: 1.0, DIRECT: 1.5},
             "4": {DENSE: 5.0, CSR: 4.0}, MODEL: {"dense": 8.0, "sparse": 7.0}}
    fast = sparse_inference(model, x, timer=prefer(DENSE, table), min_sparsity=0.0, min_gain=0.1)
    assert [(p.layer, p.kernel) for p in fast.plan] == [("0", DENSE), ("2", CSR), ("4", CSR)]
    # within a 25 % margin, layer 4 (20 % faster sparse) stays dense; the whole model needs only to be faster
    cautious = sparse_inference(model, x, timer=prefer(DENSE, table), min_sparsity=0.0, min_gain=0.25)
    assert [p.kernel for p in cautious.plan] == [DENSE, CSR, DENSE]
    assert "sparse_csr less than 25% faster than dense" in cautious.plan[2].reason
    assert fast.plan[0].times_ms == ({DENSE: 1000.0, CSR: 3000.0, DIRECT: 2000.0} if HAS_NATIVE else
                                     {DENSE: 1000.0, CSR: 3000.0})
    assert isinstance(fast.model[0], DenseConv2d) and isinstance(fast.model[2], SparseConv2d)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), **TOL)


def test_plan_goes_dense_when_the_whole_model_is_not_faster():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    global_magnitude_prune(model, 0.9)
    x = torch.randn(3, 16)
    fast = sparse_inference(model, x, timer=prefer(CSR, {MODEL: {"dense": 1.0, "sparse": 1.5}}), min_sparsity=0.0)
    assert [p.kernel for p in fast.plan] == ["dense", "dense"]
    assert all("whole model" in p.reason for p in fast.plan)
    assert not any(isinstance(m, SparseLinear) for m in fast.modules())
    torch.testing.assert_close(fast(x), model(x).detach(), **TOL)


def test_layers_below_min_sparsity_and_custom_layers_stay_dense_with_a_reason():
    from timm.layers import Conv2dSame
    same = Conv2dSame(3, 4, 3, stride=2)
    reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    model = nn.Sequential(same, reflect, nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        for m in model:
            m.weight.copy_(sparse_tensor(m.weight.shape, 0.95))
        model[2].weight.fill_(1.0)  # no zeros at all
    x = torch.randn(1, 3, 9, 9)
    fast = sparse_inference(model, x, timer=prefer(CSR))
    reasons = [p.reason for p in fast.plan]
    assert [p.kernel for p in fast.plan] == ["dense"] * 3
    assert "Conv2dSame has its own forward" in reasons[0] and "padding_mode 'reflect'" in reasons[1]
    assert "min_sparsity" in reasons[2]
    assert fast.model[0] is not same and type(fast.model[0]) is Conv2dSame  # a copy, still running its own forward
    torch.testing.assert_close(fast(x), model(x).detach(), **TOL)


# ------------------------------------------------------------------ the native kernel and its fallback
@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The native library looked up again, built into an empty cache."""
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv("ST3_HF_KERNEL_CACHE", str(tmp_path / "kernels"))
    yield monkeypatch
    native._loaded = None


@pytest.mark.slow
def test_without_the_native_kernel_the_plan_times_and_runs_torch_kernels_only(fresh_native):
    fresh_native.setenv("ST3_HF_NATIVE_KERNELS", "0")
    assert native.native_library() == (None, "native kernels switched off (ST3_HF_NATIVE_KERNELS=0)")
    with pytest.raises(RuntimeError, match="switched off"):
        DirectSparseConv2d(torch.zeros(2, 2, 1, 1), None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    global_magnitude_prune(model, 0.9)
    x = torch.randn(1, 3, 32, 32)
    seen = set()

    def timer(layer, candidates):
        seen.update(candidates)
        return prefer(DIRECT)(layer, candidates)
    fast = sparse_inference(model, x, timer=timer, min_sparsity=0.0)
    assert DIRECT not in seen and {p.kernel for p in fast.plan} == {CSR}
    assert sparse_inference(model, x, force="sparse").plan[0].kernel == CSR
    torch.testing.assert_close(fast(x), model(x).detach(), **TOL)


def test_a_failing_compiler_is_said_and_a_working_one_builds_into_the_cache(fresh_native, tmp_path):
    fresh_native.setenv("CC", "false")
    library, reason = native.native_library()
    assert library is None and reason.startswith("the C compiler failed")
    if not HAS_NATIVE:
        return
    fresh_native.delenv("CC")
    fresh_native.setattr(native, "_loaded", None)
    library, reason = native.native_library()
    assert library is not None and reason == ""
    assert [p.suffix for p in (tmp_path / "kernels").iterdir()] == [".so"]  # no partial file left behind


@needs_native
def test_direct_kernel_refuses_float64():
    conv = DirectSparseConv2d(sparse_tensor((2, 2, 3, 3)), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    with pytest.raises(TypeError, match="float32"):
        conv(torch.randn(1, 2, 4, 4, dtype=torch.float64))


# ------------------------------------------------------------------ refusals
def test_unsupported_inputs_are_one_clear_error():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="float32 or float64 input, got torch.int64"):
        sparse_inference(model, torch.ones(1, 4, dtype=torch.int64))
    with pytest.raises(ConfigError, match=r"model in the input's dtype torch.float64.*call model.to"):
        sparse_inference(model, torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="runs on the CPU, but parameter 0.weight is on meta"):
        sparse_inference(nn.Sequential(nn.Linear(4, 2, device="meta")), torch.ones(1, 4))
    with pytest.raises(ConfigError, match="force must be"):
        sparse_inference(model, torch.ones(1, 4), force="fast")
    for err in (ConfigError("x"),):
        assert "\n" not in str(err)


def test_side_by_side_timing_reports_every_runner():
    calls = []
    times = time_side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert set(times) == {"a", "b"} and all(0 <= t["best_ms"] <= t["median_ms"] for t in times.values())
    assert calls == ["a", "b"] * 4  # warm-up, then interleaved rounds


def test_global_magnitude_prune_is_global_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
    with torch.no_grad():
        model[1].weight.mul_(10)  # the larger layer-2 weights survive the global threshold more often
    assert global_magnitude_prune(model, 0.9) == pytest.approx(0.9, abs=1e-3)
    assert float((model[0].weight == 0).float().mean()) > float((model[1].weight == 0).float().mean())


# ------------------------------------------------------------------ evaluate_model.py --sparse-inference
@pytest.mark.slow
def test_evaluate_script_reports_the_same_scores_dense_and_sparse(tmp_path):
    from data_utils import make_image_folder
    from train_utils import REPO, run
    from st3_hf.train.recipe import save_recipe
    from st3_hf.train.recipe_schema import DataConfig, ModelConfig, Recipe, SparsityRecipe
    from st3_hf.train.run_export import export_run

    classes = ("circle", "square", "triangle")
    root = make_image_folder(tmp_path / "images", classes, per_class={"train": 2, "val": 4}, size=32)
    recipe = Recipe(
        output_dir=str(tmp_path / "unused"), model=ModelConfig(name="resnet10t", num_classes=3, in_chans=3),
        data=DataConfig(source="imagefolder", root=str(root), eval_split="val", input_size=[3, 32, 32],
                        mean=[0.5] * 3, std=[0.25] * 3, crop_pct=1.0, batch_size=4, num_workers=0),
        sparsity=SparsityRecipe(method="st3", target=0.9, start_epoch=0, end_epoch=1))
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.9, end_step=1))
    sparsifier.apply(0.9)
    data_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bilinear",
                "crop_pct": 1.0, "crop_mode": "center", "num_classes": 3}
    export = export_run(model, sparsifier, tmp_path / "export", recipe, data_pretrained_cfg=data_cfg)
    save_recipe(recipe, tmp_path / "recipe.yaml")
    proc = run([sys.executable, str(REPO / "scripts" / "evaluate_model.py"), str(export), "--sparse-inference",
                "--recipe", str(tmp_path / "recipe.yaml")])
    scores = json.loads(proc.stdout)
    dense, sparse = scores["dense"], scores["sparse_inference"]
    assert dense["num_examples"] == sparse["num_examples"] == 12
    assert dense["top1"] == sparse["top1"] and dense["top5"] == sparse["top5"]
    assert sparse["loss"] == pytest.approx(dense["loss"], rel=1e-4, abs=1e-5)
    assert dense["images_per_s"] > 0 and sparse["images_per_s"] > 0
    assert scores["sparse_layers"] + scores["dense_layers"] == sum(
        isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert scores["threads"] == 1  # the test environment's OMP_NUM_THREADS, used by both runs


def test_benchmark_table_row_from_a_report():
    from benchmark_inference import markdown_table

    row = {"model": "resnet50", "sparsity": 0.98, "batch_size": 1, "max_abs_diff": 0.0,
           "median_ms": {"dense_eager": 90.0, "sparse_inference": 30.0},
           "speedup_median": {"dense_eager": 3.0, "dense_compile": 2.5},
           "speedup_best": {"dense_eager": 3.2}, "plan": {"sparse_layers": 50, "dense_layers": 4}}
    lines = markdown_table({"results": [row]}).splitlines()
    assert lines[2] == "| resnet50 | 0.98 | 1 | 90 | 30 | 3.00 / 3.20 | 2.50 | nan | 0.0e+00 | 50 / 4 |"


# ------------------------------------------------------------------ the compact file straight into the kernels
DATA_CFG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center", "num_classes": 5}


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    """An st3_hf export of a ResNet pruned to 90 % by ST-3 (random norm statistics: every branch counts)."""
    from st3_hf.hub import export_pretrained

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)
    randomize_norm_layers(model)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.9, end_step=1))
    sparsifier.apply(0.9)
    return export_pretrained(model, sparsifier, tmp_path_factory.mktemp("export") / "hub", data_pretrained_cfg=DATA_CFG,
                             metrics={"top1": 0.5})


def plain_timm(folder) -> nn.Module:
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    model.eval()
    return model


def test_compact_export_runs_sparse_layers_without_their_dense_weights(export_folder, monkeypatch):
    import gc
    import weakref

    from st3_hf.hub import load_sparse_inference
    from st3_hf.inference import SparseWeight, held_tensors, tensor_bytes

    x = torch.randn(2, 3, 32, 32)
    dense_model = plain_timm(export_folder)
    with torch.no_grad():
        expected = dense_model(x)
    shapes = {name: tuple(m.weight.shape) for name, m in dense_model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}

    materialised = []  # (shape, weak reference to its memory) of every dense weight built from a sparse one
    original = SparseWeight.dense

    def dense(self):
        tensor = original(self)
        materialised.append((self.shape, weakref.ref(tensor.untyped_storage())))
        return tensor
    monkeypatch.setattr(SparseWeight, "dense", dense)

    alive_at_timing = []

    def timer(layer, candidates):
        gc.collect()
        alive_at_timing.append(sum(ref() is not None for _, ref in materialised))
        return prefer(DIRECT if HAS_NATIVE else CSR, {"conv1.0": {DENSE: 0.5}})(layer, candidates)

    fast = load_sparse_inference(export_folder, x, timer=timer, min_sparsity=0.0)
    torch.testing.assert_close(fast(x), expected, **TOL)
    kernels = {p.layer: p.kernel for p in fast.plan}
    assert kernels["conv1.0"] == DENSE and sum(k != DENSE for k in kernels.values()) == len(kernels) - 1
    # while timing, one dense weight exists: the layer being timed (the stem, kept dense, is timed first)
    assert alive_at_timing[0] == 1 and max(alive_at_timing[1:]) == 2, alive_at_timing
    gc.collect()
    alive = [shape for shape, ref in materialised if ref() is not None]
    assert alive == [shapes["conv1.0"]], alive  # only the layer planned dense keeps its dense weight
    held = held_tensors(fast)
    assert not any(t.is_meta for t in held.values())
    for layer, kernel in kernels.items():
        tensors = {k: t for k, t in held.items() if k.startswith(f"model.{layer}.")}
        numel = math.prod(shapes[layer])
        full = [k for k, t in tensors.items() if t.layout == torch.strided and t.numel() >= numel]
        assert (full != []) == (kernel == DENSE), (layer, kernel, full)
    assert fast.memory_bytes() == tensor_bytes(fast.model) < tensor_bytes(dense_model) / 2

    # force="sparse": no dense weight is ever built
    materialised.clear()
    forced = load_sparse_inference(f"local-dir:{export_folder}", x, force="sparse")
    assert materialised == [] and {p.kernel for p in forced.plan} <= {CSR, DIRECT}
    torch.testing.assert_close(forced(x), expected, **TOL)
    assert forced.model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_compact_export_loads_from_a_hub_repo_id(export_folder, offline_hub):
    from st3_hf import load_sparse_inference

    populate_cache(offline_hub, "org/resnet10t-st3", export_folder)
    x = torch.randn(1, 3, 32, 32)
    fast = load_sparse_inference("hf-hub:org/resnet10t-st3", x, force="sparse")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain_timm(export_folder)(x), **TOL)


def test_compact_file_that_does_not_fit_its_config_is_refused_in_one_line(export_folder, tmp_path):
    import shutil

    from st3_hf.errors import ModelError
    from st3_hf.hub import load_sparse_inference

    x = torch.randn(1, 3, 32, 32)

    def copy_with(edit) -> str:
        folder = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(export_folder, folder)
        config = json.loads((folder / "config.json").read_text())
        edit(config, folder)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    def other_head(config, folder):
        config["num_classes"] = config["pretrained_cfg"]["num_classes"] = config["model_args"]["num_classes"] = 7

    with pytest.raises(ModelError) as refused:
        load_sparse_inference(copy_with(other_head), x)
    assert "model.sparse.safetensors does not fit resnet10t" in str(refused.value)
    assert "shape mismatches" in str(refused.value) and "fc.weight (5, 512) vs (7, 512)" in str(refused.value)

    def other_architecture(config, folder):
        config["architecture"] = "resnet14t"

    with pytest.raises(ModelError, match="holds a resnet10t but config.json describes a resnet14t"):
        load_sparse_inference(copy_with(other_architecture), x)

    with pytest.raises(ModelError, match="model.sparse.safetensors not found"):
        load_sparse_inference(copy_with(lambda config, folder: (folder / "model.sparse.safetensors").unlink()), x)
    for error in (refused.value,):
        assert "\n" not in str(error)


def test_models_without_refillable_buffers_are_built_with_parameters_on_meta(tmp_path, monkeypatch):
    from accelerate import init_empty_weights

    from st3_hf.hub import compact_inference

    with init_empty_weights(include_buffers=False):  # what load_sparse_inference falls back to
        skeleton = timm.create_model("swin_tiny_patch4_window7_224", **FAMILY_KWARGS["swin_tiny_patch4_window7_224"])
    assert all(p.is_meta for p in skeleton.parameters())
    index = skeleton.layers[0].blocks[0].attn.relative_position_index
    assert not index.is_meta and int(index.max()) > 0  # computed while the model was built
    monkeypatch.setattr(compact_inference, "_buffers_refillable", lambda model: False)
    check_family_from_compact(FAMILY_BY_MODEL["swin_tiny_patch4_window7_224"], tmp_path)


def test_a_layer_whose_weight_the_parent_reads_stays_dense_even_when_forced():
    class Reader(nn.Module):  # as timm's BEiT / EVA attention: F.linear(x, self.qkv.weight, own bias)
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 8, bias=False)
            self.proj = nn.Linear(8, 4)

        def forward(self, x):
            return self.proj(F.linear(x, self.qkv.weight, torch.ones(8)))

    model = Reader()
    global_magnitude_prune(model, 0.9)
    x = torch.randn(3, 8)
    fast = sparse_inference(model, x, force="sparse")
    assert [(p.layer, p.kernel) for p in fast.plan] == [("qkv", DENSE), ("proj", CSR)]
    assert fast.plan[0].reason == "weight read outside the layer's forward: dense"
    torch.testing.assert_close(fast(x), model(x).detach(), **TOL)


# ------------------------------------------------------------------ every timm family of docs/models.md
def _families():
    from timm_families import FAMILIES
    return FAMILIES


FAMILY_BY_MODEL = {f.model: f for f in _families()}
FAMILY_KWARGS = {f.model: f.kwargs for f in _families()}


def family_model(entry) -> nn.Module:
    """The family's small model, 90 % of every Conv2d / Linear weight zeroed at random, random norm statistics."""
    torch.manual_seed(0)
    model = timm.create_model(entry.model, pretrained=False, num_classes=5, **entry.kwargs)
    model.eval()
    randomize_norm_layers(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(torch.rand(module.weight.shape, generator=g) >= 0.9)
    return model


def check_family_from_compact(entry, folder, model: nn.Module = None) -> None:
    """``model`` written as config.json + model.sparse.safetensors (the two files the loader reads), loaded
    with every layer that can take it on a sparse kernel, against the dense model's logits."""
    from st3_hf.hub import load_sparse_inference
    from st3_hf.hub.compact import COMPACT_FILENAME, save_compact

    model = family_model(entry) if model is None else model
    folder.mkdir(parents=True, exist_ok=True)
    size = [3, entry.size, entry.size]
    config = {"architecture": entry.model, "num_classes": 5,
              "pretrained_cfg": {"input_size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 5}}
    (folder / "config.json").write_text(json.dumps(config))
    save_compact(model.state_dict(), folder / COMPACT_FILENAME, {"architecture": entry.model})
    x = torch.randn(2, *size)
    fast = load_sparse_inference(folder, x, force="sparse", model_args=entry.kwargs)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), **TOL)
    assert any(p.kernel != DENSE for p in fast.plan)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: intra-op threads cost more than they give on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("entry", _families(), ids=[f.model for f in _families()])
def test_sparse_inference_is_exact_on_every_family(entry, tmp_path, one_thread):
    """Both ways in, every layer the kernels can run on a sparse kernel: the model in memory through
    sparse_inference (a cost table: CSR everywhere, convs as sparse taps), and its compact file through
    load_sparse_inference (forced: the direct conv where it builds, CSR for Linear layers)."""
    model = family_model(entry)
    x = torch.randn(2, 3, entry.size, entry.size)
    fast = sparse_inference(model, x, timer=prefer(CSR), min_sparsity=0.0)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), **TOL)
    kept = {p.reason for p in fast.plan if p.kernel == DENSE}
    assert all(r.startswith("original layer kept") or r.startswith("weight read outside") for r in kept), kept
    assert any(p.kernel == CSR for p in fast.plan)
    check_family_from_compact(entry, tmp_path / entry.model, model)


def test_what_sparse_inference_does_not_run_is_refused_in_one_line():
    model = timm.create_model("resnet10t", num_classes=5).to(torch.bfloat16)
    with pytest.raises(ConfigError) as refused:
        sparse_inference(model, torch.randn(1, 3, 32, 32))
    message = str(refused.value)
    assert "parameter conv1.0.weight is torch.bfloat16" in message and "\n" not in message
    with pytest.raises(ConfigError, match="float32 or float64 input, got torch.bfloat16"):
        sparse_inference(model, torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
