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
from st3_hf.inference.storage import SparseWeight, tensor_bytes
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

    def memory_bytes(self) -> int:
        """Bytes of every tensor the model holds (parameters, buffers, the kernels' matrices and index arrays),
        each memory block once: the resident size of the weights, dense or sparse."""
        return tensor_bytes(self.model)

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


def _check_supported(model: nn.Module, example_input: torch.Tensor,
                     weights: Mapping[str, SparseWeight]) -> None:
    """One clear error for what the CPU kernels cannot run: another device, a non-float dtype."""
    if not isinstance(example_input, torch.Tensor):
        raise ConfigError(f"sparse_inference needs one example input tensor, got {type(example_input).__name__}")
    given = {f"{name}.weight" if name else "weight" for name in weights}  # read from ``weights``, not the module
    tensors = [("the example input", example_input)] + [
        (f"parameter {n}", p) for n, p in model.named_parameters() if n not in given] + [
        (f"the given weight of {n}", w.values) for n, w in weights.items()]
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


def _describe(layer: nn.Module) -> Tuple[str, str]:
    """``(op description, why the original layer is kept)``; no reason: the kernels can run the layer."""
    if isinstance(layer, nn.Linear):
        op = f"linear {layer.in_features}->{layer.out_features}"
    else:
        kh, kw = layer.kernel_size
        op = (f"conv{kh}x{kw} {layer.in_channels}->{layer.out_channels} stride {layer.stride[0]}"
              + (f" groups {layer.groups}" if layer.groups > 1 else ""))
    if type(layer).forward not in _PLAIN_FORWARDS:
        return op, f"original layer kept: {type(layer).__name__} has its own forward"
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return op, f"original layer kept: padding_mode {layer.padding_mode!r} (sparse taps pad with zeros)"
    return op, ""


def sparse_capable(layer: nn.Module) -> bool:
    """Whether the kernels can run ``layer``: a Conv2d / Linear (ST-3 ones included) with the plain forward and
    zero padding.  Other layers stay as they are in a :class:`SparseInferenceModel`."""
    return isinstance(layer, (nn.Conv2d, nn.Linear)) and not _describe(layer)[1]


class _Pending(nn.Module):
    """Stands in for one Conv2d / Linear while the example input runs: on its first call it picks the layer's
    kernel on the input it receives (timed there), then runs that kernel.  It holds the weight in sparse form;
    only the dense kernel (timed, or chosen) materialises it.  A parent that reads ``.weight`` itself (timm's
    EVA / BEiT attention: ``F.linear(x, self.qkv.weight)``) gets the dense weight, and the layer stays dense."""

    def __init__(self, planner: "_Planner", entry: LayerPlan, weight: SparseWeight, layer: nn.Module) -> None:
        super().__init__()
        self.entry, self.sparse_weight = entry, weight
        self.bias = None if layer.bias is None else layer.bias.detach()
        self.conv_args = None if isinstance(layer, nn.Linear) else (
            tuple(layer.stride), _conv_padding(layer), tuple(layer.dilation), layer.groups)
        self.kernel: Optional[nn.Module] = None
        self.dense_kernel: Optional[nn.Module] = None  # kept once built for an outside read of .weight
        self.read_outside = False
        object.__setattr__(self, "planner", planner)  # not a submodule

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        self.read_outside = True
        return self.build(DENSE).weight

    def build(self, kernel: str) -> nn.Module:
        if kernel == DENSE and self.dense_kernel is not None:
            return self.dense_kernel
        w = self.sparse_weight
        if self.conv_args is None:
            built: nn.Module = DenseLinear(w.dense(), self.bias) if kernel == DENSE else SparseLinear(w, self.bias)
        else:
            cls = {DENSE: DenseConv2d, CSR: SparseConv2d, DIRECT: DirectSparseConv2d}[kernel]
            built = cls(w.dense() if kernel == DENSE else w, self.bias, *self.conv_args)
        if kernel == DENSE and self.read_outside:
            self.dense_kernel = built
        return built

    def sparse_kernels(self) -> List[str]:
        direct = self.conv_args is not None and self.planner.native and self.sparse_weight.dtype == torch.float32
        return [CSR, DIRECT] if direct else [CSR]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            self.kernel = self.planner.choose(self, x)
        return self.kernel(x)


