"""The acceptance parts, each run inside its own deadline, and the figures they read off what their runs
leave behind (a run's ``metrics.jsonl``, its export loaded with plain timm, a cProfile dump).

``python -m acceptance.parts loader RECIPE [key=value ...] --batches 40`` prints one JSON object: the
images/s of the recipe's training DataLoader alone (no model), with its workers.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import io
import itertools
import json
import os
import platform
import pstats
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from st3_hf.train.metrics_log import JsonlLogger
from acceptance.plan import PART_ORDER, Sizes, find_fsdp2_config, sweep_overrides, sweep_recipes, train_overrides
from sweep import final_record, markdown_table, summarize

FMNIST_CANDIDATES = ("/usr/share/datasets/fashion-mnist", ".gpu_bundle/fashion-mnist")
PROFILE_FILE = "profile_train.txt"
# BENCHMARKS.md's GPU targets for ResNet-50, batch 256, bf16, channels_last, during the ramp to 98%
TARGETS = {"st3_over_dense": 1.02, "peak_memory_ratio": 1.05, "update_ms": 2.0}


class Skip(Exception):  # the part cannot run here; the message is the record's reason ("not available: ...")
    pass


class PartFailed(Exception):  # the part ran and something it checks is wrong
    pass


class PartTimeout(Exception):  # the part's deadline passed while one of its commands ran (it was killed)
    pass


class Context:
    """What every part sees: device, sizes, folders, the records written so far."""

    def __init__(self, device: str, sizes: Sizes, out_dir: Path, work_dir: Path, repo: Path,
                 fmnist_root: Optional[Path]) -> None:
        self.device, self.sizes, self.out_dir, self.work_dir, self.repo = device, sizes, out_dir, work_dir, repo
        self.fmnist_root, self.imagenet_root, self.python = fmnist_root, None, sys.executable
        self.records: Dict[str, Dict[str, Any]] = {}
        path = os.pathsep.join(p for p in (str(repo), str(repo / "scripts"), os.environ.get("PYTHONPATH", "")) if p)
        self.env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                        HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


class Part:
    """One part's run: its deadline, the commands it ran, its log, and the result so far (kept on a timeout)."""

    def __init__(self, ctx: Context, name: str, deadline: float) -> None:
        self.ctx, self.name, self.deadline = ctx, name, deadline
        self.commands: List[str] = []
        self.result: Dict[str, Any] = {}
        self.log_path = ctx.work_dir / "logs" / f"{name}.log"

    def start(self, cmd: Sequence[str], stdout_path: Optional[Path] = None) -> subprocess.Popen:
        """``cmd`` in its own process group (a timeout ends its workers too), logged (stdout to ``stdout_path``)."""
        self.commands.append(shlex.join(cmd))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log, open(stdout_path or os.devnull, "w") as result:
            log.write(f"\n$ {self.commands[-1]}\n")
            log.flush()
            return subprocess.Popen(list(cmd), stdout=result if stdout_path else log, stderr=log, env=self.ctx.env,
                                    cwd=self.ctx.repo, start_new_session=True)

    def wait(self, proc: subprocess.Popen) -> bool:
        """Wait for ``proc`` until the part's deadline; there, kill its process group. True if it ended itself."""
        try:
            proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False

    def run(self, cmd: Sequence[str], stdout_path: Optional[Path] = None, check: bool = True) -> int:
        began, proc = time.monotonic(), self.start(cmd, stdout_path)
        if not self.wait(proc):
            raise PartTimeout(f"killed at the deadline after {time.monotonic() - began:.0f} s: {self.commands[-1]}")
        if check and proc.returncode != 0:
            raise PartFailed(f"exit {proc.returncode}: {self.commands[-1]}")
        return proc.returncode

    def run_json(self, cmd: Sequence[str], name: str) -> Dict[str, Any]:
        """Run a command whose stdout is one JSON object (kept as ``work_dir/NAME.json``) and parse it."""
        self.run(cmd, stdout_path=self.ctx.work_dir / f"{name}.json")
        return json.loads((self.ctx.work_dir / f"{name}.json").read_text())


