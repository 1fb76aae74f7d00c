"""The GPU acceptance driver, dry-run on the CPU through its real command line: one JSON line per part,
in order, each part's figures re-derived here from what its runs left behind; budgets cut parts and
leave the earlier records; the sweep runs the recipes in order of value."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from data_utils import fashion_mnist_available
from train_utils import REPO, env
from gpu_acceptance import RECORDS_FILE, STATUSES, read_records, run_acceptance, write_record
from acceptance.parts import loop_throughput
from acceptance.plan import (CPU, MIN_START_S, PART_ORDER, find_fsdp2_config, parse_part_budgets, parse_parts,
                             sweep_recipes)
from gpu_acceptance import latest_by_part, render
from sweep import final_record, markdown_table, summarize

needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(), reason="needs dataset-fashion-mnist")


def _metrics(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
@needs_fmnist
def test_cpu_dry_run_of_every_part(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, "scripts/gpu_acceptance.py", "--device", "cpu", "--out", str(out),
                           "--work-dir", str(work)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_records(out / RECORDS_FILE)
    assert [r["part"] for r in records] == list(PART_ORDER)
    by = {r["part"]: r for r in records}
    for r in records:
        assert r["status"] in STATUSES and r["device"] == "cpu" and r["wall_s"] <= r["budget_s"] + 5, r

    assert by["environment"]["status"] == "ok" and by["environment"]["result"]["packages"]["torch"]

    tests = by["cuda_tests"]
    assert tests["status"] == "ok" and tests["result"]["tests"] > 0
    assert tests["result"]["skipped"] == tests["result"]["tests"]  # no GPU here: every CUDA test skips cleanly

    bench = by["benchmark_eager"]
    assert bench["status"] == "ok" and bench["result"]["model"] == CPU.bench["model"]
    b = bench["result"]
    assert b["st3_images_per_s"] == pytest.approx(1000 * b["batch_size"] / b["st3_step_ms"])
    assert 0 < b["st3_sparsity"] < 0.98
    assert by["benchmark_compile"]["status"] == "skipped" and "CPU" in by["benchmark_compile"]["reason"]

    loop = by["train_loop"]
    assert loop["status"] == "ok", loop
    metrics = _metrics(work / "train_loop")
    train = [m for m in metrics if m["kind"] == "train" and m["step"] >= CPU.train_skip_steps]
    images_per_s = (train[-1]["step"] - train[0]["step"]) * CPU.train_batch / (train[-1]["elapsed_s"] - train[0]["elapsed_s"])
    assert loop["result"]["loop"]["images_per_s"] == pytest.approx(images_per_s)
    final = [m for m in metrics if m["kind"] == "final"][-1]
    assert final["step"] == CPU.train_steps and 0 < final["sparsity"] < 0.98  # ST-3 really pruned on the way
    assert loop["result"]["export"]["zero_fraction"] == pytest.approx(final["sparsity"], abs=1e-6)
    assert loop["result"]["where_time_goes"]["loader_only_images_per_s"] > 0
    assert "scripts/train.py recipes/r50_st3_98.yaml" in loop["commands"][0]

    for name in ("deepspeed_zero2", "fsdp2"):
        assert by[name]["status"] == "skipped" and by[name]["reason"].startswith("not available"), by[name]

    profile = by["train_profile"]
    assert profile["status"] == "ok", profile
    assert profile["result"]["functions"]["sparsifier update"]["seconds"] > 0
    assert "st3_hf/train/trainer.py" in (out / "profile_train.txt").read_text()

    sweep = by["sweep"]
    assert sweep["status"] == "ok", sweep
    expected = [p.stem for p in sweep_recipes(REPO / "recipes", CPU.sweep_max_recipes)]
    assert expected[0] == "fmnist_dense" and sweep["result"]["recipes"] == expected
    rows = sweep["result"]["rows"]
    assert [(r["recipe"], r["seed"]) for r in rows] == [(name, 0) for name in expected] and sweep["result"]["cut"] == []
    for r in rows:
        assert r["top1"] == final_record(work / "sweep" / "seed0" / "runs" / r["run"])["eval_top1"]

    text = render(latest_by_part([out / RECORDS_FILE]))
    assert markdown_table(summarize(rows)) in text
    assert f"| train_loop | {images_per_s:.1f} |" in text


@pytest.mark.slow
@needs_fmnist
def test_budgets_cut_parts_and_keep_earlier_records(tmp_path):
    sweep_budget = 5.0
    # the sweep starts with the whole budget; after its 5 s less than MIN_START_S is left for the next part
    records = run_acceptance("cpu", tmp_path / "out", parts=["sweep", "train_profile"],
                             budget_s=sweep_budget + MIN_START_S - 1, part_budgets={"sweep": sweep_budget},
                             work_dir=tmp_path / "work")
    assert [r["status"] for r in records] == ["timeout", "skipped"]
    sweep = records[0]
    assert sweep["result"]["completed_runs"] == 0 and len(sweep["result"]["cut"]) == sweep["result"]["planned_runs"] > 0
    assert "not started" in records[1]["reason"]
    assert read_records(tmp_path / "out" / RECORDS_FILE) == json.loads(json.dumps(records))


def test_records_survive_a_torn_last_line_and_refuse_unknown_status(tmp_path):
    path = tmp_path / "a.jsonl"
    write_record(path, {"part": "environment", "status": "ok", "value": math.inf})
    with path.open("a") as f:
        f.write('{"part": "cuda_te')  # a kill mid-write
    assert read_records(path) == [{"part": "environment", "status": "ok", "value": None}]
    with pytest.raises(ValueError, match="status"):
        write_record(path, {"part": "x", "status": "fine"})


def test_sweep_recipes_in_order_of_value(tmp_path):
    for stem in ("fmnist_gmp_90", "fmnist_feather_98", "fmnist_dense", "fmnist_st3_98", "fmnist_st3sigma_99",
                 "fmnist_st3sigma_98", "fmnist_newmethod_98"):
        (tmp_path / f"{stem}.yaml").write_text("inherit: base/fmnist.yaml\n")
    order = [p.stem for p in sweep_recipes(tmp_path)]
    assert order == ["fmnist_dense", "fmnist_st3_98", "fmnist_st3sigma_98", "fmnist_feather_98", "fmnist_newmethod_98",
                     "fmnist_gmp_90", "fmnist_st3sigma_99"]
    assert [p.stem for p in sweep_recipes(tmp_path, 2)] == order[:2]


def test_fsdp2_detected_only_from_an_fsdp2_config(tmp_path):
    (tmp_path / "multi_gpu.yaml").write_text("distributed_type: MULTI_GPU\n")
    assert find_fsdp2_config(tmp_path) is None
    (tmp_path / "fsdp1.yaml").write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n")
    assert find_fsdp2_config(tmp_path) is None
    (tmp_path / "fsdp2.yaml").write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n")
    assert find_fsdp2_config(tmp_path) == tmp_path / "fsdp2.yaml"


def test_loop_throughput_skips_warm_up_and_needs_two_records():
    records = [{"kind": "train", "step": s, "elapsed_s": t} for s, t in ((10, 5.0), (20, 7.0), (30, 8.5), (40, 10.0))]
    result = loop_throughput(records + [{"kind": "eval", "step": 40, "elapsed_s": 99.0}], global_batch=64, skip_steps=20)
    assert result["images_per_s"] == pytest.approx((40 - 20) * 64 / (10.0 - 7.0))
    with pytest.raises(ValueError, match="two 'train' records"):
        loop_throughput(records, 64, skip_steps=40)


def test_part_and_budget_arguments_are_checked():
    assert parse_parts("sweep,cuda_tests") == ["cuda_tests", "sweep"]  # always run in order of value
    assert parse_parts("all") == list(PART_ORDER)
    with pytest.raises(ValueError, match="valid: environment"):
        parse_parts("cuda_test")
    assert parse_part_budgets(["sweep=200"]) == {"sweep": 200.0}
    with pytest.raises(ValueError, match="NAME=SECONDS"):
        parse_part_budgets(["swep=2"])


@pytest.mark.slow
def test_device_entry_script_runs_the_driver(tmp_path):
    """scripts/gpu_acceptance.sh (the GPU machine's entry point) reaches the driver and its records."""
    wheels = tmp_path / "no_wheels"
    wheels.mkdir()
    e = dict(env(), PYTHON=sys.executable, ST3_WHEELS=str(wheels))
    proc = subprocess.run(["bash", "scripts/gpu_acceptance.sh", "--device", "cpu", "--parts", "environment",
                           "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [record] = read_records(tmp_path / "out" / RECORDS_FILE)
    assert record["part"] == "environment" and record["status"] == "ok" and record["result"]["missing_packages"] == []
