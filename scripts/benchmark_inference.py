#!/usr/bin/env python
"""CPU inference benchmark of pruned timm models: dense eager, dense ``torch.compile``, ONNX Runtime (dense,
when installed) and :func:`st3_hf.sparse_inference`, timed side by side in one process (interleaved rounds).

    python scripts/benchmark_inference.py                                   # the BENCHMARKS.md table
    python scripts/benchmark_inference.py --models resnet50 --sparsities 0.98 --batch-sizes 1 --no-compile
    python scripts/benchmark_inference.py --memory-only --merge-into results/inference/benchmark.json

Each model is pruned in place with one global magnitude threshold over all Conv2d / Linear weights (layers end
up with different sparsities, as under ST-3), at increasing sparsity.  Prints JSON.

The ``memory`` section: one model exported as an st3_hf folder, then loaded in fresh subprocesses (plain timm;
``load_sparse_inference`` from the compact file, timed plan and ``force="sparse"``; dense + ``sparse_inference``),
each followed by one forward: the bytes of the tensors the model holds and the peak resident set (``VmHWM``),
also above a process that only imported the libraries.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import timm
import torch

from st3_hf.inference import sparse_inference
from st3_hf.inference.benchmark import global_magnitude_prune, randomize_norm_layers, time_side_by_side

DEFAULT_CASES = {"resnet50": ([0.9, 0.95, 0.98, 0.99], [1, 16]), "vit_small_patch16_224": ([0.9, 0.98], [1])}


def onnx_runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """The dense model in ONNX Runtime (raises ImportError when it is not installed)."""
    import onnxruntime

    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, input_names=["x"], dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def time_by_op(plan: List[Any]) -> Dict[str, Dict[str, float]]:
    """Where the time goes per op kind (conv3x3, linear...): the planner's per-layer times, dense vs chosen."""
    out: Dict[str, Dict[str, float]] = {}
    for p in (p for p in plan if p.times_ms):
        row = out.setdefault(p.op.split()[0], {"layers": 0, "dense_ms": 0.0, "chosen_ms": 0.0})
        row.update(layers=row["layers"] + 1, dense_ms=round(row["dense_ms"] + p.times_ms["dense"], 3),
                   chosen_ms=round(row["chosen_ms"] + p.times_ms[p.kernel], 3))
    return out


def run_case(model: torch.nn.Module, compiled: Any, x: torch.Tensor, sparsity: float, rounds: int,
             with_onnx: bool) -> Dict[str, Any]:
    achieved = global_magnitude_prune(model, sparsity)
    start = time.perf_counter()
    fast = sparse_inference(model, x)
    plan_s = time.perf_counter() - start
    with torch.no_grad():
        expected = model(x)
        runners: Dict[str, Callable[[], Any]] = {"dense_eager": lambda: model(x), "sparse_inference": lambda: fast(x)}
        if compiled is not None:
            runners["dense_compile"] = lambda: compiled(x)
        result: Dict[str, Any] = {"sparsity": achieved, "batch_size": x.shape[0],
                                  "max_abs_diff": float((fast(x) - expected).abs().max())}
        if with_onnx:
            try:
                runners["dense_onnxruntime"] = onnx_runner(model, x)
            except ImportError as e:
                result["onnxruntime"] = f"left out: {e}"
        ms = time_side_by_side(runners, rounds=rounds)
    for stat in ("median_ms", "best_ms"):
        result[stat] = {name: round(value[stat], 3) for name, value in ms.items()}
        # how many times faster ours is than each dense runner (> 1: ours is faster)
        result[f"speedup_{stat[:-3]}"] = {name: round(value[stat] / ms["sparse_inference"][stat], 3)
                                          for name, value in ms.items() if name != "sparse_inference"}
    result["speedup_over_dense"] = result["speedup_median"]["dense_eager"]
    result["time_by_op_ms"], summary = time_by_op(fast.plan), fast.summary()
    result["plan"] = {"seconds_to_plan": round(plan_s, 1),
                      **{k: summary[k] for k in ("sparse_layers", "dense_layers", "whole_model_ms", "kernels")},
                      "sparse": [f"{p.layer} {p.sparsity:.3f} {p.kernel}" for p in fast.plan if p.kernel != "dense"],
                      "dense": [f"{p.layer} {p.sparsity:.3f}: {p.reason}" for p in fast.plan if p.kernel == "dense"]}
    return result


