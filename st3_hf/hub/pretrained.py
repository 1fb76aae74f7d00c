"""Load sparse models back: exported folders, Hub repos and training checkpoints.

:func:`from_pretrained` accepts

(a) a local folder written by :func:`st3_hf.hub.export_pretrained`;
(b) a Hub repo id (``"ORG/NAME"``, optionally ``"hf-hub:ORG/NAME"``), fetched
    with ``huggingface_hub.snapshot_download`` (so ``HF_HUB_OFFLINE=1`` with a
    populated cache works);
(c) a training checkpoint folder written by accelerate's ``save_state``:
    ``model.safetensors`` (the model's state dict, ``_orig_mod.`` / ``module.``
    prefixes allowed), the :meth:`Sparsifier.state_dict` (either the trainer's
    pickle-free ``sparsifier.json`` + ``sparsifier.safetensors``, see
    :mod:`st3_hf.state_io`, or accelerate's ``custom_checkpoint_<i>.pkl`` from
    ``register_for_checkpointing``, read with ``torch.load(weights_only=True)``)
    and ``recipe.yaml`` (the resolved recipe).

For (a)/(b) the masks are the non-zeros of the weights
(:meth:`Sparsifier.freeze_from_zeros`), checked against the zero counts
recorded in ``config.json``.  For (c) the model and sparsifier come back
exactly as saved (frozen or not, ready to resume).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..config import SparsityConfig
from ..layers import is_prunable
from ..sparsifier import Sparsifier, sparsify
from ..state_io import SPARSIFIER_JSON, SPARSIFIER_TENSORS, load_sparsifier_state
from .export import CONFIG_FILENAME, RECIPE_FILENAME, WEIGHTS_FILENAME, data_config_from_recipe

PathLike = Union[str, Path]
HEADS = ("dense", "pruned")
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def from_pretrained(
    name_or_path: PathLike,
    num_classes: Optional[int] = None,
    head: str = "dense",
    sparsity_tolerance: float = 0.0,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    seed: int = 0,
) -> Tuple[nn.Module, Sparsifier]:
    """A sparse timm model and its :class:`Sparsifier` from an exported folder, a Hub repo or a checkpoint.

    ``num_classes`` different from the saved one replaces the classifier
    (``model.reset_classifier``): with ``head="dense"`` the new head is
    excluded from the masks and trains densely; with ``head="pruned"`` it is
    sparsified and frozen with a uniformly random mask (seeded by ``seed``)
    holding exactly as many zeros as the old head's recorded sparsity (the
    model's global sparsity if the old head was dense).

    ``sparsity_tolerance`` is how far (as a fraction) the zeros found in the
    weights of an export may be from the counts recorded in ``config.json``;
    at the default 0 every layer must have exactly the recorded number of
    zeros.  An export comes back in eval mode with a frozen sparsifier (masks =
    the non-zeros).  A training checkpoint comes back as saved (sparsifier
    frozen or not, model in train mode, ready to resume); asking it for a new
    ``num_classes`` freezes it first.

        >>> import st3_hf
        >>> model, sparsifier = st3_hf.from_pretrained("ORG/resnet50-st3-90")  # doctest: +SKIP
        >>> model, sparsifier = st3_hf.from_pretrained("out/hub", num_classes=10, head="dense")  # doctest: +SKIP
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if sparsity_tolerance < 0:
        raise ValueError(f"sparsity_tolerance must be >= 0, got {sparsity_tolerance}")
    folder, kind = _resolve(name_or_path, revision=revision, cache_dir=cache_dir)
    if kind == "checkpoint":
        model, sparsifier, _ = load_training_checkpoint(folder)
        if num_classes is not None and num_classes != model.num_classes:
            if not sparsifier.frozen:
                sparsifier.freeze()
            sparsifier = _replace_head(model, sparsifier, num_classes, head, seed)
        return model, sparsifier
    model, sparsifier = _load_export(folder, sparsity_tolerance)
    if num_classes is not None and num_classes != model.num_classes:
        sparsifier = _replace_head(model, sparsifier, num_classes, head, seed)
    model.eval()
    return model, sparsifier


