"""The acceptance parts and the loop that runs them, each inside its own budget, one JSON line each.

>>> from acceptance.driver import run_acceptance
>>> records = run_acceptance("cpu", "/tmp/acc_out", parts=["environment"], budget_s=60)  # doctest: +SKIP
>>> records[0]["part"], records[0]["status"]  # doctest: +SKIP
('environment', 'ok')
"""
from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from st3_hf.train.metrics_log import JsonlLogger
from acceptance.imagenet_layout import write_imagenet_layout
from acceptance.measure import export_zero_fraction, loop_throughput, profile_summary
from acceptance.plan import (CPU_BUDGETS_S, GPU_BUDGETS_S, MIN_START_S, PART_ORDER, Sizes, cuda_test_files, find_fsdp2_config,
                   sizes_for, sweep_overrides, sweep_recipes, train_overrides)
from acceptance.records import PartTimeout, RecordWriter, kill_group, log_tail, run_command, start, wait

RECORDS_FILE = "acceptance.jsonl"
LOG_FILE = "acceptance.log"
PROFILE_FILE = "profile_train.txt"
REPO = Path(__file__).resolve().parents[2]
FMNIST_CANDIDATES = ("/usr/share/datasets/fashion-mnist", ".gpu_bundle/fashion-mnist")
# BENCHMARKS.md's GPU targets for ResNet-50, batch 256, bf16, channels_last, during the ramp to 98%
TARGETS = {"st3_over_dense": 1.02, "peak_memory_ratio": 1.05, "update_ms": 2.0}


class Skip(Exception):
    """The part cannot run here; its message is the record's ``reason`` ("not available: ...")."""


class PartFailed(Exception):
    """The part ran and something it checks is wrong (message: what)."""


class Context:
    """What every part sees: device, sizes, folders, the records written so far, the overall deadline."""

    def __init__(self, device: str, out_dir: Path, work_dir: Path, repo: Path, fmnist_root: Optional[Path],
                 deadline: float) -> None:
        self.device, self.sizes = device, sizes_for(device)
        self.out_dir, self.work_dir, self.repo, self.deadline = out_dir, work_dir, repo, deadline
        self.fmnist_root = fmnist_root
        self.records: Dict[str, Dict[str, Any]] = {}
        self.python = sys.executable
        path = os.pathsep.join(p for p in (str(repo), str(repo / "scripts"), os.environ.get("PYTHONPATH", "")) if p)
        self.env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                        HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.imagenet_root: Optional[Path] = None


class Part:
    """One part's run: its deadline, the commands it ran, its log, and the result so far (kept on a timeout)."""

    def __init__(self, ctx: Context, name: str, deadline: float) -> None:
        self.ctx, self.name, self.deadline = ctx, name, deadline
        self.commands: List[str] = []
        self.result: Dict[str, Any] = {}
        self.log_path = ctx.work_dir / "logs" / f"{name}.log"

    def run(self, cmd: Sequence[str], stdout_path: Optional[Path] = None, check: bool = True) -> int:
        finished = run_command(cmd, self.deadline, self.log_path, self.ctx.env, self.ctx.repo, stdout_path)
        self.commands.append(finished.command)
        if finished.timed_out:
            raise PartTimeout(f"killed at the part's deadline after {finished.wall_s:.0f} s: {finished.command}")
        if check and finished.returncode != 0:
            raise PartFailed(f"exit {finished.returncode}: {finished.command}")
        return int(finished.returncode or 0)


