"""``sparse_inference``: every Conv2d / Linear gets the faster of its dense and sparse kernel, measured here."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from st3_hf.errors import ConfigError
from st3_hf.inference.kernels import DenseConv2d, DenseLinear, SparseConv2d, SparseLinear
from st3_hf.inference.native import DirectSparseConv2d, native_library
from st3_hf.sparse.layers import STConv2d, STLinear

#: ``timer(layer_name, {kernel: run})`` -> seconds per call of each kernel; inject a cost table in tests
Timer = Callable[[str, Mapping[str, Callable[[], object]]], Dict[str, float]]

# dense: F.conv2d / F.linear; sparse_csr: torch CSR products (conv as taps); sparse_direct: the C direct conv
DENSE, CSR, DIRECT = "dense", "sparse_csr", "sparse_direct"
SPARSE = "sparse"  # force=: the direct conv where it runs, else CSR
MODEL = "<whole model>"
# forwards that only read ``self.weight`` and call the plain op: a kernel computes the same function
_PLAIN_FORWARDS = {nn.Conv2d.forward, STConv2d.forward, nn.Linear.forward, STLinear.forward}


@dataclass
class LayerPlan:
    """What runs for one layer, and why."""

    layer: str
    op: str
    input_shape: List[int]
    sparsity: float
    kernel: str
    times_ms: Dict[str, float] = field(default_factory=dict)
    reason: str = ""


class SparseInferenceModel(nn.Module):
    """The model with every measured layer replaced by its chosen kernel; forward runs without autograd."""

    def __init__(self, model: nn.Module, plan: List[LayerPlan], threads: int) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.threads = threads
        self.whole_model_ms: Dict[str, float] = {}  # the end-to-end check: all dense vs the plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def summary(self) -> Dict[str, object]:
        """Counts per kernel and the per-layer rows, JSON-ready."""
        kernels = [p.kernel for p in self.plan]
        return {"threads": self.threads, "layers": len(self.plan), "sparse_layers": len(kernels) - kernels.count(DENSE),
                "dense_layers": kernels.count(DENSE), "kernels": {k: kernels.count(k) for k in sorted(set(kernels))},
                "whole_model_ms": self.whole_model_ms, "plan": [asdict(p) for p in self.plan]}


def default_timer(layer: str, candidates: Mapping[str, Callable[[], object]], min_seconds: float = 0.05,
                  min_rounds: int = 5, max_rounds: int = 30) -> Dict[str, float]:
    """Best time per call of each candidate, measured in interleaved rounds (the minimum resists other load)."""
    best = {name: float("inf") for name in candidates}
    for run in candidates.values():
        run()  # warm-up: first-call allocations and kernel selection
    spent, rounds = 0.0, 0
    while rounds < min_rounds or (spent < min_seconds and rounds < max_rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            best[name] = min(best[name], elapsed)
            spent += elapsed
        rounds += 1
    return best


def _check_supported(model: nn.Module, example_input: torch.Tensor) -> None:
    """One clear error for what the CPU kernels cannot run: another device, a non-float dtype."""
    if not isinstance(example_input, torch.Tensor):
        raise ConfigError(f"sparse_inference needs one example input tensor, got {type(example_input).__name__}")
    tensors = [("the example input", example_input)] + [(f"parameter {n}", p) for n, p in model.named_parameters()]
    for what, tensor in tensors:
        if tensor.device.type != "cpu":
            raise ConfigError(f"sparse_inference runs on the CPU, but {what} is on {tensor.device}: call model.cpu() "
                              "and pass a CPU input")
    dtype = example_input.dtype
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"sparse_inference needs a float32 or float64 input, got {dtype}: convert with .float()")
    for what, tensor in tensors[1:]:
        if tensor.dtype != dtype:
            raise ConfigError(f"sparse_inference needs the model in the input's dtype {dtype}, but {what} is "
                              f"{tensor.dtype}: call model.to({dtype})")


def _conv_padding(layer: nn.Conv2d) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding, ``'same'`` / ``'valid'`` included."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0, 0, 0, 0)
        pads = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        return (pads[0] // 2, pads[0] - pads[0] // 2, pads[1] // 2, pads[1] - pads[1] // 2)
    return (layer.padding[0], layer.padding[0], layer.padding[1], layer.padding[1])


def _kernels(layer: nn.Module) -> Tuple[Optional[Dict[str, nn.Module]], float, str, str]:
    """``({kernel: module}, sparsity, op description, reason)``; no kernels when the layer must stay as it is."""
    with torch.no_grad():
        weight = layer.weight.detach()  # what the layer's forward reads: the effective weight of an ST-3 layer
    sparsity = float((weight == 0).sum()) / max(weight.numel(), 1)
    if isinstance(layer, nn.Linear):
        op = f"linear {layer.in_features}->{layer.out_features}"
        if type(layer).forward not in _PLAIN_FORWARDS:
            return None, sparsity, op, f"original layer kept: {type(layer).__name__} has its own forward"
        return {DENSE: DenseLinear(weight, layer.bias), CSR: SparseLinear(weight, layer.bias)}, sparsity, op, ""
    kh, kw = layer.kernel_size
    op = (f"conv{kh}x{kw} {layer.in_channels}->{layer.out_channels} stride {layer.stride[0]}"
          + (f" groups {layer.groups}" if layer.groups > 1 else ""))
    if type(layer).forward not in _PLAIN_FORWARDS:
        return None, sparsity, op, f"original layer kept: {type(layer).__name__} has its own forward"
    if layer.padding_mode != "zeros":
        return None, sparsity, op, f"original layer kept: padding_mode {layer.padding_mode!r} (sparse taps pad with zeros)"
    args = (weight, layer.bias, tuple(layer.stride), _conv_padding(layer), tuple(layer.dilation), layer.groups)
    kernels: Dict[str, nn.Module] = {DENSE: DenseConv2d(*args), CSR: SparseConv2d(*args)}
    if native_library()[0] is not None and weight.dtype == torch.float32:
        kernels[DIRECT] = DirectSparseConv2d(*args)
    return kernels, sparsity, op, ""


def _record_inputs(model: nn.Module, example_input: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The first input each Conv2d / Linear receives on ``example_input`` (the shapes the kernels are timed on)."""
    seen: Dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod, args, name=name):  # type: ignore[no-untyped-def]
                if name not in seen and args and isinstance(args[0], torch.Tensor):
                    seen[name] = args[0].detach().clone(memory_format=torch.preserve_format)
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def sparse_inference(model: nn.Module, example_input: torch.Tensor, *, timer: Optional[Timer] = None,
                     min_sparsity: float = 0.5, min_gain: float = 0.1,
                     force: Optional[str] = None) -> SparseInferenceModel:
    """A CPU inference copy of ``model`` where each Conv2d / Linear runs the faster of a dense and a sparse kernel.

    The kernels (``dense``, ``sparse_csr``, ``sparse_direct``) are timed on this machine, on the input each layer
    receives from ``example_input``, with the current torch thread count (the sparse kernels use it too);
    ``timer`` replaces the clock (a cost table in tests).  Layers below ``min_sparsity`` are not timed and stay
    dense; a sparse kernel is taken only when it is at least ``min_gain`` faster than dense, so that timing noise
    does not pick it.  At the end the whole model is timed all dense against the plan: if the plan is not
    faster there, every layer goes back to dense.  ``.plan`` says per layer what runs, its
    sparsity, the measured times and the reason.  ``model`` itself is not changed.  ``force="dense"`` or
    ``"sparse"`` puts every layer that can take it on that kernel without timing (a dense baseline).

    >>> import torch, timm
    >>> net = timm.create_model("resnet18", pretrained=False).eval()            # doctest: +SKIP
    >>> fast = sparse_inference(net, torch.randn(1, 3, 224, 224))             # doctest: +SKIP
    >>> [(p.layer, p.kernel) for p in fast.plan][:2]                          # doctest: +SKIP
    [('conv1', 'dense'), ('layer1.0.conv1', 'sparse_direct')]
    """
    _check_supported(model, example_input)
    if force not in (None, DENSE, SPARSE):
        raise ConfigError(f"force must be None, {DENSE!r} or {SPARSE!r}, got {force!r}")
    timer = timer or default_timer
    fast = copy.deepcopy(model)
    fast.eval()
    inputs = _record_inputs(fast, example_input)
    plan: List[LayerPlan] = []
    dense_kernels: Dict[str, nn.Module] = {}
    for name, layer in list(fast.named_modules()):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        kernels, sparsity, op, reason = _kernels(layer)
        x = inputs.get(name)
        entry = LayerPlan(name, op, list(x.shape) if x is not None else [], round(sparsity, 4), DENSE, reason=reason)
        plan.append(entry)
        if kernels is None:
            continue
        dense_kernels[name] = kernels[DENSE]
        if force is not None:
            entry.kernel = DENSE if force == DENSE else (DIRECT if DIRECT in kernels else CSR)
            entry.reason = "forced"
        elif x is None:
            entry.reason = "not reached by the example input: dense"
        elif sparsity < min_sparsity:
            entry.reason = f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity}: dense, not timed"
        else:
            with torch.no_grad():
                seconds = timer(name, {k: (lambda k=k: kernels[k](x)) for k in kernels})
            entry.times_ms = {k: round(v * 1e3, 4) for k, v in seconds.items()}
            fastest = min(seconds, key=seconds.__getitem__)
            if fastest == DENSE or seconds[fastest] <= (1 - min_gain) * seconds[DENSE]:
                entry.kernel, entry.reason = fastest, "measured fastest"
            else:
                entry.reason = f"{fastest} less than {min_gain:.0%} faster than dense: dense"
        _replace(fast, name, kernels[entry.kernel])
    del inputs
    result = SparseInferenceModel(fast, plan, torch.get_num_threads())
    if force is None and any(p.kernel != DENSE for p in plan):
        _keep_only_if_faster(result, example_input, dense_kernels, timer)
    return result