# ---------------------------------------------------------------------------- resolution
def _resolve(name_or_path: PathLike, *, revision: Optional[str], cache_dir: Optional[PathLike]) -> Tuple[Path, str]:
    """``(folder, kind)`` with kind ``"export"`` or ``"checkpoint"``."""
    text = str(name_or_path)
    if text.startswith("hf-hub:"):
        return _download(text[len("hf-hub:"):], revision, cache_dir), "export"
    if text.startswith("local-dir:"):
        text = text[len("local-dir:"):]
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; from_pretrained expects an exported folder or a checkpoint folder")
        if (path / CONFIG_FILENAME).is_file():
            return path, "export"
        if (
            (path / RECIPE_FILENAME).is_file()
            or (path / SPARSIFIER_JSON).is_file()
            or any(path.glob("custom_checkpoint_*.pkl"))
        ):
            return path, "checkpoint"
        raise FileNotFoundError(
            f"{path} is neither an st3_hf export (no {CONFIG_FILENAME}) nor a training checkpoint "
            f"(no {RECIPE_FILENAME} / {SPARSIFIER_JSON} / custom_checkpoint_*.pkl)"
        )
    return _download(text, revision, cache_dir), "export"


def _download(repo_id: str, revision: Optional[str], cache_dir: Optional[PathLike]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither an existing folder nor a valid Hub repo id ({e})") from e
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=[CONFIG_FILENAME, WEIGHTS_FILENAME]
        )
    except Exception as e:  # network, auth, offline-without-cache: keep the cause, say what was tried
        raise OSError(
            f"could not get {repo_id!r} (revision {revision or 'main'}) from the Hugging Face Hub or the local cache: "
            f"{type(e).__name__}: {e}. Offline (HF_HUB_OFFLINE=1) it must already be in the cache."
        ) from e
    return Path(folder)


# ---------------------------------------------------------------------------- exported folders
def read_export_config(folder: PathLike) -> Dict[str, Any]:
    """``config.json`` of an exported folder, checked to be an st3_hf export."""
    path = Path(folder) / CONFIG_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an exported model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (corrupted file?): {e}") from e
    if not isinstance(config, dict) or "architecture" not in config:
        raise ValueError(f"{path} has no 'architecture': not a timm model config")
    sparsity = config.get("sparsity")
    if not isinstance(sparsity, dict) or not isinstance(sparsity.get("per_layer"), dict) or "config" not in sparsity:
        raise ValueError(f"{path} has no st3_hf 'sparsity' block: not an st3_hf export")
    return config


