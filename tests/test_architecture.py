"""docs/architecture.md is the truth about the layout: its floor table, read here, is checked against every import
the package makes, and its size limit against every file."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "lora_dpo"
PAGE = ROOT / "docs" / "architecture.md"


def _floors() -> dict[str, tuple[int, int]]:
    """unit -> (floor, position on its floor), from the page's table."""
    table = PAGE.read_text().split("<!-- floors:start -->")[1].split("<!-- floors:end -->")[0]
    placed = {}
    for line in table.splitlines():
        match = re.match(r"\| (\d) \| (.+) \|$", line.strip())
        if match:
            units = [name.strip().replace("\\_", "_") for name in match.group(2).split(",")]
            placed |= {unit: (int(match.group(1)), index) for index, unit in enumerate(units)}
    return placed


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imports(path: Path) -> set[str]:
    """The units of lora_dpo this file imports (its own unit excluded)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_dpo"):
            names = [a.name for a in node.names] if node.module == "lora_dpo" else [node.module.split(".")[1]]
            found |= set(names)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lora_dpo.")}
    return found - {_unit(path), "__version__"}


def _sources() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE]


def test_every_unit_is_on_the_page_once() -> None:
    assert {_unit(p) for p in _sources()} == set(_floors())


def test_every_import_points_down_or_to_an_earlier_unit_of_its_floor() -> None:
    floors = _floors()
    wrong = [f"{p.relative_to(ROOT)} imports {target}" for p in _sources() for target in sorted(_imports(p))
             if floors[target] >= floors[_unit(p)]]
    assert wrong == []


def test_only_the_cli_imports_the_trainer() -> None:
    importers = {_unit(p) for p in _sources() if "train" in _imports(p)}
    assert importers <= {"cli"}


def test_no_module_is_over_the_size_limit() -> None:
    limit = int(re.search(r"max-lines: (\d+)", PAGE.read_text()).group(1))
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > limit} == {}
