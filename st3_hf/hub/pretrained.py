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

Nothing in a model folder or repo is ever executed: weights are read from
safetensors only (``pytorch_model.bin`` and other pickles are never opened,
except the sparsifier pickle of (c), with ``weights_only=True``), a config
asking for remote code (``auto_map``) or for timm to read other files
(``checkpoint_path``, ``pretrained_cfg_overlay``...) is refused, and the
architecture must be one timm itself defines.  Every problem is an
:class:`~st3_hf.errors.St3Error` (:class:`~st3_hf.errors.ModelLoadError`,
:class:`~st3_hf.errors.ModelNotFoundError`...) with a one-line message.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle  # for pickle.UnpicklingError only: what torch.load(weights_only=True) raises on a refused object
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..config import SparsityConfig
from ..errors import ConfigError, ModelLoadError, ModelNotFoundError, St3Error
from ..layers import is_prunable
from ..sparsifier import Sparsifier, sparsify
from ..state_io import SPARSIFIER_JSON, SPARSIFIER_TENSORS, load_sparsifier_state
from .compact import COMPACT_FILENAME
from .errors import HubDownloadError, NotAModelFolderError, UnsafeModelError, describe_cause
from .export import (
    CONFIG_FILENAME,
    PLOT_FILENAME,
    README_FILENAME,
    RECIPE_FILENAME,
    WEIGHTS_FILENAME,
    data_config_from_recipe,
)
from .staging import readable_export

PathLike = Union[str, Path]
HEADS = ("dense", "pruned")
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers
# config keys through which a repo would make a loader run its code (transformers' auto classes)
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
# timm.create_model arguments that read files or fetch configs: a downloaded config must not choose them
UNSAFE_MODEL_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
# file names of pickled weights: never opened, only named in the "no safetensors" message
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".ckpt", ".pkl", ".pickle")
# files only an export has (a folder holding them but no config.json is an incomplete export)
_EXPORT_ONLY_FILES = (COMPACT_FILENAME, README_FILENAME, PLOT_FILENAME)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model folder came from, to name it in messages and say how to fix it."""

    folder: Path
    repo_id: Optional[str] = None
    revision: Optional[str] = None

    def name(self, filename: str = "") -> str:
        """The file as the user knows it: a path, or a file of a Hub repo (with its cache path)."""
        if self.repo_id is None:
            return str(self.folder / filename) if filename else str(self.folder)
        what = f"{filename} of " if filename else ""
        return f"{what}Hub repo {self.repo_id!r} (revision {self.revision or 'main'}, cached in {self.folder})"

    @property
    def refetch(self) -> str:
        """How to get an intact copy."""
        if self.repo_id is None:
            return "re-run the export (scripts/export.py)"
        return f"download it again (`hf download {self.repo_id} --force-download`) or re-export and push it"


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

    Raises :class:`~st3_hf.errors.ModelNotFoundError` (a ``FileNotFoundError``)
    for a folder / repo / file that is not there and
    :class:`~st3_hf.errors.ModelLoadError` (a ``ValueError``) for one that is
    corrupt, incomplete, of another architecture or not an st3_hf model.

        >>> import st3_hf
        >>> model, sparsifier = st3_hf.from_pretrained("ORG/resnet50-st3-90")  # doctest: +SKIP
        >>> model, sparsifier = st3_hf.from_pretrained("out/hub", num_classes=10, head="dense")  # doctest: +SKIP
    """
    if head not in HEADS:
        raise ConfigError(f"head must be one of {HEADS}, got {head!r}")
    if sparsity_tolerance < 0:
        raise ConfigError(f"sparsity_tolerance must be >= 0, got {sparsity_tolerance}")
    source, kind = _resolve(name_or_path, revision=revision, cache_dir=cache_dir)
    if kind == "checkpoint":
        model, sparsifier, _ = load_training_checkpoint(source.folder)
        if num_classes is not None and num_classes != model.num_classes:
            if not sparsifier.frozen:
                sparsifier.freeze()
            sparsifier = _replace_head(model, sparsifier, num_classes, head, seed)
        return model, sparsifier
    model, sparsifier = _load_export(source, sparsity_tolerance)
    if num_classes is not None and num_classes != model.num_classes:
        sparsifier = _replace_head(model, sparsifier, num_classes, head, seed)
    model.eval()
    return model, sparsifier


