"""Typed sections of a recipe and the rules on their values; :mod:`st3_hf.train.recipe` reads the YAML with
these dataclasses as the OmegaConf schema. A field with a few valid values is typed ``Literal[...]``
(:data:`CHOICES`), a number with a range declares it with ``ranged(default, rule)``; :func:`problems` checks
both, and the rules that tie fields together, in one place."""
from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Literal, Optional, Tuple, Union

from st3_hf.errors import ConfigError
from st3_hf.sparse.config import Method, SparsityConfig

# the rules `ranged(default, rule)` may name; the message is "must be <rule>" ("must be in <interval>")
RANGES: Dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, "[0, 1)": lambda v: 0 <= v < 1,
    "[0, 1]": lambda v: 0 <= v <= 1, "(0, 1]": lambda v: 0 < v <= 1, "[0, 2**32)": lambda v: 0 <= v < 2**32}


def ranged(default: Any, rule: str) -> Any:
    """A dataclass field whose value, when not null, must satisfy ``RANGES[rule]``."""
    return field(default=default, metadata={"range": rule})


@dataclass
class ModelConfig:
    name: str = "resnet50"  # any timm model name
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = ranged(0.0, "[0, 1)")
    bn_momentum: Optional[float] = None  # PyTorch convention (reference ImageNet: 0.01)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    channels_last: bool = False
    compile: bool = False
    init_from: Optional[str] = None  # Hub repo id / folder / checkpoint for fine-tuning (st3_hf.from_pretrained)
    head: Literal["dense", "pruned"] = "dense"  # a new head (num_classes differs from the start's)
    # dense weights pruned by the schedule: true (timm's for model.name), a Hub id or a ("local-dir:") folder
    pretrained: Union[bool, str] = False


@dataclass
class DataConfig:
    source: Literal["imagefolder", "hf", "fashion_mnist"] = "imagefolder"
    root: Optional[str] = None  # folder with train/ val/ (imagefolder), IDX folder (fashion_mnist), dataset path (hf)
    hf_name: Optional[str] = None  # datasets name (e.g. imagenet-1k) loaded from the local cache
    train_split: str = "train"
    eval_split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"
    input_size: List[int] = field(default_factory=lambda: [3, 224, 224])
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: Literal["bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"] = "bilinear"  # timm's
    crop_pct: float = ranged(0.875, "(0, 1]")
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    hflip: float = ranged(0.5, "[0, 1]")
    random_crop_padding: int = ranged(0, ">= 0")  # small images: pad-and-crop instead of random-resized-crop when > 0
    batch_size: int = ranged(256, "> 0")  # per device
    eval_batch_size: Optional[int] = ranged(None, "> 0")
    num_workers: int = ranged(8, ">= 0")
    train_subset: Optional[int] = ranged(None, "> 0")  # first N training examples (smoke / CPU plumbing runs)
    eval_subset: Optional[int] = ranged(None, "> 0")
    device_resident: bool = False  # small data: keep all tensors on the accelerator, augment there


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: Optional[float] = ranged(None, "> 0")  # absolute lr; if None: base_lr * global_batch / base_batch_size
    base_lr: float = 0.2
    base_batch_size: int = ranged(512, "> 0")
    momentum: float = 0.875
    nesterov: bool = False
    weight_decay: float = 5e-5
    decay_norm_and_bias: bool = True


@dataclass
class LRScheduleConfig:
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = ranged(5.0, ">= 0")
    min_lr: float = ranged(0.0, ">= 0")
    milestones: List[float] = field(default_factory=list)  # epochs, for "step"
    gamma: float = ranged(0.1, "> 0")


@dataclass
class SparsityRecipe:
    method: Method = "st3"
    target: float = 0.9  # method rules (range, dense, feather, probmask): SparsityConfig
    start_epoch: float = ranged(5.0, ">= 0")
    end_epoch: float = 50.0
    power: float = 3.0
    exclude: List[str] = field(default_factory=list)
    p: Optional[float] = None  # feather: p-norm exponent (null: 3)
    theta: Optional[float] = None  # feather: gradient scale of pruned weights (null: 0.5 above 95% target, else 1)
    soft_threshold: Optional[bool] = None  # ablation switches (null: the method's own); probmask: soft variant
    rescale: Optional[bool] = None
    probas_lr: Optional[float] = ranged(None, "> 0")  # probmask's keep-probabilities (null: the model's lr ...)
    probas_momentum: Optional[float] = ranged(None, "[0, 1)")  # (null: the model's momentum)
    probas_weight_decay: float = ranged(0.0, ">= 0")
    # ramp: one pruning run | lrr: then rewind, retrain with frozen masks | iterative: `rounds` runs (lrr.py)
    schedule: Literal["ramp", "lrr", "iterative"] = "ramp"
    rounds: int = 1
    round_fraction: float = 0.2