def _keep_only_if_faster(result: SparseInferenceModel, example_input: torch.Tensor,
                         dense_kernels: Dict[str, nn.Module], timer: Timer) -> None:
    """Whole-model check: the layer-by-layer choice must pay off end to end, else every layer goes dense."""
    chosen = {p.layer: result.model.get_submodule(p.layer) for p in result.plan if p.layer in dense_kernels}

    def run_with(kernels: Dict[str, nn.Module]) -> Callable[[], object]:
        def run() -> object:
            for name, kernel in kernels.items():
                _replace(result.model, name, kernel)
            return result(example_input)
        return run

    runs = {DENSE: run_with(dense_kernels), SPARSE: run_with(chosen)}
    seconds = timer(MODEL, runs)
    if seconds[SPARSE] >= seconds[DENSE]:  # undo the layers' measured gains only when a second timing agrees
        again = timer(MODEL, runs)
        seconds = {k: min(seconds[k], again[k]) for k in seconds}
    # no margin here: the layers' margins already guard against noise, and a whole model at a large batch
    # is timed in few rounds, where a margin would throw away real gains on one disturbed round
    keep_sparse = seconds[SPARSE] < seconds[DENSE]
    for name, kernel in chosen.items():
        _replace(result.model, name, kernel)
    result.whole_model_ms = {k: round(v * 1e3, 4) for k, v in seconds.items()}
    if keep_sparse:
        return
    for entry in result.plan:
        if entry.kernel != DENSE:
            _replace(result.model, entry.layer, dense_kernels[entry.layer])
            entry.kernel = DENSE
            entry.reason = (f"whole model with sparse layers {seconds[SPARSE] * 1e3:.2f} ms >= all dense "
                            f"{seconds[DENSE] * 1e3:.2f} ms: dense")
