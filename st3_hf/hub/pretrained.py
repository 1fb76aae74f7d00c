"""Load sparse models back from an exported folder or a Hub repo, as ``(model, sparsifier)`` with frozen masks.

A name is a local folder (``PATH`` or ``local-dir:PATH``) written by
:func:`st3_hf.hub.export_pretrained`, or a Hub repo id (``ORG/NAME``, ``hf-hub:ORG/NAME``) fetched with
``huggingface_hub.snapshot_download`` (only ``config.json`` and ``model.safetensors``, so
``HF_HUB_OFFLINE=1`` with a populated cache works).  timm parses the config
(``load_model_config_from_path``); what is ours: the masks are the non-zeros of the weights
(:meth:`Sparsifier.freeze_from_zeros`), checked against the zero counts recorded in ``config.json``,
and a new head on request.  Training checkpoints are the training side's (``st3_hf/train/run_export.py``).

Nothing in a model folder or repo is ever executed: weights are read from safetensors only
(``pytorch_model.bin`` and other pickles are never opened), a config asking for remote code
(``auto_map``) or for timm to read other files (``checkpoint_path``, ``pretrained_cfg_overlay``...) is
refused, and the architecture must be one timm itself defines.  Every problem is an
:class:`~st3_hf.errors.St3Error` with a one-line message.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.models._hub import load_model_config_from_path

from st3_hf.sparse.config import SparsityConfig
from st3_hf.errors import ConfigError, ModelLoadError, ModelNotFoundError
from st3_hf.sparse.layers import is_prunable
from st3_hf.sparse.sparsifier import Sparsifier, sparsify
from st3_hf.hub.errors import HubDownloadError, NotAModelFolderError, UnsafeModelError
from st3_hf.errors import describe_cause
from st3_hf.hub.export import CONFIG_FILENAME, EXPORT_ONLY_FILES, WEIGHTS_FILENAME

PathLike = Union[str, Path]
HEADS = ("dense", "pruned")
# config keys through which a repo would make a loader run its code (transformers' auto classes)
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
# timm.create_model arguments that read files or fetch configs: a downloaded config must not choose them
UNSAFE_MODEL_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
# file names of pickled weights: never opened, only named in the "no safetensors" message
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".ckpt", ".pkl", ".pickle")
HUB_PREFIX, LOCAL_PREFIX = "hf-hub:", "local-dir:"


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
    """A sparse timm model (eval mode) and its frozen :class:`Sparsifier` from an exported folder or a Hub repo.

    ``num_classes`` different from the saved one replaces the classifier (:func:`replace_head`).
    ``sparsity_tolerance`` is how far (as a fraction) the zeros found in the weights may be from the
    counts recorded in ``config.json``; at the default 0 every layer must have exactly the recorded
    number of zeros.  Raises :class:`~st3_hf.errors.ModelNotFoundError` (a ``FileNotFoundError``) for
    a folder / repo / file that is not there and :class:`~st3_hf.errors.ModelLoadError` (a
    ``ValueError``) for one that is corrupt, incomplete, of another architecture or not an st3_hf model.

        >>> from st3_hf.hub import from_pretrained
        >>> model, sparsifier = from_pretrained("ORG/resnet50-st3-90")  # doctest: +SKIP
        >>> model, sparsifier = from_pretrained("out/hub", num_classes=10, head="dense")  # doctest: +SKIP
    """
    if head not in HEADS:
        raise ConfigError(f"head must be one of {HEADS}, got {head!r}")
    if sparsity_tolerance < 0:
        raise ConfigError(f"sparsity_tolerance must be >= 0, got {sparsity_tolerance}")
    source = locate(name_or_path, revision=revision, cache_dir=cache_dir)
    if source.repo_id is None:
        _check_export_folder(source.folder)
    model, sparsifier = _load_export(source, sparsity_tolerance)
    if num_classes is not None and num_classes != model.num_classes:
        sparsifier = replace_head(model, sparsifier, num_classes, head, seed)
    model.eval()
    return model, sparsifier


def locate(name_or_path: PathLike, *, revision: Optional[str] = None, cache_dir: Optional[PathLike] = None) -> ModelSource:
    """The local folder ``name_or_path`` names: an existing path, else the snapshot of a Hub repo."""
    text = str(name_or_path)
    if text.startswith(HUB_PREFIX):
        repo_id = text[len(HUB_PREFIX):]
        return ModelSource(download(repo_id, revision, cache_dir), repo_id, revision)
    path = Path(text[len(LOCAL_PREFIX):] if text.startswith(LOCAL_PREFIX) else text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotAModelFolderError(f"{path} is a file; pass the folder holding it (an exported folder)")
        return ModelSource(path)
    return ModelSource(download(text, revision, cache_dir), text, revision)


def _check_export_folder(path: Path) -> None:
    """An existing folder without config.json, said as what it is (incomplete export, or no model)."""
    if (path / CONFIG_FILENAME).is_file():
        return
    found = sorted(p.name for p in path.iterdir())
    export_files = [name for name in EXPORT_ONLY_FILES if (path / name).is_file()]
    if export_files:
        raise ModelNotFoundError(
            f"{path} has no {CONFIG_FILENAME} but holds {export_files}: an incomplete st3_hf export (an export "
            "interrupted while its files were replaced, or a partial copy); re-run the export or copy the whole folder again"
        )
    if "recipe.yaml" in found or "sparsifier.json" in found:
        raise ModelNotFoundError(f"{path} is a training checkpoint, not an export: load it with st3_hf.from_pretrained "
                                 "(which reads checkpoints) or export it with scripts/export.py")
    raise ModelNotFoundError(
        f"{path} is neither an st3_hf export (no {CONFIG_FILENAME}) nor a training checkpoint "
        f"(no recipe.yaml / sparsifier.json); it holds {found[:8]}: "
        "pass an exported folder, a checkpoints/step_* folder or a Hub repo id"
    )


def download(repo_id: str, revision: Optional[str], cache_dir: Optional[PathLike]) -> Path:
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


# ---------------------------------------------------------------------------- config.json
def read_timm_config(source: ModelSource) -> Dict[str, Any]:
    """``config.json`` of a timm Hub folder, checked to run no code and to name an architecture timm defines."""
    path = source.folder / CONFIG_FILENAME
    name = source.name(CONFIG_FILENAME)
    if not path.is_file():
        raise ModelNotFoundError(
            f"{name} not found: not a model in timm's Hub format (config.json + model.safetensors); "
            f"it holds {sorted(p.name for p in source.folder.iterdir())[:8]}; {source.refetch}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{name} is not valid JSON (corrupted file? {describe_cause(e)}); {source.refetch}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{name} is not a JSON object: not a timm model config; {source.refetch}")
    _refuse_remote_code(config, name)
    if "architecture" not in config:
        raise ModelLoadError(f"{name} has no 'architecture': {_what_config_is(config)}")
    architecture = config["architecture"]
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise ModelLoadError(
            f"{name}: unknown architecture {architecture!r}: not a model of timm {timm.__version__} (st3_hf builds "
            "only timm's own architectures, never a transformers or custom-code model; a newer timm may know it)"
        )
    if not isinstance(config.get("pretrained_cfg", {}), dict) or not isinstance(config.get("model_args") or {}, dict):
        raise ModelLoadError(f"{name}: 'pretrained_cfg' or 'model_args' is not a JSON object; {source.refetch}")
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


def read_export_config(source: ModelSource) -> Dict[str, Any]:
    """:func:`read_timm_config` plus the st3_hf ``sparsity`` block an export has."""
    name = source.name(CONFIG_FILENAME)
    config = read_timm_config(source)
    sparsity = config.get("sparsity")
    if not isinstance(sparsity, dict) or not isinstance(sparsity.get("per_layer"), dict) or "config" not in sparsity:
        raise ModelLoadError(
            f"{name} has no st3_hf 'sparsity' block: not an st3_hf export (a plain timm model? load it with "
            "timm.create_model('local-dir:...' or 'hf-hub:...', pretrained=True) and sparsify it with st3_hf.sparsify)"
        )
    _check_sparsity_block(sparsity, name, source)
    return config


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
        raise ModelNotFoundError(f"{name} not found{pickle_hint(path.parent)}; {source.refetch}")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError for corrupt headers and truncated data
        raise ModelLoadError(
            f"{name} is not a readable safetensors file (corrupt or truncated): {describe_cause(e)}; {source.refetch}"
        ) from e


def pickle_hint(folder: Path) -> str:
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
    config = read_export_config(source)
    sparsity_meta = config["sparsity"]
    state_dict = load_safetensors(source.folder / WEIGHTS_FILENAME, source)
    check_sparsity(state_dict, sparsity_meta, tolerance, source=source.name(WEIGHTS_FILENAME))
    model = build_timm_model(source, state_dict)
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
    return model, sparsifier


def build_timm_model(
    source: ModelSource, state_dict: Mapping[str, torch.Tensor], num_classes: Optional[int] = None,
    extra_args: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """The timm model ``config.json`` describes (parsed by timm), ``state_dict`` loaded strictly, a new head
    when ``num_classes`` differs; its ``pretrained_cfg`` is the folder's own."""
    pretrained_cfg, architecture, model_args = load_model_config_from_path(source.folder)
    model_args = _model_args(model_args, pretrained_cfg, source)
    model_args.update(extra_args or {})
    try:
        model = timm.create_model(architecture, pretrained=False, **model_args)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # an argument this architecture does not take
        raise ModelLoadError(
            f"timm cannot build {architecture} with the model_args of {source.name(CONFIG_FILENAME)} "
            f"({describe_cause(e)}); {source.refetch}"
        ) from e
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"{source.name(WEIGHTS_FILENAME)} does not fit {architecture} built with {model_args}: "
            f"{state_dict_mismatch(model, state_dict)}; config.json and model.safetensors are not of the same model "
            f"(check model.kwargs against config.json): {source.refetch}"
        ) from e
    if num_classes is not None and int(num_classes) != int(model.num_classes):
        model.reset_classifier(int(num_classes))  # timm's fresh head, seeded by the caller's RNG
        for key in ("label_names", "label_descriptions"):
            pretrained_cfg.pop(key, None)
    pretrained_cfg["num_classes"] = int(model.num_classes)
    for key in ("first_conv", "classifier"):  # structure, from the architecture when the config omits it
        if key not in pretrained_cfg and key in model.pretrained_cfg:
            pretrained_cfg[key] = model.pretrained_cfg[key]
    set_pretrained_cfg(model, architecture, pretrained_cfg, source=str(source.folder))
    return model


