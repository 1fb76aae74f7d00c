"""What each acceptance part runs: the parts in order of value, their time budgets, and the sizes for
one H200 (``GPU``) or for the CPU dry run (``CPU``: tiny, seconds per part).

Sized for 15 minutes on one GPU, as two commands (docs/gpu_acceptance.md); what had to be cut against
the full claims is in :data:`GPU_CUTS` and repeated in every record that it concerns.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

PART_ORDER: Tuple[str, ...] = ("environment", "cuda_tests", "benchmark_eager", "benchmark_compile", "train_loop",
                               "deepspeed_zero2", "fsdp2", "train_profile", "sweep")
# seconds each part may take (its subprocesses are killed at the end of it)
GPU_BUDGETS_S: Dict[str, float] = {
    "environment": 30, "cuda_tests": 60, "benchmark_eager": 90, "benchmark_compile": 180, "train_loop": 170,
    "deepspeed_zero2": 90, "fsdp2": 90, "train_profile": 70, "sweep": 600,
}
CPU_BUDGETS_S: Dict[str, float] = dict.fromkeys(PART_ORDER, 300.0)  # the dry run: generous, a shared machine
MIN_START_S = 15.0  # a part is not started with less than this left of the overall budget

GPU_CUTS: Dict[str, str] = {
    "benchmark_eager": "3 interleaved rounds x 20 steps (BENCHMARKS.md's command says 5 rounds)",
    "benchmark_compile": "3 interleaved rounds x 20 steps",
    "train_loop": "300 steps on 80k generated 400x300 JPEGs, ramp moved to epochs 0 -> 2 so every step updates the "
                  "threshold (the recipe's ramp starts at epoch 5); one GPU, not the recipe's 8",
    "deepspeed_zero2": "20 steps on one GPU (num_processes 1): shows the engine runs, not its scaling",
    "fsdp2": "20 steps on one GPU (num_processes 1)",
    "sweep": "3 epochs instead of 30 (ramp epochs 0.2 -> 2 instead of 2 -> 20); recipes run in value order until the "
             "budget ends, all 3 seeds of each (fewer recipes before fewer seeds); the 3 seeds run side by side on "
             "the one GPU, so wall_s is under 3-way sharing",
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size knob of the parts; the defaults are the GPU's (:data:`GPU`), :data:`CPU` the dry run's."""

    # scripts/benchmark.py's flags (``batch_size`` -> ``--batch-size``; True: a switch)
    bench: Dict[str, Any] = dataclasses.field(default_factory=lambda: dict(
        model="resnet50", batch_size=256, input_size=224, num_classes=1000, steps=20, rounds=3, warmup=3, amp="bf16",
        channels_last=True, target=0.98))
    compile_skip_reason: Optional[str] = None  # why --compile is not run at this size (None: it runs)
    # scripts/train.py recipes/r50_st3_98.yaml on generated JPEGs
    train_recipe: str = "recipes/r50_st3_98.yaml"
    train_model_overrides: Tuple[str, ...] = ()
    train_classes: int = 1000
    train_per_class: int = 80
    val_per_class: int = 1
    image_size: Tuple[int, int] = (400, 300)
    train_batch: int = 256
    train_workers: int = 16
    train_steps: int = 300
    train_log_every: int = 25
    train_skip_steps: int = 50
    loader_batches: int = 40
    # DeepSpeed ZeRO-2 / FSDP2, host profile
    dist_steps: int = 20
    dist_log_every: int = 5
    profile_steps: int = 60
    # Fashion-MNIST sweep
    sweep_epochs: float = 3
    sweep_seeds: Tuple[int, ...] = (0, 1, 2)
    sweep_extra_overrides: Tuple[str, ...] = ()
    sweep_max_recipes: Optional[int] = None
    cuts: Dict[str, str] = dataclasses.field(default_factory=lambda: GPU_CUTS)