def load_safetensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with errors that name the file."""
    import safetensors.torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError for corrupt headers and truncated data
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated): {e}") from e


def check_sparsity(
    state_dict: Mapping[str, torch.Tensor], sparsity_meta: Mapping[str, Any], tolerance: float = 0.0, source: str = ""
) -> None:
    """Raise ``ValueError`` unless each recorded layer has the recorded fraction of zeros.

    Half a weight is always allowed on top of ``tolerance`` so that equal zero
    counts pass whatever float rounding the JSON round trip did.
    """
    total_zeros = 0
    total = 0
    where = f" ({source})" if source else ""
    for name, info in sparsity_meta["per_layer"].items():
        key = f"{name}.weight" if name else "weight"
        if key not in state_dict:
            raise ValueError(f"layer {name!r} recorded in the metadata has no weight {key!r} in the checkpoint{where}")
        weight = state_dict[key]
        zeros = int((weight == 0).sum())
        numel = weight.numel()
        recorded = float(info["sparsity"])
        if int(info.get("num_weights", numel)) != numel or abs(zeros / numel - recorded) > tolerance + 0.5 / numel:
            raise ValueError(
                f"checkpoint sparsity {zeros / numel:.6f} of layer {name!r} does not match metadata {recorded:.6f}{where}: "
                "file corrupted or not an st3_hf export"
            )
        total_zeros += zeros
        total += numel
    recorded_global = float(sparsity_meta["achieved_sparsity"])
    if total == 0 or abs(total_zeros / total - recorded_global) > tolerance + 0.5 / max(total, 1):
        actual = total_zeros / total if total else float("nan")
        raise ValueError(
            f"checkpoint sparsity {actual:.6f} does not match metadata {recorded_global:.6f}{where}: "
            "file corrupted or not an st3_hf export"
        )


def _load_export(folder: Path, tolerance: float) -> Tuple[nn.Module, Sparsifier]:
    import timm

    config = read_export_config(folder)
    sparsity_meta = config["sparsity"]
    architecture = config["architecture"]
    if not timm.is_model(architecture):
        raise ValueError(
            f"unknown architecture {architecture!r} in {folder / CONFIG_FILENAME}: not a model of timm {timm.__version__}"
        )
    weights_path = folder / WEIGHTS_FILENAME
    state_dict = load_safetensors(weights_path)
    check_sparsity(state_dict, sparsity_meta, tolerance, source=str(weights_path))

    pretrained_cfg = dict(config.get("pretrained_cfg", {}))
    model_args = dict(config.get("model_args", {}))
    model_args.setdefault("num_classes", config.get("num_classes", pretrained_cfg.get("num_classes")))
    if "in_chans" not in model_args and pretrained_cfg.get("input_size"):
        model_args["in_chans"] = int(pretrained_cfg["input_size"][0])
    model = timm.create_model(architecture, pretrained=False, **model_args)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights_path} does not fit {architecture} built with {model_args}: {e}") from e

    sparsifier = sparsify(model, SparsityConfig.from_dict(dict(sparsity_meta["config"])))
    sparsifier.freeze_from_zeros()
    recorded = set(sparsity_meta["per_layer"])
    if set(sparsifier.layers) != recorded:
        raise ValueError(
            f"the recorded sparsity config prunes {sorted(set(sparsifier.layers) ^ recorded)[:5]} differently "
            f"from the metadata's per-layer list ({folder / CONFIG_FILENAME}): not an st3_hf export of this model"
        )
    _set_pretrained_cfg(model, architecture, pretrained_cfg, source=str(folder))
    return model, sparsifier


def _set_pretrained_cfg(model: nn.Module, architecture: str, pretrained_cfg: Mapping[str, Any], source: str) -> None:
    cfg = dict(pretrained_cfg)
    for key in ("input_size", "test_input_size", "min_input_size", "pool_size"):
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    cfg["architecture"] = architecture
    cfg["file"] = source
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # timm's backward-compatible alias


# ---------------------------------------------------------------------------- new heads
def classifier_names(model: nn.Module) -> List[str]:
    """Qualified module names of the model's classifier(s) (timm's ``pretrained_cfg['classifier']``)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(names, str):
        return [names]
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if module is classifier:
            return [name]
    raise ValueError("cannot find the model's classifier: no pretrained_cfg['classifier'] and no get_classifier()")


@torch.no_grad()
def _replace_head(model: nn.Module, sparsifier: Sparsifier, num_classes: int, head: str, seed: int) -> Sparsifier:
    """Reset the classifier to ``num_classes`` and return a frozen sparsifier over the new set of layers."""
    heads = classifier_names(model)
    old_sparsity = sparsifier.layer_sparsity()

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    head_sparsity = [old_sparsity[n] for n in old_sparsity if in_head(n)]
    target = sum(head_sparsity) / len(head_sparsity) if head_sparsity else sparsifier.sparsity()
    model.reset_classifier(num_classes)

    layers = {name: layer for name, layer in sparsifier.layers.items() if not in_head(name)}
    config = sparsifier.config
    if head == "dense":
        config = dataclasses.replace(config, exclude=tuple(config.exclude) + tuple(h for h in heads if h not in config.exclude))
    else:
        generator = torch.Generator().manual_seed(seed)
        for name in heads:
            module = model.get_submodule(name)
            if not is_prunable(module):
                continue  # e.g. nn.Identity for num_classes=0
            layer = sparsify(module, dataclasses.replace(config, exclude=())).layers[""]
            layer.freeze()  # dense -> frozen with an all-ones mask
            numel = layer.weight.numel()
            zeros = int(round(target * numel))
            flat = torch.ones(numel, dtype=torch.bool)
            flat[torch.randperm(numel, generator=generator)[:zeros]] = False
            layer.mask.copy_(flat.view_as(layer.mask).to(layer.mask.device))
            layer.refresh()  # frozen: weight *= mask
            layers[name] = layer
    # the new sparsifier re-registers the DDP-ignored buffers of exactly its layers
    model._ddp_params_and_buffers_to_ignore = []
    new = Sparsifier(model, config, layers)
    new.frozen = True
    new.step_count = sparsifier.step_count
    new.global_threshold = sparsifier.global_threshold
    new.ratio = new.sparsity()
    if hasattr(model, "pretrained_cfg"):
        cfg = dict(model.pretrained_cfg)
        cfg["num_classes"] = num_classes
        for key in ("label_names", "label_descriptions"):
            cfg.pop(key, None)
        model.pretrained_cfg = cfg
        model.default_cfg = cfg
    return new


