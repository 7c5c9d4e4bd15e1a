"""The import-layer contract of the project, checked from the source (no imports executed).

Layers, lowest first; a module may import only from its own layer or a lower one, and across
layers only public modules (no path component starting with ``_``):

0. math core -- ``lightning_sgl.optim`` private rule modules and its public face
   ``lightning_sgl.optim.functional``;
1. torch front ends -- the ``torch.optim`` classes (``lightning_sgl.optim``), plain torch models,
   metrics and data, checkpoint files (``lightning_sgl.checkpoint``: standard library only, used
   by the serving export to verify what it reads); and the fused table kernel
   ``torchrec_ext.kernel``, which may import from the math core only through
   ``lightning_sgl.optim.functional``;
2. TorchRec integration -- the rest of ``torchrec_ext``;
3. Lightning integration -- callbacks, strategy, the optimizer factory, ``ctr``;
4. examples and benchmarks.

Lazy imports inside functions count as imports. The eager (module-level) imports of the
project's modules must have no cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_sgl", "torchrec_ext", "examples", "benchmarks")

#: (module prefix, layer); the longest matching prefix wins
LAYERS: list[tuple[str, int]] = [
    ("lightning_sgl.optim._prox", 0), ("lightning_sgl.optim._dual", 0),
    ("lightning_sgl.optim._moments", 0), ("lightning_sgl.optim._specs", 0),
    ("lightning_sgl.optim._validation", 0), ("lightning_sgl.optim._functional", 0),
    ("lightning_sgl.optim.functional", 0),
    ("lightning_sgl.optim", 1), ("lightning_sgl.models", 1), ("lightning_sgl.metrics", 1),
    ("lightning_sgl.data", 1), ("lightning_sgl.checkpoint", 1),
    ("torchrec_ext.kernel", 1), ("torchrec_ext._C", 1),
    ("torchrec_ext", 2),
    ("lightning_sgl", 3),
    ("examples", 4), ("benchmarks", 4),
]
NAMES = {0: "math core", 1: "torch front end / fused kernel", 2: "TorchRec integration",
         3: "Lightning integration", 4: "examples"}
#: what the fused kernel may import from lightning_sgl (the math core's public face)
KERNEL_MAY_IMPORT = ("lightning_sgl.optim.functional",)


def layer_of(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    eager: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every project import of one file, absolute, with whether it runs at import time."""
    name = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    eager_nodes = {id(n) for n in tree.body}
    for node in tree.body:  # module-level try/if blocks run at import time too
        if isinstance(node, (ast.Try, ast.If)):
            eager_nodes |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` may import a submodule: record both readings
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names
                               if (root / Path(*f"{mod}.{a.name}".split("."))).with_suffix(".py")
                               .exists() or (root / Path(*f"{mod}.{a.name}".split("."))).is_dir()]
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                out.append(Import(name, t, node.lineno, id(node) in eager_nodes))
    return out


def all_imports(root: Path = ROOT) -> list[Import]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            out.append(imports_of(path, root))
    return [i for group in out for i in group]


def _private_outside(importer: str, imported: str) -> str | None:
    """The private module ``imported`` reaches into when ``importer`` is not inside the package
    that owns it (Python's convention: ``pkg._mod`` is for ``pkg`` and its submodules)."""
    parts = imported.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.startswith("_") and not part.startswith("__"):
            owner = ".".join(parts[:i])
            if not (importer == owner or importer.startswith(owner + ".")):
                return ".".join(parts[:i + 1])
    return None


def violations(root: Path = ROOT) -> list[str]:
    """Every breach of the contract, as readable lines (empty: the contract holds)."""
    bad = []
    for imp in all_imports(root):
        src, dst = layer_of(imp.importer), layer_of(imp.imported)
        if src is None or dst is None:
            bad.append(f"{imp.importer}:{imp.line}: {imp.imported} has no layer (add it to LAYERS)")
            continue
        where = f"{imp.importer}:{imp.line} imports {imp.imported}"
        if dst > src:
            bad.append(f"{where}: upward ({NAMES[src]} -> {NAMES[dst]})")
        private = _private_outside(imp.importer, imp.imported)
        if private:
            bad.append(f"{where}: private module {private} used outside its package")
        if (imp.importer.startswith("torchrec_ext.kernel") and imp.imported.startswith(
                "lightning_sgl") and not imp.imported.startswith(KERNEL_MAY_IMPORT)):
            bad.append(f"{where}: the kernel imports only {KERNEL_MAY_IMPORT[0]}")
        if (imp.importer.startswith("lightning_sgl.optim") and src <= 1
                and imp.imported.startswith("torchrec_ext")):
            bad.append(f"{where}: the torch front end does not import the fused kernel")
    return bad


def eager_cycles(root: Path = ROOT) -> list[list[str]]:
    """Cycles among module-level imports of the project's modules (``a`` imports ``b`` at import
    time and ``b`` imports ``a``, possibly through others). Package ``__init__`` re-exports of
    their own submodules are edges too."""
    modules = {module_name(p, root) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in all_imports(root):
        if imp.eager and imp.imported in modules and imp.imported != imp.importer:
            # importing a package's submodule runs the package first; that is not a cycle
            if imp.importer.startswith(imp.imported + "."):
                continue
            graph[imp.importer].add(imp.imported)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles
