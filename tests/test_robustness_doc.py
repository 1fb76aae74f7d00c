"""docs/robustness.md lists real tests, and the README's error example is what the script prints."""
from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
import sys

import pytest

from train_utils import REPO, TRAIN, env

DOC = REPO / "docs" / "robustness.md"


def _test_names(path):
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def _references():
    """(file, test pattern) for every `file.py::test` and every `::test` that continues the previous file."""
    refs = []
    for row in DOC.read_text().splitlines():
        current = None
        for match in re.finditer(r"`(test_[\w]+\.py)?::(test_[\w*]+)`", row):
            current = match.group(1) or current
            assert current, f"'::{match.group(2)}' without a file before it in: {row}"
            refs.append((current, match.group(2)))
    return refs


def test_every_test_the_matrix_names_exists():
    refs = _references()
    assert len(refs) >= 25
    for filename, pattern in refs:
        names = _test_names(REPO / "tests" / filename)
        assert fnmatch.filter(names, pattern), f"{filename}::{pattern} is not a test"


def test_every_fault_and_input_row_has_a_test():
    for line in DOC.read_text().splitlines():
        if line.startswith("| ") and not line.startswith(("| Fault", "| Input", "| Guarantee")) and "---" not in line:
            assert "::test_" in line, f"row without a test: {line}"


@pytest.mark.slow
def test_readme_error_example_is_what_the_script_prints():
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^\$ python (scripts/train\.py .+)$", readme, re.M).group(1).split()
    shown = re.search(r"^(error: .+?)\.\.\.$", readme, re.M).group(1)
    proc = subprocess.run([sys.executable, TRAIN, *command[1:]], env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(shown)