def _model_args(model_args: Mapping[str, Any], pretrained_cfg: Mapping[str, Any], source: ModelSource) -> Dict[str, Any]:
    """The ``timm.create_model`` keyword arguments recorded in the config, refusing any that read files."""
    unsafe = sorted(set(model_args) & set(UNSAFE_MODEL_ARGS))
    if unsafe:
        raise UnsafeModelError(
            f"{source.name(CONFIG_FILENAME)} passes {unsafe} to timm.create_model, which would read other files or "
            "fetch weights: st3_hf refuses it; only st3_hf's own exports can be loaded"
        )
    model_args = dict(model_args)
    model_args.setdefault("num_classes", pretrained_cfg.get("num_classes"))
    if "in_chans" not in model_args and pretrained_cfg.get("input_size"):
        model_args["in_chans"] = int(pretrained_cfg["input_size"][0])
    return model_args


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
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


def set_pretrained_cfg(model: nn.Module, architecture: str, pretrained_cfg: Mapping[str, Any], source: str) -> None:
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
def replace_head(model: nn.Module, sparsifier: Sparsifier, num_classes: int, head: str, seed: int) -> Sparsifier:
    """Reset the classifier to ``num_classes`` and return a frozen sparsifier over the new set of layers.

    With ``head="dense"`` the new head is excluded from the masks and trains densely; with ``"pruned"`` it is
    sparsified and frozen with a uniformly random mask (seeded by ``seed``) holding as many zeros as the old
    head's recorded sparsity (the model's global sparsity if the old head was dense).
    """
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
