#!/usr/bin/env python
"""CPU inference benchmark of pruned timm models: dense eager, dense ``torch.compile``, ONNX Runtime (dense,
when installed) and :func:`st3_hf.sparse_inference`, timed side by side in one process (interleaved rounds).

    python scripts/benchmark_inference.py                                   # the BENCHMARKS.md table
    python scripts/benchmark_inference.py --models resnet50 --sparsities 0.98 --batch-sizes 1 --no-compile

Each model is pruned with one global magnitude threshold over all Conv2d / Linear weights (layers end up
with different sparsities, as under ST-3's global threshold), at increasing sparsity, in place.  Prints JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
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
    """Where the time goes: per op kind (conv3x3, conv1x1, linear...), the summed per-layer times measured
    while planning, dense vs the kernels chosen (layers not timed are left out)."""
    out: Dict[str, Dict[str, float]] = {}
    for p in plan:
        if p.times_ms:
            row = out.setdefault(p.op.split()[0], {"layers": 0, "dense_ms": 0.0, "chosen_ms": 0.0})
            row["layers"] += 1
            row["dense_ms"] = round(row["dense_ms"] + p.times_ms["dense"], 3)
            row["chosen_ms"] = round(row["chosen_ms"] + p.times_ms[p.kernel], 3)
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
    summary = fast.summary()
    for stat in ("median_ms", "best_ms"):
        result[stat] = {name: round(value[stat], 3) for name, value in ms.items()}
        # how many times faster ours is than each dense runner (> 1: ours is faster)
        result[f"speedup_{stat[:-3]}"] = {name: round(value[stat] / ms["sparse_inference"][stat], 3)
                                          for name, value in ms.items() if name != "sparse_inference"}
    result["speedup_over_dense"] = result["speedup_median"]["dense_eager"]
    result["time_by_op_ms"] = time_by_op(fast.plan)
    result["plan"] = {"seconds_to_plan": round(plan_s, 1), "sparse_layers": summary["sparse_layers"],
                      "dense_layers": summary["dense_layers"], "whole_model_ms": summary["whole_model_ms"],
                      "kernels": summary["kernels"],
                      "sparse": [f"{p.layer} {p.sparsity:.3f} {p.kernel}" for p in fast.plan if p.kernel != "dense"],
                      "dense": [f"{p.layer} {p.sparsity:.3f}: {p.reason}" for p in fast.plan if p.kernel == "dense"]}
    return result


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
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            print(markdown_table(json.load(f)))
        return
    torch.set_num_threads(args.threads)
    out: Dict[str, Any] = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU", "threads": args.threads,
                           "torch": torch.__version__, "rounds": args.rounds, "results": []}
    for name in args.models:
        sparsities, batch_sizes = DEFAULT_CASES.get(name, ([0.9, 0.98], [1]))
        for batch in args.batch_sizes or batch_sizes:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False)
            model.eval()
            randomize_norm_layers(model)  # every branch reaches the output: max_abs_diff sees every layer
            x = torch.randn(batch, 3, args.input_size, args.input_size)
            compiled = None
            if not args.no_compile:
                compiled = torch.compile(model)
                start = time.perf_counter()
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