@dataclass
class TrainingConfig:
    epochs: int = ranged(100, "> 0")
    max_steps: Optional[int] = ranged(None, "> 0")  # stop after this many optimizer steps (smoke runs)
    gradient_accumulation_steps: int = ranged(1, "> 0")
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    grad_clip: Optional[float] = ranged(3.0, "> 0")
    label_smoothing: float = ranged(0.1, "[0, 1)")
    seed: int = ranged(0, "[0, 2**32)")  # numpy and torch seeds
    checkpoint_every_steps: Optional[int] = ranged(None, "> 0")
    checkpoint_every_epoch: bool = True
    keep_checkpoints: int = ranged(3, ">= 1")  # only checkpoints this trainer wrote are rotated
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    allow_recipe_change: bool = False  # resume although a run-changing key differs (st3_hf.train.resume_guard)
    overwrite_output_dir: bool = False  # start over in a folder holding another run, or any non-empty folder
    log_every_steps: int = ranged(50, "> 0")
    freeze_at_end: bool = True
    finetune_epochs: int = ranged(0, ">= 0")  # frozen-mask epochs after the run (the reference: 10)
    # skip NaN/inf updates, stop (with a checkpoint) after this many in a row; null: off (saves a host sync per step)
    max_consecutive_nonfinite_steps: Optional[int] = ranged(10, ">= 1")
    collective_timeout_s: float = ranged(1800.0, "> 0")  # a collective waiting longer (a dead rank) fails


@dataclass
class EvaluationConfig:
    every_epochs: int = ranged(1, "> 0")
    at_end: bool = True
    at_start: bool = True  # a run from model.pretrained evaluates the dense start at step 0
    max_batches: Optional[int] = ranged(None, "> 0")


@dataclass
class HubConfig:
    export: bool = True
    push: bool = False
    repo_id: Optional[str] = None
    private: bool = False
    revision: Optional[str] = None
    license: str = "apache-2.0"
    dataset_name: Optional[str] = None  # card metadata, e.g. "imagenet-1k"
    base_model: Optional[str] = None  # fine-tuned cards name their base model


@dataclass
class LoggingConfig:
    trackers: List[str] = field(default_factory=lambda: ["tensorboard"])
    project_name: str = "st3_hf"
    progress_bar: bool = True


@dataclass
class ExpectedResults:
    """What the paper reports for this recipe (for reports and cards); never used by training."""
    top1: Optional[float] = None
    sparsity: Optional[float] = None
    mflops: Optional[float] = None
    source: Optional[str] = None


@dataclass
class Recipe:
    output_dir: str = "outputs/run"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    sparsity: SparsityRecipe = field(default_factory=SparsityRecipe)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    expected: ExpectedResults = field(default_factory=ExpectedResults)


SECTIONS = {name: tp for name, tp in typing.get_type_hints(Recipe).items() if dataclasses.is_dataclass(tp)}
# section ("": the top level) -> field -> (type, annotation as written)
FIELDS = {section: {f.name: (typing.get_type_hints(cls)[f.name], str(f.type)) for f in dataclasses.fields(cls)}
          for section, cls in {"": Recipe, **SECTIONS}.items()}
# dotted key -> its valid values, read from the Literal annotations above
CHOICES: Dict[str, Tuple[str, ...]] = {f"{section}.{name}": typing.get_args(tp) for section in SECTIONS
                                       for name, (tp, _) in FIELDS[section].items() if typing.get_origin(tp) is Literal}


