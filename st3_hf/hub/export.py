"""Export a sparse model as a Hub folder in timm's own format, plus a compact copy, a model card and a plot.

Plain timm loads it (``timm.create_model("local-dir:PATH", pretrained=True)``) as a dense model with exact zeros,
:func:`st3_hf.from_pretrained` as a sparse model with frozen masks; docs/run_outputs.md lists its files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import safetensors.torch
import torch
import torch.nn as nn
from timm.models._hub import save_config_for_hf

from st3_hf.atomic import atomic_directory
from st3_hf.errors import ModelError, RunError, describe_cause
from st3_hf.hub.card import CARD_FACTS, build_model_card, find_accuracy, find_metric
from st3_hf.hub.compact import COMPACT_FILENAME, save_compact
from st3_hf.sparse.macs import count_macs
from st3_hf.sparse.sparsifier import Sparsifier

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
RECIPE_FILENAME = "recipe.yaml"
METRICS_FILENAME = "metrics.jsonl"
PLOT_FILENAME = "sparsity_per_layer.png"
EXPORT_ONLY_FILES = (COMPACT_FILENAME, "README.md", PLOT_FILENAME)  # never in a training checkpoint
REQUIRED_FILES = (CONFIG_FILENAME, WEIGHTS_FILENAME, *EXPORT_ONLY_FILES)
EXPORT_FILES = REQUIRED_FILES + (RECIPE_FILENAME, METRICS_FILENAME)
DATA_CFG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
# pretrained_cfg keys of the architecture's *source* checkpoint that timm keeps: nothing true of these weights
_SOURCE_KEYS = ("tag", "origin_url", "paper_ids", "paper_name", "notes", "license", "label_names", "label_descriptions")

PathLike = Union[str, Path]


def read_metrics_file(path: PathLike) -> Dict[str, Any]:
    """The last record with a top-1 of a JSON-lines file ({} if none); a run killed mid-write leaves a partial line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ModelError(f"metrics file {path} is not UTF-8 text ({describe_cause(e)}): "
                         "pass the run's metrics.jsonl") from e
    for line in reversed(lines):
        with contextlib.suppress(json.JSONDecodeError):
            if isinstance(record := json.loads(line), dict) and find_metric(record, "top1") is not None:
                return record
    return {}


