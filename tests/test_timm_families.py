"""Every timm family the README lists, run for real (see tests/timm_families.py), and the README table in sync."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest

from timm_families import FAMILIES, readme_section, readme_table, run_family, static_row

_ROWS: Dict[str, Dict[str, Any]] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize(
    "entry",
    [pytest.param(f, marks=pytest.mark.xfail(reason=f.known_issue, strict=True)) if f.known_issue else f for f in FAMILIES],
    ids=[f.model for f in FAMILIES],
)
def test_family_trains_freezes_exports_and_reloads_in_plain_timm(entry, workdir) -> None:
    row = run_family(entry, workdir)
    _ROWS[entry.model] = row
    assert row["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert row["freeze_max_diff"] <= 1e-5, "output changed across freeze()"
    assert row["reload_max_diff"] == 0.0, "plain timm reload differs from the frozen sparse model"
    assert row["macs"] == row["independent_macs"], "count_macs disagrees with torch's FlopCounterMode"
    assert row["uncounted_layers"] == [], "pruned layers whose weight no conv/matmul used"
    assert row["unread_layers"] == {}


def test_readme_table_lists_the_families_as_run() -> None:
    columns = ("family", "model", "kwargs", "input", "pruned_layers", "prunable_weights", "macs", "reparameterizable", "known_issue")
    rows = [{k: (_ROWS[f.model] if f.model in _ROWS else static_row(f))[k] for k in columns} for f in FAMILIES]
    assert readme_section() == readme_table(rows), "README family table is stale: run `python tests/timm_families.py --write-readme`"


def test_reparameterization_is_reported_honestly() -> None:
    # the README note says reparameterize_model makes the model less sparse: the runs must show it
    for f in FAMILIES:
        if f.reparameterizable and f.model in _ROWS:
            row = _ROWS[f.model]
            assert row["reparameterized_sparsity"] < row["sparsity"], f.model
