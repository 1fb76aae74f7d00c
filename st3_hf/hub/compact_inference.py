"""An exported model straight from its compact file into the CPU sparse kernels: :func:`load_sparse_inference`.

The dense weights of the layers that run sparse are never kept: the timm model is created on the meta device
(timm's own way: its computed buffers are then filled by ``init_non_persistent_buffers``; a model with computed
buffers that cannot be refilled is built with only its parameters on the meta device), every tensor that is
not such a weight is read from ``model.sparse.safetensors`` into it, and the pruned Conv2d / Linear weights go
to :func:`st3_hf.inference.plan_in_place` as their stored positions and values
(:class:`~st3_hf.inference.SparseWeight`), which builds the CSR matrices or the direct conv's arrays from them.
A layer's dense weight exists only while that one layer's dense kernel is timed, or where the plan keeps it
dense.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn

from st3_hf.errors import ModelError, describe_cause
from st3_hf.hub.compact import COMPACT_FILENAME, CompactTensor, read_compact, read_compact_metadata
from st3_hf.hub.export import CONFIG_FILENAME
from st3_hf.hub.pretrained import (ModelSource, load_strict, locate, read_timm_config, set_pretrained_cfg,
                                   timm_create_args)
from st3_hf.inference import SparseInferenceModel, SparseWeight, Timer, held_tensors, plan_in_place, sparse_capable

PathLike = Union[str, Path]


def load_sparse_inference(
    name_or_path: PathLike,
    example_input: torch.Tensor,
    *,
    timer: Optional[Timer] = None,
    min_sparsity: float = 0.5,
    min_gain: float = 0.1,
    force: Optional[str] = None,
    whole_model_check: bool = False,
    model_args: Optional[Mapping[str, Any]] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
) -> SparseInferenceModel:
    """The CPU inference model of an st3_hf export, built from ``config.json`` and ``model.sparse.safetensors``
    alone, without the dense weights of the layers that run sparse.

    ``name_or_path``: an exported folder (``PATH``, ``local-dir:PATH``) or a Hub repo id (``ORG/NAME``,
    ``hf-hub:ORG/NAME``; only those two files are fetched).  Each Conv2d / Linear gets its kernel as in
    :func:`st3_hf.sparse_inference` (``example_input``, ``timer``, ``min_sparsity``, ``min_gain``, ``force``),
    timed one layer at a time, so at most one layer's dense weight is materialised for timing at any moment.
    ``whole_model_check=True`` also times the whole model all dense against the plan, as
    :func:`~st3_hf.sparse_inference` does; that needs every dense weight at once (the dense model's memory
    while planning), so it is off by default.  ``model_args``: ``timm.create_model`` keywords on top of those
    the ``config.json`` records (what ``timm.create_model("local-dir:PATH", pretrained=True, **kwargs)`` takes,
    e.g. an ``img_size`` the model was created with).  The result computes what the dense export computes with plain
    timm (``allclose`` 1e-4); ``.plan`` says what runs where and why; ``.memory_bytes()`` what it holds.

    Raises :class:`~st3_hf.errors.ModelError` (one line) when the folder or its compact file is missing, or
    when the compact file does not fit the ``config.json`` (another architecture, other tensor names or
    shapes), is damaged, or the config is unsafe.

        >>> import torch
        >>> from st3_hf.hub import load_sparse_inference
        >>> fast = load_sparse_inference("out/hub", torch.randn(1, 3, 224, 224))           # doctest: +SKIP
        >>> logits = fast(images)                                                          # doctest: +SKIP
        >>> sum(p.kernel != "dense" for p in fast.plan), fast.memory_bytes()              # doctest: +SKIP
        (48, 4316212)
    """
    source = locate(name_or_path, revision=revision, cache_dir=cache_dir, files=(CONFIG_FILENAME, COMPACT_FILENAME))
    if not (source.folder / CONFIG_FILENAME).is_file() and source.repo_id is None:
        raise ModelError(f"{source.name(CONFIG_FILENAME)} not found: {source.folder} is not an st3_hf export "
                         "(config.json + model.sparse.safetensors); pass an exported folder")
    read_timm_config(source)  # no remote code, an architecture timm defines, sane preprocessing fields
    pretrained_cfg, architecture, model_args = timm_create_args(source, model_args)
    compact = source.folder / COMPACT_FILENAME
    if not compact.is_file():
        raise ModelError(f"{source.name(COMPACT_FILENAME)} not found: the export has no compact file (an "
                         f"export older than the compact format?); {source.refetch}")
    stored = read_compact_metadata(compact).get("architecture")
    if stored is not None and stored != architecture:
        raise ModelError(f"{source.name(COMPACT_FILENAME)} holds a {stored} but {CONFIG_FILENAME} describes a "
                         f"{architecture}: the two files are of different models; {source.refetch}")
    tensors = read_compact(compact)
    model = _skeleton(source, architecture, model_args)
    shapes = {name: torch.empty(t.shape, device="meta") for name, t in tensors.items()}
    load_strict(model, shapes, f"{source.name(COMPACT_FILENAME)} does not fit {architecture} built with {model_args}",
                f"{CONFIG_FILENAME} and {COMPACT_FILENAME} are not of the same model: {source.refetch}")
    weights, dense = _split(model, tensors)
    del tensors, shapes
    model.load_state_dict(dense, strict=False, assign=True)  # the small tensors: norms, biases, embeddings
    del dense
    for name in weights:  # read from ``weights`` only; a placeholder of no memory gives the device and dtype
        layer = model.get_submodule(name)
        layer.weight = nn.Parameter(torch.zeros((), dtype=layer.weight.dtype).expand(layer.weight.shape),
                                    requires_grad=False)
    _fill_computed_buffers(model)
    for key in ("first_conv", "classifier"):
        pretrained_cfg.setdefault(key, model.pretrained_cfg.get(key))
    set_pretrained_cfg(model, {**pretrained_cfg, "architecture": architecture, "file": str(source.folder)})
    fast = plan_in_place(model, example_input, weights=weights, timer=timer, min_sparsity=min_sparsity,
                         min_gain=min_gain, force=force, whole_model_check=whole_model_check)
    left = sorted(name for name, t in held_tensors(fast.model).items() if t.is_meta)
    if left:  # a parameter no state-dict entry reaches (a weight shared between layers): never silently empty
        raise ModelError(f"{architecture}: {left[:3]} received no value from {source.name(COMPACT_FILENAME)}; "
                         "load this model with st3_hf.from_pretrained and st3_hf.sparse_inference instead")
    return fast


def _skeleton(source: ModelSource, architecture: str, model_args: Mapping[str, Any]) -> nn.Module:
    """The timm model with no memory behind its parameters, in eval mode: built on the meta device when every
    computed (non-persistent) buffer can be refilled, else with only its parameters on the meta device."""
    model = _create(source, architecture, model_args, torch.device("meta"))
    if not _buffers_refillable(model):
        # accelerate's context: parameters on the meta device, buffers computed for real while the model is built
        from accelerate import init_empty_weights
        model = _create(source, architecture, model_args, init_empty_weights(include_buffers=False))
    model.eval()
    return model


def _buffers_refillable(model: nn.Module) -> bool:
    """Whether every module holding computed buffers recomputes them on request (timm's meta-device support)."""
    return all(hasattr(module, "init_non_persistent_buffers") for module in _modules_with_computed_buffers(model))


def _create(source: ModelSource, architecture: str, model_args: Mapping[str, Any],
            context: contextlib.AbstractContextManager) -> nn.Module:
    try:
        with context:
            return timm.create_model(architecture, pretrained=False, **model_args)
    except (TypeError, ValueError, RuntimeError, KeyError, NotImplementedError) as e:
        raise ModelError(f"timm cannot build {architecture} with the model_args of "
                         f"{source.name(CONFIG_FILENAME)} ({describe_cause(e)}); {source.refetch}") from e


def _modules_with_computed_buffers(model: nn.Module) -> List[nn.Module]:
    return [module for module in model.modules()
            if any(module._buffers.get(name) is not None for name in module._non_persistent_buffers_set)]


def _fill_computed_buffers(model: nn.Module) -> None:
    """The non-persistent buffers of a model built on the meta device, computed by their modules (timm's
    ``init_non_persistent_buffers``) once the parameters they are derived from are in place."""
    for module in _modules_with_computed_buffers(model):
        meta = [name for name in module._non_persistent_buffers_set
                if module._buffers.get(name) is not None and module._buffers[name].is_meta]
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        if meta:
            module.init_non_persistent_buffers()


def _split(model: nn.Module, tensors: Dict[str, Union[torch.Tensor, CompactTensor]]
           ) -> Tuple[Dict[str, SparseWeight], Dict[str, torch.Tensor]]:
    """The weights of the layers the sparse kernels can run, as :class:`SparseWeight` (still packed: positions
    and values), and every other tensor dense."""
    capable = {name for name, module in model.named_modules() if sparse_capable(module)}
    weights: Dict[str, SparseWeight] = {}
    dense: Dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        layer, _, attribute = key.rpartition(".")
        if attribute == "weight" and layer in capable:
            weights[layer] = (SparseWeight(tensor.shape, tensor.positions(), tensor.values)
                              if isinstance(tensor, CompactTensor) else SparseWeight.from_dense(tensor))
        else:
            dense[key] = tensor.to_dense() if isinstance(tensor, CompactTensor) else tensor
    return weights, dense
