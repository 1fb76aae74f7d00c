"""Every timm family docs/models.md lists, run for real (see tests/timm_families.py), and its table in sync."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from timm_families import FAMILIES, doc_section, doc_table, run_family, static_row

_ROWS: Dict[str, Dict[str, Any]] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # batches of 2 at 32-75 px: each op is too small for intra-op threads to pay off, and on a shared
    # machine their waits cost more CPU than the work (4 of these families: 93 s CPU with 2 threads, 27 s with 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize(
    "entry",
    [pytest.param(f, marks=pytest.mark.xfail(reason=f.known_issue, strict=True)) if f.known_issue else f for f in FAMILIES],
    ids=[f.model for f in FAMILIES],
)
@pytest.mark.slow
def test_family_trains_freezes_exports_and_reloads_in_plain_timm(entry, workdir) -> None:
    row = run_family(entry, workdir)
    _ROWS[entry.model] = row
    assert row["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert row["finite"], "non-finite output after training: is the dense model stable at this test size?"
    assert row["freeze_max_diff"] <= 1e-5, "output changed across freeze()"
    assert row["reload_max_diff"] == 0.0, "plain timm reload differs from the frozen sparse model"
    assert row["macs"] == row["independent_macs"], "count_macs disagrees with torch's FlopCounterMode"
    assert row["uncounted_layers"] == [], "pruned layers whose weight no conv/matmul used"
    assert row["unread_layers"] == {}


@pytest.mark.slow
def test_models_doc_table_lists_the_families_as_run() -> None:
    columns = ("family", "model", "kwargs", "input", "pruned_layers", "prunable_weights", "macs", "reparameterizable", "known_issue")
    rows = [{k: (_ROWS[f.model] if f.model in _ROWS else static_row(f))[k] for k in columns} for f in FAMILIES]
    assert doc_section() == doc_table(rows), "docs/models.md family table is stale: run `python tests/timm_families.py --write-doc`"


def test_reparameterization_is_reported_honestly() -> None:
    # the docs/models.md note says reparameterize_model's kernels have fewer zeros than their kxk branch: the runs must show it
    checked = 0
    for f in FAMILIES:
        if f.reparameterizable and f.model in _ROWS:
            row = _ROWS[f.model]
            assert 0 < row["fused_kernel_zeros"] < row["kxk_branch_zeros"], f.model
            checked += 1
    if not checked:
        pytest.skip("no reparameterizable family ran in this pytest run (-k selection)")
