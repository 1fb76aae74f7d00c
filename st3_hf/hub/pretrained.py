"""Load sparse models back from an exported folder, a Hub repo or a training checkpoint, as ``(model, sparsifier)``.

A name is a folder (``PATH``, ``local-dir:PATH``) or a Hub repo id (``ORG/NAME``, ``hf-hub:ORG/NAME``; only
``config.json`` and ``model.safetensors`` are fetched).  timm parses the config; an export's masks are the non-zeros
of the weights (checked against ``config.json``), a training checkpoint's its saved sparsifier.  Nothing in a folder
or repo is ever executed: safetensors only, no remote code, no ``model_args`` that make timm read other files.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models._hub import load_model_config_from_path

from st3_hf.errors import ConfigError, ModelError, describe_cause
from st3_hf.hub.export import CONFIG_FILENAME, EXPORT_ONLY_FILES, RECIPE_FILENAME, WEIGHTS_FILENAME
from st3_hf.hub.state_io import SPARSIFIER_JSON, SPARSIFIER_TENSORS, load_sparsifier_state
from st3_hf.sparse.config import SparsityConfig
from st3_hf.sparse.layers import is_prunable
from st3_hf.sparse.sparsifier import Sparsifier, sparsify

PathLike = Union[str, Path]
HEADS = ("dense", "pruned")
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")  # transformers' ways of running a repo's code
# timm.create_model arguments that read files or fetch configs: a downloaded config must not choose them
UNSAFE_MODEL_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".ckpt", ".pkl", ".pickle")  # only named, never opened
HUB_PREFIX, LOCAL_PREFIX = "hf-hub:", "local-dir:"
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers, in a training checkpoint's keys
CHECKPOINT_FILES = (SPARSIFIER_JSON, SPARSIFIER_TENSORS, RECIPE_FILENAME)  # a config.json without 'sparsity' + these


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model folder came from, to name it in messages and say how to fix it."""

    folder: Path
    repo_id: Optional[str] = None
    revision: Optional[str] = None

    def name(self, filename: str = "") -> str:
        """The file as the user knows it: a path, or a file of a Hub repo (with its cache path)."""
        if self.repo_id is None:
            return str(self.folder / filename)
        return ((f"{filename} of " if filename else "")
                + f"Hub repo {self.repo_id!r} (revision {self.revision or 'main'}, cached in {self.folder})")

    @property
    def refetch(self) -> str:
        """How to get an intact copy."""
        return ("re-run the export (scripts/export.py)" if self.repo_id is None
                else f"download it again (`hf download {self.repo_id} --force-download`) or re-export and push it")


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
    """A sparse timm model and its :class:`Sparsifier`: from an exported folder or a Hub repo in eval mode with frozen
    masks; from a training checkpoint folder as saved (train mode, ready to resume).  ``num_classes`` different from
    the saved one freezes the masks and replaces the classifier (:func:`replace_head`); ``sparsity_tolerance``: how
    far (a fraction) each layer's zeros may be from ``config.json``.  :class:`~st3_hf.errors.ModelError` (a
    ``ValueError``) for what is not there, corrupt, foreign or unsafe.

        >>> model, sparsifier = from_pretrained("ORG/resnet50-st3-90")  # doctest: +SKIP
        >>> model, sparsifier = from_pretrained("out/hub", num_classes=10, head="dense")  # doctest: +SKIP
        >>> model, sparsifier = from_pretrained("outputs/quickstart/checkpoints/step_00000938")  # doctest: +SKIP
    """
    source = locate(name_or_path, revision=revision, cache_dir=cache_dir)
    if source.repo_id is None and not (source.folder / CONFIG_FILENAME).is_file():
        _no_config(source.folder)
    config = read_timm_config(source)
    checkpoint = "sparsity" not in config and source.repo_id is None and any(
        (source.folder / name).is_file() for name in CHECKPOINT_FILES)
    model, sparsifier = load_checkpoint(source) if checkpoint else _load_export(source, config, sparsity_tolerance)
    if num_classes is not None and num_classes != model.num_classes:
        sparsifier.freeze()  # frozen already: re-zeroes the masked weights, nothing else
        sparsifier = replace_head(model, sparsifier, num_classes, head, seed)
    return model.train(checkpoint), sparsifier