# ---------------------------------------------------------------------------- resolution
def _resolve(name_or_path: PathLike, *, revision: Optional[str], cache_dir: Optional[PathLike]) -> Tuple[ModelSource, str]:
    """``(source, kind)`` with kind ``"export"`` or ``"checkpoint"``."""
    text = str(name_or_path)
    if text.startswith("hf-hub:"):
        repo_id = text[len("hf-hub:"):]
        return ModelSource(_download(repo_id, revision, cache_dir), repo_id, revision), "export"
    if text.startswith("local-dir:"):
        text = text[len("local-dir:"):]
    path = Path(text).expanduser()
    # an export interrupted while being published left a complete copy next to the folder
    pending = readable_export(path)
    folder = path if pending == Path(os.path.abspath(path)) else pending
    if folder.exists():
        return ModelSource(folder), _folder_kind(folder)
    return ModelSource(_download(text, revision, cache_dir), text, revision), "export"


def _folder_kind(path: Path) -> str:
    """``"export"`` or ``"checkpoint"`` for an existing path, or an error saying what it is not."""
    if not path.is_dir():
        raise NotAModelFolderError(
            f"{path} is a file; from_pretrained expects the folder holding it (an exported folder or a checkpoint folder)"
        )
    if (path / CONFIG_FILENAME).is_file():
        return "export"
    if (path / SPARSIFIER_JSON).is_file() or any(path.glob("custom_checkpoint_*.pkl")):
        return "checkpoint"
    found = sorted(p.name for p in path.iterdir())
    export_files = [name for name in _EXPORT_ONLY_FILES if (path / name).is_file()]
    if export_files:
        raise ModelNotFoundError(
            f"{path} has no {CONFIG_FILENAME} but holds {export_files}: an incomplete st3_hf export; re-run the export "
            "(scripts/export.py) or copy the whole exported folder again"
        )
    if (path / RECIPE_FILENAME).is_file():
        return "checkpoint"  # load_training_checkpoint says which checkpoint file is missing
    raise ModelNotFoundError(
        f"{path} is neither an st3_hf export (no {CONFIG_FILENAME}) nor a training checkpoint "
        f"(no {RECIPE_FILENAME} / {SPARSIFIER_JSON} / custom_checkpoint_*.pkl); it holds {found[:8]}: "
        "pass an exported folder, a checkpoints/step_* folder or a Hub repo id"
    )