# ---------------------------------------------------------------------------------------------- measures
def loop_throughput(records: Sequence[Dict[str, Any]], global_batch: int, skip_steps: int) -> Dict[str, Any]:
    """Images/s of the whole loop from the ``elapsed_s`` of the ``train`` records after ``skip_steps`` (warm-up)."""
    train = [r for r in records if r.get("kind") == "train" and r.get("step", 0) >= skip_steps]
    if len(train) < 2 or train[-1]["step"] <= train[0]["step"]:
        raise ValueError(f"need two 'train' records at or after step {skip_steps}, found {len(train)}: "
                         "lower skip_steps or training.log_every_steps")
    first, last = train[0], train[-1]
    steps, seconds = last["step"] - first["step"], last["elapsed_s"] - first["elapsed_s"]
    return {"images_per_s": steps * global_batch / seconds, "step_ms": 1e3 * seconds / steps,
            "from_step": first["step"], "to_step": last["step"], "seconds": seconds}


def loader_throughput(recipe_path: str, overrides: Sequence[str], batches: int, warmup: int = 3) -> Dict[str, Any]:
    """Images/s of the recipe's training DataLoader alone, after ``warmup`` batches (worker start-up)."""
    from st3_hf.train.data.loaders import build_dataloaders
    from st3_hf.train.recipe import load_recipe
    recipe = load_recipe(recipe_path, overrides)
    it = iter(build_dataloaders(recipe.data, recipe.training.seed)[0])
    for _ in range(warmup):
        next(it)
    began = time.perf_counter()
    images = sum(next(it)[0].shape[0] for _ in range(batches))
    seconds = time.perf_counter() - began
    return {"images_per_s": images / seconds, "batches": batches, "batch_size": recipe.data.batch_size,
            "num_workers": recipe.data.num_workers, "seconds": seconds}


# (label, file suffix, function name): host-side functions whose cumulative time says where a step goes
PROFILE_FUNCTIONS: Tuple[Tuple[str, str, str], ...] = (
    ("data loader wait", "torch/utils/data/dataloader.py", "__next__"),
    ("module calls (forward; evaluation included)", "torch/nn/modules/module.py", "_call_impl"),
    ("backward", "accelerate/accelerator.py", "backward"),
    ("gradient clipping (norm)", "accelerate/accelerator.py", "clip_grad_norm_"),
    ("non-finite guard (host sync)", "st3_hf/train/nonfinite.py", "update_is_finite"),
    ("optimizer step (sparsifier hook included)", "accelerate/optimizer.py", "step"),
    ("sparsifier update", "st3_hf/sparse/sparsifier.py", "step"),
    ("evaluation", "st3_hf/train/evaluation.py", "evaluate_model"),
    ("checkpoint", "st3_hf/train/checkpointing.py", "save"),
    ("export", "st3_hf/train/trainer.py", "_export"),
)


def profile_summary(profile_path: Path, train_steps: int, top: int = 30) -> Tuple[Dict[str, Any], str]:
    """Cumulative host seconds (and ms per step) of :data:`PROFILE_FUNCTIONS` in a cProfile dump, and the top
    ``top`` functions of the run's own code paths as text. GPU time shows up in the host function that waits
    for it (the guard's host sync, a ``.item()``)."""
    buf = io.StringIO()
    stats = pstats.Stats(str(profile_path), stream=buf)
    found: Dict[str, Dict[str, float]] = {}
    for (filename, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():  # type: ignore
        for label, suffix, function in PROFILE_FUNCTIONS:
            if name == function and filename.replace("\\", "/").endswith(suffix):
                found.setdefault(label, {"seconds": 0.0})["seconds"] += cumulative
    for entry in found.values():
        entry["ms_per_step"] = 1e3 * entry["seconds"] / max(train_steps, 1)
    # the run's own code paths, not the one-off imports that dominate a short run's cumulative list
    stats.sort_stats("cumulative").print_stats(r"st3_hf/|accelerate/|torch/utils/data/|torch/autograd/|torch/optim/",
                                               top)
    return {"train_steps": train_steps, "functions": found, "total_s": getattr(stats, "total_tt", None)}, buf.getvalue()


def export_zero_fraction(folder: Path) -> Dict[str, Any]:
    """The zeros of an export's Conv2d/Linear weights as plain timm loads it (no st3_hf code): what users get."""
    import timm
    import torch.nn as nn

    model = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in weights)
    return {"zero_fraction": sum(int((w == 0).sum()) for w in weights) / total, "weights": total,
            "architecture": type(model).__name__}