def sparsity_config(cfg: SparsityRecipe, steps_per_epoch: int, epochs: int = 1, seed: int = 0) -> SparsityConfig:
    """The recipe's epoch-based ramp in optimizer steps (``epochs``, ``seed``: ProbMask's temperature and draw)."""
    probmask = dict(steps_per_epoch=steps_per_epoch, temperature_epochs=epochs, mask_seed=seed)
    return SparsityConfig(
        method=cfg.method, target=cfg.target, start_step=int(round(cfg.start_epoch * steps_per_epoch)),
        end_step=int(round(cfg.end_epoch * steps_per_epoch)), power=cfg.power, exclude=tuple(cfg.exclude), p=cfg.p,
        theta=cfg.theta, soft_threshold=cfg.soft_threshold, rescale=cfg.rescale,
        **{k: v if cfg.method == "probmask" else None for k, v in probmask.items()})


show = reprlib.repr  # short reprs of user values in messages


def choice_problem(key: str, value: Any) -> str:
    """Why ``value`` is not one of the choices of the ``Literal`` field ``key``, with the closest one."""
    close = difflib.get_close_matches(str(value), CHOICES[key], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"is {show(value)}{hint}; valid values: {', '.join(CHOICES[key])}"


def _nonfinite(value: Any) -> Optional[float]:
    """The first NaN or infinity in ``value`` (lists and mappings too): no range rule refuses NaN."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((bad for bad in map(_nonfinite, items) if bad is not None), None)


def problems(recipe: Recipe, data_given: FrozenSet[str]) -> List[Tuple[str, str]]:
    """Every invalid value of ``recipe`` as ``(dotted key, problem)``: each field against its declaration (finite
    numbers, ``Literal`` choices, range rule), then the rules between fields (none for a key that already has a
    problem). ``data_given``: the data keys the recipe sets (a ``model.pretrained`` start provides the others).

    >>> problems(Recipe(training=TrainingConfig(epochs=0)), frozenset())
    [('training.epochs', 'must be > 0, got 0')]
    """
    from st3_hf.hub.pretrained import UNSAFE_MODEL_ARGS
    from st3_hf.train.lrr import round_sparsity
    found: Dict[str, str] = {}
    for section in SECTIONS:
        config = getattr(recipe, section)
        for f in dataclasses.fields(config):
            value, key, rule = getattr(config, f.name), f"{section}.{f.name}", f.metadata.get("range")
            bad = _nonfinite(value)
            if bad is not None:
                found[key] = (f"must be a finite number, got {bad}" if bad is value
                              else f"must hold finite numbers only, got {bad} in {show(value)}")
            elif key in CHOICES and value not in CHOICES[key]:
                found[key] = choice_problem(key, value)
            elif rule and value is not None and not RANGES[rule](value):
                found[key] = f"must be {'in ' * (rule[0] in '[(')}{rule}, got {show(value)}"
    # the rules that tie fields together (several sections, or one key only some methods read)
    sp, data, model, unset, errors = recipe.sparsity, recipe.data, recipe.model, SparsityRecipe(), list(found.items())

    def need(ok: bool, key: str, problem: str) -> None:
        errors.extend([] if ok or key in found else [(key, problem)])

    try:  # the method's own rules are the core's (SparsityConfig), stated once there
        if _nonfinite(dataclasses.astuple(sp)) is None:
            sparsity_config(sp, steps_per_epoch=1)
    except ConfigError as exc:  # at the recipe's key; a core-only key (criterion...): the method
        if exc.key is None:  # not a SparsityConfig field's refusal: already a whole message
            raise
        key = "start_epoch" if exc.key == "start_step" else exc.key if hasattr(unset, exc.key) else "method"
        need(False, f"sparsity.{key}", exc.problem)
    need(sp.start_epoch <= sp.end_epoch, "sparsity.start_epoch",
         f"must be <= sparsity.end_epoch, got start_epoch={sp.start_epoch} > end_epoch={sp.end_epoch}")
    for key in ("probas_lr", "probas_momentum", "probas_weight_decay"):
        need(getattr(sp, key) == getattr(unset, key) or sp.method == "probmask", f"sparsity.{key}", f"is a probmask "
             f"setting; sparsity.method {show(sp.method)} does not use it (remove it or set sparsity.method=probmask)")
    need(sp.method != "probmask" or recipe.optimizer.name == "sgd" or sp.probas_momentum is None,
         "sparsity.probas_momentum", "applies to optimizer.name sgd only")
    need(recipe.optimizer.lr is not None or recipe.optimizer.base_lr > 0, "optimizer.base_lr",
         f"must be > 0, got {recipe.optimizer.base_lr}")
    need(recipe.lr_schedule.name != "step" or bool(recipe.lr_schedule.milestones), "lr_schedule.milestones",
         "must list the decay epochs when lr_schedule.name is 'step'")
    every, epochs = recipe.evaluation.every_epochs, recipe.training.epochs
    need(sp.schedule == "ramp" or every <= 0 or epochs % every == 0, "evaluation.every_epochs",
         f"must divide training.epochs={show(epochs)} for sparsity.schedule {show(sp.schedule)} (the rewind "
         f"reloads the best evaluation of each run or round), got {show(every)}")
    if sp.schedule == "iterative":
        need(sp.method == "gmp", "sparsity.method", "must be 'gmp' for sparsity.schedule iterative (hard "
                                                    f"threshold, masked gradients), got {show(sp.method)}")
        need(sp.rounds >= 2, "sparsity.rounds", f"must be >= 2 for sparsity.schedule iterative (round 0 is "
                                                f"dense), got {show(sp.rounds)}")
        need(0.0 < sp.round_fraction < 1.0, "sparsity.round_fraction", f"must be in (0, 1), got {sp.round_fraction}")
        final = round_sparsity(sp.rounds - 1, sp.round_fraction) if sp.rounds > 1 and 0 < sp.round_fraction < 1 else 0
        need(not final or abs(sp.target - final) <= 1e-6, "sparsity.target", f"must be 1 - (1 - round_fraction)^"
             f"(rounds - 1) = {final:.6f} for sparsity.schedule iterative, got {sp.target}")
    else:
        for key in ("rounds", "round_fraction"):
            need(getattr(sp, key) == getattr(unset, key), f"sparsity.{key}", f"is an iterative-pruning setting; "
                 f"sparsity.schedule {show(sp.schedule)} does not use it (set sparsity.schedule=iterative)")
        need(sp.schedule != "lrr" or sp.method != "dense", "sparsity.schedule",
             "lrr rewinds a pruning run: sparsity.method 'dense' prunes nothing")
    # preprocessing left to a pretrained start is checked once known (modeling.with_start_preprocessing)
    channels = data.input_size[0] if len(data.input_size) == 3 else None
    if model.pretrained is False or not {"input_size", "mean", "std"} - data_given:
        need(channels is not None, "data.input_size", f"must be [channels, height, width], got {show(data.input_size)}")
        need(channels in (None, model.in_chans), "data.input_size",
             f"has {show(channels)} channels but model.in_chans is {show(model.in_chans)}")
        for name in ("mean", "std") if channels is not None else ():
            need(len(getattr(data, name)) == channels, f"data.{name}",
                 f"needs one value per channel ({show(channels)}), got {show(getattr(data, name))}")
    need(all(s > 0 for s in data.std), "data.std", f"values must be > 0, got {show(data.std)}")
    need(all(v > 0 for v in data.input_size), "data.input_size", f"values must be > 0, got {show(data.input_size)}")
    need(len(data.scale) == 2 and 0 < data.scale[0] <= data.scale[1] <= 1, "data.scale", f"must be [min, max] with "
         f"0 < min <= max <= 1 (fractions of the image area), got {show(data.scale)}")
    need(len(data.ratio) == 2 and 0 < data.ratio[0] <= data.ratio[1], "data.ratio",
         f"must be [min, max] with 0 < min <= max (aspect ratios), got {show(data.ratio)}")
    unsafe = sorted(set(model.kwargs) & set(UNSAFE_MODEL_ARGS))
    need(not unsafe, "model.kwargs", f"must not set {', '.join(unsafe)}: they make timm load files of its own; "
         f"start from weights with model.pretrained or model.init_from")
    need(not isinstance(model.pretrained, str) or bool(model.pretrained.strip()), "model.pretrained",
         "is an empty string; give true, a Hub id (ORG/NAME) or a folder")
    need(model.pretrained is False or not model.init_from, "model.pretrained", "and model.init_from are both set: model"
         ".init_from continues a sparse export with frozen masks, model.pretrained prunes dense weights; choose one")
    need(data.source != "hf" or bool(data.hf_name or data.root), "data.hf_name",
         "data.source 'hf' needs data.hf_name (or data.root, a saved dataset)")
    return errors
