"""A real `kill -9` of `vitfree finetune` mid-run, then `--resume`: same final weights as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

import vitfree
from vitfree.train import CheckpointManager, FinetuneConfig, finetune


def _cmd(spec_file, out):
    return [sys.executable, '-m', 'vitfree.cli', 'finetune', 'winft_tiny_patch16_224', 'digits', '-o', str(out),
            '--img-size', '32', '--windows', str(spec_file),
            '--model-kwargs', 'depth=2', 'patch_size=8', 'embed_dim=48', 'num_heads=3',
            '--epochs', '2', '--batch-size', '16', '--lr', '2e-3', '--drop-path', '0.1', '--scale', '0.5', '1',
            '--checkpoint-every', '2', '--keep-last', '3', '--workers', '0', '--threads', '1',
            '--no-progress', '--seed', '5', '--limit-train-batches', '40', '--limit-val-batches', '2']


def _cfg(spec_file, out, **kw):
    """The same run as `_cmd`, through the library (same single thread, so the same arithmetic)."""
    return FinetuneConfig(model='winft_tiny_patch16_224', data='digits', output=str(out), img_size=32,
                          windows=str(spec_file), model_kwargs=dict(depth=2, patch_size=8, embed_dim=48, num_heads=3),
                          epochs=2, batch_size=16, lr=2e-3, drop_path=0.1, scale=(0.5, 1.0), checkpoint_every=2,
                          keep_last=3, workers=0, threads=1, progress=False, seed=5, limit_train_batches=40,
                          limit_val_batches=2, **kw)


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    spec_file = vitfree.WindowSpec.uniform(2, 4, 1, global_blocks=[1]).save(tmp_path / 'spec.json')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    victim = subprocess.Popen(_cmd(spec_file, tmp_path / 'run'), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    ckpts = CheckpointManager(tmp_path / 'run' / 'checkpoints')
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        names = [p.name for p in ckpts.list()]
        if names and int(names[-1][5:14]) >= 16:
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = names[-1]
            break
        time.sleep(0.01)
    victim.wait()
    assert killed_at is not None, f'the run ended before it could be killed: {victim.stderr.read()[-2000:]}'
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / 'run' / 'model').exists()  # it really died before the end
    resumed = finetune(_cfg(spec_file, tmp_path / 'run', resume=True))
    ref = finetune(_cfg(spec_file, tmp_path / 'ref'))
    assert resumed.global_step == ref.global_step == 80
    events = [json.loads(line)['event'] for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert events.count('start') == 1  # the second run resumed rather than starting over
    a = load_file(str(tmp_path / 'ref' / 'model' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'run' / 'model' / 'model.safetensors'))
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) == 0, {k: v for k, v in diffs.items() if v}