def _download(repo_id: str, revision: Optional[str], cache_dir: Optional[PathLike]) -> Path:
    """The local snapshot of ``repo_id`` holding (at most) its config.json and model.safetensors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub repo id ({describe_cause(e)}): "
            "pass an exported folder, a training checkpoint folder or ORG/NAME"
        ) from e
    try:
        # only these two files: nothing else of the repo (pickles, code) is ever fetched
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=[CONFIG_FILENAME, WEIGHTS_FILENAME]
        )
    except Exception as e:  # network, auth, offline-without-cache: keep the cause, say what was tried
        raise _download_error(repo_id, revision, cache_dir, e) from e
    return Path(folder)


def _download_error(repo_id: str, revision: Optional[str], cache_dir: Optional[PathLike], error: Exception) -> ModelLoadError:
    import huggingface_hub.constants as constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    what = f"Hub repo {repo_id!r} (revision {revision or 'main'})"
    if isinstance(error, LocalEntryNotFoundError):
        cache = cache_dir or constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            return ModelNotFoundError(
                f"{what} is not in the local Hugging Face cache {cache} and HF_HUB_OFFLINE=1 forbids downloading it: "
                f"download it once online (`hf download {repo_id}`), pass a local folder, or unset HF_HUB_OFFLINE"
            )
        return ModelNotFoundError(
            f"could not reach the Hugging Face Hub for {what} and it is not in the local cache {cache} "
            f"({describe_cause(error)}): check the network, or pass a local folder"
        )
    if isinstance(error, RevisionNotFoundError):
        return ModelNotFoundError(f"{what}: no such revision on the Hub: check the branch, tag or commit name")
    if isinstance(error, RepositoryNotFoundError):
        return ModelNotFoundError(
            f"{what} does not exist on the Hub or is private/gated: check the id, or log in (`hf auth login`) "
            "with an account that has access"
        )
    return HubDownloadError(
        f"could not get {what} from the Hugging Face Hub or the local cache ({describe_cause(error)}): check the "
        "network and retry; offline (HF_HUB_OFFLINE=1) it must already be in the cache"
    )


# ---------------------------------------------------------------------------- exported folders
def read_export_config(folder: PathLike, source: Optional[ModelSource] = None) -> Dict[str, Any]:
    """``config.json`` of an exported folder, checked to be an st3_hf export of a timm model that runs no code."""
    source = source or ModelSource(Path(folder))
    path = Path(folder) / CONFIG_FILENAME
    name = source.name(CONFIG_FILENAME)
    if not path.is_file():
        raise ModelNotFoundError(f"{name} not found: not an exported model folder; {source.refetch}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{name} is not valid JSON (corrupted file? {describe_cause(e)}); {source.refetch}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{name} is not a JSON object: not a timm model config; {source.refetch}")
    _refuse_remote_code(config, name)
    if "architecture" not in config:
        raise ModelLoadError(f"{name} has no 'architecture': {_what_config_is(config)}")
    sparsity = config.get("sparsity")
    if not isinstance(sparsity, dict) or not isinstance(sparsity.get("per_layer"), dict) or "config" not in sparsity:
        raise ModelLoadError(
            f"{name} has no st3_hf 'sparsity' block: not an st3_hf export (a plain timm model? load it with "
            "timm.create_model('local-dir:...' or 'hf-hub:...', pretrained=True) and sparsify it with st3_hf.sparsify)"
        )
    _check_sparsity_block(sparsity, name, source)
    return config


def _refuse_remote_code(config: Mapping[str, Any], name: str) -> None:
    asked = [key for key in REMOTE_CODE_KEYS if key in config]
    if asked:
        raise UnsafeModelError(
            f"{name} asks for remote code ({asked}): st3_hf never runs code from a model folder or repo; "
            "only timm architectures exported by st3_hf can be loaded"
        )


def _what_config_is(config: Mapping[str, Any]) -> str:
    """Why a config without ``architecture`` is not ours, in words (a transformers config is the usual case)."""
    if "model_type" in config or "architectures" in config:
        return (
            f"it is a transformers config (model_type {config.get('model_type')!r}, architectures "
            f"{config.get('architectures')!r}), not a timm/st3_hf model; st3_hf loads timm image classifiers "
            "exported by st3_hf (scripts/export.py)"
        )
    return "not a timm model config; st3_hf loads timm image classifiers exported by st3_hf (scripts/export.py)"


def _check_sparsity_block(sparsity: Mapping[str, Any], name: str, source: ModelSource) -> None:
    """The fields :func:`check_sparsity` and the loader read, with the types they need."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    bad = [layer for layer, info in sparsity["per_layer"].items() if not isinstance(info, dict) or not number(info.get("sparsity"))]
    if bad or not number(sparsity.get("achieved_sparsity")) or not isinstance(sparsity["config"], dict):
        problem = f"layers {bad[:3]} have no numeric 'sparsity'" if bad else "'achieved_sparsity' or 'config' is missing"
        raise ModelLoadError(f"{name}: malformed st3_hf 'sparsity' block ({problem}); {source.refetch}")


