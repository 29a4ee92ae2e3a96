"""The measuring helpers (vitfree.benchmark) behind ``vitfree bench`` and benchmarks/ (behaviour only, no timings)."""
import json

import torch

from vitfree.cli import main
from vitfree import benchmark as bench


def test_interleaved_runs_round_robin():
    order = []
    res = bench.interleaved({'a': lambda: order.append('a'), 'b': lambda: order.append('b')}, reps=3, warmup=1)
    assert order == ['a', 'b'] * 4
    assert set(res) == {'a', 'b'} and len(res['a']['times']) == 3
    assert res['a']['min'] <= res['a']['median']


def test_peak_memory_sees_a_big_allocation():
    small = bench.peak_memory('def step():\n    torch.zeros(10)\n')
    big = bench.peak_memory('def step():\n    x = torch.ones(64 * 2**20 // 4)\n    x.sum()\n')
    assert 'error' not in big, big
    assert big['peak_mb'] >= 50 > small['peak_mb']


def test_peak_memory_reports_errors():
    assert 'error' in bench.peak_memory('raise SystemExit(3)\n')


def test_count_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert bench.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_cli_bench_tiny(tmp_path, capsys):
    out = tmp_path / 'b.json'
    assert main(['bench', 'vit_tiny_patch16_224', '--img-size', '64', '--batch', '1', '--reps', '1',
                 '--json', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'vit_tiny_patch16_224 @ 64px' in text and 'backends:' in text
    rows = json.loads(out.read_text())['rows']
    assert rows[0]['img_size'] == 64 and rows[0]['speedup'] > 0
    assert len(rows[0]['backends']) == 12


XEON = ('vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n'
        'model name\t: Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz\n'
        'flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_bf16 amx_tile amx_bf16\n')


def test_cpu_info_names_the_cpu_and_its_vector_extensions():
    info = bench.cpu_info(XEON)
    assert info['cpu'].startswith('Intel(R) Xeon(R) Platinum 8480+') and (info['family'], info['model']) == ('6', '143')
    assert info['extensions'] == ['sse4_2', 'avx', 'avx2', 'fma', 'f16c', 'avx512f', 'avx512bw', 'avx512_bf16',
                                  'amx_tile', 'amx_bf16']
    assert info['slug'] == 'intel-xeon-platinum-8480-family6-model143'
    amd = bench.cpu_info('cpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: avx2 fma\n')
    assert amd['slug'] == 'amd-epyc-family26-model2' != bench.cpu_info(XEON.replace(': 143', ': 106'))['slug']
    assert bench.cpu_results_dir('/r').startswith('/r/cpu-') and 'cpu_extensions' in bench.machine_info()


def test_merge_rows_keeps_what_this_run_did_not_measure(tmp_path):
    path = tmp_path / 'a.json'
    old = {'machine': {'cpu': 'old'}, 'rows': [{'n': 1, 'x': 1}, {'n': 2, 'x': 2}]}
    path.write_text(json.dumps(old))
    new = {'machine': {'cpu': 'new'}, 'rows': [{'n': 2, 'x': 20}, {'n': 3, 'x': 30}]}
    got = bench.merge_rows(str(path), new, key=lambda r: r['n'])
    assert [(r['n'], r['x'], r['machine']['cpu']) for r in got['rows']] == [(1, 1, 'old'), (2, 20, 'new'), (3, 30, 'new')]
    fresh = bench.merge_rows(str(tmp_path / 'none.json'), {'machine': {'cpu': 'm'}, 'rows': [{'n': 1}]}, key=lambda r: r['n'])
    assert fresh['rows'] == [{'n': 1, 'machine': {'cpu': 'm'}}]


def test_write_results_writes_whole_files(tmp_path, capsys):
    bench.write_results(str(tmp_path / 'cpu-x'), 'attention', {'rows': [1]}, '# table\n')
    assert json.loads((tmp_path / 'cpu-x' / 'attention.json').read_text()) == {'rows': [1]}
    assert (tmp_path / 'cpu-x' / 'attention.md').read_text() == '# table\n'
    assert sorted(p.name for p in (tmp_path / 'cpu-x').iterdir()) == ['attention.json', 'attention.md']
    assert '# table' in capsys.readouterr().out