def export_pretrained(model: nn.Module, sparsifier: Sparsifier, output_dir: PathLike, *,
                      data_pretrained_cfg: Optional[Mapping[str, Any]] = None,
                      metrics: Optional[Mapping[str, Any]] = None, metrics_file: Optional[PathLike] = None,
                      label_names: Optional[Sequence[str]] = None, recipe_yaml: Optional[str] = None,
                      recipe_name: Optional[str] = None, recipe_description: Optional[str] = None,
                      license: str = "apache-2.0", dataset_split: Optional[str] = None, **card_facts: Any) -> Path:
    """Write ``model`` as a Hub folder in timm's format, with sparsity metadata and a model card.

    Freezes ``sparsifier`` first (``-0.0`` written as ``+0.0``); the model stays usable, frozen and contiguous.
    ``data_pretrained_cfg``: the training data's preprocessing (else the model's ``pretrained_cfg``, with a warning).
    ``metrics``: top-1 / top-5 as fractions (else ``metrics_file``'s last record with a top-1).  ``card_facts``:
    keywords of :func:`~st3_hf.hub.card.build_model_card`.  An earlier export's files are replaced atomically.

        >>> folder = export_pretrained(model, sp, "out/hub", data_pretrained_cfg={
        ...     "input_size": (1, 32, 32), "mean": (0.286,), "std": (0.353,), "num_classes": 5})  # doctest: +SKIP
    """
    from st3_hf import __version__

    if foreign := [name for name, layer in sparsifier.layers.items() if not any(layer is m for m in model.modules())]:
        raise ModelError(f"the sparsifier's layers {foreign[:3]} are not part of the model being exported: "
                         "pass the sparsifier that sparsify() returned for this very model")
    if not hasattr(model, "pretrained_cfg") or not model.pretrained_cfg.get("architecture"):
        raise ModelError("cannot tell the timm architecture of the model (no pretrained_cfg['architecture']): "
                         "pass the bare timm.create_model model, not a DDP or torch.compile wrapper")
    if unknown := sorted(set(card_facts) - set(CARD_FACTS)):
        raise TypeError(f"export_pretrained got unknown keywords {unknown}; card facts are {sorted(CARD_FACTS)}")
    if metrics_file is not None:
        metrics_file = Path(metrics_file)
        if not metrics_file.is_file():
            raise ModelError(f"metrics file {metrics_file} not found: pass the run's metrics.jsonl "
                             "(--metrics-file) or the metrics themselves (--metrics)")
        metrics = read_metrics_file(metrics_file) if metrics is None else metrics
    examples = find_metric(metrics, "eval_examples")  # the accuracy's sample: a subset is said as such
    measured = {"top1": find_accuracy(metrics, "top1"), "top5": find_accuracy(metrics, "top5"),  # checked first
                "eval_examples": None if examples is None else int(examples)}
    data_cfg = _resolve_data_config(model, data_pretrained_cfg)
    architecture = str(model.pretrained_cfg["architecture"])
    names = [str(n) for n in label_names or ()]
    if names and len(names) != int(model.num_classes):
        raise ModelError(f"{len(names)} label names for a model with {model.num_classes} outputs: "
                         "pass one class name per output, in index order")
    destination = Path(output_dir)
    # the trainer's own metrics.jsonl next to the export stays where it is (it appends to it)
    own_metrics = (metrics_file is not None and (destination / METRICS_FILENAME).exists()
                   and (destination / METRICS_FILENAME).samefile(metrics_file))

    # refresh: re-zero what an unwrapped optimizer may have moved since the freeze
    sparsifier.refresh() if sparsifier.frozen else sparsifier.freeze()
    with torch.no_grad():
        for layer in sparsifier.layers.values():  # -0.0 -> +0.0: keeps the compact file small
            layer.latent_weight.masked_fill_(layer.latent_weight == 0, 0.0)
    model.to(memory_format=torch.contiguous_format)

    stale = [n for n in EXPORT_FILES if not (own_metrics and n == METRICS_FILENAME)]
    try:
        with atomic_directory(destination, last=CONFIG_FILENAME, stale=stale) as folder:
            extra = {"sparsity": _sparsity_block(model, sparsifier, data_cfg, __version__,
                                                 {"name": recipe_name, "description": recipe_description}),
                     "metrics": {**measured, "dataset": card_facts.get("dataset_name"), "split": dataset_split}}
            # contiguous CPU tensors, half-precision floats as float32 (what plain timm loads alike)
            safetensors.torch.save_file({k: (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t)
                                         .detach().cpu().contiguous() for k, t in model.state_dict().items()},
                                        str(folder / WEIGHTS_FILENAME))
            config = write_timm_config(model, folder, data_cfg, license, names, extra)
            # the compact copy, from the very tensors of model.safetensors (not from the live model)
            save_compact(safetensors.torch.load_file(str(folder / WEIGHTS_FILENAME)), folder / COMPACT_FILENAME,
                         {"architecture": architecture, "st3_hf_version": __version__},
                         sparse_names=[f"{name}.weight" if name else "weight" for name in sparsifier.layers])
            if recipe_yaml is not None:
                (folder / RECIPE_FILENAME).write_text(recipe_yaml, encoding="utf-8")
            if metrics_file is not None and not own_metrics:
                shutil.copyfile(metrics_file, folder / METRICS_FILENAME)
            plot_sparsity_per_layer(sparsifier.layer_sparsity(), folder / PLOT_FILENAME,
                                    title=f"{architecture} ({sparsifier.config.method})")
            build_model_card(config, metrics=measured, license=license, dataset_split=dataset_split,
                             recipe_yaml=recipe_yaml, **card_facts).save(str(folder / "README.md"))
    except OSError as e:  # no space, no permission, read-only or failing disk
        raise RunError(f"cannot write the export {destination} ({describe_cause(e)}); a previous export there is "
                       "unchanged unless the error came while its files were being replaced: free disk space, fix "
                       "the permissions or choose another output folder, then export again") from e
    return destination


def write_timm_config(model: nn.Module, folder: Path, data_cfg: Mapping[str, Any], license: str = "apache-2.0",
                      label_names: Sequence[str] = (), extra: Optional[Mapping[str, Any]] = None,
                      model_args: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """timm's own ``config.json`` of ``model`` in ``folder``, ``extra`` merged at the top level, data_cfg checked."""
    data_cfg = _resolve_data_config(model, data_cfg)
    timm_data_config = {k: data_cfg[k] for k in DATA_CFG_KEYS}
    # label_names at the top level is where timm reads them back into model.pretrained_cfg
    model_config = dict(extra or {}, **({"label_names": list(label_names)} if label_names else {}))
    save_config_for_hf(model, str(folder / CONFIG_FILENAME), model_config=model_config, data_config=timm_data_config,
                       model_args=dict(model_args or {}))
    config = json.loads((folder / CONFIG_FILENAME).read_text())
    cfg = config["pretrained_cfg"] = {k: v for k, v in config["pretrained_cfg"].items() if k not in _SOURCE_KEYS}
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in timm_data_config.items()},
               num_classes=int(model.num_classes), license=license)
    if (names := data_cfg.get("label_names")) is not None and len(names) == int(model.num_classes):
        cfg["label_names"] = [str(n) for n in names]
    config["architecture"] = model.pretrained_cfg["architecture"]
    (folder / CONFIG_FILENAME).write_text(json.dumps(config, indent=2))
    return config


