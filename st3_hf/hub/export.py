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

The hub knows files and models, not training runs: what a run adds (its recipe, the card's
facts about its data and start) comes in as plain arguments (``st3_hf/train/run_export.py``).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from st3_hf.atomic import atomic_directory
from st3_hf.errors import OutputDirError, St3Error
from st3_hf.sparse.macs import count_macs
from st3_hf.sparse.sparsifier import Sparsifier
from st3_hf.hub.card import CARD_FACTS, build_model_card, find_accuracy, find_metric
from st3_hf.hub.compact import COMPACT_FILENAME, save_compact
from st3_hf.hub.errors import ExportError, ExportFileNotFoundError
from st3_hf.errors import describe_cause

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
EXPORT_ONLY_FILES = (COMPACT_FILENAME, README_FILENAME, PLOT_FILENAME)  # never in a training checkpoint

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
    data_pretrained_cfg: Optional[Mapping[str, Any]] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    metrics_file: Optional[PathLike] = None,
    label_names: Optional[Sequence[str]] = None,
    recipe_yaml: Optional[str] = None,
    recipe_name: Optional[str] = None,
    recipe_description: Optional[str] = None,
    license: str = "apache-2.0",
    dataset_split: Optional[str] = None,
    **card_facts: Any,
) -> Path:
    """Write ``model`` as a Hub folder in timm's format, with sparsity metadata and a model card.

    Freezes ``sparsifier`` first if it is not frozen (the exported weights are
    the frozen effective weights; ``-0.0`` left by masking is written as
    ``+0.0``, which no computation can tell apart).  The model object stays
    usable and now runs in frozen mode (in contiguous memory format).

    ``data_pretrained_cfg`` gives the training data's preprocessing
    (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
    ``crop_mode``, ``num_classes``; without it the model's current ``pretrained_cfg``, with a
    warning); ``label_names`` (class names in index order) go to ``config.json`` where plain timm
    reads them into ``model.pretrained_cfg["label_names"]``.  ``metrics`` holds measured top-1 /
    top-5 accuracy as fractions in [0, 1] (keys ``top1``/``top5``, also ``eval_top1`` etc.);
    without it the last record of ``metrics_file`` with a top-1 is used.  ``recipe_yaml`` is
    written as ``recipe.yaml`` and quoted in the card; ``card_facts`` are the other keywords of
    :func:`~st3_hf.hub.card.build_model_card` (``repo_id``, ``dataset_name``, ``base_model``,
    ``paper_expected``, ``training_data``, ``init_from``, ``start_checkpoint``).  Files of an
    earlier export in ``output_dir`` are replaced; other files there are left alone.  Written
    through :func:`st3_hf.atomic.atomic_directory`: a crash never leaves a half export readable.

        >>> import timm, torch
        >>> from st3_hf import sparsify
        >>> model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
        >>> sp = sparsify(model, method="st3", target=0.8, end_step=1); sp.apply(0.8)
        >>> folder = export_pretrained(model, sp, "out/hub", data_pretrained_cfg={
        ...     "input_size": (1, 32, 32), "mean": (0.286,), "std": (0.353,), "interpolation": "bilinear",
        ...     "crop_pct": 1.0, "crop_mode": "center", "num_classes": 5})  # doctest: +SKIP
    """
    from st3_hf import __version__

    model = unwrap_model(model)
    _check_sparsifier_owns(model, sparsifier)
    if not hasattr(model, "pretrained_cfg") or not hasattr(model, "reset_classifier"):
        raise TypeError("export_pretrained needs a timm model (with pretrained_cfg and reset_classifier)")
    unknown = sorted(set(card_facts) - set(CARD_FACTS))
    if unknown:
        raise TypeError(f"export_pretrained got unknown keywords {unknown}; card facts are {sorted(CARD_FACTS)}")
    if metrics_file is not None:
        metrics_file = _check_metrics_file(metrics_file)
        if metrics is None:
            metrics = read_metrics_file(metrics_file)
    top1, top5 = find_accuracy(metrics, "top1"), find_accuracy(metrics, "top5")  # checked before writing anything
    data_cfg = _resolve_data_config(model, data_pretrained_cfg)
    architecture = _architecture(model)
    names = _checked_label_names(label_names, model)
    destination = Path(output_dir)
    # the trainer's own metrics.jsonl next to the export stays where it is (it appends to it)
    own_metrics = metrics_file is not None and (destination / METRICS_FILENAME).exists() and (
        destination / METRICS_FILENAME).samefile(metrics_file)

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

    stale = [n for n in EXPORT_FILES if not (own_metrics and n == METRICS_FILENAME)]
    try:
        with atomic_directory(destination, last=CONFIG_FILENAME, stale=stale) as folder:
            sparsity = _sparsity_block(model, sparsifier, data_cfg, recipe_name, recipe_description, __version__)
            # fractions, as measured; null = not evaluated
            measured = {"top1": top1, "top5": top5, "dataset": card_facts.get("dataset_name"), "split": dataset_split}
            config = _write_timm_files(model, folder, data_cfg, license, architecture, names,
                                       {"sparsity": sparsity, "metrics": measured})
            _write_compact(folder, sparsifier, architecture, __version__)
            if recipe_yaml is not None:
                (folder / RECIPE_FILENAME).write_text(recipe_yaml, encoding="utf-8")
            if metrics_file is not None and not own_metrics:
                shutil.copyfile(metrics_file, folder / METRICS_FILENAME)
            plot_sparsity_per_layer(
                sparsifier.layer_sparsity(), folder / PLOT_FILENAME, title=f"{architecture} ({sparsifier.config.method})"
            )
            card = build_model_card(config, metrics={"top1": top1, "top5": top5}, license=license,
                                    dataset_split=dataset_split, recipe_yaml=recipe_yaml, plot_file=PLOT_FILENAME,
                                    **card_facts)
            card.save(str(folder / README_FILENAME))
    except OSError as e:  # no space, no permission, read-only or failing disk
        if isinstance(e, St3Error):
            raise
        raise OutputDirError(
            f"cannot write the export {destination} ({describe_cause(e)}); a previous export there is unchanged "
            "unless the error came while its files were being replaced: free disk space, fix the permissions "
            "or choose another output folder, then export again"
        ) from e
    return destination


