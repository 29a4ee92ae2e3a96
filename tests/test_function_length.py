"""No function in vitfree/ is longer than 80 lines (issue 24, item 7)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'vitfree'
LIMIT = 80


def _files():
    yield from sorted(PACKAGE.rglob('*.py'))


@pytest.mark.parametrize('path', list(_files()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_over_80_lines(path):
    long = [f'{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})'
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LIMIT]
    assert not long, f'{path.name}: functions over {LIMIT} lines: {", ".join(long)}'
