"""Export a sparse model as a Hub folder in timm's own format (plus a compact copy, a card and a plot).

The folder loads with plain timm (``timm.create_model("local-dir:PATH",
pretrained=True)`` or ``"hf-hub:ORG/NAME"``) as a dense model whose pruned
weights are exact zeros, and with :func:`st3_hf.from_pretrained` as a sparse
model with frozen masks.  Files:

* ``config.json``               – timm's config (architecture, model_args,
  pretrained_cfg with the training data's preprocessing) plus a ``"sparsity"``
  block (method, criterion, target, achieved and per-layer sparsity, dense and
  sparse MFLOPs, st3_hf version, recipe name/description) and ``"metrics"``;
* ``model.safetensors``         – the plain timm state dict (frozen effective
  weights; latent weights are never exported);
* ``model.sparse.safetensors``  – the same tensors, bitmask-compressed
  (:mod:`st3_hf.hub.compact`);
* ``README.md``                 – the model card (:mod:`st3_hf.hub.card`);
* ``sparsity_per_layer.png``    – per-layer sparsity bar chart;
* ``recipe.yaml``               – the resolved recipe (when given);
* ``metrics.jsonl``             – a copy of the training metrics file (when given).

The export is crash-safe: everything is written into a hidden sibling folder
and published only once complete (:mod:`st3_hf.hub.staging`), so the folder
holds either the previous export or the new one, never half of one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..sparsifier import Sparsifier
from .card import build_model_card, find_accuracy, find_metric
from .compact import COMPACT_FILENAME, save_compact
from .errors import ExportError, ExportFileNotFoundError, describe_cause
from .staging import Staging, staged

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
README_FILENAME = "README.md"
PLOT_FILENAME = "sparsity_per_layer.png"
RECIPE_FILENAME = "recipe.yaml"
METRICS_FILENAME = "metrics.jsonl"
REQUIRED_FILES = (CONFIG_FILENAME, WEIGHTS_FILENAME, COMPACT_FILENAME, README_FILENAME, PLOT_FILENAME)
OPTIONAL_FILES = (RECIPE_FILENAME, METRICS_FILENAME)
EXPORT_FILES = REQUIRED_FILES + OPTIONAL_FILES

DATA_CFG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
# pretrained_cfg keys describing the *source* checkpoint of the architecture (e.g. timm's
# ImageNet weights), which say nothing true about the exported weights
_SOURCE_KEYS = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "origin_url",
                "paper_ids", "paper_name", "notes", "license", "label_names", "label_descriptions")

PathLike = Union[str, Path]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def portable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors, half-precision floats as float32.

    safetensors refuses non-contiguous tensors (channels_last weights are) and a CUDA or bf16
    copy would not load into a plain CPU timm model the same way.

        >>> sd = portable_state_dict(torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last))
        >>> sd["weight"].is_contiguous()
        True
    """
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        out[name] = tensor.contiguous(memory_format=torch.contiguous_format)
    return out


def data_config_from_recipe(recipe: Any) -> Dict[str, Any]:
    """The evaluation preprocessing a recipe trained with, as timm pretrained_cfg keys (plus num_classes)."""
    from ..data.transforms import pretrained_cfg_for

    return {**pretrained_cfg_for(recipe.data), "num_classes": int(recipe.model.num_classes)}


