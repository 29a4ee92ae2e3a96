"""Two CPU processes (gloo): identical parameters on both ranks, and the same result as one process
with the same global batch."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import vitfree
from vitfree.train import FinetuneConfig, finetune

SPEC = vitfree.WindowSpec.uniform(2, 4, 1, global_blocks=[1]).to_dict()


def _cfg(out, batch_size, **kw):
    # no drop-path / mixup: those draw per-process random numbers, which a single process cannot mirror.
    # SGD, not AdamW: Adam rescales gradients that are zero up to rounding (the key bias of attention) to
    # full-size steps, so the rounding differences of a 2-way all-reduce would dominate those entries.
    return FinetuneConfig(model='winft_tiny_patch16_224', data='digits', output=str(out), img_size=32,
                          model_kwargs=dict(depth=2, patch_size=8, embed_dim=48, num_heads=3, windows=SPEC),
                          epochs=2, batch_size=batch_size, opt='sgd', lr=0.05, limit_train_batches=4, workers=0,
                          threads=1, progress=False, seed=11, scale=(0.5, 1.0), checkpoint_every=3, **kw)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    res = finetune(_cfg(out, batch_size=4, device='cpu'))
    save_file({k: v.contiguous() for k, v in res.model.state_dict().items()}, os.path.join(results, f'rank{rank}.st'))
    with open(os.path.join(results, f'rank{rank}.json'), 'w') as f:
        json.dump(res.metrics, f)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    results = str(tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / 'ddp'), results), nprocs=2, join=True)
    r0, r1 = load_file(f'{results}/rank0.st'), load_file(f'{results}/rank1.st')
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f'{k} differs between ranks'
    single = finetune(_cfg(tmp_path / 'single', batch_size=8))
    ref = single.model.state_dict()
    for k in r0:
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    m0 = json.load(open(f'{results}/rank0.json'))
    assert [m['val_images'] for m in m0] == [270, 270]  # validation sharded, then summed: every image once
    assert m0[-1]['top1'] == pytest.approx(single.metrics[-1]['top1'])
    # only rank 0 wrote: one start record, one record per epoch, checkpoints and export present
    events = [json.loads(line)['event'] for line in (tmp_path / 'ddp' / 'metrics.jsonl').read_text().splitlines()]
    assert events.count('start') == 1 and events.count('val') == 2
    assert (tmp_path / 'ddp' / 'model' / 'model.safetensors').is_file()
    assert json.loads(events and (tmp_path / 'ddp' / 'metrics.jsonl').read_text().splitlines()[0])['world_size'] == 2


@pytest.mark.slow
def test_torchrun_runs_the_same_command(tmp_path):
    spec = vitfree.WindowSpec.from_dict(SPEC).save(tmp_path / 'spec.json')
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    cmd = [torchrun, '--nproc_per_node', '2', '--master_port', str(_free_port()), '-m', 'vitfree.cli', 'finetune',
           'winft_tiny_patch16_224', 'digits', '-o', str(tmp_path / 'out'), '--img-size', '32', '--windows', str(spec),
           '--model-kwargs', 'depth=2', 'patch_size=8', 'embed_dim=48', 'num_heads=3', '--epochs', '1',
           '--batch-size', '4', '--limit-train-batches', '4', '--workers', '0', '--threads', '1', '--device', 'cpu',
           '--no-progress']
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / 'out' / 'metrics.jsonl').read_text().splitlines()]
    assert recs[0]['world_size'] == 2 and [r['event'] for r in recs].count('val') == 1
