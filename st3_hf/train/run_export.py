"""Training runs and the Hub: export a run or a training checkpoint (its recipe -> the card's facts, as plain
arguments to :mod:`st3_hf.hub`), and the ``config.json`` the trainer writes into each checkpoint."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

import torch.nn as nn

from st3_hf.train.data.transforms import pretrained_cfg_for
from st3_hf.errors import ModelError, St3Error, describe_cause
from st3_hf.hub import export_pretrained
from st3_hf.hub.dense_start import describe_spec
from st3_hf.hub.export import CONFIG_FILENAME, RECIPE_FILENAME, WEIGHTS_FILENAME, write_timm_config
from st3_hf.hub.pretrained import HUB_PREFIX, ModelSource, load_checkpoint, pickle_hint
from st3_hf.hub.state_io import SPARSIFIER_JSON
from st3_hf.train.checkpointing import TRAINER_STATE, checkpoint_tree_holding
from st3_hf.train.init_source import is_hub_id
from st3_hf.train.modeling import create_model
from st3_hf.train.recipe import load_recipe, recipe_to_yaml
from st3_hf.sparse.sparsifier import Sparsifier

PathLike = Union[str, Path]


def export_run(model: nn.Module, sparsifier: Sparsifier, output_dir: PathLike, recipe: Any, *,
               data_pretrained_cfg: Optional[Mapping[str, Any]] = None, base_model: Optional[str] = None,
               start_checkpoint: Optional[str] = None, repo_id: Optional[str] = None, dataset_name: Optional[str] = None,
               run: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> Path:
    """:func:`~st3_hf.hub.export_pretrained` of a run of ``recipe``, the card's facts defaulting to the recipe's
    (``expected``: the paper's row, only in the paper's setting).  ``run``: what the trainer measured (``steps``,
    ``epochs``, ``planned_epochs``, ``images_seen``, ``train_images``); other keywords go to the export."""
    hub = recipe.hub
    if start_checkpoint is None and recipe.model.pretrained not in (False, None):
        start_checkpoint = describe_spec(recipe.model.pretrained, recipe.model.name)
    return export_pretrained(
        model, sparsifier, output_dir, recipe_yaml=recipe_to_yaml(recipe),
        data_pretrained_cfg=_data_cfg(recipe) if data_pretrained_cfg is None else data_pretrained_cfg,
        paper_expected=dataclasses.asdict(recipe.expected) if is_paper_setting(recipe) else None,  # None: no row
        recipe_name=Path(recipe.output_dir).name, recipe_description=recipe.description,
        license=_license(recipe), dataset_split=recipe.data.eval_split, repo_id=repo_id or hub.repo_id,
        dataset_name=dataset_name or hub.dataset_name or recipe.data.hf_name,
        base_model=base_model or hub.base_model or base_model_of(recipe) or _as_repo_id(start_checkpoint),
        start_checkpoint=start_checkpoint, init_from=recipe.model.init_from,
        training_data=_training_data_text(recipe, (run or {}).get("train_images")), run=run, **kwargs)


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


def save_checkpoint_config(model: nn.Module, recipe: Any, folder: PathLike) -> None:
    """The ``config.json`` of a training checkpoint: the timm model (architecture, ``model_args``, the recipe's
    dropout) and the run's preprocessing, from which :func:`st3_hf.from_pretrained` rebuilds it without the recipe."""
    write_timm_config(model, Path(folder), _data_cfg(recipe), _license(recipe),
                      model_args={"drop_rate": recipe.model.drop_rate})


def _data_cfg(recipe: Any) -> dict:
    """The run's preprocessing and head size, as timm's ``pretrained_cfg`` holds them (export and checkpoint)."""
    return {**pretrained_cfg_for(recipe.data), "num_classes": int(recipe.model.num_classes)}


def _license(recipe: Any) -> str:
    return recipe.hub.license or "apache-2.0"


def load_training_checkpoint(folder: PathLike) -> Tuple[nn.Module, Sparsifier, Any]:
    """``(model, sparsifier, recipe)`` of a trainer checkpoint folder, the sparsifier exactly as saved; one without
    ``config.json`` (older) gets its architecture from its ``recipe.yaml``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"training checkpoint folder {folder} does not exist: pass a checkpoints/step_* folder "
                         "of a run")
    if (folder / CONFIG_FILENAME).is_file() and not (folder / SPARSIFIER_JSON).is_file():
        raise ModelError(f"{folder} is an exported model folder ({CONFIG_FILENAME}), not a training checkpoint: it "
                         "needs no export (load it with st3_hf.from_pretrained, push it with scripts/push_to_hub.py)")
    recipe_path, weights_path = folder / RECIPE_FILENAME, folder / WEIGHTS_FILENAME
    if not recipe_path.is_file():
        raise ModelError(f"{recipe_path} not found: a training checkpoint needs the resolved recipe next to the "
                         "weights (the trainer writes it into every checkpoints/step_* folder; copy the run's "
                         "recipe.yaml there)")
    if not weights_path.is_file():
        raise ModelError(f"{weights_path} not found{pickle_hint(folder)}; save the state with "
                         "accelerator.save_state(safe_serialization=True), as the trainer does")
    recipe = load_recipe(recipe_path)
    try:  # no config.json: written before checkpoints held one, the recipe's model
        model = None if (folder / CONFIG_FILENAME).is_file() else create_model(recipe.model)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # unknown timm name, bad kwargs
        if isinstance(e, St3Error):
            raise
        raise ModelError(f"cannot build the model of {folder} ({describe_cause(e)}): "
                         "fix model.name / model.kwargs of its recipe.yaml") from e
    return (*load_checkpoint(ModelSource(folder), model), recipe)


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
    folder = Path(str(init_from)).expanduser() if init_from else None
    if folder is None or not folder.is_dir():
        return _as_repo_id(str(init_from)) if init_from else None
    try:
        repo_id = load_recipe(folder / RECIPE_FILENAME).hub.repo_id if (folder / RECIPE_FILENAME).is_file() else None
    except Exception:  # noqa: BLE001 - a foreign or damaged recipe names no base; the card says "local folder"
        return None
    return repo_id if repo_id and is_hub_id(repo_id) else None


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
