"""Every timm family the README lists, run for real (see tests/timm_families.py), and the README table in sync."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest

from timm_families import FAMILIES, readme_section, readme_table, run_family

_ROWS: Dict[str, Dict[str, Any]] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("entry", FAMILIES, ids=[f.model for f in FAMILIES])
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
    if len(_ROWS) != len(FAMILIES):
        pytest.skip("needs every family test of this module to have run")
    expected = readme_table([_ROWS[f.model] for f in FAMILIES])
    assert readme_section() == expected, "README family table is stale: run `python tests/timm_families.py --write-readme`"