def write_imagenet_layout(root: Path, num_classes: int, train_per_class: int, val_per_class: int,
                          size: Tuple[int, int], distinct: int = 256, seed: int = 0) -> Path:
    """``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` of noise-textured colour gradients: they cost about what
    a photo of that (width, height) costs to decode (flat images decode unrealistically fast). Only ``distinct``
    images are encoded, the files reuse their bytes: seconds even for 80k files."""
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for _ in range(min(distinct, num_classes * train_per_class)):
        c = rng.uniform(0, 255, size=(3, 3, 1, 1)).astype(np.float32)  # per channel: offset, x slope, y slope
        pixels = c[:, 0] + c[:, 1] * xx / width - c[:, 2] * yy / height + rng.normal(0, 25, (3, height, width))
        images.append(io.BytesIO())
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0)).save(images[-1], "JPEG",
                                                                                          quality=90)
    jpegs = itertools.cycle(image.getvalue() for image in images)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (root / split / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG").write_bytes(next(jpegs))
    return root


# ---------------------------------------------------------------------------------------------- parts
def part_environment(part: Part) -> None:
    import torch

    ctx, r = part.ctx, part.result
    packages = ("torch", "torchvision", "timm", "accelerate", "transformers", "datasets", "evaluate", "deepspeed",
                "huggingface_hub", "safetensors")
    r.update(python=platform.python_version(), cpu_count=os.cpu_count(), cuda_available=torch.cuda.is_available(),
             packages={n: importlib.metadata.version(n) for n in packages if importlib.util.find_spec(n)})
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        r.update(device_name=props.name, device_memory_gib=props.total_memory / 2**30,
                 device_count=torch.cuda.device_count())
    else:
        r["device_name"] = platform.processor() or platform.machine()
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ctx.repo, capture_output=True, text=True, timeout=10)
    r["git_commit"], r["missing_packages"] = git.stdout.strip() or None, []
    for name in ("datasets", "evaluate"):  # carried as wheels to the GPU machine: do they import there?
        try:
            importlib.import_module(name)
        except Exception as err:  # an ImportError, or a version clash with the machine's own packages
            r["missing_packages"].append(f"{name} ({type(err).__name__}: {err})"[:300])
    if ctx.device == "cuda" and not torch.cuda.is_available():
        raise PartFailed("--device cuda, but torch sees no CUDA device")
    if r["missing_packages"]:
        raise PartFailed(f"missing packages {r['missing_packages']}: install them from the wheel folder that "
                         "scripts/prepare_gpu_bundle.sh builds")


def part_cuda_tests(part: Part) -> None:
    """``tests/test_cuda.py`` and any other test module that marks tests ``cuda``."""
    ctx = part.ctx
    files = [p.name for p in sorted((ctx.repo / "tests").glob("test_*.py"))
             if p.name == "test_cuda.py" or "pytest.mark.cuda" in p.read_text()]
    junit = ctx.work_dir / "cuda_tests.xml"
    rc = part.run([ctx.python, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={junit}",
                   *[f"tests/{f}" for f in files]], check=False)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    part.result.update(files=files, exit_code=rc, failed_tests=failed, **counts)
    if counts["failures"] or counts["errors"] or rc not in (0, 5):
        raise PartFailed(f"{counts['failures']} failed, {counts['errors']} errors: {failed[:5]}")
    if ctx.device == "cuda" and counts["skipped"] == counts["tests"]:
        raise PartFailed("every CUDA test was skipped on a --device cuda run: pytest saw no GPU")


def part_benchmark(part: Part, compile_: bool) -> None:
    ctx, s = part.ctx, part.ctx.sizes
    if compile_ and s.compile_skip_reason:
        raise Skip(s.compile_skip_reason)
    flags = {"device": ctx.device, **s.bench, "compile": compile_}
    argv = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in flags.items() if v is not False]
    result = part.run_json([ctx.python, "scripts/benchmark.py", *argv], part.name)
    for variant in ("dense", "st3", "naive_st3", "st3_guarded"):
        result[f"{variant}_images_per_s"] = 1e3 * result["batch_size"] / result[f"{variant}_step_ms"]
    if ctx.device == "cuda":
        values = {"st3_over_dense": result["st3_over_dense"], "update_ms": result["update_ms"],
                  "peak_memory_ratio": result["st3_peak_mib"] / result["dense_peak_mib"]}
        result["targets"] = {k: {"value": v, "target": TARGETS[k], "met": v <= TARGETS[k]} for k, v in values.items()}
    part.result.update(result)