def _load_export(source: ModelSource, config: Mapping[str, Any], tolerance: float) -> Tuple[nn.Module, Sparsifier]:
    """An export's model and its sparsifier frozen on the non-zeros, checked against the ``sparsity`` block."""
    sparsity = config.get("sparsity")
    if not isinstance(sparsity, dict) or not isinstance(sparsity.get("per_layer"), dict) or "config" not in sparsity:
        raise ModelError(f"{source.name(CONFIG_FILENAME)} has no st3_hf 'sparsity' block: not an st3_hf export (a "
                         "plain timm model? load it with timm.create_model('local-dir:...', pretrained=True) and "
                         "sparsify it with st3_hf.sparsify)")
    model = build_timm_model(source)
    try:
        check_sparsity(model.state_dict(), sparsity, tolerance, source=source.name(WEIGHTS_FILENAME))
        sparsity_config = SparsityConfig.from_dict(dict(sparsity["config"]))
    except ModelError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ModelError(f"malformed st3_hf 'sparsity' block in {source.name(CONFIG_FILENAME)} "
                         f"({describe_cause(e)}); {source.refetch}") from e
    sparsifier = sparsify(model, sparsity_config)
    sparsifier.freeze_from_zeros()
    if differ := sorted(set(sparsifier.layers) ^ set(sparsity["per_layer"]))[:5]:
        raise ModelError(f"the recorded sparsity config prunes {differ} differently from the per-layer list of "
                         f"{source.name(CONFIG_FILENAME)}: not an st3_hf export of this model")
    return model, sparsifier


def load_checkpoint(source: ModelSource, model: Optional[nn.Module] = None) -> Tuple[nn.Module, Sparsifier]:
    """A training checkpoint folder as saved: ``model`` (default: built from config.json) with model.safetensors,
    the sparsifier restored exactly (``sparsifier.{json,safetensors}``); accelerate's pickles are never opened."""
    folder = source.folder
    try:
        state = load_sparsifier_state(folder)
    except Exception as e:  # noqa: BLE001 - a missing file, corrupt JSON or safetensors: say which folder
        raise ModelError(f"missing or unreadable sparsifier state in {folder} ({describe_cause(e)}): pass "
                         "a checkpoints/step_* folder written by the trainer") from e
    if model is None:
        model = build_timm_model(source)
    else:  # the trainer's own model: the weights only
        load_strict(model, load_safetensors(folder / WEIGHTS_FILENAME, source), f"{folder / WEIGHTS_FILENAME} does "
                    f"not fit the model {type(model).__name__}", "the checkpoint's files are not of the same run")
    try:
        sparsifier = sparsify(model, SparsityConfig.from_dict(dict(state["config"])))
        sparsifier.load_state_dict(state)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"the sparsifier state in {folder} does not fit its model ({describe_cause(e)}): "
                         "the checkpoint's files are not of the same run") from e
    return model, sparsifier


def locate(name_or_path: PathLike, *, revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
           files: Sequence[str] = (CONFIG_FILENAME, WEIGHTS_FILENAME)) -> ModelSource:
    """The local folder ``name_or_path`` names: an existing path, else the snapshot of a Hub repo (``files``)."""
    text = str(name_or_path)
    if not text.startswith(HUB_PREFIX):
        path = Path(text.removeprefix(LOCAL_PREFIX)).expanduser()
        if path.is_file():
            raise ModelError(f"{path} is a file; pass the folder holding it (an exported folder)")
        if path.is_dir():
            return ModelSource(path)
    text = text.removeprefix(HUB_PREFIX)
    return ModelSource(download(text, revision, cache_dir, files), text, revision)


