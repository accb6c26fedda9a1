"""The written descriptions of the project match it: the README's layout table and the
model directory's file list."""

import os
import re

from insectlib import layout
from tests.conftest import REPO


def test_readme_layout_table_matches_the_tree():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Layout") :]
    named = set()
    for cell in re.findall(r"^\| `([^`]+)`(?:, `([^`]+)`)? \|", table, flags=re.M):
        first = cell[0]
        named.add(first)
        if cell[1]:  # "`insectlib/sample.py`, `demo.py`": the second in the first's folder
            named.add(os.path.join(os.path.dirname(first), cell[1]))
    modules = {f"insectlib/{n}" for n in os.listdir(REPO / "insectlib") if n.endswith(".py")}
    modules.discard("insectlib/__init__.py")
    assert modules <= named, f"modules missing from the README: {sorted(modules - named)}"
    missing = [p for p in named if not (REPO / p.rstrip("/")).exists()]
    assert not missing, f"the README names what does not exist: {missing}"


def test_model_directory_holds_exactly_the_layout_files(trained):
    cfg, _ = trained
    assert sorted(os.listdir(cfg.output)) == sorted(layout.MODEL_FILES)
    assert layout.COMPLETE_MARKER == layout.META_FILE == layout.MODEL_FILES[-1]
