"""The package's layout holds: layers and acyclic packages (import-linter's contracts in pyproject.toml), no private
name imported across modules, and one stage module per stage, named by its number."""

import ast
import subprocess
import sys
from pathlib import Path

from synthflaw.registry import STAGES

PACKAGE = Path(__file__).resolve().parent.parent / "synthflaw"


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(source: str, module: str) -> list[str]:
    """`from synthflaw.x import _name` and `synthflaw_module._name` uses in `source`, other than the module's own."""
    found, aliases = [], {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("synthflaw") and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if alias.name.startswith("_") and node.module != module:
                    found.append(f"from {node.module} import {alias.name}")
                aliases[alias.asname or alias.name] = target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("synthflaw"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in aliases
                and aliases[node.value.id] != module):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_private_names_stay_in_their_module():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        found = private_imports(path.read_text(), _module_name(path))
        if found:
            offenders[str(path.relative_to(PACKAGE.parent))] = found
    assert not offenders, offenders


def test_the_check_finds_private_imports():
    source = "from synthflaw.models.generation import _secret\nfrom synthflaw.models import build\nbuild._x()\n"
    assert private_imports(source, "synthflaw.stages.s07_evaluate") == [
        "from synthflaw.models.generation import _secret", "build._x"]
    assert private_imports("from synthflaw.models.build import _x\n", "synthflaw.models.build") == []


def test_every_stage_has_its_module_and_notebook():
    notebooks = PACKAGE.parent / "notebooks"
    for stage in STAGES:
        assert (PACKAGE / "stages" / f"s{stage.name}.py").exists(), stage.name
        assert (notebooks / stage.notebook).exists(), stage.notebook
    assert len(list((PACKAGE / "stages").glob("s[0-9][0-9]_*.py"))) == len(STAGES)
