"""The house rules hold: the written descriptions match the project (the README's layout
table, the model directory's file list), the layering contract is kept and can fail, and
no function outgrows a screen."""

import ast
import os
import re
import shutil
import subprocess

import pytest

from insectlib import layout
from tests.conftest import BIN, REPO

MAX_FUNCTION_LINES = 60  # a screen; the CLI's tables (module-level data) are not functions


def test_readme_layout_table_matches_the_tree():
    """Every package of insectlib (and every top-level module) is in the README's Layout
    table, and everything the table names exists."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Layout") :]
    named = {m.rstrip("/") for m in re.findall(r"^\| `([^`]+)`", table, flags=re.M)}
    package = REPO / "insectlib"
    parts = {
        f"insectlib/{n}"
        for n in os.listdir(package)
        if (n.endswith(".py") and n != "__init__.py") or (package / n / "__init__.py").exists()
    }
    assert parts <= named, f"missing from the README: {sorted(parts - named)}"
    missing = [p for p in named if not (REPO / p).exists()]
    assert not missing, f"the README names what does not exist: {missing}"


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted((REPO / "insectlib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_a_wrong_way_import_breaks_the_layering_contract(tmp_path):
    """The contract in pyproject.toml is kept by the tree, and broken by one import from a
    lower layer into a higher one (storage importing the classification pipeline)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(REPO / "pyproject.toml", copy)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "insectlib", copy / "insectlib", ignore=skip)

    def lint():
        env = {**os.environ, "PYTHONPATH": str(copy)}
        return subprocess.run(
            [str(BIN / "lint-imports"), "--no-logo", "--no-cache"],
            cwd=copy, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    assert lint().returncode == 0
    files = copy / "insectlib" / "storage" / "files.py"
    files.write_text(files.read_text() + "\n\ndef _up():\n    import insectlib.classify.pipeline\n")
    broken = lint()
    assert broken.returncode != 0 and "BROKEN" in broken.stdout, broken.stdout


@pytest.mark.ray
def test_model_directory_holds_exactly_the_layout_files(trained):
    cfg, _ = trained
    assert sorted(os.listdir(cfg.output)) == sorted(layout.MODEL_FILES)
    assert layout.COMPLETE_MARKER == layout.META_FILE == layout.MODEL_FILES[-1]


def test_the_performance_page_is_generated_from_the_results():
    """docs/performance.md is what bench/performance_page.py makes of bench/results/*.json,
    and no committed result names a path of the machine it ran on."""
    result = subprocess.run(
        [str(BIN / "python"), str(REPO / "bench" / "performance_page.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for path in (REPO / "bench" / "results").glob("*.json"):
        text = path.read_text()
        machine_path = re.search(r'"(/work|/tmp|/home|/root)/', text)
        assert not machine_path, f"{path.name} holds a path of the machine it ran on"


def test_the_long_modules_the_suite_starts_with_exist():
    """A module renamed or gone from conftest's LONG_MODULES would be left for last again,
    with no test failing: this one does."""
    from tests.conftest import LONG_MODULES

    assert [name for name in LONG_MODULES if not (REPO / "tests" / f"{name}.py").exists()] == []
