"""The analysis room's structure: one image loop, one plotting module, nothing imported upward from
report/ (the 80-line limit for every function is tests/test_function_length.py)."""
import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / 'vitfree'
ANALYSIS = PACKAGE / 'analysis'


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def _calls(path: Path, name: str):
    """Line numbers where ``path`` calls a function named ``name`` (plain or as an attribute)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                out.append(node.lineno)
    return out


def test_one_image_loop():
    """Every analysis runs its images through inputs.ImageLoop (eval mode, progress bar, grid check,
    the empty-input error); nothing else in analysis/ iterates iter_images or words that error."""
    for path in sorted(ANALYSIS.rglob('*.py')):
        if path.name == 'inputs.py':
            continue
        assert not _calls(path, 'iter_images'), f'{path.name} runs its own image loop: use inputs.ImageLoop'
        assert 'yielded none' not in path.read_text(), path.name
    for module in ('interaction', 'heads', 'removal', 'semantic', 'capture'):
        assert _calls(ANALYSIS / f'{module}.py', 'ImageLoop'), module


def test_one_plotting_module_and_nothing_imports_report():
    assert (ANALYSIS / 'plots.py').is_file() and not (ANALYSIS / 'report' / 'plots.py').exists()
    for path in sorted(ANALYSIS.rglob('*.py')):
        if 'report' in path.relative_to(ANALYSIS).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ('.' * node.level) + (node.module or '')
                assert 'report' not in module.split('.'), f'{path.name} imports {module} (upward, from report/)'
    plots = ast.parse((ANALYSIS / 'plots.py').read_text())
    imported = {('.' * n.level) + (n.module or '') for n in ast.walk(plots) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m.startswith('.')} == {'.inputs'}  # reads result objects by attribute only