def _no_config(path: Path) -> None:
    """An existing folder without config.json, said as what it is (an incomplete export, or no model)."""
    found = sorted(p.name for p in path.iterdir())
    if export_files := [n for n in EXPORT_ONLY_FILES if n in found]:
        raise ModelError(f"{path} has no {CONFIG_FILENAME} but holds {export_files}: an incomplete st3_hf export "
                         "(interrupted while its files were replaced, or a partial copy); re-run the export")
    if SPARSIFIER_JSON in found or SPARSIFIER_TENSORS in found:
        raise ModelError(f"{path} is a training checkpoint without {CONFIG_FILENAME} (written by an older st3_hf): "
                         f"export it with `python scripts/export.py {path} --output-dir DIR` (which reads its "
                         f"{RECIPE_FILENAME}) and load DIR")
    raise ModelError(f"{path} is neither an st3_hf export (no {CONFIG_FILENAME}) nor a training checkpoint (no "
                     f"{SPARSIFIER_JSON}); it holds {found[:8]}: pass an exported folder, a checkpoints/step_* folder "
                     "or a Hub repo id")


def download(repo_id: str, revision: Optional[str], cache_dir: Optional[PathLike],
             files: Sequence[str] = (CONFIG_FILENAME, WEIGHTS_FILENAME)) -> Path:
    """The local snapshot of ``repo_id`` holding (at most) ``files``: its config.json and model.safetensors."""
    import huggingface_hub.constants as constants
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ModelError(f"{repo_id!r} is neither an existing folder nor a valid Hub repo id "
                         f"({describe_cause(e)}): pass an exported folder, a checkpoint folder or "
                         "ORG/NAME") from e
    what = f"Hub repo {repo_id!r} (revision {revision or 'main'})"
    try:  # only these files (safetensors and the config): nothing else of the repo (pickles, code) is ever fetched
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(files)))
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise ModelError(f"{what} is not in the local Hugging Face cache {cache_dir or constants.HF_HUB_CACHE} and "
                             f"HF_HUB_OFFLINE=1 forbids downloading it: download it once online (`hf download "
                             f"{repo_id}`), pass a local folder, or unset HF_HUB_OFFLINE") from e
        raise ModelError(f"could not reach the Hugging Face Hub for {what}, not in the local cache either "
                         f"({describe_cause(e)}): check the network, or pass a local folder") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # gated repos too
        raise ModelError(f"{what} does not exist on the Hub or is private/gated ({describe_cause(e)}): "
                         "check the id and revision, or log in (`hf auth login`) with access") from e
    except Exception as e:  # network, server: keep the cause
        raise ModelError(f"could not get {what} from the Hugging Face Hub ({describe_cause(e)}): check the "
                         "network and retry; offline (HF_HUB_OFFLINE=1) it must already be in the cache") from e


