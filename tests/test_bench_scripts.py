"""The benchmark scripts still run against the package (structure and finite numbers only, never speed).

``benchmarks/`` is not imported by the rest of the suite, so an API change in ``vitfree`` used to
break a script silently; most of all ``bench_cuda.py`` / ``run_cuda.sh``, which only a rented GPU
runs.  Here: every ``vitfree`` name the scripts import or read exists; ``run_cuda.sh calibrate smoke``
runs ``vitfree calibrate`` through the script's own command line and ``bench_cuda.py --device cpu
--smoke`` (the same code paths as on the GPU, tiny sizes); ``bench_attention.py`` on its smallest
case; ``bench_models.py`` and ``bench_families.py`` on a 32 px image.  A real CUDA run cannot be
checked here (no GPU).
"""
from __future__ import annotations

import ast
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / 'benchmarks'
CPU_METHODS = ('flash', 'tiled', 'sdpa-tiles', 'auto', 'dense', 'native')  # what bench_cuda.py times on a CPU


def _env(tmp_path: Path) -> dict:
    """The environment of a script run: this checkout first on the path, a fresh vitfree cache (so no
    table measured by someone else applies) that shares the compiled native kernel of the current one."""
    from vitfree.ops.calibration import cache_dir
    cache = tmp_path / 'cache'
    cache.mkdir()
    kernels = cache_dir() / 'kernels'
    if kernels.is_dir():
        (cache / 'kernels').symlink_to(kernels, target_is_directory=True)
    env = dict(os.environ, VITFREE_CACHE_DIR=str(cache), PYTHON=sys.executable, HF_HUB_OFFLINE='1',
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    for var in ('VITFREE_BACKEND', 'VITFREE_CALIBRATION', 'CALIBRATE_ARGS', 'BENCH_ARGS'):
        env.pop(var, None)
    return env


def _run(cmd, tmp_path: Path, timeout: float = 240, **env) -> str:
    res = subprocess.run(cmd, cwd=ROOT, env={**_env(tmp_path), **env}, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f'{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}'
    return res.stdout + res.stderr


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---- every vitfree name the scripts use exists --------------------------------------------------------
def _module_aliases(tree: ast.AST) -> dict:
    """``{local name: module}`` for every vitfree module a script binds to a name."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split('.')[0] == 'vitfree':
                    out[a.asname or 'vitfree'] = importlib.import_module(a.name if a.asname else 'vitfree')
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'vitfree':
            mod = importlib.import_module(node.module)
            for a in node.names:
                if hasattr(mod, a.name):
                    val = getattr(mod, a.name)
                else:
                    try:
                        val = importlib.import_module(f'{node.module}.{a.name}')
                    except ImportError:
                        continue  # reported by _missing_names
                if isinstance(val, type(os)):  # a module (not a function of the same name)
                    out[a.asname or a.name] = val
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
              and getattr(node.value.func, 'attr', None) == 'import_module' and node.value.args
              and isinstance(node.value.args[0], ast.Constant)):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = importlib.import_module(node.value.args[0].value)
    return out


def _missing_names(path: Path) -> list:
    tree = ast.parse(path.read_text())
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'vitfree':
            mod = importlib.import_module(node.module)
            for a in node.names:
                if not hasattr(mod, a.name):
                    try:
                        importlib.import_module(f'{node.module}.{a.name}')
                    except ImportError:
                        missing.append(f'line {node.lineno}: from {node.module} import {a.name}')
    aliases = _module_aliases(tree)
    for node in ast.walk(tree):  # alias.attr.attr ... read from a vitfree module
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in aliases and chain:
            obj = aliases[node.id]
            for attr in reversed(chain):
                if not isinstance(obj, type(os)):
                    break  # past the modules: a function's or class's own attributes are not checked
                if not hasattr(obj, attr):
                    try:
                        obj = importlib.import_module(f'{obj.__name__}.{attr}')
                        continue
                    except ImportError:
                        missing.append(f'line {node.lineno}: {obj.__name__}.{attr}')
                        break
                obj = getattr(obj, attr)
    return sorted(set(missing))


@pytest.mark.parametrize('name', sorted(p.name for p in BENCH.glob('*.py')))
def test_every_vitfree_name_a_script_uses_exists(name):
    missing = _missing_names(BENCH / name)
    assert not missing, f'{name} uses vitfree names that do not exist: {missing}'


# ---- run_cuda.sh and bench_cuda.py ------------------------------------------------------------------------
def test_run_cuda_sh_calibrate_and_the_cpu_smoke_run_of_bench_cuda(tmp_path):
    """``run_cuda.sh calibrate smoke`` on the CPU: the calibration stage's ``vitfree calibrate`` command line
    (here with one backend that refuses the CPU: every timing skipped, the table still written), then
    ``bench_cuda.py --device cpu --smoke --recalibrate``: every part of the GPU run, results written."""
    out = tmp_path / 'out'
    log = _run(['bash', str(BENCH / 'run_cuda.sh'), 'calibrate', 'smoke'], tmp_path, OUT=str(out),
               CAL_DEVICE='cpu', CALIBRATE_ARGS='--quick --backends xformers')
    assert '== calibration' in log and '== bench_cuda.py on the CPU' in log, log[-2000:]
    tables = [p for p in out.glob('*.json') if not p.name.startswith('smoke_')]
    assert len(tables) == 1 and json.loads(tables[0].read_text())['format'] == 'vitfree.calibration'
    assert (out / 'calibration.log').is_file() and (out / 'bench_cuda_smoke.log').is_file()

    (res_path,) = out.glob('smoke_cpu_*.json')
    res = json.loads(res_path.read_text())
    assert 'error' not in res, res.get('error')
    assert res['config']['smoke'] and res['config']['device'] == 'cpu'
    assert res['calibration'].startswith('quick calibration made in this run')
    assert res['calibration_fits'] and all(_positive(f['samples']) for per in res['calibration_fits'].values()
                                           for f in per.values())
    assert [(r['N'], r['mode']) for r in res['op']] == [(64, 'fwd'), (64, 'fwd+bwd'), (256, 'fwd'), (256, 'fwd+bwd')]
    for r in res['op']:
        assert not r['error'], r['error']
        assert all(_positive(r['ms'].get(m)) for m in CPU_METHODS), (r['mode'], r['ms'], r['skipped'])
        assert {'flex', 'xformers', 'xformers-dense'} <= set(r['skipped']), r['skipped']
        assert 'CUDA' in r['skipped']['xformers'] and r['auto_picks'] in CPU_METHODS
    sweep = res['tile_sweep']
    assert len(sweep['chosen']) == 2 and all(_positive(v) for v in sweep['ms'].values()), sweep
    models = {(r['img'], r['model']): r for r in res['models']}
    for key in [(64, 'vit'), (64, 'winft:auto'), (128, 'vit'), (128, 'winft:auto'), (128, 'winft:tiled'),
                (128, 'winft:sdpa-tiles')]:
        r = models[key]
        assert _positive(r.get('infer_img_s')) and _positive(r.get('train_img_s')), r
    assert models[(128, 'winft:tiled')]['backends'] == ['tiled']
    assert 'skipped' in models[(128, 'winft:flex')] and 'skipped' in models[(128, 'winft:xformers')]
    md = res_path.with_suffix('.md').read_text()
    assert md.startswith('# bench_cuda.py smoke run') and '| 256 | 1 | fwd+bwd |' in md and 'winft:tiled' in md


def test_bench_cuda_refuses_a_cpu_run_that_is_not_a_smoke_run():
    sys.path.insert(0, str(BENCH))
    try:
        bench_cuda = importlib.import_module('bench_cuda')
    finally:
        sys.path.remove(str(BENCH))
    assert bench_cuda.main(['--device', 'cpu']) == 2
    if not torch.cuda.is_available():
        assert bench_cuda.main([]) == 2


# ---- the CPU scripts ----------------------------------------------------------------------------------
def test_bench_attention_smallest_case(tmp_path):
    _run([sys.executable, str(BENCH / 'bench_attention.py'), '--cases', '196', '--reps', '1', '--no-memory',
          '--no-tiles', '--threads', '1', '--out', str(tmp_path / 'out')], tmp_path)
    (path,) = (tmp_path / 'out').glob('cpu-*/attention.json')
    rows = json.loads(path.read_text())['rows']
    assert sorted(r['mode'] for r in rows) == ['fwd', 'fwd+bwd'] and all(r['N'] == 196 for r in rows)
    for r in rows:
        assert {'sdpa', 'sdpa_mask', 'tiled', 'native', 'auto'} <= set(r['time_s']), r['time_s']
        assert all(_positive(t) for t in r['time_s'].values()), r['time_s']
        assert r['pairs']['window'] < r['pairs']['all']
    assert path.with_suffix('.md').is_file()


def _script(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_bench_models_one_tiny_size(tmp_path):
    bench_models = _script('bench_models')
    threads = torch.get_num_threads()
    try:
        assert bench_models.main(['--sizes', '32', '--threads', '1', '--reps', '1', '--kinds', 'infer',
                                  '--out', str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob('cpu-*/models.json')
    (row,) = json.loads(path.read_text())['rows']
    assert row['img_size'] == 32 and row['backends'] and 'train_ms' not in row
    assert set(row['infer_ms']) == set(bench_models.VARIANTS) and all(_positive(t) for t in row['infer_ms'].values())
    assert path.with_suffix('.md').is_file()


def test_bench_families_builds_and_times_a_tiny_dinov3(monkeypatch):
    fam = _script('bench_families')
    monkeypatch.setattr(fam, 'peak_memory', lambda setup, threads=1: {'peak_mb': 1.0})  # a fresh process each: slow
    row = fam.bench(fam.DINO, ['timm', 'winft_7x7'], 32, 1, torch.get_num_threads())
    assert row['grid'] == 2 and all(_positive(v) for v in row['images_per_s'].values()), row
    assert row['backends']['winft_7x7']
    md = fam.to_markdown({'machine': {'cpu': 'x', 'cores': 1, 'torch': torch.__version__, 'load_avg_1_5_15': []},
                          'reps': 1, 'threads': 1, 'rows': [row]})
    assert '| 32 | 4 |' in md
    import vitfree
    for spec in ('winft_prior_sam_d12_g64', 'winft_local_sam_d12_g64'):  # the SAM part's windows (not run here)
        assert vitfree.windows.get_spec(spec).depth == 12
