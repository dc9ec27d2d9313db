"""The package layout: layers import only downwards, and every name the docs show imports."""

import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "himap"

LAYERS = {
    "prune": 0,  # schedules, token sets, criteria, ranking rows, engine, adapters: nothing else of ours
    "builtin": 1,  # the shipped model's files, its offline processor, the synthetic benchmark, training
    "models": 2,  # loading models and processors, prompts, tiny test models
    "cost": 3,  # FLOPs, measured FLOPs, latency benchmark
    "evaluation": 4,  # runner, metrics, judge, ablations, sweeps
    "tasks": 4,  # the benchmarks, one file each (evaluation's layer)
    "analysis": 5,  # saliency, disruption, filter, plots
    "cli": 6,  # the command line: one module per command
    "integrations": 7,  # other harnesses (lmms-eval): built on everything below, the CLI's method parsing included
}
"""A module may import its own layer and the layers below it. The root package `himap` re-exports
the pruning API only, so importing it counts as importing `prune`."""


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "himap":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] == "__main__":
        return LAYERS["prune"] if len(parts) == 1 else LAYERS["cli"]
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer; add its folder to LAYERS")
    return LAYERS[parts[1]]


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every himap module `path` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "himap"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "himap":
            for alias in node.names:  # `from himap.x import y` may import the module himap.x.y
                sub = f"{node.module}.{alias.name}"
                found.add(sub if importlib.util.find_spec(node.module) and _is_module(sub) else node.module)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        for imported in _imports(path):
            if _layer(imported) > _layer(importer):
                violations.append(f"{importer} (layer {_layer(importer)}) imports {imported} "
                                  f"(layer {_layer(imported)})")
    assert not violations, "\n".join(violations)


def test_prune_imports_nothing_else_of_ours():
    for path in sorted((PACKAGE / "prune").rglob("*.py")):
        others = {m for m in _imports(path) if not m.startswith("himap.prune")}
        assert not others, f"{path.name} imports {others}"


def _documented_imports() -> list[str]:
    """`import himap...` and `from himap... import ...` lines of the Python blocks in README and docs/."""
    lines = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if re.match(r"(from himap[\w.]* import [\w, ]+|import himap[\w.]*)$", line):
                    lines.append(line)
    return sorted(set(lines))


def _documented_attributes() -> list[str]:
    """`himap.name(` / `himap.name.` uses in the docs' Python blocks (the root package's API)."""
    names = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
            names |= set(re.findall(r"\bhimap\.([A-Za-z_]\w*)", block))
    return sorted(names)


def test_docs_show_the_api():
    assert len(_documented_imports()) >= 3 and len(_documented_attributes()) >= 5


@pytest.mark.parametrize("line", _documented_imports())
def test_every_documented_import_works(line):
    exec(line, {})


@pytest.mark.parametrize("name", _documented_attributes())
def test_every_documented_root_name_exists(name):
    import himap

    assert hasattr(himap, name) or _is_module(f"himap.{name}"), f"himap.{name} is documented but missing"


def test_public_api():
    import himap
    from himap.tasks import get_task

    for name in ("apply", "remove", "pruned", "maybe_pruned", "Schedule", "Stage", "PRESETS", "get_schedule"):
        assert getattr(himap, name) is not None
    assert get_task("shapes").NAME == "shapes"
