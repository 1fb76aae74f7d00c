"""What each acceptance part runs: the parts in order of value, their time budgets, and the sizes for
one H200 (``cuda``) or for the CPU dry run (``cpu``: tiny, seconds per part).

Sizing for the GPU (15 minutes of device time in all, machine start included, in two calls of at
most 9 minutes): call 1 runs parts 1-3 (CUDA tests, benchmark eager + compile, whole-loop run),
call 2 the distributed engines, the host profile and the Fashion-MNIST sweep. What had to be cut
against the full claims is said in :data:`GPU_CUTS` and repeated in every record that it concerns.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PART_ORDER: Tuple[str, ...] = (
    "environment",
    "cuda_tests",
    "benchmark_eager",
    "benchmark_compile",
    "train_loop",
    "deepspeed_zero2",
    "fsdp2",
    "train_profile",
    "sweep",
)

# seconds each part may take (its subprocesses are killed at the end of it)
GPU_BUDGETS_S: Dict[str, float] = {
    "environment": 30, "cuda_tests": 60, "benchmark_eager": 90, "benchmark_compile": 180, "train_loop": 170,
    "deepspeed_zero2": 90, "fsdp2": 90, "train_profile": 70, "sweep": 600,
}
CPU_BUDGETS_S: Dict[str, float] = {
    "environment": 30, "cuda_tests": 120, "benchmark_eager": 120, "benchmark_compile": 60, "train_loop": 240,
    "deepspeed_zero2": 60, "fsdp2": 60, "train_profile": 180, "sweep": 300,
}
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


@dataclass(frozen=True)
class Sizes:
    """Every size knob of the parts; :data:`GPU` and :data:`CPU` are the two shipped settings."""

    # part 2: scripts/benchmark.py
    bench_model: str
    bench_batch: int
    bench_input: int
    bench_num_classes: int
    bench_steps: int
    bench_rounds: int
    bench_warmup: int
    bench_amp: str
    bench_channels_last: bool
    compile_skip_reason: Optional[str]  # why --compile is not run at this size (None: it runs)
    # part 3: scripts/train.py recipes/r50_st3_98.yaml on generated JPEGs
    train_recipe: str
    train_model_overrides: Tuple[str, ...]
    train_classes: int
    train_per_class: int
    val_per_class: int
    image_size: Tuple[int, int]
    train_batch: int
    train_workers: int
    train_steps: int
    train_log_every: int
    train_skip_steps: int
    loader_batches: int
    # part 4: DeepSpeed ZeRO-2 / FSDP2
    dist_steps: int
    dist_log_every: int
    # host profile
    profile_steps: int
    # part 5: Fashion-MNIST sweep
    sweep_epochs: float
    sweep_seeds: Tuple[int, ...]
    sweep_extra_overrides: Tuple[str, ...]
    sweep_max_recipes: Optional[int]
    cuts: Dict[str, str] = field(default_factory=dict)


GPU = Sizes(
    bench_model="resnet50", bench_batch=256, bench_input=224, bench_num_classes=1000, bench_steps=20,
    bench_rounds=3, bench_warmup=3, bench_amp="bf16", bench_channels_last=True, compile_skip_reason=None,
    train_recipe="recipes/r50_st3_98.yaml", train_model_overrides=(),
    train_classes=1000, train_per_class=80, val_per_class=1, image_size=(400, 300), train_batch=256,
    train_workers=16, train_steps=300, train_log_every=25, train_skip_steps=50, loader_batches=40,
    dist_steps=20, dist_log_every=5, profile_steps=60,
    sweep_epochs=3, sweep_seeds=(0, 1, 2), sweep_extra_overrides=(), sweep_max_recipes=None,
    cuts=GPU_CUTS,
)

CPU = Sizes(
    bench_model="test_resnet", bench_batch=2, bench_input=32, bench_num_classes=10, bench_steps=1,
    bench_rounds=1, bench_warmup=1, bench_amp="none", bench_channels_last=False,
    compile_skip_reason="not dry-run on the CPU: inductor compiles 4 models for minutes on 2 cores; "
                        "the same command line runs on the GPU",
    train_recipe="recipes/r50_st3_98.yaml",
    train_model_overrides=("model.name=test_resnet", "model.num_classes=4", "data.input_size=[3,32,32]",
                           "training.mixed_precision=no"),
    train_classes=4, train_per_class=6, val_per_class=1, image_size=(48, 40), train_batch=4,
    train_workers=2, train_steps=6, train_log_every=1, train_skip_steps=2, loader_batches=2,
    dist_steps=4, dist_log_every=1, profile_steps=3,
    sweep_epochs=1, sweep_seeds=(0,),
    sweep_extra_overrides=("model.name=resnet10t", "model.kwargs={}", "data.train_subset=128",
                           "data.eval_subset=100", "data.batch_size=64", "training.mixed_precision=no"),
    sweep_max_recipes=2,
)


def sizes_for(device: str) -> Sizes:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return GPU if device == "cuda" else CPU


def train_overrides(sizes: Sizes, data_root: Path, output_dir: Path, steps: int, log_every: int) -> List[str]:
    """The whole-loop run's overrides: generated data, a one-epoch run with the ramp active from step 0."""
    return [
        f"data.root={data_root}",
        f"data.batch_size={sizes.train_batch}",
        f"data.num_workers={sizes.train_workers}",
        f"training.max_steps={steps}",
        f"training.log_every_steps={log_every}",
        "training.checkpoint_every_epoch=false",
        # the ramp is active from the first step, so every step recomputes threshold, masks and weights
        "sparsity.start_epoch=0",
        "sparsity.end_epoch=2",
        "lr_schedule.warmup_epochs=0",
        "logging.trackers=[]",
        "logging.progress_bar=false",
        *sizes.train_model_overrides,
        f"output_dir={output_dir}",
    ]