def read_metrics_file(path: PathLike) -> Dict[str, Any]:
    """The last record of a JSON-lines metrics file that holds a top-1 accuracy ({} if none).

    Lines that are not JSON objects are skipped (a run killed mid-write leaves a partial last line).
    """
    path = _check_metrics_file(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ExportError(f"metrics file {path} is not UTF-8 text ({describe_cause(e)}): pass the run's metrics.jsonl") from e
    last: Dict[str, Any] = {}
    for line in lines:
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and find_metric(record, "top1") is not None:
            last = record
    return last


def _check_metrics_file(path: PathLike) -> Path:
    """``path`` as a Path, or an error naming it when it is not a readable file."""
    path = Path(path)
    if not path.is_file():
        raise ExportFileNotFoundError(
            f"metrics file {path} not found: pass the run's metrics.jsonl (--metrics-file) or the metrics themselves (--metrics)"
        )
    return path


def export_pretrained(
    model: nn.Module,
    sparsifier: Sparsifier,
    output_dir: PathLike,
    *,
    recipe: Any = None,
    data_pretrained_cfg: Optional[Mapping[str, Any]] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    metrics_file: Optional[PathLike] = None,
    base_model: Optional[str] = None,
    paper_expected: Optional[Mapping[str, Any]] = None,
    repo_id: Optional[str] = None,
    dataset_name: Optional[str] = None,
    license: Optional[str] = None,
    recipe_name: Optional[str] = None,
    label_names: Optional[Sequence[str]] = None,
    start_checkpoint: Optional[str] = None,
) -> Path:
    """Write ``model`` as a Hub folder in timm's format, with sparsity metadata and a model card.

    Freezes ``sparsifier`` first if it is not frozen (the exported weights are
    the frozen effective weights; ``-0.0`` left by masking is written as
    ``+0.0``, which no computation can tell apart).  The model object stays
    usable and now runs in frozen mode (in contiguous memory format).

    ``data_pretrained_cfg`` gives the training data's preprocessing
    (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
    ``crop_mode``, ``num_classes``); ``label_names`` (class names in index order) go to
    ``config.json`` where plain timm reads them into ``model.pretrained_cfg["label_names"]``; without it the recipe's data section is
    used, else the model's current ``pretrained_cfg`` (with a warning).
    ``metrics`` holds measured top-1 / top-5 accuracy as fractions in [0, 1]
    (the convention of :mod:`st3_hf.evaluation`; keys ``top1``/``top5``, also
    ``eval_top1`` etc.); without it the last record of ``metrics_file`` with a
    top-1 is used.  ``start_checkpoint`` names the dense checkpoint the
    run pruned (default: the recipe's ``model.pretrained``); the card says so,
    and a Hub id there is also the card's ``base_model``.  Other keywords default to the recipe's ``hub`` /
    ``expected`` sections (``base_model`` also to ``model.init_from`` when that
    is a Hub repo id).  Files of an earlier export in ``output_dir`` are
    replaced; other files there are left alone.  The folder is written
    crash-safely: ``output_dir`` holds the previous export, whole, until the
    new one is complete (:mod:`st3_hf.hub.staging`).

        >>> import timm, torch
        >>> from st3_hf import sparsify
        >>> model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
        >>> sp = sparsify(model, method="st3", target=0.8, end_step=1); sp.apply(0.8)
        >>> folder = export_pretrained(model, sp, "out/hub", data_pretrained_cfg={
        ...     "input_size": (1, 32, 32), "mean": (0.286,), "std": (0.353,), "interpolation": "bilinear",
        ...     "crop_pct": 1.0, "crop_mode": "center", "num_classes": 5})  # doctest: +SKIP
    """
    from .. import __version__

    model = unwrap_model(model)
    _check_sparsifier_owns(model, sparsifier)
    if not hasattr(model, "pretrained_cfg") or not hasattr(model, "reset_classifier"):
        raise TypeError("export_pretrained needs a timm model (with pretrained_cfg and reset_classifier)")
    hub = getattr(recipe, "hub", None)
    start_checkpoint = start_checkpoint or _start_checkpoint(recipe)
    base_model = base_model or (hub.base_model if hub else None) or base_model_of(recipe) or _as_repo_id(start_checkpoint)
    repo_id = repo_id or (hub.repo_id if hub else None)
    dataset_name = dataset_name or (hub.dataset_name if hub else None) or (recipe.data.hf_name if recipe else None)
    license = license or (hub.license if hub else None) or "apache-2.0"
    if paper_expected is None and recipe is not None and is_paper_setting(recipe):
        expected = dataclasses.asdict(recipe.expected)
        paper_expected = expected if any(expected[k] is not None for k in ("top1", "sparsity", "mflops")) else None
    if metrics_file is not None:
        metrics_file = _check_metrics_file(metrics_file)
        if metrics is None:
            metrics = read_metrics_file(metrics_file)
    top1, top5 = find_accuracy(metrics, "top1"), find_accuracy(metrics, "top5")  # checked before writing anything
    data_cfg = _resolve_data_config(model, recipe, data_pretrained_cfg)
    architecture = _architecture(model, recipe)

    # ---- freeze: exported weights = frozen effective weights
    if not sparsifier.frozen:
        sparsifier.freeze()
    else:
        sparsifier.refresh()  # re-zero what an unwrapped optimizer may have moved since the freeze
    with torch.no_grad():
        for layer in sparsifier.layers.values():
            layer.latent_weight.masked_fill_(layer.latent_weight == 0, 0.0)  # -0.0 -> +0.0: keeps the compact file small
    # safetensors stores contiguous tensors only: a channels_last model (model.channels_last) goes back
    model.to(memory_format=torch.contiguous_format)

    # everything goes to a staging folder published only when complete: a crash or an error
    # part-way leaves the previous export in output_dir whole (and files that are not the
    # export's, e.g. the trainer's checkpoints/ next to it, untouched)
    with staged(output_dir) as staging:
        folder = staging.folder
        config = _write_timm_files(model, folder, data_cfg, license, architecture, _checked_label_names(label_names, model))
        config["sparsity"] = _sparsity_block(model, sparsifier, data_cfg, recipe, recipe_name, __version__)
        # fractions, as measured; null = not evaluated
        config["metrics"] = {
            "top1": top1,
            "top5": top5,
            "dataset": dataset_name,
            "split": recipe.data.eval_split if recipe is not None else None,
        }
        (folder / CONFIG_FILENAME).write_text(json.dumps(config, indent=2))
        _write_compact(folder, sparsifier, architecture, __version__)

        # ---- recipe, metrics, plot, card
        recipe_yaml = None
        if recipe is not None:
            recipe_yaml = _recipe_yaml(recipe)
            (folder / RECIPE_FILENAME).write_text(recipe_yaml, encoding="utf-8")
        if metrics_file is not None and not _is_own_file(staging, metrics_file):
            shutil.copyfile(metrics_file, folder / METRICS_FILENAME)
        plot_sparsity_per_layer(
            sparsifier.layer_sparsity(), folder / PLOT_FILENAME, title=f"{architecture} ({sparsifier.config.method})"
        )
        card = build_model_card(
            config,
            training_data=_training_data_text(recipe),
            init_from=getattr(getattr(recipe, "model", None), "init_from", None),
            metrics={"top1": top1, "top5": top5},
            paper_expected=paper_expected,
            repo_id=repo_id,
            license=license,
            dataset_name=dataset_name,
            dataset_split=recipe.data.eval_split if recipe is not None else None,
            base_model=base_model,
            start_checkpoint=start_checkpoint,
            recipe_yaml=recipe_yaml,
            plot_file=PLOT_FILENAME,
        )
        card.save(str(folder / README_FILENAME))
    return Path(output_dir)


def _write_timm_files(
    model: nn.Module, folder: Path, data_cfg: Mapping[str, Any], license: str, architecture: str,
    label_names: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """timm's own ``config.json`` + ``model.safetensors`` in ``folder``; returns the config, cleaned up."""
    import safetensors.torch
    from timm.models._hub import save_config_for_hf

    timm_data_config = {k: data_cfg[k] for k in DATA_CFG_KEYS}
    safetensors.torch.save_file(portable_state_dict(model), str(folder / WEIGHTS_FILENAME))
    # label_names at the top level is where timm reads them back into model.pretrained_cfg
    model_config = {"label_names": list(label_names)} if label_names else None
    save_config_for_hf(model, str(folder / CONFIG_FILENAME), model_config=model_config, data_config=timm_data_config)
    config = json.loads((folder / CONFIG_FILENAME).read_text())
    pretrained_cfg = config.setdefault("pretrained_cfg", {})
    for key in _SOURCE_KEYS:
        pretrained_cfg.pop(key, None)
    pretrained_cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in timm_data_config.items()})
    pretrained_cfg["num_classes"] = int(model.num_classes)
    names = data_cfg.get("label_names")
    if names is not None and len(names) == int(model.num_classes):
        pretrained_cfg["label_names"] = [str(n) for n in names]
    pretrained_cfg["license"] = license
    config["architecture"] = architecture
    return config


