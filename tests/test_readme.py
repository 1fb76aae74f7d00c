"""The README keeps its promises: two set-up-included commands first, CI runs the test one,
and the recipe table it links (docs/recipes.md) is the one generated from the shipped recipe files."""
from __future__ import annotations

import re
from pathlib import Path

from tables import recipe_table
REPO = Path(__file__).resolve().parents[1]


def test_readme_opens_with_demo_and_test_commands():
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```(?:bash)?\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: venv data$", makefile, re.M) and re.search(r"^test: venv data$", makefile, re.M)
    assert "recipes/quickstart.yaml" in makefile


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_recipe_table_is_generated_from_the_recipes_and_the_readme_links_it():
    text = (REPO / "docs" / "recipes.md").read_text()
    assert recipe_table(REPO / "recipes") in text, "regenerate with: python scripts/tables.py recipes"
    assert "](docs/recipes.md" in (REPO / "README.md").read_text()