def sweep_overrides(sizes: Sizes, data_root: Path) -> List[str]:
    """Shrink the Fashion-MNIST recipes' 30 epochs to ``sizes.sweep_epochs``, keeping the schedule's shape
    (warm-up 1/30, ramp from 2/30 to 2/3 of training)."""
    e = sizes.sweep_epochs
    return [
        f"data.root={data_root}",
        f"training.epochs={int(e)}",
        f"sparsity.start_epoch={e * 2 / 30:g}",
        f"sparsity.end_epoch={e * 20 / 30:g}",
        f"lr_schedule.warmup_epochs={e / 30:g}",
        "training.checkpoint_every_epoch=false",
        "logging.trackers=[]",
        *sizes.sweep_extra_overrides,
    ]


_TARGET_ORDER = ("98", "90", "99", "95")  # the paper's headline sparsity first
_METHOD_ORDER = ("st3", "st3sigma", "gmp", "feather")


def sweep_recipes(recipes_dir: Path, max_recipes: Optional[int] = None) -> List[Path]:
    """The ``fmnist_*`` recipes present, in order of value: dense, then each target (98, 90, 99, 95, others)
    with ST-3, ST-3σ, GMP, Feather and any other method found; recipes absent are simply not listed."""
    found = sorted(recipes_dir.glob("fmnist_*.yaml"))
    def key(path: Path) -> Tuple[int, int, int, str]:
        m = re.fullmatch(r"fmnist_([a-z0-9]+?)(?:_(\w+))?", path.stem)
        method, target = (m.group(1), m.group(2) or "") if m else (path.stem, "")
        if method == "dense":
            return (0, 0, 0, path.stem)
        t = _TARGET_ORDER.index(target) if target in _TARGET_ORDER else len(_TARGET_ORDER)
        k = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)
        return (1, t, k, path.stem)
    ordered = sorted(found, key=key)
    return ordered[:max_recipes] if max_recipes is not None else ordered


def find_fsdp2_config(configs_dir: Path) -> Optional[Path]:
    """The accelerate FSDP2 config shipped in ``recipes/accelerate_configs`` (None until one exists)."""
    for path in sorted(configs_dir.glob("*.yaml")):
        text = path.read_text()
        if re.search(r"distributed_type:\s*['\"]?FSDP", text) and re.search(r"fsdp_version:\s*['\"]?2", text):
            return path
    return None


def cuda_test_files(tests_dir: Path) -> List[Path]:
    """``tests/test_cuda.py`` and any other test module that marks tests ``cuda``."""
    files = [p for p in sorted(tests_dir.glob("test_*.py"))
             if p.name == "test_cuda.py" or "pytest.mark.cuda" in p.read_text()]
    return files


def parse_part_budgets(items: Sequence[str]) -> Dict[str, float]:
    """``["sweep=200", "train_loop=120"]`` -> ``{"sweep": 200.0, "train_loop": 120.0}`` (names checked)."""
    out: Dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in PART_ORDER:
            raise ValueError(f"--part-budget {item!r}: expected NAME=SECONDS with NAME one of {', '.join(PART_ORDER)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--part-budget {item!r}: {value!r} is not a number of seconds") from None
        if out[name] <= 0:
            raise ValueError(f"--part-budget {item!r}: seconds must be > 0")
    return out


def parse_parts(spec: Optional[str]) -> List[str]:
    """``"cuda_tests,benchmark_eager"`` -> those parts in :data:`PART_ORDER` order; None or ``all``: every part."""
    if spec is None or spec == "all":
        return list(PART_ORDER)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in PART_ORDER]
    if unknown or not names:
        raise ValueError(f"--parts: unknown part(s) {unknown}; valid: {', '.join(PART_ORDER)} (or all)")
    return [p for p in PART_ORDER if p in names]
