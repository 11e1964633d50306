"""scripts/import_cycles.py on a tiny package written here: which imports make edges, and which cycles it reports."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_cycles.py"


@pytest.fixture(scope="module")
def finder():
    spec = importlib.util.spec_from_file_location("import_cycles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


FILES = {
    "__init__.py": "",
    "a.py": "from pkg import b\n",                          # b is a submodule: edge a -> pkg.b
    "b.py": "from .c import thing\n",                       # relative: b -> pkg.c
    "c.py": "thing = 1\n\ndef later():\n    from . import a\n",  # only inside a function: c -> pkg.a
    "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",  # never runs
    "e.py": "import pkg.d\n",
    "f.py": "from pkg.g import name, os\n",                 # names, not modules: one edge f -> pkg.g
    "g.py": "import os\nname = 1\n",
    "sub/__init__.py": "from .x import y\n",                # a package's own submodule: pkg.sub -> pkg.sub.x
    "sub/x.py": "import pkg.sub\nfrom .. import a\ny = 1\n",  # level 2 reaches pkg: x -> pkg.a
}


@pytest.fixture
def package(tmp_path) -> Path:
    root = tmp_path / "pkg"
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_edges_resolve_submodules_relative_imports_and_skip_type_checking(finder, package):
    edges = {(e.source, e.target, e.in_function) for e in finder.collect_edges(package)}
    assert edges == {
        ("pkg.a", "pkg.b", False), ("pkg.b", "pkg.c", False), ("pkg.c", "pkg.a", True),
        ("pkg.e", "pkg.d", False), ("pkg.f", "pkg.g", False),
        ("pkg.sub", "pkg.sub.x", False), ("pkg.sub.x", "pkg.sub", False), ("pkg.sub.x", "pkg.a", False),
    }


def _assert_is_cycle(cycle):
    steps = [(e.source, e.target) for e in cycle.path]
    assert steps[0][0] == steps[-1][1], steps
    assert all(a[1] == b[0] for a, b in zip(steps, steps[1:])), steps
    assert {s for s, _ in steps} == set(cycle.modules)


def test_module_level_pass_ignores_imports_inside_functions(finder, package):
    cycles = finder.find_cycles(finder.collect_edges(package), include_functions=False)
    assert [c.modules for c in cycles] == [["pkg.sub", "pkg.sub.x"]]
    _assert_is_cycle(cycles[0])


def test_full_pass_counts_imports_inside_functions(finder, package):
    cycles = finder.find_cycles(finder.collect_edges(package), include_functions=True)
    assert [c.modules for c in cycles] == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.sub", "pkg.sub.x"]]
    for cycle in cycles:
        _assert_is_cycle(cycle)
    assert [e.in_function for e in cycles[0].path] == [False, False, True]


def test_collapsed_modules_show_cycles_between_packages(finder, package):
    # pkg.sub.x -> pkg.f -> pkg.g -> pkg.sub.y: no module is on a cycle, but the package pkg.sub is.
    (package / "sub" / "x.py").write_text("from pkg import f\n")
    (package / "sub" / "y.py").write_text("")
    (package / "g.py").write_text("def late():\n    from pkg.sub import y\n")
    (package / "c.py").write_text("thing = 1\n")
    edges = finder.collect_edges(package)
    assert finder.find_cycles(edges, include_functions=True) == []
    collapsed = finder.collapse(edges, 2)
    assert finder.find_cycles(collapsed, include_functions=False) == []
    cycles = finder.find_cycles(collapsed, include_functions=True)
    assert [c.modules for c in cycles] == [["pkg.f", "pkg.g", "pkg.sub"]]
    _assert_is_cycle(cycles[0])


def test_main_prints_both_passes_and_check_fails_on_a_cycle(finder, package, capsys):
    assert finder.main([str(package)]) == 0
    out = capsys.readouterr().out
    assert "module-level imports only: 1 cycle(s)" in out
    assert "inside functions): 2 cycle(s)" in out
    assert "pkg.c -> pkg.a   (pkg/c.py:4, in a function)" in out
    assert finder.main([str(package), "--check"]) == 1
    (package / "sub" / "x.py").write_text("y = 1\n")
    (package / "c.py").write_text("thing = 1\n")
    capsys.readouterr()
    assert finder.main([str(package), "--check"]) == 0
    assert capsys.readouterr().out.count(": 0 cycle(s)") == 2