def read_timm_config(source: ModelSource) -> Dict[str, Any]:
    """``config.json`` of a timm Hub folder, checked to run no code and to name an architecture timm defines."""
    name = source.name(CONFIG_FILENAME)
    if not (source.folder / CONFIG_FILENAME).is_file():
        found = sorted(p.name for p in source.folder.iterdir())[:8]
        raise ModelError(f"{name} not found: not a model in timm's Hub format (config.json + "
                         f"model.safetensors); it holds {found}; {source.refetch}")
    try:
        config = json.loads((source.folder / CONFIG_FILENAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{name} is not valid JSON (corrupted file? {describe_cause(e)}); {source.refetch}") from e
    except RecursionError as e:  # json recurses once per nesting level
        raise ModelError(f"{name} nests its JSON too deeply to be a model config; {source.refetch}") from e
    if not isinstance(config, dict):
        raise ModelError(f"{name} is not a JSON object: not a timm model config; {source.refetch}")
    if asked := [key for key in REMOTE_CODE_KEYS if key in config]:
        raise ModelError(f"{name} asks for remote code ({asked}): st3_hf never runs code from a model folder "
                         "or repo; only timm architectures exported by st3_hf can be loaded")
    if "architecture" not in config and ("model_type" in config or "architectures" in config):
        raise ModelError(f"{name} has no 'architecture': it is a transformers config (model_type "
                         f"{config.get('model_type')!r}), not a timm/st3_hf model; st3_hf loads timm image "
                         "classifiers exported by st3_hf (scripts/export.py)")
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise ModelError(f"{name}: unknown architecture {architecture!r}: not a model of timm {timm.__version__} "
                         "(st3_hf builds only timm's own architectures, never a transformers or custom-code model; "
                         "a newer timm may know it)")
    if not isinstance(config.get("pretrained_cfg", {}), dict) or not isinstance(config.get("model_args") or {}, dict):
        raise ModelError(f"{name}: 'pretrained_cfg' or 'model_args' is not a JSON object; {source.refetch}")
    if problem := data_config_problem(config.get("pretrained_cfg", {})):
        raise ModelError(f"{name}: pretrained_cfg {problem}; {source.refetch}")
    return config


def data_config_problem(cfg: Mapping[str, Any]) -> str:
    """What is wrong with the preprocessing fields timm reads from ``pretrained_cfg`` ('' if nothing)."""
    def numbers(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v) for v in value)

    size, channels = cfg.get("input_size"), None
    if size is not None:
        if not (numbers(size) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
            return f"input_size {size!r} is not [channels, height, width] (three positive integers)"
        channels = size[0]
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is not None and not (numbers(value) and len(value) == (channels or len(value)) and value):
            return f"{key} {value!r} is not a list of {channels or 'per-channel'} finite numbers"
    classes = cfg.get("num_classes")
    if classes is not None and not (isinstance(classes, int) and not isinstance(classes, bool) and classes >= 0):
        return f"num_classes {classes!r} is not a non-negative integer"
    return ""


def load_safetensors(path: Path, source: ModelSource, shapes_only: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of ``path``, keys without wrapper prefixes, errors naming the file (and any pickle found instead);
    ``shapes_only``: meta tensors of the header's shapes, no data read."""
    if not path.is_file():
        raise ModelError(f"{source.name(path.name)} not found{pickle_hint(path.parent)}; {source.refetch}")
    try:
        if shapes_only:
            with safetensors.safe_open(str(path), framework="pt") as f:
                tensors = {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
        else:
            tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError for corrupt headers and truncated data
        raise ModelError(f"{source.name(path.name)} is not a readable safetensors file (corrupt or truncated): "
                         f"{describe_cause(e)}; {source.refetch}") from e
    return strip_prefixes(tensors)


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``_orig_mod.``, ``module.``, in any nesting) from the keys."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key[len(next(p for p in WRAPPER_PREFIXES if key.startswith(p))):]
        if key in out:
            raise ModelError(f"two checkpoint keys map to {key!r} after removing wrapper prefixes: the state dict "
                             "mixes two models")
        out[key] = value
    return out


def pickle_hint(folder: Path) -> str:
    """Names the pickled weight files of ``folder``, which are never opened: unpickling can run arbitrary code."""
    pickles = (sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
               if folder.is_dir() else [])
    return (f" (the folder holds {pickles[:5]}, which st3_hf never loads: pickle files can run arbitrary code; "
            "convert them to safetensors with code you trust)") if pickles else ""


def check_sparsity(state_dict: Mapping[str, torch.Tensor], sparsity_meta: Mapping[str, Any], tolerance: float = 0.0,
                   source: str = "") -> None:
    """:class:`~st3_hf.errors.ModelError` unless each recorded layer has the recorded fraction of zeros (half a weight
    on top of ``tolerance``: equal counts pass whatever rounding the JSON did)."""
    fix = f" ({source}): file corrupted or not an st3_hf export (re-export or re-download the model)"

    def fraction(value: Any, what: str) -> float:
        # NaN compares False with everything: unchecked, it would let any weights pass as recorded
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ModelError(f"metadata {what} is {value!r}, not a fraction in [0, 1]{fix}")
        return float(value)

    zeros_total = total = 0
    for name, info in sparsity_meta["per_layer"].items():
        weight = state_dict.get(f"{name}.weight" if name else "weight")
        if weight is None:
            raise ModelError(f"layer {name!r} recorded in the metadata has no weight in the checkpoint{fix}")
        zeros, numel = int((weight == 0).sum()), weight.numel()
        recorded = fraction(info["sparsity"], f"sparsity of layer {name!r}")
        if int(info.get("num_weights", numel)) != numel or abs(zeros / numel - recorded) > tolerance + 0.5 / numel:
            raise ModelError(f"checkpoint sparsity {zeros / numel:.6f} of layer {name!r} does not match metadata "
                             f"{recorded:.6f}{fix}; sparsity_tolerance=... accepts small drifts")
        zeros_total, total = zeros_total + zeros, total + numel
    recorded = fraction(sparsity_meta["achieved_sparsity"], "achieved_sparsity")
    fraction((sparsity_meta.get("config") or {}).get("target", 0.0), "target")
    if total == 0 or abs(zeros_total / total - recorded) > tolerance + 0.5 / total:
        raise ModelError(f"checkpoint sparsity {zeros_total / max(total, 1):.6f} does not match metadata "
                         f"{recorded:.6f}{fix}")


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    """``model.load_state_dict(strict=True)``, or a one-line :class:`ModelError` summing up how they differ (torch's
    is one line per key); a model on the meta device is only checked (names and shapes)."""
    expected = model.state_dict()
    problems = {
        "missing keys": [k for k in expected if k not in state_dict],
        "unexpected keys": [k for k in state_dict if k not in expected],
        "shape mismatches": [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
                             for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape],
    }
    summary = ", ".join(f"{len(items)} {label} (e.g. {items[:3]})" for label, items in problems.items() if items)
    if summary:
        raise ModelError(f"{what}: {summary}; {fix}")
    if not any(t.is_meta for t in expected.values()):
        model.load_state_dict(state_dict, strict=True)


def timm_create_args(source: ModelSource, extra_args: Optional[Mapping[str, Any]] = None
                     ) -> Tuple[Dict[str, Any], str, Dict[str, Any]]:
    """``(pretrained_cfg, architecture, create_model keywords)`` of the folder's ``config.json`` as timm parses it;
    keywords that would make timm read other files or fetch weights are refused."""
    pretrained_cfg, architecture, model_args = load_model_config_from_path(source.folder)
    if unsafe := sorted(set(model_args) & set(UNSAFE_MODEL_ARGS)):
        raise ModelError(f"{source.name(CONFIG_FILENAME)} passes {unsafe} to timm.create_model, which would "
                         "read other files or fetch weights: st3_hf refuses it")
    model_args = {"num_classes": pretrained_cfg.get("num_classes"), **model_args, **(extra_args or {})}
    if "in_chans" not in model_args and pretrained_cfg.get("input_size"):
        model_args["in_chans"] = int(pretrained_cfg["input_size"][0])
    return pretrained_cfg, architecture, model_args


def build_timm_model(source: ModelSource, num_classes: Optional[int] = None,
                     extra_args: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The timm model ``config.json`` describes, its ``model.safetensors`` loaded strictly, a new head when
    ``num_classes`` differs; its ``pretrained_cfg`` is the folder's own.  Built first on the meta device and checked
    against the weights' header: a config that does not fit them (``model_args`` asking for thousands of blocks) is
    refused before any memory is allocated."""
    pretrained_cfg, architecture, model_args = timm_create_args(source, extra_args)
    weights = source.folder / WEIGHTS_FILENAME
    what = f"{source.name(WEIGHTS_FILENAME)} does not fit {architecture} built with {model_args}"
    fix = f"config.json and model.safetensors are not of the same model: {source.refetch}"
    shapes = load_safetensors(weights, source, shapes_only=True)
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = timm.create_model(architecture, pretrained=False, **model_args)
        except (TypeError, ValueError, RuntimeError, KeyError) as e:  # an argument this architecture does not take
            raise ModelError(f"timm cannot build {architecture} with the model_args of "
                             f"{source.name(CONFIG_FILENAME)} ({describe_cause(e)}); {source.refetch}") from e
        load_strict(model, shapes if device == "meta" else load_safetensors(weights, source), what, fix)
    if num_classes is not None and int(num_classes) != int(model.num_classes):
        model.reset_classifier(int(num_classes))  # timm's fresh head, seeded by the caller's RNG
    for key in ("first_conv", "classifier"):  # structure, from the architecture when the config omits it
        pretrained_cfg.setdefault(key, model.pretrained_cfg.get(key))
    set_pretrained_cfg(model, {**pretrained_cfg, "architecture": architecture, "file": str(source.folder)})
    return model


def set_pretrained_cfg(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """``model.pretrained_cfg`` (and timm's alias ``default_cfg``) as timm keeps it: sizes as tuples, label
    names only for the head they describe."""
    cfg = {k: tuple(v) if isinstance(v, list) and k.endswith(("input_size", "pool_size")) else v
           for k, v in cfg.items()}
    if int(cfg.get("num_classes") or model.num_classes) != int(model.num_classes):
        cfg = {k: v for k, v in cfg.items() if k not in ("label_names", "label_descriptions")}
    cfg["num_classes"] = int(model.num_classes)
    model.pretrained_cfg = model.default_cfg = cfg


def classifier_names(model: nn.Module) -> List[str]:
    """Qualified module names of the model's classifier(s) (timm's ``pretrained_cfg['classifier']``)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(names, (str, list, tuple)) and names:
        return [names] if isinstance(names, str) else [str(n) for n in names]
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not (found := [name for name, module in model.named_modules() if module is classifier]):
        raise ModelError(f"cannot find the classifier of {type(model).__name__}: no pretrained_cfg['classifier'] "
                         "and no get_classifier(); a new num_classes needs a timm classification model")
    return found[:1]


@torch.no_grad()
def replace_head(model: nn.Module, sparsifier: Sparsifier, num_classes: int, head: str, seed: int) -> Sparsifier:
    """Reset the classifier to ``num_classes``; returns a frozen sparsifier over the new set of layers.
    ``head="dense"``: the new head is excluded from the masks; ``"pruned"``: frozen with a uniformly random mask
    (seeded by ``seed``) with as many zeros as the old head had (the model's sparsity if the old head was dense)."""
    if head not in HEADS:
        raise ConfigError(f"head must be one of {HEADS}, got {head!r}")
    heads = classifier_names(model)
    in_head = lambda name: any(name == h or name.startswith(h + ".") for h in heads)  # noqa: E731
    head_sparsity = [value for name, value in sparsifier.layer_sparsity().items() if in_head(name)]
    target = sum(head_sparsity) / len(head_sparsity) if head_sparsity else sparsifier.sparsity()
    model.reset_classifier(num_classes)
    layers = {name: layer for name, layer in sparsifier.layers.items() if not in_head(name)}
    config = sparsifier.config
    if head == "dense":
        config = dataclasses.replace(config, exclude=(*config.exclude, *(h for h in heads if h not in config.exclude)))
    else:
        generator = torch.Generator().manual_seed(seed)
        for name in heads:
            module = model.get_submodule(name)
            if not is_prunable(module):
                continue  # e.g. nn.Identity for num_classes=0
            layer = sparsify(module, dataclasses.replace(config, exclude=())).layers[""]
            layer.freeze()  # dense -> frozen with an all-ones mask
            numel = layer.latent_weight.numel()
            keep = torch.ones(numel, dtype=torch.bool)
            keep[torch.randperm(numel, generator=generator)[:int(round(target * numel))]] = False
            layer.mask.copy_(keep.view_as(layer.mask))
            layer.refresh()  # frozen: weight *= mask
            layers[name] = layer
    model._ddp_params_and_buffers_to_ignore = []  # the new sparsifier re-registers exactly its layers' buffers
    new = Sparsifier(model, config, layers)
    new.frozen, new.step_count, new.global_threshold = True, sparsifier.step_count, sparsifier.global_threshold
    new.ratio = new.sparsity()
    if hasattr(model, "pretrained_cfg"):
        set_pretrained_cfg(model, model.pretrained_cfg)
    return new