# what each memory subprocess loads; all end with one forward of the example batch, saved for the comparison
_LOADERS = {
    "imports_only": "model = None",
    "dense_timm": "model = timm.create_model(f'local-dir:{folder}', pretrained=True)\nmodel.eval()",
    "sparse_from_compact": "model = load_sparse_inference(folder, x)",
    "sparse_from_compact_forced": "model = load_sparse_inference(folder, x, force='sparse')",
    "dense_plus_sparse_inference": ("dense = timm.create_model(f'local-dir:{folder}', pretrained=True)\n"
                                    "dense.eval()\nmodel = st3_hf.sparse_inference(dense, x)\nkept.append(dense)"),
}
_CHILD = """
import json, sys, time
import safetensors.torch, timm, torch
import st3_hf
from st3_hf.hub import load_sparse_inference
from st3_hf.inference import tensor_bytes
folder, threads, size, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
torch.manual_seed(0)
x = torch.randn(batch, 3, size, size)
kept = []  # models the process holds besides ``model``
start = time.perf_counter()
{load}
seconds = time.perf_counter() - start
report = {{"load_seconds": round(seconds, 1)}}
if model is not None:
    inner = getattr(model, "model", model)  # a sparse model's timm model, its layers replaced by the kernels
    with torch.no_grad():
        safetensors.torch.save_file({{"logits": model(x).contiguous(),
                                      "features": inner.forward_features(x).contiguous()}}, out)
    report["tensor_bytes"] = tensor_bytes(torch.nn.ModuleList([model, *kept]))
    if hasattr(model, "plan"):
        report["kernels"] = model.summary()["kernels"]
# this process's own memory (Linux; ru_maxrss would start at the parent's RSS at fork): VmHWM, the peak resident
# set, code pages of the libraries included; RssAnon, the data held at the end
with open("/proc/self/status") as status:
    fields = dict(line.split(":", 1) for line in status)
report["max_rss_bytes"] = int(fields["VmHWM"].split()[0]) * 1024
report["rss_anon_bytes"] = int(fields["RssAnon"].split()[0]) * 1024
print(json.dumps(report))
"""


