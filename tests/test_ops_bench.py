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