# ---------------------------------------------------------------------------- training checkpoints
def load_training_checkpoint(folder: PathLike) -> Tuple[nn.Module, Any, Any]:
    """``(model, sparsifier, recipe)`` restored from an accelerate ``save_state`` folder with ``recipe.yaml``.

    The sparsifier comes back exactly as saved (mode, masks, thresholds, step
    count), so an unfrozen checkpoint keeps its moving masks.
    """
    from ..modeling import create_model

    folder = Path(folder)
    recipe_path = folder / RECIPE_FILENAME
    if not recipe_path.is_file():
        raise FileNotFoundError(f"{recipe_path} not found: a training checkpoint needs the resolved recipe next to the weights")
    weights_path = folder / WEIGHTS_FILENAME
    if not weights_path.is_file():
        hint = " (found pytorch_model.bin: save the state with safe_serialization=True)" if (folder / "pytorch_model.bin").exists() else ""
        raise FileNotFoundError(f"{weights_path} not found{hint}")
    recipe = load_recipe_yaml(recipe_path)
    state_dict = strip_prefixes(load_safetensors(weights_path))
    sparsifier_state = _find_sparsifier_state(folder)

    model = create_model(recipe.model)
    sparsifier = sparsify(model, SparsityConfig.from_dict(dict(sparsifier_state["config"])))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights_path} does not fit the recipe's model {recipe.model.name!r}: {e}") from e
    sparsifier.load_state_dict(sparsifier_state)
    if hasattr(model, "pretrained_cfg"):
        cfg = dict(model.pretrained_cfg)
        data_cfg = data_config_from_recipe(recipe)
        cfg.update(data_cfg)
        _set_pretrained_cfg(model, recipe.model.name, cfg, source=str(folder))
    return model, sparsifier, recipe


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str] = _PREFIXES) -> Dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``_orig_mod.``, ``module.``, in any nesting) from the keys."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    stripped = True
        if key in out:
            raise ValueError(f"two checkpoint keys map to {key!r} after removing wrapper prefixes")
        out[key] = value
    return out


def _find_sparsifier_state(folder: Path) -> Dict[str, Any]:
    if (folder / SPARSIFIER_JSON).is_file() or (folder / SPARSIFIER_TENSORS).is_file():
        try:
            return load_sparsifier_state(folder)
        except FileNotFoundError:
            raise
        except Exception as e:  # corrupt JSON or safetensors: say which folder
            raise ValueError(f"the sparsifier state in {folder} ({SPARSIFIER_JSON}, {SPARSIFIER_TENSORS}) is unreadable: {e}") from e
    candidates = sorted(folder.glob("custom_checkpoint_*.pkl"))
    if not candidates:
        raise FileNotFoundError(
            f"no sparsifier state in {folder}: neither {SPARSIFIER_JSON} + {SPARSIFIER_TENSORS} nor custom_checkpoint_*.pkl"
        )
    for path in candidates:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or non-tensor pickle: say which file
            raise ValueError(f"{path} cannot be read with torch.load(weights_only=True): {e}") from e
        if isinstance(state, dict) and "masks" in state and "config" in state:
            return state
    raise ValueError(f"none of {[p.name for p in candidates]} in {folder} holds a Sparsifier state")


def load_recipe_yaml(path: PathLike) -> Any:
    """The :class:`~st3_hf.recipe_schema.Recipe` of a resolved ``recipe.yaml`` (validated by :func:`st3_hf.recipe.load_recipe`)."""
    from ..recipe import load_recipe

    return load_recipe(path)
