"""The sweep at CPU size: real runs of two Fashion-MNIST recipes x two seeds, one table, one plot.
A plumbing check only (tiny subsets, two epochs): no accuracy claim."""
from __future__ import annotations

import json
import statistics
import sys

import pytest

from data_utils import fashion_mnist_available
from train_utils import REPO, env
from sweep import final_record, markdown_table, method_of, run_sweep, summarize, write_report

pytestmark = pytest.mark.skipif(not fashion_mnist_available(), reason="needs dataset-fashion-mnist")

CPU_SIZE = [
    "model.name=resnet10t",
    "model.kwargs={}",
    "data.train_subset=128",
    "data.eval_subset=64",
    "data.batch_size=64",
    "training.epochs=2",
    "training.mixed_precision=no",
    "sparsity.start_epoch=0",
    "sparsity.end_epoch=1",
    "lr_schedule.warmup_epochs=0",
    "logging.trackers=[]",
]


@pytest.mark.slow
def test_cpu_sweep_collects_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    recipes = ["recipes/fmnist_dense.yaml", "recipes/fmnist_st3_90.yaml"]
    rows = run_sweep(recipes, [0, 1], tmp_path, CPU_SIZE, launcher=[sys.executable], progress=False)
    assert [r["run"] for r in rows] == ["fmnist_dense_seed0", "fmnist_dense_seed1", "fmnist_st3_90_seed0", "fmnist_st3_90_seed1"]
    for r in rows:
        final = final_record(tmp_path / "runs" / r["run"])
        assert r["top1"] == final["eval_top1"] and final["eval_examples"] == 64
    by = {r["run"]: r for r in rows}
    assert by["fmnist_dense_seed0"]["sparsity"] == 0.0
    assert abs(by["fmnist_st3_90_seed0"]["sparsity"] - 0.9) < 2e-3
    assert by["fmnist_st3_90_seed0"]["sparse_mflops"] < by["fmnist_dense_seed0"]["sparse_mflops"]
    # seeds give different runs (the spread over seeds is real, not zero by construction)
    assert by["fmnist_st3_90_seed0"]["top1"] != by["fmnist_st3_90_seed1"]["top1"] or \
        by["fmnist_dense_seed0"]["top1"] != by["fmnist_dense_seed1"]["top1"]

    summary = summarize(rows)
    st3 = next(s for s in summary if s["recipe"] == "fmnist_st3_90")
    values = [by["fmnist_st3_90_seed0"]["top1"], by["fmnist_st3_90_seed1"]["top1"]]
    assert st3["top1_mean"] == pytest.approx(statistics.fmean(values))
    assert st3["top1_std"] == pytest.approx(statistics.stdev(values))
    paths = write_report(rows, tmp_path, "CPU plumbing check")
    assert paths["plot"].stat().st_size > 1000
    assert "fmnist_st3_90" in paths["table"].read_text()
    assert json.loads(paths["summary"].read_text())[0]["recipe"] == "fmnist_dense"

    # a second call finds the finished runs and trains nothing again
    again = run_sweep(recipes, [0, 1], tmp_path, CPU_SIZE, launcher=["false"], progress=False)
    assert again == rows


def test_method_names():
    assert method_of("fmnist_st3sigma_98") == "st3sigma" and method_of("fmnist_dense") == "dense"
    table = markdown_table([{"recipe": "x", "seeds": 3, "top1_mean": 0.5, "top1_std": 0.01, "sparsity_mean": 0.9,
                             "sparse_mflops_mean": 1.5, "wall_s_mean": 10}])
    assert "50.00 ± 1.00" in table