GPU = Sizes()
CPU = Sizes(
    bench=dict(model="test_resnet", batch_size=2, input_size=32, num_classes=10, steps=1, rounds=1, warmup=1,
               amp="none", target=0.98),
    compile_skip_reason="not dry-run on the CPU: inductor compiles 4 models for minutes on 2 cores; "
                        "the same command line runs on the GPU",
    train_model_overrides=("model.name=test_resnet", "model.num_classes=4", "data.input_size=[3,32,32]",
                           "training.mixed_precision=no"),
    train_classes=4, train_per_class=6, image_size=(48, 40), train_batch=4, train_workers=2, train_steps=6,
    train_log_every=1, train_skip_steps=2, loader_batches=2, dist_steps=4, dist_log_every=1, profile_steps=3,
    sweep_epochs=1, sweep_seeds=(0,), sweep_max_recipes=2,
    sweep_extra_overrides=("model.name=resnet10t", "model.kwargs={}", "data.train_subset=128",
                           "data.eval_subset=100", "data.batch_size=64", "training.mixed_precision=no"),
    cuts={},
)


def train_overrides(sizes: Sizes, data_root: Path, output_dir: Path, steps: int, log_every: int) -> List[str]:
    """Generated data, the ramp active from step 0 (every step recomputes threshold, masks and weights)."""
    return [f"data.root={data_root}", f"data.batch_size={sizes.train_batch}", f"data.num_workers={sizes.train_workers}",
            f"training.max_steps={steps}", f"training.log_every_steps={log_every}",
            "training.checkpoint_every_epoch=false", "sparsity.start_epoch=0", "sparsity.end_epoch=2",
            "lr_schedule.warmup_epochs=0", "logging.trackers=[]", "logging.progress_bar=false",
            *sizes.train_model_overrides, f"output_dir={output_dir}"]


def sweep_overrides(sizes: Sizes, data_root: Path) -> List[str]:
    """The Fashion-MNIST recipes' 30 epochs shrunk to ``sizes.sweep_epochs``, the schedule's shape kept."""
    e = sizes.sweep_epochs
    return [f"data.root={data_root}", f"training.epochs={int(e)}", f"sparsity.start_epoch={e * 2 / 30:g}",
            f"sparsity.end_epoch={e * 20 / 30:g}", f"lr_schedule.warmup_epochs={e / 30:g}",
            "training.checkpoint_every_epoch=false", "logging.trackers=[]", *sizes.sweep_extra_overrides]


_TARGET_ORDER = ("98", "90", "99", "95")  # the paper's headline sparsity first
_METHOD_ORDER = ("st3", "st3sigma", "gmp", "feather")


def sweep_recipes(recipes_dir: Path, max_recipes: Optional[int] = None) -> List[Path]:
    """The ``fmnist_*`` recipes in order of value: dense, then by target (98, 90, 99, 95, ...) and method."""
    def key(path: Path) -> Tuple[int, int, int, str]:
        method, _, target = path.stem[len("fmnist_"):].partition("_")
        if method == "dense":
            return (0, 0, 0, path.stem)
        t = _TARGET_ORDER.index(target) if target in _TARGET_ORDER else len(_TARGET_ORDER)
        k = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)
        return (1, t, k, path.stem)
    return sorted(recipes_dir.glob("fmnist_*.yaml"), key=key)[:max_recipes]


def find_fsdp2_config(configs_dir: Path) -> Optional[Path]:
    """The accelerate FSDP2 config shipped in ``recipes/accelerate_configs`` (None until one exists)."""
    for path in sorted(configs_dir.glob("*.yaml")):
        text = path.read_text()
        if re.search(r"distributed_type:\s*['\"]?FSDP", text) and re.search(r"fsdp_version:\s*['\"]?2", text):
            return path
    return None


def parse_part_budgets(items: Sequence[str]) -> Dict[str, float]:
    """``["sweep=200", "train_loop=120"]`` -> ``{"sweep": 200.0, "train_loop": 120.0}`` (names checked)."""
    out: Dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in PART_ORDER or not re.fullmatch(r"\d*\.?\d+", value) or not float(value) > 0:
            raise ValueError(f"--part-budget {item!r}: expected NAME=SECONDS (SECONDS > 0) with NAME one of "
                             f"{', '.join(PART_ORDER)}")
        out[name] = float(value)
    return out


def parse_parts(spec: Optional[str]) -> List[str]:
    """``"cuda_tests,benchmark_eager"`` -> those parts in :data:`PART_ORDER` order; None or ``all``: every part."""
    names = set(PART_ORDER) if spec in (None, "all") else {s.strip() for s in spec.split(",") if s.strip()}
    unknown = sorted(names - set(PART_ORDER))
    if unknown or not names:
        raise ValueError(f"--parts: unknown part(s) {unknown}; valid: {', '.join(PART_ORDER)} (or all)")
    return [p for p in PART_ORDER if p in names]
