"""Weight loading sits below the models, export/push above them (DESIGN: windows <- ops <- layers <-
weights <- models; hub, train, cli on top).  Every import counts, also those inside functions."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / 'vitfree'


def imported_modules(path: Path):
    """Absolute ``vitfree.*`` module names a file imports (top level and inside functions)."""
    parts = ['vitfree'] + list(path.relative_to(PKG).with_suffix('').parts)
    package = parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = '.'.join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ''
            if name.startswith('vitfree'):
                found.add(name)
                found.update(f'{name}.{a.name}' for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith('vitfree'))
    return found


def files(*names):
    out = []
    for n in names:
        p = PKG / n
        out += sorted(p.rglob('*.py')) if p.is_dir() else [p.with_suffix('.py')]
    return out


FORBIDDEN = {
    'weights': ('vitfree.models', 'vitfree.hub', 'vitfree.train', 'vitfree.analysis', 'vitfree.commands',
                'vitfree.cli', 'vitfree.data', 'vitfree.demo'),
    'models': ('vitfree.hub', 'vitfree.train', 'vitfree.analysis', 'vitfree.commands', 'vitfree.cli', 'vitfree.data',
               'vitfree.demo'),
    'hub': ('vitfree.train', 'vitfree.analysis', 'vitfree.commands', 'vitfree.cli', 'vitfree.data', 'vitfree.demo'),
    'train': ('vitfree.analysis', 'vitfree.commands', 'vitfree.cli', 'vitfree.demo'),
}


@pytest.mark.parametrize('layer', sorted(FORBIDDEN))
def test_no_upward_imports(layer):
    bad = []
    for f in files(layer):
        for mod in imported_modules(f):
            if mod.startswith(FORBIDDEN[layer]):
                bad.append(f'{f.relative_to(PKG.parent)} imports {mod}')
    assert not bad, '\n'.join(bad)


def test_old_data_module_is_only_a_re_export():
    import vitfree.data
    import vitfree.train.data
    assert vitfree.data.build_dataset is vitfree.train.data.build_dataset
    assert set(vitfree.data.__all__) == set(vitfree.train.data.__all__)
