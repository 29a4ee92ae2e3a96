"""No function longer than 80 lines (issue 24, item 7) in the parts already split: the training loop,
the command line, and the file-reading modules below them."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'vitfree'
CHECKED = ['train', 'commands', 'cli.py', 'windows.py', 'weights.py', 'hub.py', 'data.py']
LIMIT = 80


def _files():
    for entry in CHECKED:
        path = PACKAGE / entry
        yield from (sorted(path.rglob('*.py')) if path.is_dir() else [path])


@pytest.mark.parametrize('path', list(_files()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_over_80_lines(path):
    long = [f'{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})'
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LIMIT]
    assert not long, f'{path.name}: functions over {LIMIT} lines: {", ".join(long)}'
