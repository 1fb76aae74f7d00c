"""Training runs and the Hub: export a run (its recipe -> the card's facts) and load training checkpoints.

The hub (:mod:`st3_hf.hub`) knows files and models; this module knows recipes and checkpoints and
hands the hub plain arguments.  :func:`from_pretrained` (``st3_hf.from_pretrained``) loads an export,
a Hub repo or a training checkpoint folder (accelerate ``save_state`` + ``sparsifier.json`` /
``sparsifier.safetensors`` + ``recipe.yaml``, as the trainer writes it).

    >>> import st3_hf
    >>> model, sparsifier = st3_hf.from_pretrained("outputs/quickstart/checkpoints/step_00000938")  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from st3_hf.sparse.config import SparsityConfig
from st3_hf.train.data.transforms import pretrained_cfg_for
from st3_hf.errors import ModelError, St3Error, describe_cause
from st3_hf.hub import export_pretrained
from st3_hf.hub import from_pretrained as load_export
from st3_hf.hub.dense_start import describe_spec
from st3_hf.hub.export import CONFIG_FILENAME, EXPORT_ONLY_FILES, RECIPE_FILENAME, WEIGHTS_FILENAME
from st3_hf.hub.pretrained import (ModelSource, load_safetensors, load_strict, pickle_hint, replace_head,
                                   set_pretrained_cfg)
from st3_hf.train.checkpointing import TRAINER_STATE, checkpoint_tree_holding
from st3_hf.train.init_source import HUB_PREFIX, is_hub_id
from st3_hf.train.modeling import create_model
from st3_hf.train.recipe import load_recipe, recipe_to_yaml
from st3_hf.sparse.sparsifier import Sparsifier, sparsify
from st3_hf.train.state_io import SPARSIFIER_JSON, SPARSIFIER_TENSORS, load_sparsifier_state

PathLike = Union[str, Path]
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def export_run(
    model: nn.Module,
    sparsifier: Sparsifier,
    output_dir: PathLike,
    recipe: Any,
    *,
    data_pretrained_cfg: Optional[Mapping[str, Any]] = None,
    base_model: Optional[str] = None,
    start_checkpoint: Optional[str] = None,
    repo_id: Optional[str] = None,
    dataset_name: Optional[str] = None,
    paper_expected: Optional[Mapping[str, Any]] = None,
    run: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> Path:
    """:func:`~st3_hf.hub.export_pretrained` of a run of ``recipe``: its preprocessing, recipe file and card facts.

    Defaults come from the recipe: ``data`` (preprocessing, what was trained on), ``hub`` (repo id,
    dataset, license, base model), ``expected`` (the paper's row, only in the paper's setting),
    ``model.pretrained`` / ``model.init_from`` (where the run started).  ``run``: what the trainer measured
    (``steps``, ``epochs``, ``planned_epochs``, ``images_seen``, ``train_images``) for the card.  Other keywords
    (``metrics``, ``metrics_file``, ``label_names``) go to the export as they are.
    """
    hub = recipe.hub
    if start_checkpoint is None and recipe.model.pretrained not in (False, None):
        start_checkpoint = describe_spec(recipe.model.pretrained, recipe.model.name)
    if paper_expected is None and is_paper_setting(recipe):
        expected = dataclasses.asdict(recipe.expected)
        paper_expected = expected if any(expected[k] is not None for k in ("top1", "sparsity", "mflops")) else None
    if data_pretrained_cfg is None:
        data_pretrained_cfg = {**pretrained_cfg_for(recipe.data), "num_classes": int(recipe.model.num_classes)}
    return export_pretrained(
        model, sparsifier, output_dir,
        data_pretrained_cfg=data_pretrained_cfg,
        recipe_yaml=recipe_to_yaml(recipe),
        recipe_name=Path(recipe.output_dir).name,
        recipe_description=recipe.description,
        license=hub.license or "apache-2.0",
        dataset_split=recipe.data.eval_split,
        repo_id=repo_id or hub.repo_id,
        dataset_name=dataset_name or hub.dataset_name or recipe.data.hf_name,
        base_model=base_model or hub.base_model or base_model_of(recipe) or _as_repo_id(start_checkpoint),
        start_checkpoint=start_checkpoint,
        init_from=recipe.model.init_from,
        training_data=_training_data_text(recipe, (run or {}).get("train_images")),
        paper_expected=paper_expected,
        run=run,
        **kwargs,
    )


def export_checkpoint(checkpoint_dir: PathLike, output_dir: PathLike, **kwargs: Any) -> Path:
    """Export a training checkpoint (``checkpoints/step_*``) as a Hub folder; keywords go to :func:`export_run`.

        >>> export_checkpoint("outputs/run/checkpoints/step_00000009", "outputs/run/hub")  # doctest: +SKIP
    """
    tree = checkpoint_tree_holding(Path(output_dir))
    if tree is not None:  # the export would replace the latent weights a resume reads back
        raise ModelError(f"output folder {output_dir} is inside the training checkpoints {tree}; export into "
                         f"another folder, e.g. the run folder or a new one")
    model, sparsifier, recipe = load_training_checkpoint(checkpoint_dir)
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a checkpoint saved by hand may have no state
        steps = json.loads((Path(checkpoint_dir) / TRAINER_STATE).read_text()).get("global_step")
        kwargs.setdefault("run", {"steps": steps} if isinstance(steps, int) else None)
    return export_run(model, sparsifier, output_dir, recipe, **kwargs)


def from_pretrained(
    name_or_path: PathLike, num_classes: Optional[int] = None, head: str = "dense", sparsity_tolerance: float = 0.0,
    **kwargs: Any,
) -> Tuple[nn.Module, Sparsifier]:
    """:func:`st3_hf.hub.from_pretrained`, and also a training checkpoint folder, which comes back as saved
    (sparsifier frozen or not, model in train mode, ready to resume); a new ``num_classes`` freezes it first.

        >>> import st3_hf
        >>> model, sparsifier = st3_hf.from_pretrained("ORG/NAME", num_classes=102)  # doctest: +SKIP
    """
    path = Path(str(name_or_path)).expanduser()
    if not (path.is_dir() and is_training_checkpoint(path)):
        return load_export(name_or_path, num_classes, head, sparsity_tolerance, **kwargs)
    model, sparsifier, _ = load_training_checkpoint(path)
    if num_classes is not None and num_classes != model.num_classes:
        if not sparsifier.frozen:
            sparsifier.freeze()
        sparsifier = replace_head(model, sparsifier, num_classes, head, kwargs.get("seed", 0))
    return model, sparsifier


def is_training_checkpoint(folder: Path) -> bool:
    """A checkpoint has the sparsifier state or the recipe, and none of the files only an export has."""
    if any((folder / name).is_file() for name in (CONFIG_FILENAME, *EXPORT_ONLY_FILES)):
        return False
    return any((folder / name).is_file() for name in (SPARSIFIER_JSON, SPARSIFIER_TENSORS, RECIPE_FILENAME))


def load_training_checkpoint(folder: PathLike) -> Tuple[nn.Module, Sparsifier, Any]:
    """``(model, sparsifier, recipe)`` restored from a trainer checkpoint folder, the sparsifier exactly as saved.

    Only ``model.safetensors``, ``sparsifier.json`` + ``sparsifier.safetensors`` and ``recipe.yaml`` are read:
    the optimizer / scheduler / RNG pickles accelerate writes next to them are never opened.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"training checkpoint folder {folder} does not exist: "
                         "pass a checkpoints/step_* folder of a run")
    if (folder / CONFIG_FILENAME).is_file() and not (folder / SPARSIFIER_JSON).is_file():
        raise ModelError(
            f"{folder} is an exported model folder ({CONFIG_FILENAME}), not a training checkpoint: it needs no "
            "export (load it with st3_hf.from_pretrained, push it with scripts/push_to_hub.py)"
        )
    recipe_path, weights_path = folder / RECIPE_FILENAME, folder / WEIGHTS_FILENAME
    if not recipe_path.is_file():
        raise ModelError(
            f"{recipe_path} not found: a training checkpoint needs the resolved recipe next to the weights "
            "(the trainer writes it into every checkpoints/step_* folder; copy the run's recipe.yaml there)"
        )
    if not weights_path.is_file():
        raise ModelError(f"{weights_path} not found{pickle_hint(folder)}; save the state with "
                         "accelerator.save_state(safe_serialization=True), as the trainer does")
    recipe = load_recipe(recipe_path)
    state_dict = strip_prefixes(load_safetensors(weights_path, ModelSource(folder)))
    try:
        sparsifier_state = load_sparsifier_state(folder)
    except FileNotFoundError as e:  # a sparsifier file is missing
        raise ModelError(f"{e}; pass a checkpoints/step_* folder written by the trainer") from e
    except Exception as e:  # noqa: BLE001 - corrupt JSON or safetensors: say which folder
        raise ModelError(f"the sparsifier state in {folder} ({SPARSIFIER_JSON}, {SPARSIFIER_TENSORS}) is "
                         f"unreadable ({describe_cause(e)}): use another checkpoints/step_* folder") from e
    try:
        model = create_model(recipe.model)
        sparsifier = sparsify(model, SparsityConfig.from_dict(dict(sparsifier_state["config"])))
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # unknown timm name, bad kwargs, bad config
        if isinstance(e, St3Error):
            raise
        raise ModelError(f"cannot build the model and sparsifier of {folder} ({describe_cause(e)}): "
                         "fix model.name / model.kwargs of its recipe.yaml") from e
    load_strict(model, state_dict, f"{weights_path} does not fit the recipe's model {recipe.model.name!r}",
                "the checkpoint's recipe.yaml is not the one it was trained with")
    try:
        sparsifier.load_state_dict(sparsifier_state)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"the sparsifier state in {folder} does not fit the recipe's model "
                         f"({describe_cause(e)}): the checkpoint's files are not of the same run") from e
    cfg = {**model.pretrained_cfg, **pretrained_cfg_for(recipe.data), "num_classes": int(recipe.model.num_classes)}
    set_pretrained_cfg(model, {**cfg, "architecture": recipe.model.name, "file": str(folder)})
    return model, sparsifier, recipe


