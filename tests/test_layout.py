"""The package layout: every submodule imports as a module under its own name, and no name the package
exports hides a submodule (so `import sparsemem.x` and `sparsemem.x` always mean the same thing)."""

import importlib
import pkgutil
import types

import pytest

import sparsemem

PACKAGES = ("sparsemem", "sparsemem.modeling", "sparsemem.training", "sparsemem.hub_cards")


def _submodules():
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name != "__main__":  # `python -m sparsemem.training` runs a calibration
                yield package_name, info.name


def test_layout_lists_the_packages_modules():
    found = {f"{package}.{name}" for package, name in _submodules()}
    assert {"sparsemem.cache_compaction", "sparsemem.conversion", "sparsemem.modeling.compaction",
            "sparsemem.training.trainer"} <= found
    # the functions keep their package-level names, the modules have their own
    assert not {"sparsemem.compact", "sparsemem.convert"} & found


@pytest.mark.parametrize("package_name, name", list(_submodules()))
def test_every_submodule_imports_as_itself(package_name, name):
    module = importlib.import_module(f"{package_name}.{name}")
    assert isinstance(module, types.ModuleType)
    assert module.__name__ == f"{package_name}.{name}"
    # the attribute of the package is the module, not a function or class re-exported over it
    assert getattr(importlib.import_module(package_name), name) is module


def test_package_functions_are_the_implementations():
    from sparsemem import cache_compaction, conversion

    assert sparsemem.compact is cache_compaction.compact and callable(sparsemem.compact)
    assert sparsemem.prefill is cache_compaction.prefill
    assert sparsemem.convert is conversion.convert and callable(sparsemem.convert)
    # `import a.b as c` resolves the attribute first: it must give the module
    import sparsemem.cache_compaction as by_statement

    assert by_statement is cache_compaction and by_statement.plan_budget is cache_compaction.plan_budget
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("sparsemem.compact")


def _imports_between_modules() -> dict:
    """Module name -> the package modules it imports (anywhere in its body, deferred imports included)."""
    import ast
    from pathlib import Path

    files = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            files[f"{package_name}.{info.name}"] = Path(package.__path__[0]) / f"{info.name}.py"
    graph = {}
    for name, path in files.items():
        if not path.exists():
            continue
        parent = name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(parent.split(".")[: len(parent.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(part for part in (base, node.module) if part)
                found |= {t for t in (target, *(f"{target}.{a.name}" for a in node.names)) if t in files}
        graph[name] = found - {name}
    return graph


def test_no_module_imports_itself_through_others():
    graph = _imports_between_modules()
    assert graph["sparsemem.modeling.cache"] and graph["sparsemem.bench"]  # the graph was read

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph.get(start, ()))

    loops = sorted(name for name in graph if reaches(name, name, set()))
    assert not loops, f"modules on an import loop: {loops}"
    # the command line is imported by nothing but the `python -m sparsemem.training` entry point
    assert [n for n, deps in graph.items() if "sparsemem.cli" in deps] == ["sparsemem.training.__main__"]


REPORT_SUFFIXES = (".md", ".json", ".jsonl", ".png")


def test_reports_hold_results_only():
    """reports/ holds results: markdown, JSON (lines) and PNG figures; code, logs, YAML or text files are
    kept elsewhere or converted (a log into a fenced markdown block, a recipe as run into JSON)."""
    from pathlib import Path

    reports = Path(__file__).resolve().parents[1] / "reports"
    files = [path for path in reports.rglob("*") if path.is_file()]
    assert len(files) > 100  # the folder is really there
    others = sorted(str(path.relative_to(reports)) for path in files if path.suffix not in REPORT_SUFFIXES)
    assert not others, f"reports/ may hold only {REPORT_SUFFIXES} files, found {others}"