def _imagenet_data(part: Part) -> Path:
    """Generate the ImageNet-layout JPEGs once per driver run (the later parts reuse them)."""
    ctx, s = part.ctx, part.ctx.sizes
    if ctx.imagenet_root is None:
        began = time.monotonic()
        ctx.imagenet_root = write_imagenet_layout(ctx.work_dir / "imagenet", s.train_classes, s.train_per_class,
                                                  s.val_per_class, s.image_size)
        part.result["data_generation_s"] = time.monotonic() - began
    part.result["data"] = {"root": str(ctx.imagenet_root), "classes": s.train_classes, "format": "JPEG",
                           "train_images": s.train_classes * s.train_per_class,
                           "val_images": s.train_classes * s.val_per_class, "image_size_wh": list(s.image_size)}
    return ctx.imagenet_root


def _run_training(part: Part, launcher: Sequence[str], steps: int, log_every: int, skip_steps: int,
                  extra: Sequence[str] = ()) -> Path:
    """Train the recipe on the generated data; record throughput, final metrics and the export's zeros."""
    ctx, s, r = part.ctx, part.ctx.sizes, part.result
    out = ctx.work_dir / part.name
    overrides = train_overrides(s, _imagenet_data(part), out, steps, log_every) + list(extra)
    part.run([*launcher, "scripts/train.py", s.train_recipe, *overrides])
    r["recipe"], r["overrides"] = s.train_recipe, overrides
    r["loop"] = loop_throughput(JsonlLogger(out / "metrics.jsonl").read(), s.train_batch, skip_steps)
    final = final_record(out)
    r["final"] = {k: final.get(k) for k in ("step", "eval_top1", "sparsity", "sparse_mflops", "dense_mflops",
                                            "num_processes", "frozen")}
    r["export"] = {**export_zero_fraction(out), "loads_with_plain_timm": True}
    if abs(r["export"]["zero_fraction"] - final["sparsity"]) > 1e-4:
        raise PartFailed(f"export has {r['export']['zero_fraction']:.6f} zeros, the final record says "
                         f"{final['sparsity']:.6f}")
    if final["step"] != steps:
        raise PartFailed(f"the run stopped at step {final['step']}, not {steps}")
    return out


def part_train_loop(part: Part) -> None:
    ctx, s = part.ctx, part.ctx.sizes
    _run_training(part, [ctx.python], s.train_steps, s.train_log_every, s.train_skip_steps)
    # the loader alone, same recipe and workers: is the loop bound by data or by the model?
    loader = part.result["loader_only"] = part.run_json(
        [ctx.python, "-m", "acceptance.parts", "loader", s.train_recipe, *part.result["overrides"], "--batches",
         str(s.loader_batches)], "loader_only")
    where = {"whole_loop_images_per_s": part.result["loop"]["images_per_s"],
             "loader_only_images_per_s": loader["images_per_s"], "model_only_images_per_s": None,
             "model_only_source": "benchmark_eager did not run at this batch size in this call"}
    bench = ctx.records.get("benchmark_eager", {})
    if bench.get("status") == "ok" and bench["result"].get("batch_size") == s.train_batch:
        where["model_only_images_per_s"] = bench["result"]["st3_images_per_s"]
        where["model_only_source"] = "benchmark_eager st3 (synthetic batch on the device, same batch size)"
        where["bound_by"] = "data loader" if loader["images_per_s"] < where["model_only_images_per_s"] else "model"
    part.result["where_time_goes"] = where


def _distributed(part: Part, config: Path, evidence_pattern: str, what: str) -> None:
    """The recipe under an accelerate engine config; engaged only if its checkpoint holds the engine's files."""
    ctx, s = part.ctx, part.ctx.sizes
    config_name = str(config.relative_to(ctx.repo))
    launcher = [ctx.python, "-m", "accelerate.commands.launch", "--config_file", config_name, "--num_processes", "1"]
    out = _run_training(part, launcher, s.dist_steps, s.dist_log_every, s.dist_log_every,
                        extra=[f"training.checkpoint_every_steps={s.dist_steps}", "training.keep_checkpoints=1"])
    checkpoint = out / "checkpoints" / f"step_{s.dist_steps:08d}"  # CheckpointManager's folder names
    evidence = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*")
                      if re.search(evidence_pattern, str(p.relative_to(checkpoint))))
    part.result["config"], part.result["engine_evidence"] = config_name, evidence[:20]
    if not evidence:
        raise PartFailed(f"{what} did not engage: its checkpoint holds no file matching {evidence_pattern!r}")