def _write_timm_files(
    model: nn.Module, folder: Path, data_cfg: Mapping[str, Any], license: str, architecture: str,
    label_names: Optional[List[str]], extra: Mapping[str, Any],
) -> Dict[str, Any]:
    """timm's own ``config.json`` (``extra`` merged at the top level) + ``model.safetensors`` in ``folder``."""
    import safetensors.torch
    from timm.models._hub import save_config_for_hf

    timm_data_config = {k: data_cfg[k] for k in DATA_CFG_KEYS}
    safetensors.torch.save_file(portable_state_dict(model), str(folder / WEIGHTS_FILENAME))
    # label_names at the top level is where timm reads them back into model.pretrained_cfg
    model_config = dict(extra, **({"label_names": list(label_names)} if label_names else {}))
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
    (folder / CONFIG_FILENAME).write_text(json.dumps(config, indent=2))
    return config


def _sparsity_block(
    model: nn.Module, sparsifier: Sparsifier, data_cfg: Mapping[str, Any], recipe_name: Optional[str],
    recipe_description: Optional[str], version: str,
) -> Dict[str, Any]:
    """The ``"sparsity"`` block of ``config.json``: measured per-layer and global sparsity and MFLOPs."""
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
        "recipe": {"name": recipe_name, "description": recipe_description},
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


def _architecture(model: nn.Module) -> str:
    name = model.pretrained_cfg.get("architecture")
    if not name:
        raise ExportError(
            "cannot tell the timm architecture name of the model (no pretrained_cfg['architecture']): "
            "create it with timm.create_model"
        )
    return str(name)


def _resolve_data_config(model: nn.Module, given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if given is not None:
        data_cfg = dict(given)
        missing = [k for k in ("input_size", "mean", "std") if k not in data_cfg]
        if missing:
            raise ExportError(f"data_pretrained_cfg misses {missing}: give at least input_size, mean and std of the training data")
    else:
        import timm.data

        logger.warning("export_pretrained: no data_pretrained_cfg; recording the model's current pretrained_cfg")
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