class _Planner:
    """The per-layer rules of :func:`sparse_inference`."""

    def __init__(self, timer: Timer, min_sparsity: float, min_gain: float, force: Optional[str]) -> None:
        self.timer, self.min_sparsity, self.min_gain, self.force = timer, min_sparsity, min_gain, force
        self.native = native_library()[0] is not None

    def choose(self, layer: _Pending, x: torch.Tensor) -> nn.Module:
        """The kernel of ``layer``, decided on its first input ``x``; ``layer.entry`` says which and why."""
        entry = layer.entry
        entry.input_shape = list(x.shape)
        if layer.read_outside:
            return self.settle(layer, DENSE, "weight read outside the layer's forward: dense")
        if layer.conv_args is not None and x.dim() != 4:
            return self.settle(layer, DENSE, f"{x.dim()}-d (unbatched) input: dense")
        if self.force is not None:
            return self.settle(layer, DENSE if self.force == DENSE else layer.sparse_kernels()[-1], "forced")
        if entry.sparsity < self.min_sparsity:
            return self.settle(layer, DENSE, f"sparsity {entry.sparsity:.3f} < min_sparsity {self.min_sparsity}: "
                                             "dense, not timed")
        # every candidate exists only for this layer's timing: one layer's dense weight at a time
        candidates = {k: layer.build(k) for k in [DENSE, *layer.sparse_kernels()]}
        with torch.no_grad():
            seconds = self.timer(entry.layer, {k: (lambda k=k: candidates[k](x)) for k in candidates})
        entry.times_ms = {k: round(v * 1e3, 4) for k, v in seconds.items()}
        fastest = min(seconds, key=seconds.__getitem__)
        if fastest == DENSE or seconds[fastest] <= (1 - self.min_gain) * seconds[DENSE]:
            entry.kernel, entry.reason = fastest, "measured fastest"
        else:
            entry.kernel, entry.reason = DENSE, f"{fastest} less than {self.min_gain:.0%} faster than dense: dense"
        return candidates[entry.kernel]

    @staticmethod
    def settle(layer: _Pending, kernel: str, reason: str) -> nn.Module:
        layer.entry.kernel, layer.entry.reason = kernel, reason
        return layer.build(kernel)

    def finish(self, layer: _Pending) -> nn.Module:
        """The kernel that replaces ``layer`` once the example input has run."""
        if layer.read_outside:  # the parent computes with .weight: the dense kernel it read from is the one kept
            return self.settle(layer, DENSE, "weight read outside the layer's forward: dense")
        if layer.kernel is not None:
            return layer.kernel
        if self.force is not None:
            return self.settle(layer, DENSE if self.force == DENSE else layer.sparse_kernels()[-1], "forced")
        return self.settle(layer, DENSE, "not reached by the example input: dense")


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
    Layers the kernels cannot run (their own ``forward``, a padding mode other than zeros) keep their original
    module, as does a layer whose weight its parent reads directly; the plan gives the reason.  Raises
    :class:`~st3_hf.errors.ConfigError` (one line) for what it does not run: a model or input off the CPU, a
    dtype other than float32 / float64, a model not in the input's dtype.

    >>> import torch, timm
    >>> net = timm.create_model("resnet18", pretrained=False).eval()            # doctest: +SKIP
    >>> fast = sparse_inference(net, torch.randn(1, 3, 224, 224))             # doctest: +SKIP
    >>> [(p.layer, p.kernel) for p in fast.plan][:2]                          # doctest: +SKIP
    [('conv1', 'dense'), ('layer1.0.conv1', 'sparse_direct')]
    """
    _check_supported(model, example_input, {})
    return plan_in_place(copy.deepcopy(model), example_input, timer=timer, min_sparsity=min_sparsity,
                         min_gain=min_gain, force=force)


def plan_in_place(model: nn.Module, example_input: torch.Tensor, *, weights: Optional[Mapping[str, SparseWeight]] = None,
                  timer: Optional[Timer] = None, min_sparsity: float = 0.5, min_gain: float = 0.1,
                  force: Optional[str] = None, whole_model_check: bool = True) -> SparseInferenceModel:
    """:func:`sparse_inference` on ``model`` itself: its Conv2d / Linear layers are replaced by the kernels.

    ``weights``: ``{layer name: SparseWeight}`` for layers whose weight comes in sparse form (read from a compact
    file); such a layer's own ``weight`` is never read and may sit on the meta device.  Their dense weight is
    materialised only while that one layer is timed, or where dense is chosen.  ``whole_model_check=False``
    skips the end-to-end timing of the plan against all dense, which needs every dense weight at once.
    """
    weights = dict(weights or {})
    _check_supported(model, example_input, weights)
    if force not in (None, DENSE, SPARSE):
        raise ConfigError(f"force must be None, {DENSE!r} or {SPARSE!r}, got {force!r}")
    timer = timer or default_timer
    model.eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    unknown = sorted(set(weights) - {name for name, m in layers.items() if sparse_capable(m)})
    if unknown:
        raise ConfigError(f"sparse weights given for {unknown[:3]}, which are not Conv2d / Linear layers the sparse "
                          "kernels run: give those layers their dense weight")
    planner = _Planner(timer, min_sparsity, min_gain, force)
    plan: List[LayerPlan] = []
    pending: Dict[str, _Pending] = {}
    kept_shapes: Dict[str, LayerPlan] = {}
    for name, layer in layers.items():
        op, reason = _describe(layer)
        weight = weights.get(name)
        if weight is None and not reason:
            with torch.no_grad():
                weight = SparseWeight.from_dense(layer.weight)  # the effective weight of an ST-3 layer
        sparsity = weight.sparsity if weight is not None else _dense_sparsity(layer)
        entry = LayerPlan(name, op, [], round(sparsity, 4), DENSE, reason=reason)
        plan.append(entry)
        if reason:
            kept_shapes[name] = entry
        else:
            pending[name] = _Pending(planner, entry, weight, layer)
            _replace(model, name, pending[name])
    del layers, weights

    def record(mod: nn.Module, args: tuple, entry: LayerPlan) -> None:
        if not entry.input_shape and args and isinstance(args[0], torch.Tensor):
            entry.input_shape = list(args[0].shape)
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, e=e: record(m, a, e))
               for n, e in kept_shapes.items()]
    try:
        with torch.no_grad():
            model(example_input)  # each pending layer plans itself on its first input
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in pending.items():
        _replace(model, name, planner.finish(layer))
    result = SparseInferenceModel(model, plan, torch.get_num_threads())
    if whole_model_check and force is None and any(p.kernel != DENSE for p in plan):
        dense_kernels = {name: layer.build(DENSE) if layer.entry.kernel != DENSE else model.get_submodule(name)
                         for name, layer in pending.items()}
        _keep_only_if_faster(result, example_input, dense_kernels, timer)
    return result


def _dense_sparsity(layer: nn.Module) -> float:
    with torch.no_grad():
        weight = layer.weight.detach()
    return float((weight == 0).sum()) / max(weight.numel(), 1) if not weight.is_meta else 0.0


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
