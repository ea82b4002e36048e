"""The project's import graph runs one way.

* No module of ``fusion`` (stage 1: fusion) imports ``fusechat_merge`` (the merge stage,
  the CLI and the pipeline sit on top of it).
* No import cycle among the project's modules: no two modules import each other,
  directly or through others.

The imports are read with ``ast`` from every module of the ``fusion`` and
``fusechat_merge`` packages, including imports inside functions (a lazy import still makes
a cycle: the two modules cannot be understood or loaded one without the other), with
relative imports resolved. ``from pkg import name`` counts as importing the submodule
``pkg.name`` where one exists, else ``pkg``; ``import a.b.c`` counts as importing
``a.b.c`` (its parent packages are not counted as edges). ``importlib.import_module`` with
a literal module name counts too, and so do imports inside ``if TYPE_CHECKING:`` blocks:
they never run, but a module whose types come from another that imports it back is a cycle
all the same (it cannot be read, or type-checked, one without the other).

Also:

* importing the CLI module imports none of the heavy libraries;
* the rooms keep their privates: a private module (``_name.py``) or a private name
  (``from x import _name``) is imported only from inside the package that holds it;
* ``fusion/`` stays in rooms: at most `FUSION_TOP_LEVEL` modules beside its subpackages,
  and every subpackage of either package says in its ``__init__`` docstring what it is for;
* the public entry points (``fusechat_merge.sce``, ``fusechat_merge.mergekit_adapter``, the
  ``fusechat-merge`` command) and the one-release re-exports of moved modules
  (``fusion.logits``, ``fusion.align``, ``fusion.trainer``) still import, as the same objects.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fusion", "fusechat_merge")
HEAVY = ("torch", "transformers", "mergekit", "datasets", "pyarrow")
FUSION_TOP_LEVEL = 10  # modules directly in fusion/ (besides __init__): the rest lives in rooms


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # path:line

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> file."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_literal_import_module(node: ast.AST) -> bool:
    """``importlib.import_module("absolute.name")`` (or a bare ``import_module``)."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return False
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    value = node.args[0].value
    return name == "import_module" and isinstance(value, str) and not value.startswith(".")


def _import_nodes(tree: ast.AST):
    """Import statements (and literal import_module calls) anywhere: module level, inside
    functions and classes, under ``if TYPE_CHECKING:``."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _is_literal_import_module(node):
            yield node


def _deepest_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a project module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_edges(root: Path = ROOT) -> list[Edge]:
    modules = project_modules(root)
    edges: list[Edge] = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_nodes(tree):
            where = f"{path.relative_to(root)}:{node.lineno}"
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.Call):
                targets = [node.args[0].value]
            else:
                if node.level:
                    base_parts = module.split(".") if is_package else module.split(".")[:-1]
                    if node.level > 1:
                        base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join([*base_parts, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                resolved = _deepest_module(target, modules)
                if resolved is not None and resolved != module:
                    edges.append(Edge(module, resolved, where))
    return edges


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def describe_cycle(component: list[str], edges: list[Edge]) -> str:
    """The component's modules and the import lines that tie them together."""
    members = set(component)
    inner = sorted({str(e) for e in edges if e.source in members and e.target in members})
    return "cycle among " + ", ".join(component) + ":\n      " + "\n      ".join(inner)


def test_fusion_does_not_import_fusechat_merge():
    bad = [
        e for e in import_edges()
        if e.source.split(".")[0] == "fusion" and e.target.split(".")[0] == "fusechat_merge"
    ]
    assert not bad, "fusion must not import fusechat_merge:\n  " + "\n  ".join(map(str, bad))


def test_no_import_cycles():
    edges = import_edges()
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n  " + "\n  ".join(describe_cycle(c, edges) for c in cycles)


def test_the_graph_reader_sees_what_it_should(tmp_path):
    """The reader on a made-up tree: relative, lazy, submodule and TYPE_CHECKING imports."""
    files = {
        "fusion/__init__.py": "",
        "fusion/a.py": "from . import b\nfrom .sub import c as _c\n",
        "fusion/b.py": "def f():\n    from fusechat_merge import x\n",
        "fusion/sub/__init__.py": "from .. import a\n",
        "fusion/sub/c.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fusion.a\n"
            "import importlib\nimportlib.import_module('fusion.b')\n"
        ),
        "fusechat_merge/__init__.py": "",
        "fusechat_merge/x.py": "import fusion.sub.c\nfrom fusion.a import name\n",
        # the shape of the old pipeline.jobs <-> pipeline.launch cycle: lazy one way, types the other
        "fusechat_merge/jobs.py": "class Job:\n    def run(self):\n        from .launch import go\n",
        "fusechat_merge/launch.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fusechat_merge.jobs import Job\n"
        ),
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges = {(e.source, e.target) for e in import_edges(tmp_path)}
    assert edges == {
        ("fusion.a", "fusion.b"),
        ("fusion.a", "fusion.sub.c"),
        ("fusion.b", "fusechat_merge.x"),
        ("fusion.sub", "fusion.a"),
        ("fusion.sub.c", "fusion.a"),  # under TYPE_CHECKING
        ("fusion.sub.c", "fusion.b"),
        ("fusechat_merge.x", "fusion.sub.c"),
        ("fusechat_merge.x", "fusion.a"),
        ("fusechat_merge.jobs", "fusechat_merge.launch"),
        ("fusechat_merge.launch", "fusechat_merge.jobs"),
    }
    cycles = find_cycles(import_edges(tmp_path))
    assert cycles == [["fusechat_merge.jobs", "fusechat_merge.launch"],
                      ["fusechat_merge.x", "fusion.a", "fusion.b", "fusion.sub.c"]]