def load_safetensors(path: PathLike, source: Optional[ModelSource] = None) -> Dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with errors that name the file (and any pickle found instead)."""
    import safetensors.torch

    path = Path(path)
    source = source or ModelSource(path.parent)
    name = source.name(path.name)
    if not path.is_file():
        raise ModelNotFoundError(f"{name} not found{_pickle_hint(path.parent)}; {source.refetch}")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError for corrupt headers and truncated data
        raise ModelLoadError(
            f"{name} is not a readable safetensors file (corrupt or truncated): {describe_cause(e)}; {source.refetch}"
        ) from e


def _pickle_hint(folder: Path) -> str:
    """Names the pickled weight files of ``folder``, which are never opened: unpickling can run arbitrary code."""
    if not folder.is_dir():
        return ""
    pickles = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
    if not pickles:
        return ""
    return (
        f" (the folder holds {pickles[:5]}, which st3_hf never loads: pickle files can run arbitrary code; "
        "convert them to safetensors with code you trust)"
    )


def check_sparsity(
    state_dict: Mapping[str, torch.Tensor], sparsity_meta: Mapping[str, Any], tolerance: float = 0.0, source: str = ""
) -> None:
    """Raise :class:`~st3_hf.errors.ModelLoadError` unless each recorded layer has the recorded fraction of zeros.

    Half a weight is always allowed on top of ``tolerance`` so that equal zero
    counts pass whatever float rounding the JSON round trip did.
    """
    total_zeros = 0
    total = 0
    where = f" ({source})" if source else ""
    fix = "the file is corrupted or not the export this config.json describes: re-export or re-download the model"
    for name, info in sparsity_meta["per_layer"].items():
        key = f"{name}.weight" if name else "weight"
        if key not in state_dict:
            raise ModelLoadError(f"layer {name!r} recorded in the metadata has no weight {key!r} in the checkpoint{where}: {fix}")
        weight = state_dict[key]
        zeros = int((weight == 0).sum())
        numel = weight.numel()
        recorded = float(info["sparsity"])
        if int(info.get("num_weights", numel)) != numel or abs(zeros / numel - recorded) > tolerance + 0.5 / numel:
            raise ModelLoadError(
                f"checkpoint sparsity {zeros / numel:.6f} of layer {name!r} does not match metadata {recorded:.6f}{where}: "
                f"file corrupted or not an st3_hf export ({fix}; sparsity_tolerance=... accepts small drifts)"
            )
        total_zeros += zeros
        total += numel
    recorded_global = float(sparsity_meta["achieved_sparsity"])
    if total == 0 or abs(total_zeros / total - recorded_global) > tolerance + 0.5 / max(total, 1):
        actual = total_zeros / total if total else float("nan")
        raise ModelLoadError(
            f"checkpoint sparsity {actual:.6f} does not match metadata {recorded_global:.6f}{where}: "
            f"file corrupted or not an st3_hf export ({fix})"
        )


def _load_export(source: ModelSource, tolerance: float) -> Tuple[nn.Module, Sparsifier]:
    import timm

    folder = source.folder
    config = read_export_config(folder, source)
    sparsity_meta = config["sparsity"]
    architecture = config["architecture"]
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise ModelLoadError(
            f"unknown architecture {architecture!r} in {source.name(CONFIG_FILENAME)}: not a model of timm "
            f"{timm.__version__} (st3_hf builds only timm's own architectures; a newer timm may know it)"
        )
    weights_path = folder / WEIGHTS_FILENAME
    state_dict = load_safetensors(weights_path, source)
    check_sparsity(state_dict, sparsity_meta, tolerance, source=source.name(WEIGHTS_FILENAME))

    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    model_args = _model_args(config, pretrained_cfg, source)
    model = _create_timm_model(architecture, model_args, source)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"{source.name(WEIGHTS_FILENAME)} does not fit {architecture} built with {model_args}: "
            f"{_mismatch(model, state_dict)}; config.json and model.safetensors are not of the same model: {source.refetch}"
        ) from e

    try:
        sparsifier = sparsify(model, SparsityConfig.from_dict(dict(sparsity_meta["config"])))
    except (ValueError, TypeError) as e:
        raise ModelLoadError(
            f"the sparsity config in {source.name(CONFIG_FILENAME)} is invalid ({describe_cause(e)}); {source.refetch}"
        ) from e
    sparsifier.freeze_from_zeros()
    recorded = set(sparsity_meta["per_layer"])
    if set(sparsifier.layers) != recorded:
        raise ModelLoadError(
            f"the recorded sparsity config prunes {sorted(set(sparsifier.layers) ^ recorded)[:5]} differently "
            f"from the metadata's per-layer list ({source.name(CONFIG_FILENAME)}): not an st3_hf export of this model"
        )
    _set_pretrained_cfg(model, architecture, pretrained_cfg, source=str(folder))
    return model, sparsifier


def _model_args(config: Mapping[str, Any], pretrained_cfg: Mapping[str, Any], source: ModelSource) -> Dict[str, Any]:
    """The ``timm.create_model`` keyword arguments recorded in the config, minus anything that reads files."""
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ModelLoadError(f"'model_args' in {source.name(CONFIG_FILENAME)} is not a JSON object; {source.refetch}")
    unsafe = sorted(set(model_args) & set(UNSAFE_MODEL_ARGS))
    if unsafe:
        raise UnsafeModelError(
            f"{source.name(CONFIG_FILENAME)} passes {unsafe} to timm.create_model, which would read other files or "
            "fetch weights: st3_hf refuses it; only st3_hf's own exports can be loaded"
        )
    model_args = dict(model_args)
    model_args.setdefault("num_classes", config.get("num_classes", pretrained_cfg.get("num_classes")))
    if "in_chans" not in model_args and pretrained_cfg.get("input_size"):
        model_args["in_chans"] = int(pretrained_cfg["input_size"][0])
    return model_args


def _create_timm_model(architecture: str, model_args: Mapping[str, Any], source: ModelSource) -> nn.Module:
    import timm

    try:
        return timm.create_model(architecture, pretrained=False, **model_args)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # an argument this architecture does not take
        raise ModelLoadError(
            f"timm cannot build {architecture} with the model_args of {source.name(CONFIG_FILENAME)} "
            f"({describe_cause(e)}); {source.refetch}"
        ) from e


def _mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    """A one-line summary of how ``state_dict`` differs from ``model``'s (torch's message is one line per key)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {items[:3]})")
    return ", ".join(parts) or "the state dict does not load"


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
    raise ModelLoadError(
        f"cannot find the classifier of {type(model).__name__}: no pretrained_cfg['classifier'] and no get_classifier(); "
        "a new num_classes needs a timm classification model"
    )


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
            numel = layer.latent_weight.numel()
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
    count), so an unfrozen checkpoint keeps its moving masks.  Only
    ``model.safetensors``, the sparsifier state and ``recipe.yaml`` are read:
    the optimizer / scheduler / RNG pickles accelerate writes next to them are
    never opened.
    """
    folder = Path(folder)
    _check_checkpoint_folder(folder)
    recipe_path = folder / RECIPE_FILENAME
    if not recipe_path.is_file():
        raise ModelNotFoundError(
            f"{recipe_path} not found: a training checkpoint needs the resolved recipe next to the weights "
            "(the trainer writes it into every checkpoints/step_* folder; copy the run's recipe.yaml there)"
        )
    weights_path = folder / WEIGHTS_FILENAME
    if not weights_path.is_file():
        raise ModelNotFoundError(
            f"{weights_path} not found{_pickle_hint(folder)}; save the state with "
            "accelerator.save_state(safe_serialization=True), as the trainer does"
        )
    recipe = load_recipe_yaml(recipe_path)
    state_dict = _checkpoint_state_dict(weights_path)
    sparsifier_state = _find_sparsifier_state(folder)
    model, sparsifier = _build_checkpoint_model(recipe, sparsifier_state, folder)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"{weights_path} does not fit the recipe's model {recipe.model.name!r}: {_mismatch(model, state_dict)}; "
            f"the checkpoint's recipe.yaml is not the one it was trained with"
        ) from e
    try:
        sparsifier.load_state_dict(sparsifier_state)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(
            f"the sparsifier state in {folder} does not fit the recipe's model ({describe_cause(e)}): "
            "the checkpoint's files are not of the same run"
        ) from e
    if hasattr(model, "pretrained_cfg"):
        cfg = dict(model.pretrained_cfg)
        data_cfg = data_config_from_recipe(recipe)
        cfg.update(data_cfg)
        _set_pretrained_cfg(model, recipe.model.name, cfg, source=str(folder))
    return model, sparsifier, recipe


def _check_checkpoint_folder(folder: Path) -> None:
    """Say early when ``folder`` is missing, or is an export rather than a training checkpoint."""
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"training checkpoint folder {folder} does not exist: pass a checkpoints/step_* folder of a run"
        )
    has_state = (folder / SPARSIFIER_JSON).is_file() or any(folder.glob("custom_checkpoint_*.pkl"))
    if (folder / CONFIG_FILENAME).is_file() and not has_state:
        raise ModelNotFoundError(
            f"{folder} is an exported model folder ({CONFIG_FILENAME}), not a training checkpoint: it needs no "
            "export (load it with st3_hf.from_pretrained, push it with scripts/push_to_hub.py)"
        )


def _checkpoint_state_dict(weights_path: Path) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint, wrapper prefixes removed."""
    state_dict = load_safetensors(weights_path, ModelSource(weights_path.parent))
    try:
        return strip_prefixes(state_dict)
    except ModelLoadError as e:
        raise ModelLoadError(f"{weights_path}: {e}") from e