def _sparsity_block(
    model: nn.Module, sparsifier: Sparsifier, data_cfg: Mapping[str, Any], recipe: Any, recipe_name: Optional[str], version: str
) -> Dict[str, Any]:
    """The ``"sparsity"`` block of ``config.json``: measured per-layer and global sparsity and MFLOPs."""
    from ..flops import count_macs

    macs = count_macs(model, input_size=tuple(data_cfg["input_size"]))
    macs_by_layer = {layer.name: layer for layer in macs.layers}
    per_layer: Dict[str, Dict[str, Any]] = {}
    for name, value in sparsifier.layer_sparsity().items():
        info: Dict[str, Any] = {"sparsity": value, "num_weights": int(sparsifier.layers[name].latent_weight.numel())}
        if name in macs_by_layer:
            info["dense_mflops"] = macs_by_layer[name].dense_macs / 1e6
            info["sparse_mflops"] = macs_by_layer[name].sparse_macs / 1e6
        per_layer[name] = info
    sp_config = sparsifier.config
    return {
        "format": "st3_hf",
        "st3_hf_version": version,
        "method": sp_config.method,
        "criterion": sp_config.criterion,
        "target": float(sp_config.target),
        "achieved_sparsity": sparsifier.sparsity(),  # zeros / prunable weights (the method's figure)
        "num_prunable_weights": int(sparsifier.num_prunable()),
        "achieved_sparsity_all_params": sparsifier.sparsity_of_all_parameters(),  # zeros / every parameter
        "num_parameters": int(sparsifier.num_parameters()),
        "unread_layers": dict(sparsifier.unread_layers or {}),
        "dense_mflops": macs.dense_mflops,
        "sparse_mflops": macs.sparse_mflops,
        "flops_input_size": list(data_cfg["input_size"]),
        "config": sp_config.to_dict(),
        "per_layer": per_layer,
        "recipe": {
            "name": recipe_name or (Path(recipe.output_dir).name if recipe is not None else None),
            "description": recipe.description if recipe is not None else None,
        },
        "compact_file": COMPACT_FILENAME,
    }


