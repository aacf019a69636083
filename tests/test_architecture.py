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


# --------------------------------------------------------------------------------------------------
# A base family is one module: nothing outside `models/families/` names one (docs/architecture.md)

FAMILIES = PACKAGE / "models" / "families"
FAMILY_TOKENS = ("sdxl", "sd15", "sd3", "flux", "is_xl")  # in identifiers, any case
FAMILY_STRINGS = ("sdxl", "sd15", "stable-diffusion-xl", "stablediffusionxl", "stablediffusionpipeline",
                  "text_encoder_2", "sd_v1", "sdxl_base")  # in string constants that are code, not prose; any case
# Data below `models` that cannot ask the registry: (file, the constant). The recipe's default base is a hub id the
# recipe reference shows (`recipe` sits on floor 1, under the families).
ALLOWED = {("lora_dpo/recipe/schema.py", "stabilityai/stable-diffusion-xl-base-1.0")}


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring constants of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _identifiers(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.arg):
        return [node.arg]
    if isinstance(node, ast.keyword):
        return [node.arg] if node.arg else []
    if isinstance(node, ast.alias):
        return [node.name, *([node.asname] if node.asname else [])]
    return []


def family_names_in(source: str, where: str = "<source>") -> list[str]:
    """Every place a family is named in code: identifiers with a family token, and string constants (not docstrings,
    not prose: prose has a space) holding a family's name, pipeline class or part."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        for name in _identifiers(node):
            if any(token in name.lower() for token in FAMILY_TOKENS):
                found.append(f"{where}:{node.lineno}: {name}")
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and " " not in node.value and any(token in node.value.lower() for token in FAMILY_STRINGS)
                and (where, node.value) not in ALLOWED):
            found.append(f"{where}:{node.lineno}: {node.value!r}")
    return found


def test_no_code_outside_the_families_names_a_family() -> None:
    """The step, the planner, the cache, export and the CLI ask the base's family (`models.families`); prose in
    help text and docstrings may still say which families exist."""
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if FAMILIES not in path.parents
             for hit in family_names_in(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


def test_the_family_scan_sees_dispatch_and_lets_prose_be() -> None:
    """What the scan above flags, on lines the code held before the families (`git show 3a41059`)."""
    code = '''
def is_sdxl(config):
    """SDXL (text_time micro-conditioning) is written with SGM names."""
    return config.get("addition_embed_type") == "text_time"
sdxl = "text_encoder_2" in index and index.get("text_encoder_2") != [None, None]
pipeline = "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline"
base = BaseModel(source=source, unet=unet, is_sdxl=arch.is_sdxl)
note = "fp16: SDXL's VAE overflows in fp16; set [model].vae_dtype"
'''
    found = {hit.split(": ", 1)[1] for hit in family_names_in(code)}  # the docstring and the prose: none
    assert found == {"is_sdxl", "sdxl", "'sdxl'", "'text_encoder_2'", "'StableDiffusionXLPipeline'",
                     "'StableDiffusionPipeline'"}