def _build_checkpoint_model(recipe: Any, sparsifier_state: Mapping[str, Any], folder: Path) -> Tuple[nn.Module, Sparsifier]:
    """The recipe's model, sparsified with the saved sparsity config (weights not loaded yet)."""
    from ..modeling import create_model

    try:
        model = create_model(recipe.model)
    except St3Error:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # unknown timm name, bad kwargs
        raise ModelLoadError(
            f"cannot build the model of {folder / RECIPE_FILENAME} ({describe_cause(e)}): fix model.name / model.kwargs"
        ) from e
    try:
        config = SparsityConfig.from_dict(dict(sparsifier_state["config"]))
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"the sparsifier state in {folder} has an invalid config ({describe_cause(e)})") from e
    return model, sparsify(model, config)


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
            raise ModelLoadError(
                f"two checkpoint keys map to {key!r} after removing wrapper prefixes: the state dict mixes two models"
            )
        out[key] = value
    return out


def _find_sparsifier_state(folder: Path) -> Dict[str, Any]:
    if (folder / SPARSIFIER_JSON).is_file() or (folder / SPARSIFIER_TENSORS).is_file():
        return _read_sparsifier_files(folder)
    candidates = sorted(folder.glob("custom_checkpoint_*.pkl"))
    if not candidates:
        raise ModelNotFoundError(
            f"no sparsifier state in {folder}: neither {SPARSIFIER_JSON} + {SPARSIFIER_TENSORS} nor "
            "custom_checkpoint_*.pkl; pass a checkpoints/step_* folder written by the trainer"
        )
    for path in candidates:
        state = _torch_load_tensors(path)
        if isinstance(state, dict) and "masks" in state and "config" in state:
            return state
    raise ModelLoadError(
        f"none of {[p.name for p in candidates]} in {folder} holds a Sparsifier state: "
        "register the sparsifier with accelerator.register_for_checkpointing before save_state"
    )


