"""The package and tests are ruff-clean (configured in pyproject.toml), so CI lints with the README's test command."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    done = subprocess.run([ruff, "check", "attnreuse", "tests", "scripts"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


PACKAGE = ROOT / "attnreuse"
ENGINE_PACKAGES = {"attention"}  # the engine: the package's top-level modules and these subpackages
TOOLS = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - ENGINE_PACKAGES
# __main__.py is `python -m attnreuse`, the CLI's door, not the engine
ENGINE = [p.name for p in sorted(PACKAGE.glob("*.py")) if p.name != "__main__.py"] + sorted(ENGINE_PACKAGES)
GRAB_BAGS = {"utils", "helpers", "common", "misc", "util", "tools"}
TOP_LEVEL_LINES = 400


def _modules(paths):
    for path in paths:
        yield from (sorted(path.rglob("*.py")) if path.is_dir() else [path])


def _imported(tree) -> set[str]:
    """The attnreuse subpackages or modules a module imports, relative or absolute."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] == "attnreuse":
                parts = parts[1:]
            elif node.level == 0:
                continue
            names.update([parts[0]] if parts[0] else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("attnreuse."))
    return names


def test_the_engine_imports_no_tool():
    for module in _modules(PACKAGE / name for name in ENGINE):
        tools = _imported(ast.parse(module.read_text())) & TOOLS
        assert not tools, f"{module.relative_to(ROOT)} imports the tool(s) {sorted(tools)}"


def test_functions_and_classes_stay_short():
    for module in (ROOT / "attnreuse").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            limit = {ast.FunctionDef: 60, ast.AsyncFunctionDef: 60, ast.ClassDef: 150}.get(type(node))
            if limit:
                length = node.end_lineno - node.lineno + 1
                assert length <= limit, f"{module.relative_to(ROOT)}: {node.name} is {length} lines"


def test_no_grab_bag_modules():
    """Each helper lives with its concept: no module or package named like a grab-bag."""
    bags = [p.relative_to(ROOT) for p in PACKAGE.rglob("*") if p.stem in GRAB_BAGS and p.suffix in ("", ".py")]
    assert not bags, f"grab-bag modules: {bags}"


def test_top_level_modules_are_small_rooms():
    """The engine's rooms at the package's top level stay under TOP_LEVEL_LINES lines each."""
    for module in PACKAGE.glob("*.py"):
        lines = len(module.read_text().splitlines())
        assert lines <= TOP_LEVEL_LINES, f"{module.relative_to(ROOT)} is {lines} lines"


def test_the_tools_are_subpackages():
    """A reader finds the engine at the top level and each tool in its own subpackage."""
    assert {"bench", "cli", "default_model", "eval", "pipelines", "search"} <= TOOLS
    assert "cli" not in {p.stem for p in PACKAGE.glob("*.py")}