def part_deepspeed_zero2(part: Part) -> None:
    if part.ctx.device != "cuda":
        raise Skip("not available: DeepSpeed ZeRO needs CUDA devices (GPU run only)")
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("not available: deepspeed is not installed (bring .gpu_bundle/wheels from scripts/prepare_gpu_bundle.sh)")
    _distributed(part, part.ctx.repo / "recipes/accelerate_configs/deepspeed_zero2.yaml",
                 r"optim_states|zero_pp_rank", "DeepSpeed ZeRO-2")


def part_fsdp2(part: Part) -> None:
    config = find_fsdp2_config(part.ctx.repo / "recipes/accelerate_configs")
    if config is None:
        raise Skip("not available: no accelerate FSDP2 config in recipes/accelerate_configs yet")
    if part.ctx.device != "cuda":
        raise Skip("not available: the FSDP2 part runs on CUDA devices only (on CPUs: tests/test_fsdp_trainer.py)")
    _distributed(part, config, r"fsdp|\.distcp$", "FSDP2")


def part_train_profile(part: Part) -> None:
    ctx, s = part.ctx, part.ctx.sizes
    prof = ctx.work_dir / "train.prof"
    overrides = train_overrides(s, _imagenet_data(part), ctx.work_dir / part.name, s.profile_steps, s.profile_steps)
    part.run([ctx.python, "-m", "cProfile", "-o", str(prof), "scripts/train.py", s.train_recipe, *overrides])
    summary, text = profile_summary(prof, s.profile_steps)
    (ctx.out_dir / PROFILE_FILE).write_text(f"$ {part.commands[-1]}\n\n{text}")
    part.result.update(summary, profile_file=PROFILE_FILE,
                       note="host wall time (cProfile, main process); GPU work shows where the host waits for it")


def part_sweep(part: Part) -> None:
    ctx, s = part.ctx, part.ctx.sizes
    candidates = [Path(ctx.fmnist_root)] if ctx.fmnist_root else [ctx.repo / c for c in FMNIST_CANDIDATES]
    root = next((c for c in candidates if c.is_dir()), None)  # (an absolute candidate stays itself)
    if root is None:
        raise Skip(f"not available: no Fashion-MNIST IDX folder (looked in {', '.join(map(str, candidates))})")
    recipes = [str(p.relative_to(ctx.repo)) for p in sweep_recipes(ctx.repo / "recipes", s.sweep_max_recipes)]
    overrides = sweep_overrides(s, root)
    planned = [(Path(r).stem, seed) for r in recipes for seed in s.sweep_seeds]
    part.result.update(recipes=[Path(r).stem for r in recipes], seeds=list(s.sweep_seeds), overrides=overrides,
                       planned_runs=len(planned))
    # one sweep process per seed, side by side: small models leave most of one GPU idle
    procs = [part.start([ctx.python, "scripts/sweep.py", "--recipes", *recipes, "--seeds", str(seed), "--output",
                         str(ctx.work_dir / "sweep" / f"seed{seed}"), "--launcher", ctx.python, "--override",
                         *overrides]) for seed in s.sweep_seeds]
    ended = [part.wait(p) for p in procs]
    rows = [r for seed in s.sweep_seeds for r in JsonlLogger(ctx.work_dir / f"sweep/seed{seed}/runs.jsonl").read()]
    done = {(r["recipe"], r["seed"]) for r in rows}
    part.result.update(rows=rows, completed_runs=len(rows), cut=[f"{r}_seed{k}" for r, k in planned
                                                                  if (r, k) not in done])
    if rows:
        part.result["table"] = markdown_table(summarize(rows))
    if not all(ended):
        raise PartTimeout(f"budget ended after {len(rows)} of {len(planned)} runs")
    if any(p.returncode for p in procs):
        raise PartFailed(f"sweep process(es) exited {[p.returncode for p in procs]}")


PARTS: Dict[str, Callable[[Part], None]] = {name: globals().get(f"part_{name}") for name in PART_ORDER}
PARTS.update(benchmark_eager=partial(part_benchmark, compile_=False),
             benchmark_compile=partial(part_benchmark, compile_=True))


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m acceptance.parts loader")
    p.add_argument("what", choices=["loader"], help="images/s of a recipe's training DataLoader alone")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--batches", type=int, default=40)
    args = p.parse_args()
    print(json.dumps(loader_throughput(args.recipe, args.overrides, args.batches)))