def _read_sparsifier_files(folder: Path) -> Dict[str, Any]:
    """The trainer's pickle-free sparsifier state, with errors that name the folder."""
    try:
        return load_sparsifier_state(folder)
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"{e}; the checkpoint is incomplete: use another checkpoints/step_* folder") from e
    except Exception as e:  # corrupt JSON or safetensors: say which folder
        raise ModelLoadError(
            f"the sparsifier state in {folder} ({SPARSIFIER_JSON}, {SPARSIFIER_TENSORS}) is unreadable "
            f"({describe_cause(e)}): use another checkpoints/step_* folder"
        ) from e


def _torch_load_tensors(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, so no code runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: the pickle holds arbitrary objects
        raise UnsafeModelError(
            f"{path} holds Python objects other than tensors, refused by torch.load(weights_only=True) "
            f"({describe_cause(e, 160)}): st3_hf never unpickles arbitrary objects (they can run code); "
            "re-save the checkpoint with the trainer (sparsifier.json + sparsifier.safetensors)"
        ) from e
    except Exception as e:  # a truncated or damaged file: say which file
        raise ModelLoadError(
            f"{path} cannot be read with torch.load(weights_only=True) ({describe_cause(e)}): the file is damaged; "
            "use another checkpoints/step_* folder"
        ) from e


def load_recipe_yaml(path: PathLike) -> Any:
    """The :class:`~st3_hf.recipe_schema.Recipe` of a resolved ``recipe.yaml`` (validated by :func:`st3_hf.recipe.load_recipe`)."""
    from ..recipe import load_recipe

    return load_recipe(path)
