"""Typed sections of a recipe (loading and validation: :mod:`st3_hf.train.recipe`). A field with a few
valid values is typed ``Literal[...]``: that one annotation is what the loader checks and :data:`CHOICES` lists."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

from st3_hf.sparse.config import Method, SparsityConfig

DataSource = Literal["imagefolder", "hf", "fashion_mnist"]
PruningSchedule = Literal["ramp", "lrr", "iterative"]
# the resampling filters timm's transforms accept
Interpolation = Literal["bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"]

# range rules a number field declares with `ranged(default, rule)` (null passes: "not set")
RANGES: Dict[str, Tuple[Callable[[float], bool], str]] = {
    "> 0": (lambda v: v > 0, "must be > 0"),
    ">= 0": (lambda v: v >= 0, "must be >= 0"),
    ">= 1": (lambda v: v >= 1, "must be >= 1"),
    "[0, 1)": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "[0, 1]": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "(0, 1]": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32) (numpy and torch seeds)"),
}


def ranged(default: Any, rule: str) -> Any:
    """A dataclass field whose value (when not null) must satisfy ``RANGES[rule]``."""
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
    # dense pretrained weights pruned by the schedule: true (timm's Hub weights for model.name), a Hub id
    # ("timm/resnet50.a1_in1k", "hf-hub:ORG/NAME") or a folder in timm's Hub format ("local-dir:PATH" or PATH)
    pretrained: Union[bool, str] = False


@dataclass
class DataConfig:
    source: DataSource = "imagefolder"
    root: Optional[str] = None  # folder with train/ val/ (imagefolder), IDX folder (fashion_mnist), dataset path (hf)
    hf_name: Optional[str] = None  # datasets name (e.g. imagenet-1k) loaded from the local cache
    train_split: str = "train"
    eval_split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"
    input_size: List[int] = field(default_factory=lambda: [3, 224, 224])
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: Interpolation = "bilinear"
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
    # probmask: the keep-probabilities' own optimizer group (null: the model's lr and momentum; no weight decay)
    probas_lr: Optional[float] = ranged(None, "> 0")
    probas_momentum: Optional[float] = ranged(None, "[0, 1)")
    probas_weight_decay: float = ranged(0.0, ">= 0")
    # ramp: one pruning run | lrr: then rewind the lr, retrain with frozen masks | iterative: `rounds` runs (lrr.py)
    schedule: PruningSchedule = "ramp"
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
    seed: int = ranged(0, "seed")
    checkpoint_every_steps: Optional[int] = ranged(None, "> 0")
    checkpoint_every_epoch: bool = True
    keep_checkpoints: int = ranged(3, ">= 1")  # only checkpoints this trainer wrote are rotated
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    # resume although a run-changing key differs from the checkpoint's (st3_hf.train.resume_guard)
    allow_recipe_change: bool = False
    # start over in an output_dir that holds another run (its checkpoints and metrics are removed first), or
    # write into a non-empty folder that is not an st3_hf run folder (st3_hf.train.run_folder)
    overwrite_output_dir: bool = False
    log_every_steps: int = ranged(50, "> 0")
    freeze_at_end: bool = True
    # frozen-mask epochs after the run, the lr schedule continuing past its end (the reference: 10; paper recipes: 0)
    finetune_epochs: int = ranged(0, ">= 0")
    # skip NaN/inf updates, stop (with a checkpoint) after this many in a row; null: off (saves a host sync per step)
    max_consecutive_nonfinite_steps: Optional[int] = ranged(10, ">= 1")
    # a collective that waits longer than this (a dead rank or node) fails instead of hanging forever
    collective_timeout_s: float = ranged(1800.0, "> 0")


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


def _choices() -> Dict[str, Tuple[str, ...]]:
    hints = typing.get_type_hints(Recipe)
    return {f"{section}.{name}": typing.get_args(tp)
            for section, cls in hints.items() if dataclasses.is_dataclass(cls)
            for name, tp in typing.get_type_hints(cls).items() if typing.get_origin(tp) is Literal}


# dotted key -> its valid values, read from the Literal annotations above
CHOICES: Dict[str, Tuple[str, ...]] = _choices()


def sparsity_config(cfg: SparsityRecipe, steps_per_epoch: int, epochs: int = 1, seed: int = 0) -> SparsityConfig:
    """The recipe's epoch-based ramp in optimizer steps (``epochs``, ``seed``: ProbMask's temperature and draw)."""
    probmask = cfg.method == "probmask"
    return SparsityConfig(
        method=cfg.method, target=cfg.target, start_step=int(round(cfg.start_epoch * steps_per_epoch)),
        end_step=int(round(cfg.end_epoch * steps_per_epoch)), power=cfg.power, exclude=tuple(cfg.exclude), p=cfg.p,
        theta=cfg.theta, soft_threshold=cfg.soft_threshold, rescale=cfg.rescale,
        steps_per_epoch=steps_per_epoch if probmask else None, temperature_epochs=epochs if probmask else None,
        mask_seed=seed if probmask else None,
    )