# ---------------------------------------------------------------------------------------------- parts
def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def part_environment(part: Part) -> None:
    import torch

    ctx = part.ctx
    r = part.result
    r["python"] = platform.python_version()
    r["packages"] = {n: _version(n) for n in ("torch", "torchvision", "timm", "accelerate", "transformers",
                                              "datasets", "evaluate", "deepspeed", "huggingface_hub", "safetensors")}
    r["cpu_count"] = os.cpu_count()
    r["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        r["device_name"], r["device_memory_gib"] = props.name, props.total_memory / 2**30
        r["device_count"] = torch.cuda.device_count()
    else:
        r["device_name"] = platform.processor() or platform.machine()
    try:
        r["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ctx.repo, capture_output=True,
                                         text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        r["git_commit"] = None
    missing = []
    for name in ("datasets", "evaluate"):  # carried as wheels to the GPU machine: do they import there?
        try:
            importlib.import_module(name)
        except Exception as err:  # an ImportError, or a version clash with the machine's own packages
            missing.append(f"{name} ({type(err).__name__}: {err})"[:300])
    r["missing_packages"] = missing
    if ctx.device == "cuda" and not torch.cuda.is_available():
        raise PartFailed("--device cuda, but torch sees no CUDA device")
    if missing:
        raise PartFailed(f"missing packages {missing}: carry them as wheels (scripts/prepare_gpu_bundle.sh)")


def part_cuda_tests(part: Part) -> None:
    ctx = part.ctx
    files = cuda_test_files(ctx.repo / "tests")
    junit = ctx.work_dir / "cuda_tests.xml"
    rc = part.run([ctx.python, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={junit}",
                   *[str(f.relative_to(ctx.repo)) for f in files]], check=False)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed_names = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                    if c.find("failure") is not None or c.find("error") is not None]
    part.result.update(files=[f.name for f in files], exit_code=rc, failed_tests=failed_names, **counts)
    if counts["failures"] or counts["errors"] or rc not in (0, 5):
        raise PartFailed(f"{counts['failures']} failed, {counts['errors']} errors: {failed_names[:5]}")
    if ctx.device == "cuda" and counts["skipped"] == counts["tests"]:
        raise PartFailed("every CUDA test was skipped on a --device cuda run: pytest saw no GPU")


def _benchmark(part: Part, compile_: bool) -> None:
    ctx, s = part.ctx, part.ctx.sizes
    if compile_ and s.compile_skip_reason:
        raise Skip(s.compile_skip_reason)
    stdout = ctx.work_dir / f"{part.name}.json"
    cmd = [ctx.python, "scripts/benchmark.py", "--device", ctx.device, "--model", s.bench_model,
           "--batch-size", str(s.bench_batch), "--input-size", str(s.bench_input), "--num-classes",
           str(s.bench_num_classes), "--steps", str(s.bench_steps), "--rounds", str(s.bench_rounds),
           "--warmup", str(s.bench_warmup), "--amp", s.bench_amp, "--target", "0.98"]
    cmd += ["--channels-last"] if s.bench_channels_last else []
    cmd += ["--compile"] if compile_ else []
    part.run(cmd, stdout_path=stdout)
    lines = [line for line in stdout.read_text().splitlines() if line.strip().startswith("{")]
    if not lines:
        raise PartFailed("benchmark.py printed no JSON object")
    result = json.loads(lines[-1])
    for variant in ("dense", "st3", "naive_st3", "st3_guarded"):
        result[f"{variant}_images_per_s"] = 1e3 * s.bench_batch / result[f"{variant}_step_ms"]
    if ctx.device == "cuda":
        ratio = result["st3_peak_mib"] / result["dense_peak_mib"]
        values = {"st3_over_dense": result["st3_over_dense"], "peak_memory_ratio": ratio, "update_ms": result["update_ms"]}
        result["targets"] = {k: {"value": v, "target": TARGETS[k], "met": v <= TARGETS[k]} for k, v in values.items()}
    part.result.update(result)


def part_benchmark_eager(part: Part) -> None:
    _benchmark(part, compile_=False)


def part_benchmark_compile(part: Part) -> None:
    _benchmark(part, compile_=True)


def _imagenet_data(part: Part) -> Path:
    """Generate the ImageNet-layout JPEGs once per driver run (the distributed parts reuse them)."""
    ctx, s = part.ctx, part.ctx.sizes
    if ctx.imagenet_root is None:
        began = time.monotonic()
        root = write_imagenet_layout(ctx.work_dir / "imagenet", s.train_classes, s.train_per_class, s.val_per_class,
                                     s.image_size)
        part.result["data_generation_s"] = time.monotonic() - began
        ctx.imagenet_root = root
    part.result["data"] = {"root": str(ctx.imagenet_root), "classes": s.train_classes,
                           "train_images": s.train_classes * s.train_per_class,
                           "val_images": s.train_classes * s.val_per_class,
                           "image_size_wh": list(s.image_size), "format": "JPEG"}
    return ctx.imagenet_root


def _run_training(part: Part, launcher: Sequence[str], steps: int, log_every: int, skip_steps: int,
                  extra: Sequence[str] = ()) -> Path:
    """Train the recipe on the generated data; record throughput, final metrics and the export's zeros."""
    ctx, s = part.ctx, part.ctx.sizes
    data_root = _imagenet_data(part)
    out = ctx.work_dir / part.name
    overrides = train_overrides(s, data_root, out, steps, log_every) + list(extra)
    part.run([*launcher, "scripts/train.py", s.train_recipe, *overrides])
    records = JsonlLogger(out / "metrics.jsonl").read()
    part.result["recipe"], part.result["overrides"] = s.train_recipe, overrides
    part.result["loop"] = loop_throughput(records, s.train_batch, skip_steps)
    finals = [r for r in records if r.get("kind") == "final"]
    if not finals:
        raise PartFailed(f"no final evaluation record in {out / 'metrics.jsonl'}")
    final = finals[-1]
    part.result["final"] = {k: final.get(k) for k in ("step", "eval_top1", "sparsity", "sparse_mflops",
                                                       "dense_mflops", "num_processes", "frozen")}
    exported = export_zero_fraction(out)
    part.result["export"] = {**exported, "loads_with_plain_timm": True}
    if abs(exported["zero_fraction"] - final["sparsity"]) > 1e-4:
        raise PartFailed(f"export has {exported['zero_fraction']:.6f} zeros, the final record says {final['sparsity']:.6f}")
    if final["step"] != steps:
        raise PartFailed(f"the run stopped at step {final['step']}, not {steps}")
    return out


def part_train_loop(part: Part) -> None:
    ctx, s = part.ctx, part.ctx.sizes
    _run_training(part, [ctx.python], s.train_steps, s.train_log_every, s.train_skip_steps)
    # the loader alone, same recipe and workers: is the loop bound by data or by the model?
    stdout = ctx.work_dir / "loader_only.json"
    overrides = part.result["overrides"]
    part.run([ctx.python, "-m", "acceptance.measure", "loader", s.train_recipe, *overrides,
              "--batches", str(s.loader_batches)], stdout_path=stdout)
    loader = json.loads(stdout.read_text().strip().splitlines()[-1])
    part.result["loader_only"] = loader
    where = {"whole_loop_images_per_s": part.result["loop"]["images_per_s"],
             "loader_only_images_per_s": loader["images_per_s"]}
    bench = ctx.records.get("benchmark_eager", {})
    if bench.get("status") == "ok" and bench["result"].get("batch_size") == s.train_batch:
        where["model_only_images_per_s"] = bench["result"]["st3_images_per_s"]
        where["model_only_source"] = "benchmark_eager st3 (synthetic batch on the device, same batch size)"
        where["bound_by"] = "data loader" if loader["images_per_s"] < where["model_only_images_per_s"] else "model"
    else:
        where["model_only_images_per_s"] = None
        where["model_only_source"] = "benchmark_eager did not run at this batch size in this call"
    part.result["where_time_goes"] = where


def _engine_evidence(checkpoint_dir: Path, pattern: str) -> List[str]:
    names = [str(p.relative_to(checkpoint_dir)) for p in checkpoint_dir.rglob("*")] if checkpoint_dir.is_dir() else []
    return sorted(n for n in names if re.search(pattern, n))


def _distributed(part: Part, config: Path, evidence_pattern: str, what: str) -> None:
    ctx, s = part.ctx, part.ctx.sizes
    launcher = [ctx.python, "-m", "accelerate.commands.launch", "--config_file", str(config.relative_to(ctx.repo)),
                "--num_processes", "1"]
    out = _run_training(part, launcher, s.dist_steps, s.dist_log_every, s.dist_log_every,
                        extra=[f"training.checkpoint_every_steps={s.dist_steps}", "training.keep_checkpoints=1"])
    evidence = _engine_evidence(out / "checkpoints" / f"step_{s.dist_steps}", evidence_pattern)
    part.result["config"] = str(config.relative_to(ctx.repo))
    part.result["engine_evidence"] = evidence[:20]
    if not evidence:
        raise PartFailed(f"{what} did not engage: its checkpoint holds no file matching {evidence_pattern!r}")


def part_deepspeed_zero2(part: Part) -> None:
    ctx = part.ctx
    if ctx.device != "cuda":
        raise Skip("not available: DeepSpeed ZeRO needs CUDA devices (GPU run only)")
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("not available: deepspeed is not installed (carry .gpu_bundle/wheels)")
    _distributed(part, ctx.repo / "recipes/accelerate_configs/deepspeed_zero2.yaml", r"optim_states|zero_pp_rank",
                 "DeepSpeed ZeRO-2")


def part_fsdp2(part: Part) -> None:
    ctx = part.ctx
    config = find_fsdp2_config(ctx.repo / "recipes/accelerate_configs")
    if config is None:
        raise Skip("not available: no accelerate FSDP2 config in recipes/accelerate_configs yet")
    if ctx.device != "cuda":
        raise Skip("not available: the FSDP2 part runs on CUDA devices only (its CPU tests belong to the FSDP2 issue)")
    _distributed(part, config, r"fsdp|\.distcp$", "FSDP2")


def part_train_profile(part: Part) -> None:
    ctx, s = part.ctx, part.ctx.sizes
    data_root = _imagenet_data(part)
    out = ctx.work_dir / part.name
    prof = ctx.work_dir / "train.prof"
    overrides = train_overrides(s, data_root, out, s.profile_steps, s.profile_steps)
    part.run([ctx.python, "-m", "cProfile", "-o", str(prof), "scripts/train.py", s.train_recipe, *overrides])
    summary, text = profile_summary(prof, s.profile_steps)
    (ctx.out_dir / PROFILE_FILE).write_text(f"$ {part.commands[-1]}\n\n{text}")
    part.result.update(summary, profile_file=PROFILE_FILE,
                       note="host wall time (cProfile, main process); GPU work shows where the host waits for it")


def part_sweep(part: Part) -> None:
    from sweep import markdown_table, summarize

    ctx, s = part.ctx, part.ctx.sizes
    root = ctx.fmnist_root or next((Path(c) if Path(c).is_absolute() else ctx.repo / c for c in FMNIST_CANDIDATES
                                    if (Path(c) if Path(c).is_absolute() else ctx.repo / c).is_dir()), None)
    if root is None or not root.is_dir():
        raise Skip(f"not available: no Fashion-MNIST IDX folder (looked in {', '.join(FMNIST_CANDIDATES)})")
    recipes = [str(p.relative_to(ctx.repo)) for p in sweep_recipes(ctx.repo / "recipes", s.sweep_max_recipes)]
    overrides = sweep_overrides(s, root)
    planned = [(Path(r).stem, seed) for r in recipes for seed in s.sweep_seeds]
    part.result.update(recipes=[Path(r).stem for r in recipes], seeds=list(s.sweep_seeds), overrides=overrides,
                       planned_runs=len(planned))
    # one sweep process per seed, side by side: small models leave most of one GPU idle
    procs = []
    for seed in s.sweep_seeds:
        cmd = [ctx.python, "scripts/sweep.py", "--recipes", *recipes, "--seeds", str(seed), "--output",
               str(ctx.work_dir / "sweep" / f"seed{seed}"), "--launcher", ctx.python, "--override", *overrides]
        procs.append(start(cmd, part.log_path, ctx.env, ctx.repo))
        part.commands.append(" ".join(cmd))
    ended = [wait(p, part.deadline) for p in procs]
    for p in procs:
        kill_group(p)
    rows = [r for seed in s.sweep_seeds
            for r in JsonlLogger(ctx.work_dir / "sweep" / f"seed{seed}" / "runs.jsonl").read()]
    done = {(r["recipe"], r["seed"]) for r in rows}
    part.result.update(rows=rows, completed_runs=len(rows), cut=[f"{r}_seed{k}" for r, k in planned if (r, k) not in done])
    if rows:
        part.result["table"] = markdown_table(summarize(rows))
    if not all(ended):
        raise PartTimeout(f"budget ended after {len(rows)} of {len(planned)} runs")
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        raise PartFailed(f"sweep process(es) exited {bad}")


PARTS: Dict[str, Callable[[Part], None]] = {
    "environment": part_environment,
    "cuda_tests": part_cuda_tests,
    "benchmark_eager": part_benchmark_eager,
    "benchmark_compile": part_benchmark_compile,
    "train_loop": part_train_loop,
    "deepspeed_zero2": part_deepspeed_zero2,
    "fsdp2": part_fsdp2,
    "train_profile": part_train_profile,
    "sweep": part_sweep,
}
assert tuple(PARTS) == PART_ORDER


# ---------------------------------------------------------------------------------------------- driver
def run_acceptance(device: str, out_dir: Path | str, parts: Optional[Sequence[str]] = None, budget_s: float = 500,
                   part_budgets: Optional[Dict[str, float]] = None, work_dir: Optional[Path | str] = None,
                   fmnist_root: Optional[Path | str] = None, repo: Path = REPO) -> List[Dict[str, Any]]:
    """Run ``parts`` (default: all, in :data:`~acceptance.plan.PART_ORDER`) within ``budget_s`` seconds
    overall; append each part's record to ``out_dir/acceptance.jsonl`` as it ends and return them all."""
    began = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else Path("/tmp/st3_acceptance")
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(device, out_dir, work, repo, Path(fmnist_root) if fmnist_root else None, began + budget_s)
    budgets = {**(GPU_BUDGETS_S if device == "cuda" else CPU_BUDGETS_S), **(part_budgets or {})}
    writer = RecordWriter(out_dir / RECORDS_FILE)
    written: List[Dict[str, Any]] = []
    for name in parts or PART_ORDER:
        now = time.monotonic()
        remaining = ctx.deadline - now
        budget = min(budgets[name], remaining)
        part = Part(ctx, name, now + budget)
        record: Dict[str, Any] = {"part": name, "device": device, "budget_s": budget,
                                  "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if name in ctx.sizes.cuts:
            record["cut"] = ctx.sizes.cuts[name]
        if remaining < MIN_START_S:
            record.update(status="skipped", reason=f"not started: {remaining:.0f} s left of the overall --budget-s {budget_s:g}")
        else:
            try:
                PARTS[name](part)
                record["status"] = "ok"
            except Skip as err:
                record.update(status="skipped", reason=str(err))
            except PartTimeout as err:
                record.update(status="timeout", reason=str(err))
            except Exception as err:  # a broken part must not stop the parts after it
                record.update(status="failed", reason=f"{type(err).__name__}: {err}")
        record.update(wall_s=time.monotonic() - now, commands=part.commands, result=part.result)
        if record["status"] in ("failed", "timeout"):
            record["log_tail"] = log_tail(part.log_path)
        writer.write(record)
        ctx.records[name] = record
        written.append(record)
        with (out_dir / LOG_FILE).open("a") as log:
            log.write(f"\n===== {name}: {record['status']} ({record['wall_s']:.1f} s) {record.get('reason', '')}\n")
            log.write(log_tail(part.log_path, 6000))
        print(f"[acceptance] {name}: {record['status']} in {record['wall_s']:.1f} s {record.get('reason', '')}",
              flush=True)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    from acceptance.plan import parse_part_budgets, parse_parts

    p = argparse.ArgumentParser(prog="gpu_acceptance.py", description="Run the GPU acceptance parts; one JSON line each.")
    p.add_argument("--device", choices=["cuda", "cpu"], required=True, help="cpu: the tiny dry run")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for acceptance.jsonl (default: $OUT)")
    p.add_argument("--parts", default="all", help=f"comma-separated, from: {', '.join(PART_ORDER)}")
    p.add_argument("--budget-s", type=float, default=500, help="overall seconds; parts not started past it")
    p.add_argument("--part-budget", action="append", default=[], metavar="NAME=SECONDS")
    p.add_argument("--work-dir", default=None, help="scratch folder (default /tmp/st3_acceptance)")
    p.add_argument("--fmnist-root", default=None, help="Fashion-MNIST IDX folder (default: found)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out is required when $OUT is not set")
    try:
        parts, budgets = parse_parts(args.parts), parse_part_budgets(args.part_budget)
    except ValueError as err:
        p.error(str(err))
    records = run_acceptance(args.device, args.out, parts, args.budget_s, budgets, args.work_dir, args.fmnist_root)
    print("\n".join(f"{r['part']:18s} {r['status']:8s} {r['wall_s']:7.1f} s  {r.get('reason', '')[:90]}"
                    for r in records))
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1
