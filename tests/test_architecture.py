"""The package's shape (DESIGN.md, "The rooms"): imports run one way, from the bottom
room to the top, never back up and never in a circle.

The import graph is read from the source (ast): every `import hpcimage...` and
`from hpcimage... import ...`, at the top of a module or inside a function alike (a
lazy import is still a dependency). Rooms, bottom first:

    errors, fsutil  <  linux  <  config  <  image  <  host  <  runtime (with runtime.mpi
    and the doctors)  <  signing  <  store  <  imagebuild  <  generate  <  cli

A module may import from its own room or the rooms below it. `hpcimage` itself (the
package's __init__: the version) is at the bottom.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "hpcimage")

ROOMS = [
    ("hpcimage", "hpcimage.errors", "hpcimage.fsutil"),
    ("hpcimage.linux",),
    ("hpcimage.config",),
    ("hpcimage.image",),
    ("hpcimage.host",),
    ("hpcimage.runtime",),
    ("hpcimage.signing",),
    ("hpcimage.store",),
    ("hpcimage.imagebuild",),
    ("hpcimage.generate",),
    ("hpcimage.cli",),
]


def room(module):
    """The index of module's room in ROOMS (the longest matching prefix)."""
    best, best_len = None, -1
    for i, names in enumerate(ROOMS):
        for name in names:
            exact = name in ("hpcimage",)
            if module == name or not exact and module.startswith(name + "."):
                if len(name) > best_len:
                    best, best_len = i, len(name)
    return best


def modules(top=PKG):
    """{dotted name: path} of every module of the package."""
    out = {}
    for d, dirs, files in os.walk(top):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                rel = os.path.relpath(p[:-3], os.path.dirname(top)).replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = p
    return out


def imports(name, path, known):
    """The hpcimage modules that module NAME (file PATH) imports, anywhere in it."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "hpcimage" or a.name.startswith("hpcimage."):
                    deps.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = pkg + ("." + base if base else "")
            if base != "hpcimage" and not base.startswith("hpcimage."):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                deps.add(sub if sub in known else base)
    deps.discard(name)
    return deps


def graph(top=PKG):
    known = modules(top)
    return {name: imports(name, path, known) for name, path in known.items()}


def upward(g):
    bad = []
    for mod, deps in sorted(g.items()):
        r = room(mod)
        assert r is not None, f"{mod}: in no room of DESIGN.md's tree"
        for d in sorted(deps):
            rd = room(d)
            if rd is None or rd > r:
                bad.append(f"{mod} -> {d}")
    return bad


def circles(g):
    """Every import circle (strongly connected component of more than one module)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_room():
    assert [m for m in graph() if room(m) is None] == []


def test_no_module_imports_upward():
    assert upward(graph()) == []


def test_no_import_circle():
    assert circles(graph()) == []


def test_the_checks_see_a_violation(tmp_path):
    """The checks themselves: an upward import and a circle in a small fake package."""
    top = tmp_path / "hpcimage"
    (top / "linux").mkdir(parents=True)
    (top / "runtime").mkdir()
    for p in ("__init__.py", "linux/__init__.py", "runtime/__init__.py"):
        (top / p).write_text("")
    (top / "linux" / "a.py").write_text("def f():\n    from hpcimage.runtime import b\n")
    (top / "runtime" / "b.py").write_text("from hpcimage.runtime.c import x\n")
    (top / "runtime" / "c.py").write_text("import hpcimage.runtime.b\nx = 1\n")
    g = graph(str(top))
    assert upward(g) == ["hpcimage.linux.a -> hpcimage.runtime.b"]
    assert circles(g) == [["hpcimage.runtime.b", "hpcimage.runtime.c"]]


@pytest.mark.parametrize("entry", ["hpcimage.runtime.main", "hpcimage.cli"])
def test_entry_points_exist(entry):
    """The entry points that deployed wrappers and the console script call."""
    assert entry in graph()
