"""The package's import graph runs one way (DESIGN.md, "Layout"):

    version, windows  <-  ops  <-  layers  <-  weights  <-  models  <-  analysis, hub, benchmark
    <-  train  <-  cli, commands, demo

Every import counts, also those inside functions (a lazy import is still a dependency).  No
module imports a higher layer or the package root; analysis, hub and benchmark, the parts built
on the models, are independent of each other (training exports through hub); there are no
import circles.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / 'vitfree'

RANK = {
    'version': 0, '_util': 0, 'windows': 0, 'data': 0,
    'ops': 1,
    'layers': 2,
    'weights': 3,
    'models': 4,
    'analysis': 5, 'hub': 5, 'benchmark': 5,
    'train': 6,
    'cli': 7, 'commands': 7, 'demo': 7,
}
TOP = 5  # the parts built on the models


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix('')
    parts = list(rel.parts)
    if parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(parts)


def imports_of(path: Path) -> Set[str]:
    """Every vitfree module ``path`` imports, resolved to dotted names."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split('.')[0] == 'vitfree')
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if target.split('.')[0] != 'vitfree':
                continue
            for a in node.names:  # `from .x import y` may import the submodule y
                sub = f'{target}.{a.name}'
                out.add(sub if _exists(sub) else target)
    return {m for m in out if m != name}


def _exists(dotted: str) -> bool:
    p = PACKAGE.parent.joinpath(*dotted.split('.'))
    return p.with_suffix('.py').is_file() or (p / '__init__.py').is_file()


def layer(module: str) -> str:
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def graph() -> Dict[str, Set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob('*.py')}


def test_every_top_level_part_has_a_layer():
    parts = {layer(m) for m in graph()} - {''}
    assert parts <= set(RANK), f'parts without a layer in this test: {sorted(parts - set(RANK))}'


def test_no_upward_imports():
    bad: List[str] = []
    for mod, deps in graph().items():
        if mod == 'vitfree':  # the package root re-exports the public API (and loads the rest lazily)
            continue
        for dep in deps:
            if dep == 'vitfree':
                bad.append(f'{mod} imports the package root (import from the module instead)')
            elif layer(dep) != layer(mod) and RANK[layer(dep)] > RANK[layer(mod)]:
                bad.append(f'{mod} -> {dep} ({layer(mod)} is below {layer(dep)})')
            elif layer(dep) != layer(mod) and RANK[layer(dep)] == RANK[layer(mod)] == TOP:
                bad.append(f'{mod} -> {dep} ({layer(mod)} and {layer(dep)} are independent parts)')
    assert not bad, 'imports that run upward:\n' + '\n'.join(sorted(bad))


def test_no_import_circles():
    g = graph()
    # an __init__ re-exporting its own submodules is not a circle; edges into a package from its
    # own submodules are (they would import the package while it is half-initialised)
    edges = {m: {d for d in deps if d in g and not (d.startswith(m + '.'))} for m, deps in g.items()}
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def visit(m: str, stack: List[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycles, 'import circles:\n' + '\n'.join(' -> '.join(c) for c in cycles)


def _reachable(g: Dict[str, Set[str]], start: str) -> Set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for d in g.get(m, ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_the_dispatcher_never_measures():
    """Calibration is a tool: nothing the dispatcher (or a layer) imports reaches the measuring code,
    directly or through other modules, so no forward pass can start a measurement."""
    g = graph()
    for start in ('vitfree.ops.dispatch', 'vitfree.ops.backend', 'vitfree.layers.window_attention'):
        assert 'vitfree.ops.calibrate' not in _reachable(g, start), start
