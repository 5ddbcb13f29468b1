"""The code keeps its shape: no import cycle (deferred imports count), no class over 300 lines.

The figures come from ``scripts/shape``, which reads the source with ``ast``; its cycle finder is
checked here on small made-up packages.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_CLASS_LINES = 300


def load_shape() -> ModuleType:
    """Import ``scripts/shape`` (a script without a ``.py`` suffix) as a module."""
    loader = importlib.machinery.SourceFileLoader("p2prc_shape", str(ROOT / "scripts" / "shape"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up while they are made
    loader.exec_module(module)
    return module


shape = load_shape()


@pytest.fixture(scope="module")
def project() -> Any:
    """The figures for this checkout, measured once for the tests that read them."""
    return shape.measure(ROOT)


def write_package(root: Path, files: dict[str, str]) -> None:
    """Write a made-up package: ``{"pkg/a.py": source, ...}``, each ``__init__.py`` made too."""
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in path.relative_to(root).parents:
            if folder != Path("."):
                (root / folder / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))


def cycles_in(root: Path, kinds: frozenset[str] | None = None) -> list[list[str]]:
    """The modules of each cycle in the made-up package ``pkg``, runtime imports by default."""
    modules = shape.find_modules(root, ["pkg"])
    edges = shape.import_edges(modules, root)
    return [cycle.modules for cycle in shape.find_cycles(edges, kinds or shape.RUNTIME_KINDS)]


# The project itself


def test_no_import_cycle_counting_deferred_imports(project: Any) -> None:
    cycles = project.runtime_cycles
    assert not cycles, (
        f"{len(cycles)} import cycle(s), deferred imports counted "
        "(see .venv/bin/python scripts/shape):\n"
        + "\n".join(shape.describe_cycle(cycle) for cycle in cycles))


def test_no_class_over_300_lines(project: Any) -> None:
    large = [c for c in project.classes if c.lines > MAX_CLASS_LINES]
    assert not large, "classes over 300 lines: split them by job\n" + "\n".join(
        f"{c.file}:{c.line} {c.name}: {c.lines} lines, {c.methods} methods" for c in large)


def test_the_script_runs_and_prints_json() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "shape"), "--json"],
                          capture_output=True, text=True, check=True, timeout=120)
    counts = json.loads(done.stdout)["counts"]
    assert counts["public_functions"] > 0
    assert counts["largest_class_lines"] > 0


# The cycle finder, on made-up packages


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def later():\n    from pkg.a import thing\n    return thing\n",
    })
    assert cycles_in(tmp_path) == [["pkg.a", "pkg.b"]]
    modules = shape.find_modules(tmp_path, ["pkg"])
    (cycle,) = shape.find_cycles(shape.import_edges(modules, tmp_path), shape.RUNTIME_KINDS)
    assert {(e.source, e.target, e.kind) for e in cycle.path} == {
        ("pkg.a", "pkg.b", "module"), ("pkg.b", "pkg.a", "deferred")}


def test_a_type_checking_only_edge_is_not_a_runtime_cycle(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "pkg/a.py": "from pkg.b import helper\n",
        "pkg/b.py": """\
            from typing import TYPE_CHECKING
            import typing
            if TYPE_CHECKING:
                from pkg.a import Thing
            if typing.TYPE_CHECKING:
                import pkg.a
            def helper():
                if TYPE_CHECKING:
                    from pkg import a
                return 1
            """,
    })
    assert cycles_in(tmp_path) == []
    modules = shape.find_modules(tmp_path, ["pkg"])
    edges = shape.import_edges(modules, tmp_path)
    kinds = {(e.source, e.target): e.kind for e in edges if e.source == "pkg.b"}
    assert kinds == {("pkg.b", "pkg.a"): "type_checking"}
    assert [c.modules for c in shape.type_checking_cycles(edges)] == [["pkg.a", "pkg.b"]]


def test_the_else_of_a_type_checking_block_runs(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "pkg/a.py": "import pkg.b\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    pass\nelse:\n    import pkg.a\n",
    })
    assert cycles_in(tmp_path) == [["pkg.a", "pkg.b"]]


def test_relative_and_from_package_imports_resolve_to_modules(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "pkg/sub/one.py": "from . import two\n",
        "pkg/sub/two.py": "def f():\n    from ..top import name\n",
        "pkg/top.py": "from pkg.sub import one\nname = 1\n",
        "pkg/free.py": "from pkg.sub import nothing_here\nimport os\n",
    })
    modules = shape.find_modules(tmp_path, ["pkg"])
    edges = {(e.source, e.target) for e in shape.import_edges(modules, tmp_path)}
    assert edges == {("pkg.sub.one", "pkg.sub.two"), ("pkg.sub.two", "pkg.top"),
                     ("pkg.top", "pkg.sub.one"), ("pkg.free", "pkg.sub")}
    assert cycles_in(tmp_path) == [["pkg.sub.one", "pkg.sub.two", "pkg.top"]]


def test_an_acyclic_package_has_no_cycle(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "pkg/a.py": "from pkg import b, c\n",
        "pkg/b.py": "def f():\n    from pkg import c\n",
        "pkg/c.py": "x = 1\n",
    })
    assert cycles_in(tmp_path) == []


def test_classes_and_loose_returns_are_counted(tmp_path: Path) -> None:
    write_package(tmp_path, {"pkg/a.py": """\
        from typing import Any
        class Big:
            def one(self) -> dict[str, Any]:
                return {}
            def _two(self) -> Any:
                return 1
            def three(self) -> "dict[str,Any] | None":
                return None
            def four(self) -> list[dict[str, Any]]:
                return []
        def free() -> Any:
            return 1
        """})
    measured = shape.measure(tmp_path, ["pkg"])
    (big,) = measured.classes
    assert (big.name, big.lines, big.methods) == ("Big", 9, 4)
    assert [f.name for f in measured.loose_returns] == ["Big.one", "Big.three", "free"]
    assert [f.name for f in measured.loose_mentions] == ["Big.one", "Big.three", "Big.four",
                                                          "free"]