def _write_compact(folder: Path, sparsifier: Sparsifier, architecture: str, version: str) -> None:
    """The compact copy, written from the very tensors of ``model.safetensors`` (not from the live model)."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_FILENAME))
    sparse_names = [f"{name}.weight" if name else "weight" for name in sparsifier.layers]
    save_compact(
        tensors,
        folder / COMPACT_FILENAME,
        {"architecture": architecture, "st3_hf_version": version},
        sparse_names=sparse_names,
    )


def _is_own_file(staging: Staging, metrics_file: Path) -> bool:
    """Whether ``metrics_file`` is the destination's own metrics.jsonl, left in place by an in-place publish.

    (The trainer's run folder: replacing the file it appends to by a copy would gain nothing.)
    """
    destination = staging.destination / METRICS_FILENAME
    return staging.in_place and destination.exists() and destination.samefile(metrics_file)


def export_checkpoint(
    checkpoint_dir: PathLike,
    output_dir: PathLike,
    **kwargs: Any,
) -> Path:
    """Export a training checkpoint (accelerate ``save_state`` folder with ``recipe.yaml``) as a Hub folder.

    Keyword arguments go to :func:`export_pretrained`.

        >>> export_checkpoint("outputs/run/checkpoints/checkpoint_9", "outputs/run/hub")  # doctest: +SKIP
    """
    from .pretrained import load_training_checkpoint

    model, sparsifier, recipe = load_training_checkpoint(checkpoint_dir)
    return export_pretrained(model, sparsifier, output_dir, recipe=recipe, **kwargs)


def plot_sparsity_per_layer(layer_sparsity: Mapping[str, float], path: PathLike, title: str = "") -> Path:
    """Horizontal bar chart of per-layer sparsity (%), written with the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(layer_sparsity)
    values = [100.0 * layer_sparsity[n] for n in names]
    fig = Figure(figsize=(7.0, max(2.5, 0.22 * len(names) + 1.2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(len(names)))
    ax.barh(positions, values, color="#3b75af")
    ax.set_yticks(positions)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()  # first layer on top
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (%)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    return Path(path)


# ---------------------------------------------------------------------------- helpers
def _check_sparsifier_owns(model: nn.Module, sparsifier: Sparsifier) -> None:
    module_ids = {id(m) for m in model.modules()}
    foreign = [name for name, layer in sparsifier.layers.items() if id(layer) not in module_ids]
    if foreign:
        raise ExportError(
            f"the sparsifier's layers {foreign[:3]} are not part of the model being exported: "
            "pass the sparsifier that sparsify() returned for this very model"
        )


def _checked_label_names(label_names: Optional[Sequence[str]], model: nn.Module) -> Optional[List[str]]:
    """``label_names`` as a list of strings, one per model output (else an :class:`ExportError`)."""
    if not label_names:
        return None
    names = [str(n) for n in label_names]
    if len(names) != int(model.num_classes):
        raise ExportError(f"{len(names)} label names for a model with {model.num_classes} outputs: "
                          f"pass one class name per output, in index order")
    return names


def _start_checkpoint(recipe: Any) -> Optional[str]:
    """The dense checkpoint a recipe's ``model.pretrained`` names (None when it starts from scratch)."""
    model_cfg = getattr(recipe, "model", None)
    spec = getattr(model_cfg, "pretrained", False)
    if spec is False or spec is None:
        return None
    from .dense_start import describe_spec

    return describe_spec(spec, model_cfg.name)


def _as_repo_id(name: Optional[str]) -> Optional[str]:
    """``name`` if it is a Hub repo id and not a local path, else None."""
    if not name or Path(name).expanduser().exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


# the setting of the paper's ResNet-50 table: its figures describe a run only in that setting
PAPER_SETTING = {"model": "resnet50", "num_classes": 1000, "input_size": [3, 224, 224], "dataset": "imagenet-1k"}


def is_paper_setting(recipe: Any) -> bool:
    """Whether ``recipe`` trains what the paper's table measured (ResNet-50, ImageNet-1k, 224x224): only
    then does the card show the paper's row (a ``resnet10t`` run of ``r50_st3_98.yaml`` is not that)."""
    dataset = recipe.hub.dataset_name or recipe.data.hf_name
    return (recipe.model.name == PAPER_SETTING["model"] and int(recipe.model.num_classes) == PAPER_SETTING["num_classes"]
            and list(recipe.data.input_size) == PAPER_SETTING["input_size"] and dataset == PAPER_SETTING["dataset"])


def base_model_of(recipe: Any) -> Optional[str]:
    """The Hub id a fine-tune started from: ``model.init_from`` when it is a Hub repo id, or the repo id
    recorded in a local init folder's ``recipe.yaml`` (``hub.repo_id``); None for an unpublished folder."""
    from ..init_source import HUB_PREFIX, is_hub_id

    init_from = getattr(getattr(recipe, "model", None), "init_from", None)
    if not init_from:
        return None
    name = str(init_from)
    folder = Path(name).expanduser()
    if folder.is_dir():
        saved = folder / RECIPE_FILENAME
        if not saved.is_file():
            return None
        try:
            from ..recipe import load_recipe

            repo_id = load_recipe(saved).hub.repo_id
        except Exception:  # noqa: BLE001 - a foreign or damaged recipe names no base; the card says "local folder"
            return None
        return repo_id if repo_id and is_hub_id(repo_id) else None
    name = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name
    return name if is_hub_id(name) else None


def _training_data_text(recipe: Any) -> Optional[str]:
    """What the model was trained on, from the recipe's data section (the card says it as is)."""
    if recipe is None:
        return None
    d = recipe.data
    where = {"fashion_mnist": f"Fashion-MNIST IDX files in `{d.root}`", "imagefolder": f"the image folder `{d.root}`",
             "hf": f"the `datasets` dataset `{d.hf_name or d.root}`"}.get(d.source, d.source)
    subset = f", first {d.train_subset} training images" if d.train_subset else ""
    return (f"{where} (split `{d.train_split}`{subset}; evaluated on `{d.eval_split}`), "
            f"{recipe.model.num_classes} classes, {'x'.join(str(v) for v in d.input_size)} input")


def _architecture(model: nn.Module, recipe: Any) -> str:
    name = model.pretrained_cfg.get("architecture") if hasattr(model, "pretrained_cfg") else None
    if not name and recipe is not None:
        name = recipe.model.name
    if not name:
        raise ExportError(
            "cannot tell the timm architecture name of the model (no pretrained_cfg['architecture']): "
            "create it with timm.create_model or pass the recipe"
        )
    return str(name)


def _resolve_data_config(model: nn.Module, recipe: Any, given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if given is not None:
        data_cfg = dict(given)
        missing = [k for k in ("input_size", "mean", "std") if k not in data_cfg]
        if missing:
            raise ExportError(f"data_pretrained_cfg misses {missing}: give at least input_size, mean and std of the training data")
    elif recipe is not None:
        data_cfg = data_config_from_recipe(recipe)
    else:
        import timm.data

        logger.warning("export_pretrained: no data_pretrained_cfg and no recipe; recording the model's current pretrained_cfg")
        data_cfg = dict(timm.data.resolve_data_config({}, model=model))
    data_cfg.setdefault("interpolation", "bilinear")
    data_cfg.setdefault("crop_pct", 1.0)
    data_cfg.setdefault("crop_mode", "center")
    data_cfg["input_size"] = tuple(int(s) for s in data_cfg["input_size"])
    data_cfg["mean"] = tuple(float(m) for m in data_cfg["mean"])
    data_cfg["std"] = tuple(float(s) for s in data_cfg["std"])
    channels = data_cfg["input_size"][0]
    if len(data_cfg["mean"]) != channels or len(data_cfg["std"]) != channels:
        raise ExportError(
            f"data config: mean/std must have {channels} entries for input_size {data_cfg['input_size']} (one per channel)"
        )
    first = _first_conv_in_channels(model)
    if first is not None and first != channels:
        raise ExportError(
            f"data input_size has {channels} channels but the model's first conv takes {first}: "
            "pass the preprocessing the model was trained with"
        )
    num_classes = data_cfg.get("num_classes")
    if num_classes is not None and int(num_classes) != int(model.num_classes):
        raise ExportError(
            f"data num_classes {num_classes} != model.num_classes {model.num_classes}: "
            "pass the data config of the model's own training data"
        )
    return data_cfg


def _first_conv_in_channels(model: nn.Module) -> Optional[int]:
    name = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if isinstance(name, str):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def _recipe_yaml(recipe: Any) -> str:
    """The resolved recipe as YAML, in the project's canonical form (``st3_hf.recipe.load_recipe`` reads it back)."""
    from ..recipe import recipe_to_yaml

    return recipe_to_yaml(recipe)


def exported_files(folder: PathLike) -> List[str]:
    """The export files present in ``folder`` (required ones first)."""
    folder = Path(folder)
    return [name for name in EXPORT_FILES if (folder / name).is_file()]