def strip_prefixes(state_dict: Mapping[str, torch.Tensor],
                   prefixes: Sequence[str] = _PREFIXES) -> Dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``_orig_mod.``, ``module.``, in any nesting) from the keys."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        while key.startswith(tuple(prefixes)):
            key = key[len(next(p for p in prefixes if key.startswith(p))):]
        if key in out:
            raise ModelError(
                f"two checkpoint keys map to {key!r} after removing wrapper prefixes: the state dict mixes two models"
            )
        out[key] = value
    return out


# ---------------------------------------------------------------------------- card facts of a run
def is_paper_setting(recipe: Any) -> bool:
    """Whether ``recipe`` trains what the paper's table measured (ResNet-50, ImageNet-1k, 224x224): only
    then does the card show the paper's row (a ``resnet10t`` run of ``r50_st3_98.yaml`` is not that)."""
    dataset = recipe.hub.dataset_name or recipe.data.hf_name
    setting = (recipe.model.name, int(recipe.model.num_classes), list(recipe.data.input_size), dataset)
    return setting == ("resnet50", 1000, [3, 224, 224], "imagenet-1k")


def base_model_of(recipe: Any) -> Optional[str]:
    """The Hub id a fine-tune started from: ``model.init_from`` when it is a Hub repo id, or the repo id
    recorded in a local init folder's ``recipe.yaml`` (``hub.repo_id``); None for an unpublished folder."""
    init_from = recipe.model.init_from
    if not init_from:
        return None
    name = str(init_from)
    folder = Path(name).expanduser()
    if folder.is_dir():
        saved = folder / RECIPE_FILENAME
        if not saved.is_file():
            return None
        try:
            repo_id = load_recipe(saved).hub.repo_id
        except Exception:  # noqa: BLE001 - a foreign or damaged recipe names no base; the card says "local folder"
            return None
        return repo_id if repo_id and is_hub_id(repo_id) else None
    return _as_repo_id(name)


def _as_repo_id(name: Optional[str]) -> Optional[str]:
    """``name`` (``hf-hub:`` prefix removed) if it is a Hub repo id and not a local path, else None."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or not is_hub_id(name):
        return None
    return name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name


def _training_data_text(recipe: Any, train_images: Optional[int] = None) -> str:
    """What the model was trained on, from the recipe's data section and the size of the training set as loaded."""
    d = recipe.data
    where = {"fashion_mnist": f"Fashion-MNIST IDX files in `{d.root}`", "imagefolder": f"the image folder `{d.root}`",
             "hf": f"the `datasets` dataset `{d.hf_name or d.root}`"}.get(d.source, d.source)
    count = d.train_subset if train_images is None else train_images  # a subset larger than the split is the split
    first = "first " if d.train_subset and count == d.train_subset else ""
    subset = f", {first}{count} training images" if count else ""
    return (f"{where} (split `{d.train_split}`{subset}; evaluated on `{d.eval_split}`), "
            f"{recipe.model.num_classes} classes, {'x'.join(str(v) for v in d.input_size)} input")