def test_cli_import_is_light():
    code = (
        "import json, sys\nimport fusechat_merge.cli\n"
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def _package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to (a package belongs to itself)."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def private_imports(root: Path = ROOT) -> list[str]:
    """Imports of a private module or a private name from outside the package that holds it."""
    modules = project_modules(root)
    found: list[str] = []
    for module, path in modules.items():
        here = _package_of(module, modules)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_nodes(tree):
            where = f"{path.relative_to(root)}:{node.lineno}"
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                # a name that is a submodule is a module import, not a name's
                names = [(f"{base}.{a.name}", "") if f"{base}.{a.name}" in modules else (base, a.name)
                         for a in node.names]
            else:
                names = [(t, "") for t in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                           else [node.args[0].value])]
            for target, name in names:
                owner = _deepest_module(target, modules)
                if owner is None or owner == module:
                    continue
                private_module = next((p for p in owner.split(".") if p.startswith("_")), None)
                if private_module is not None:
                    holder = owner[: owner.index(private_module)].rstrip(".")
                    if not module.startswith(holder + ".") and module != holder:
                        found.append(f"{module} imports the private module {owner} ({where})")
                if name.startswith("_") and not name.startswith("__") and _package_of(owner, modules) != here:
                    found.append(f"{module} imports the private name {owner}.{name} ({where})")
    return found


def test_no_room_reaches_into_another_rooms_privates():
    found = private_imports()
    assert not found, "private imports across rooms:\n  " + "\n  ".join(found)


def test_the_privates_check_sees_what_it_should(tmp_path):
    files = {
        "fusion/__init__.py": "",
        "fusion/room/__init__.py": "",
        "fusion/room/_inner.py": "X = 1\n",
        "fusion/room/public.py": "from fusion.room._inner import X\nfrom ._inner import X as Y\n_hidden = 1\n",
        "fusion/room/sub/__init__.py": "from fusion.room import _inner\n",  # inside the room: fine
        "fusion/other.py": "from fusion.room._inner import X\nfrom fusion.room.public import _hidden\n",
        "fusechat_merge/__init__.py": "",
        "fusechat_merge/a.py": "from fusechat_merge.b import _same_package\nimport fusion.room._inner\n",
        "fusechat_merge/b.py": "_same_package = 1\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert sorted(line.split(" (")[0] for line in private_imports(tmp_path)) == [
        "fusechat_merge.a imports the private module fusion.room._inner",
        "fusion.other imports the private module fusion.room._inner",
        "fusion.other imports the private name fusion.room.public._hidden",
    ]


def test_fusion_is_in_rooms_and_every_room_says_what_it_is_for():
    top = sorted(p.name for p in (ROOT / "fusion").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= FUSION_TOP_LEVEL, f"fusion/ has {len(top)} top-level modules: {top}"
    rooms = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("__init__.py"))]
    assert len(rooms) > len(PACKAGES)
    for init in rooms:
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 8, f"{init.relative_to(ROOT)} does not say what the room is for"


def test_the_public_entry_points_and_moved_names_still_import():
    import fusechat_merge.cli
    import fusechat_merge.mergekit_adapter
    import fusechat_merge.sce
    import fusion.align
    import fusion.align.positions
    import fusion.capture.logit_job
    import fusion.logits
    import fusion.train.trainer
    import fusion.trainer

    assert callable(fusechat_merge.sce.sce_merge) and callable(fusechat_merge.mergekit_adapter.register)
    assert fusechat_merge.cli.main.name in ("main", "fusechat-merge") and "run" in fusechat_merge.cli.main.commands
    for name in ("LogitJob", "generate_logits", "score_shard", "shard_rows"):
        assert getattr(fusion.logits, name) is getattr(fusion.capture.logit_job, name), name
    for name in fusion.align.__all__:
        assert getattr(fusion.align, name) is getattr(fusion.align.positions, name), name
    for name in ("FusionTrainer", "check_pivot", "train_fusion"):
        assert getattr(fusion.trainer, name) is getattr(fusion.train.trainer, name), name