def random_model(name: str) -> torch.nn.Module:
    """``name`` in eval mode with random norm statistics: every branch reaches the output, comparisons see it."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    model.eval()
    randomize_norm_layers(model)
    return model


def export_pruned(name: str, sparsity: float, folder: Path, input_size: int) -> float:
    """:func:`random_model` magnitude-pruned, exported as an st3_hf folder; returns the sparsity reached."""
    from st3_hf import SparsityConfig, sparsify
    from st3_hf.hub import export_pretrained

    achieved = global_magnitude_prune(model := random_model(name), sparsity)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=sparsity))
    sparsifier.freeze_from_zeros()  # the masks are the zeros just made
    export_pretrained(model, sparsifier, folder, data_pretrained_cfg={
        "input_size": (3, input_size, input_size), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "num_classes": int(model.num_classes)})
    return achieved


def memory_report(name: str, sparsity: float, input_size: int, batch: int, threads: int) -> Dict[str, Any]:
    """The ``memory`` section: tensor bytes and peak RSS of each way of loading, each in a fresh subprocess."""
    import safetensors.torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        achieved = export_pruned(name, sparsity, folder, input_size)
        report: Dict[str, Any] = {
            "model": name, "sparsity": round(achieved, 4), "input_size": input_size, "batch_size": batch,
            "threads": threads, "files_bytes": {f: (folder / f).stat().st_size
                                                for f in ("model.safetensors", "model.sparse.safetensors")}}
        outputs: Dict[str, Dict[str, torch.Tensor]] = {}
        for label, load in _LOADERS.items():
            out = Path(tmp) / f"{label}.safetensors"
            proc = subprocess.run([sys.executable, "-c", _CHILD.format(load=load), str(folder), str(threads),
                                   str(input_size), str(batch), str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"memory run {label} failed: {proc.stderr.strip().splitlines()[-1:]}")
            report[label] = json.loads(proc.stdout.strip().splitlines()[-1])
            if out.exists():
                outputs[label] = safetensors.torch.load_file(str(out))
    base = report["imports_only"]
    for label in list(_LOADERS)[1:]:  # each above imports_only
        for key in ("max_rss_bytes", "rss_anon_bytes"):
            report[label][key.replace("_bytes", "_over_imports_bytes")] = report[label][key] - base[key]
        # the logits alone can hide errors: at high global sparsity a random-init classifier is pruned whole
        for key in ("logits", "features"):
            report[label][f"max_abs_diff_to_dense_{key}"] = float(
                (outputs[label][key] - outputs["dense_timm"][key]).abs().max())
    report["dense_timm"]["max_abs_features"] = float(outputs["dense_timm"]["features"].abs().max())
    dense, sparse = report["dense_timm"], report["sparse_from_compact"]
    report["dense_over_sparse_tensor_bytes"] = round(dense["tensor_bytes"] / sparse["tensor_bytes"], 2)
    report["dense_over_sparse_rss_over_imports"] = round(
        dense["max_rss_over_imports_bytes"] / max(sparse["max_rss_over_imports_bytes"], 1), 2)
    return report


def markdown_table(report: Dict[str, Any]) -> str:
    """The BENCHMARKS.md table of a saved report: times are medians of the interleaved rounds."""
    lines = ["| model | sparsity | batch | dense eager ms | ours ms | x eager (median / best round) | x compile | "
             "x ONNX Runtime | max abs diff | layers sparse / dense |", "|" + "---|" * 10]
    for r in report["results"]:
        median, best = r["speedup_median"], r["speedup_best"]
        lines.append(
            f"| {r['model']} | {r['sparsity']:.2f} | {r['batch_size']} | {r['median_ms']['dense_eager']:.0f} | "
            f"{r['median_ms']['sparse_inference']:.0f} | {median['dense_eager']:.2f} / {best['dense_eager']:.2f} | "
            f"{median.get('dense_compile', float('nan')):.2f} | {median.get('dense_onnxruntime', float('nan')):.2f} | "
            f"{r['max_abs_diff']:.1e} | {r['plan']['sparse_layers']} / {r['plan']['dense_layers']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_CASES))
    parser.add_argument("--sparsities", nargs="*", type=float, help="default: per model, as in BENCHMARKS.md")
    parser.add_argument("--batch-sizes", nargs="*", type=int, help="default: per model, as in BENCHMARKS.md")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-compile", action="store_true", help="leave out dense torch.compile")
    parser.add_argument("--no-onnx", action="store_true", help="leave out ONNX Runtime")
    parser.add_argument("--table", metavar="REPORT_JSON", help="print the markdown table of a saved report and exit")
    parser.add_argument("--no-memory", action="store_true", help="leave out the memory section")
    parser.add_argument("--memory-only", action="store_true", help="measure the memory section only")
    parser.add_argument("--memory-model", default="resnet50")
    parser.add_argument("--memory-sparsity", type=float, default=0.98)
    parser.add_argument("--memory-batch-size", type=int, default=1)
    parser.add_argument("--merge-into", metavar="REPORT_JSON",
                        help="with --memory-only: write the memory section into this saved report (its timings kept)")
    args = parser.parse_args()
    if args.table:
        return print(markdown_table(json.loads(Path(args.table).read_text())))
    torch.set_num_threads(args.threads)
    memory = None if args.no_memory else memory_report(args.memory_model, args.memory_sparsity, args.input_size,
                                                        args.memory_batch_size, args.threads)
    if args.memory_only:
        if args.merge_into:
            merged = {**json.loads(Path(args.merge_into).read_text()), "memory": memory}
            Path(args.merge_into).write_text(json.dumps(merged, indent=1) + "\n")
        return print(json.dumps(memory, indent=1))
    out: Dict[str, Any] = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU", "threads": args.threads,
                           "torch": torch.__version__, "rounds": args.rounds, "results": [],
                           **({} if memory is None else {"memory": memory})}
    for name in args.models:
        sparsities, batch_sizes = DEFAULT_CASES.get(name, ([0.9, 0.98], [1]))
        for batch in args.batch_sizes or batch_sizes:
            model = random_model(name)
            x = torch.randn(batch, 3, args.input_size, args.input_size)
            compiled, start = None if args.no_compile else torch.compile(model), time.perf_counter()
            if compiled is not None:
                with torch.no_grad():
                    compiled(x)  # compile once per batch size; pruning in place changes weights, not the graph
                out.setdefault("compile_seconds", {})[f"{name}/{batch}"] = round(time.perf_counter() - start, 1)
            for sparsity in sorted(args.sparsities or sparsities):
                row = run_case(model, compiled, x, sparsity, args.rounds, not args.no_onnx)
                out["results"].append({"model": name, **row})
                print(json.dumps({k: v for k, v in row.items() if k != "plan"}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