def _sparsity_block(model: nn.Module, sparsifier: Sparsifier, data_cfg: Mapping[str, Any], version: str,
                    recipe: Mapping[str, Optional[str]]) -> Dict[str, Any]:
    """The ``"sparsity"`` block of ``config.json``: measured per-layer and global sparsity and MFLOPs."""
    macs = count_macs(model, input_size=tuple(data_cfg["input_size"]))
    by_layer = {layer.name: layer for layer in macs.layers}
    per_layer = {name: {"sparsity": value, "num_weights": int(sparsifier.layers[name].latent_weight.numel()),
                        **({"dense_mflops": by_layer[name].dense_macs / 1e6,
                            "sparse_mflops": by_layer[name].sparse_macs / 1e6} if name in by_layer else {})}
                 for name, value in sparsifier.layer_sparsity().items()}
    config = sparsifier.config
    return {"format": "st3_hf", "st3_hf_version": version, "method": config.method, "criterion": config.criterion,
            "target": float(config.target),
            "achieved_sparsity": sparsifier.sparsity(),  # zeros / prunable weights (the method's figure)
            "num_prunable_weights": int(sparsifier.num_prunable()),
            "achieved_sparsity_all_params": sparsifier.sparsity_of_all_parameters(),  # zeros / every parameter
            "num_parameters": int(sparsifier.num_parameters()), "unread_layers": dict(sparsifier.unread_layers or {}),
            "dense_mflops": macs.dense_mflops, "sparse_mflops": macs.sparse_mflops,
            "flops_input_size": list(data_cfg["input_size"]), "config": config.to_dict(), "per_layer": per_layer,
            "recipe": dict(recipe), "compact_file": COMPACT_FILENAME}


def plot_sparsity_per_layer(layer_sparsity: Mapping[str, float], path: PathLike, title: str = "") -> Path:
    """Horizontal bar chart of per-layer sparsity (%): a bare Figure (no display, no pyplot state)."""
    from matplotlib.figure import Figure

    names = list(layer_sparsity)
    fig = Figure(figsize=(7.0, max(2.5, 0.22 * len(names) + 1.2)))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(names)), [100.0 * layer_sparsity[n] for n in names], color="#3b75af")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()  # first layer on top
    ax.set(xlim=(0, 100), xlabel="sparsity (%)", title=title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    return Path(path)


def _resolve_data_config(model: nn.Module, given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The preprocessing to record, checked against the model (channels, number of classes)."""
    if given is None:
        from timm.data import resolve_data_config

        logger.warning("export_pretrained: no data_pretrained_cfg; recording the model's current pretrained_cfg")
        given = resolve_data_config({}, model=model)
    if missing := [k for k in ("input_size", "mean", "std") if k not in given]:
        raise ModelError(f"data_pretrained_cfg misses {missing}: give at least input_size, mean and std "
                         "of the training data")
    data_cfg = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", **given,
                "input_size": tuple(int(s) for s in given["input_size"]),
                "mean": tuple(float(m) for m in given["mean"]), "std": tuple(float(s) for s in given["std"])}
    channels = data_cfg["input_size"][0]
    if len(data_cfg["mean"]) != channels or len(data_cfg["std"]) != channels:
        raise ModelError(f"data config: mean/std must have {channels} entries for input_size {data_cfg['input_size']}")
    stem = dict(model.named_modules()).get(str(model.pretrained_cfg.get("first_conv")))
    convs = [stem] if isinstance(stem, nn.Conv2d) else [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[0].in_channels != channels:
        raise ModelError(f"data input_size has {channels} channels but the model's first conv takes "
                         f"{convs[0].in_channels}: pass the preprocessing the model was trained with")
    if (num_classes := data_cfg.get("num_classes")) is not None and int(num_classes) != int(model.num_classes):
        raise ModelError(f"data num_classes {num_classes} != model.num_classes {model.num_classes}: "
                         "pass the data config of the model's own training data")
    return data_cfg
