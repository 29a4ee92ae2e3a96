"""The analysis package's imports: no circles inside it, nothing lower imports it, and the demo
does not reach into the command-line layer.  Imports inside functions count as edges too."""
import ast
from pathlib import Path

import vitfree

ROOT = Path(vitfree.__file__).resolve().parent
LOWER = ('vitfree.windows', 'vitfree.ops', 'vitfree.layers', 'vitfree.models', 'vitfree.weights')


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def modules():
    return {module_name(p): p for p in ROOT.rglob('*.py')}


def imports_of(name: str, path: Path, known) -> set:
    """Every vitfree module ``name`` imports, at any depth of the file; ``from pkg import sub``
    counts as importing the submodule when ``sub`` is one."""
    package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith('vitfree'))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if not target.startswith('vitfree'):
                continue
            subs = [f'{target}.{a.name}' for a in node.names if f'{target}.{a.name}' in known]
            out.update(subs if len(subs) == len(node.names) else subs + [target])
    return {m for m in out if m in known and m != name}


def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(edges, nodes):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if m not in nodes:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_circle_inside_analysis():
    g = graph()
    nodes = {n for n in g if n.startswith('vitfree.analysis')}
    assert {'vitfree.analysis.capture', 'vitfree.analysis.inputs', 'vitfree.analysis.report.plots'} <= nodes
    cycle = find_cycle(g, nodes)
    assert cycle is None, ' -> '.join(cycle)


def test_inputs_is_the_bottom_of_analysis():
    g = graph()
    analysis = {m for m in g['vitfree.analysis.inputs'] if m.startswith('vitfree.analysis')}
    assert analysis == set()
    assert {m for m in g['vitfree.analysis.capture'] if m.startswith('vitfree.analysis')} <= {
        'vitfree.analysis.inputs', 'vitfree.analysis.report.plots'}  # plots: only for Recorder.save
    assert {m for m in g['vitfree.analysis.report.plots'] if m.startswith('vitfree.analysis')} == {
        'vitfree.analysis.inputs'}


def test_nothing_lower_imports_analysis_and_demo_skips_commands():
    g = graph()
    for name, targets in g.items():
        if name.startswith(LOWER):
            assert not any(t.startswith('vitfree.analysis') for t in targets), (name, targets)
    assert not any(t.startswith('vitfree.commands') for t in g['vitfree.demo'])
    assert not any(t.startswith('vitfree.commands') for n, ts in g.items() if n.startswith('vitfree.analysis')
                   for t in ts)
