"""The package's import graph: no cycles, and imports run one way through the layers
kernels/ops -> engine -> scoring -> evaluation / training -> cli (read from the source with
``ast``, function-level imports included, ``TYPE_CHECKING`` ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "flr_engine"

# lowest first; a module may import only from its own layer or below
LAYERS = [
    ("errors", "_version", "logs"),
    ("ops", "kernels"),
    ("engine",),
    ("control", "chat", "chat_formats", "templates", "io", "models", "reward", "sampling",
     "reference", "baselines", "llamacpp", "scorer", "trl_reward", "env", "distributed",
     "ray_data"),
    ("evaluation", "mining", "dpo", "feedback", "pairwise_tune", "bench"),
    ("cli",),
]  # fmt: skip


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        if "kernels" in rel.parts:  # the Triton sources: below ops, import nothing of ours
            continue
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != mod and not mod.startswith(n + "."):  # parents run first anyway
                    graph[mod].add(n)
    return graph


def _layer(mod: str) -> int:
    if mod == "flr_engine":
        return len(LAYERS)  # the package's public re-exports sit on top
    top = mod.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    assert all(_layer(m) >= 0 for m in import_graph())


def test_no_import_cycles():
    graph = import_graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_run_down_the_layers():
    upward = sorted(
        (a, b) for a, deps in import_graph().items() for b in deps
        if _layer(b) > _layer(a)
    )  # fmt: skip
    assert upward == []
