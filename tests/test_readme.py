"""The README and docs/ promise only what tests hold, link only to what exists, and speak only of files a user has;
the numbers docs/results.md quotes are the committed demo's."""

import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
USER_DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./<-])((?:benchmarks|configs|docs|examples|progadv_trl|tests)/[\w./-]*[\w/])")
MEASURED = re.compile(r"\b\d[\d,.]*\s?(?:x|%|MiB|GB|KB|min|s)\b")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(_text(path))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+\s+(.*)$", _prose(text), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_test_the_docs_name_exists():
    assert len(TEST_REF.findall(README)) >= 30, "the guarantees section names its tests"
    missing = []
    for doc in USER_DOCS:
        for file, name in TEST_REF.findall(_text(doc)):
            path = ROOT / file
            if not path.is_file() or (name and name not in _test_names(path)):
                missing.append(f"{doc.name}: {file}::{name}" if name else f"{doc.name}: {file}")
    assert not missing, missing


def test_the_docs_refer_to_no_file_outside_the_repository():
    for doc in USER_DOCS:
        text = _text(doc)
        assert "../shared" not in text and "BRIEF" not in text, doc.name


def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) < 180
    for section in ("## Two commands", "## Supported training set-ups", "## What is guaranteed", "## Architecture"):
        assert section in README, section


def test_every_relative_link_points_to_a_file_that_exists():
    broken = []
    for doc in USER_DOCS:
        for target in LINK.findall(_prose(_text(doc))):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(_text(path)):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def test_every_repository_path_the_docs_name_exists():
    missing = [f"{doc.name}: {p}" for doc in USER_DOCS for p in REPO_PATH.findall(_text(doc))
               if not (ROOT / p).exists()]
    assert not missing, missing


def test_every_measurement_in_the_readme_links_to_where_it_was_measured():
    units = []
    for block in re.split(r"\n\s*\n", _prose(README)):
        units += block.splitlines() if block.lstrip().startswith("|") else [block]
    unlinked = [u.strip()[:80] for u in units if MEASURED.search(u) and "](docs/" not in u]
    assert not unlinked, unlinked


def test_results_summary_numbers_come_from_the_committed_demo_table():
    results = _text(ROOT / "docs" / "results.md")
    table = _text(ROOT / "docs" / "demo" / "table.md")
    start = results.index("| final GRPO scorer")
    rows = results[start:].split("\n\n")[0]
    numbers = re.findall(r"-?\d+\.\d{3}(?: \[-?\d+\.\d{2}, -?\d+\.\d{2}\])?", rows)
    assert len(numbers) >= 20
    assert [n for n in numbers if n not in table] == []


def test_seed_table_is_what_the_report_prints():
    from progadv_trl.envs.report import seed_table

    demo = ROOT / "docs" / "demo"
    runs = [json.loads(_text(p)) for p in (demo / "metrics.json", demo / "seed1" / "metrics.json",
                                          demo / "seed2" / "metrics.json")]
    assert seed_table(runs) in _text(ROOT / "docs" / "results.md")


def test_settings_table_is_what_the_report_prints():
    from progadv_trl.envs.report import render_tables, settings_table

    metrics = json.loads(_text(ROOT / "docs" / "settings" / "metrics.json"))
    assert settings_table(metrics) in _text(ROOT / "docs" / "settings.md")
    text, drift = render_tables(metrics)
    assert text == _text(ROOT / "docs" / "settings" / "table.md")
    assert drift == _text(ROOT / "docs" / "settings" / "drift.md")


def test_repair_settings_table_is_what_the_report_prints():
    from progadv_trl.envs.report import settings_table

    metrics = json.loads(_text(ROOT / "docs" / "repair" / "metrics.json"))
    assert settings_table(metrics) in _text(ROOT / "docs" / "results.md")
