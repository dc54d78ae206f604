"""The README's promises point at tests that exist, and it speaks only of files a user has."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_readme_names_exists():
    refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", README)
    assert len(refs) >= 30, "the guarantees section names its tests"
    missing = []
    for file, name in refs:
        path = ROOT / file
        if not path.is_file() or (name and name not in _test_names(path)):
            missing.append(f"{file}::{name}" if name else file)
    assert not missing, missing


def test_the_readme_refers_to_no_file_outside_the_repository():
    assert "../shared" not in README and "BRIEF" not in README
