"""Fine-tuning loop: metrics, exact resume after a crash, AMP, grad checkpointing, layer decay, EMA/mixup."""
import json

import pytest
import torch
from safetensors.torch import load_file

import vitfree
from vitfree.train import CheckpointManager, FinetuneConfig, finetune

SPEC = vitfree.WindowSpec.uniform(2, 4, 1, global_blocks=[1]).to_dict()  # 4x4 grid, 2 blocks


def tiny_cfg(tmp_path, **kw):
    """A 2-block WinfT on 32x32 digits (patch 8 -> 4x4 grid), a few steps, one thread."""
    base = dict(model='winft_tiny_patch16_224', data='digits', output=str(tmp_path / 'run'), img_size=32,
                model_kwargs=dict(depth=2, patch_size=8, embed_dim=48, num_heads=3, windows=SPEC),
                epochs=2, batch_size=16, lr=2e-3, limit_train_batches=5, limit_val_batches=2, workers=0,
                threads=1, progress=False, seed=3, drop_path=0.1, hflip=0.5, scale=(0.5, 1.0))
    base.update(kw)
    return FinetuneConfig(**base)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_finetune_writes_metrics_checkpoints_and_export(tmp_path):
    res = finetune(tiny_cfg(tmp_path, checkpoint_every=3, keep_last=2))
    out = res.output
    recs = read_jsonl(out / 'metrics.jsonl')
    assert recs[0]['event'] == 'start' and recs[0]['input_size'] == [3, 32, 32]
    vals = [r for r in recs if r['event'] == 'val']
    assert [v['epoch'] for v in vals] == [1, 2]
    assert all(0 <= v['top1'] <= v['top5'] <= 100 and v['val_images'] == 32 for v in vals)
    trains = [r for r in recs if r['event'] == 'train']
    assert trains and all(r['img_per_s'] > 0 and r['loss'] > 0 for r in trains)
    assert res.global_step == 10
    names = [p.name for p in CheckpointManager(out / 'checkpoints').list()]
    assert names == ['ckpt-000000009', 'ckpt-000000010-end']  # keep_last=2
    # the export is a timm local-dir model with the same windows and weights
    import timm
    m = timm.create_model(f'local-dir:{res.export}', pretrained=True)
    assert m.window_spec == res.model.window_spec and m.num_classes == 10
    cfg = json.loads((res.export / 'config.json').read_text())
    assert cfg['label_names'] == [str(i) for i in range(10)]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m.eval()(x), res.model.eval()(x))


def _final_weights(run_dir):
    return load_file(str(run_dir / 'model' / 'model.safetensors'))


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    ref = finetune(tiny_cfg(tmp_path / 'a', ema=True, ema_decay=0.9, mixup=0.4, smoothing=0.1))

    class Crash(RuntimeError):
        pass

    def crash_at_7(step):
        if step == 7:
            raise Crash()

    cfg = tiny_cfg(tmp_path / 'b', ema=True, ema_decay=0.9, mixup=0.4, smoothing=0.1, checkpoint_every=3)
    with pytest.raises(Crash):
        finetune(cfg, on_step=crash_at_7)
    assert [p.name for p in CheckpointManager(tmp_path / 'b' / 'run' / 'checkpoints').list()][-1] == 'ckpt-000000006'
    res = finetune(cfg, resume=True)
    a, b = _final_weights(tmp_path / 'a' / 'run'), _final_weights(tmp_path / 'b' / 'run')
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a = load_file(str(tmp_path / 'a' / 'run' / 'model_ema' / 'model.safetensors'))
    ema_b = load_file(str(tmp_path / 'b' / 'run' / 'model_ema' / 'model.safetensors'))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # metrics of the resumed run match too (records after the checkpoint were replaced, not duplicated)
    va = [r for r in read_jsonl(tmp_path / 'a' / 'run' / 'metrics.jsonl') if r['event'] == 'val']
    vb = [r for r in read_jsonl(tmp_path / 'b' / 'run' / 'metrics.jsonl') if r['event'] == 'val']
    assert [(r['step'], r['top1'], r['val_loss']) for r in va] == [(r['step'], r['top1'], r['val_loss']) for r in vb]
    # the resumed epoch's train loss covers the whole epoch, not only the steps after the resume
    assert [r['train_loss'] for r in va] == [r['train_loss'] for r in vb]
    steps_b = [r['step'] for r in read_jsonl(tmp_path / 'b' / 'run' / 'metrics.jsonl') if r['event'] == 'train']
    assert steps_b == sorted(set(steps_b))
    assert res.global_step == ref.global_step == 10


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, caplog):
    cfg = tiny_cfg(tmp_path, epochs=1, checkpoint_every=2, keep_last=5)
    finetune(cfg)
    ckpts = CheckpointManager(tmp_path / 'run' / 'checkpoints').list()
    newest = ckpts[-1] / 'state.safetensors'
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    with caplog.at_level('WARNING'):
        res = finetune(cfg, resume=True)
    assert 'truncated or corrupt' in caplog.text and ckpts[-1].name in caplog.text
    assert res.global_step == 5  # resumed from step 4 and finished the epoch


def test_amp_bf16_grad_checkpointing_and_layer_decay(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1, limit_train_batches=2, amp='bf16', grad_checkpointing=True, layer_decay=0.7)
    res = finetune(cfg)
    assert res.model.grad_checkpointing
    assert res.metrics[0]['top5'] >= res.metrics[0]['top1']
    with pytest.raises(ValueError, match='fp16 autocast is not supported on CPU'):
        finetune(cfg, amp='fp16', device='cpu', output=str(tmp_path / 'fp16'))


def test_layer_decay_scales_learning_rates(tmp_path):
    from timm.optim import create_optimizer_v2
    from vitfree.train import create_finetune_model
    model = create_finetune_model(tiny_cfg(tmp_path), num_classes=10)
    opt = create_optimizer_v2(model, opt='adamw', lr=1.0, layer_decay=0.5)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert scales == [0.125, 0.25, 0.5, 1.0]  # embeddings, block 0, block 1, head


def test_img_size_resizes_the_window_spec(tmp_path):
    from vitfree.train import create_finetune_model
    cfg = tiny_cfg(tmp_path, img_size=64)  # 8x8 grid for a spec written for 4x4
    model = create_finetune_model(cfg, num_classes=10)
    assert model.window_spec.grid == (8, 8)
    assert model.window_spec.provenance['resized_from'] == [4, 4]


@pytest.mark.parametrize('bad, match', [
    (dict(amp='fp8'), 'amp must be one of'), (dict(batch_size=0), 'batch_size must be >= 1'),
    (dict(layer_decay=1.5), r'layer_decay must be in \(0, 1\]'), (dict(scale=(0.9, 0.1)), 'scale must be'),
])
def test_bad_options_are_named(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        finetune(tiny_cfg(tmp_path, **bad))


def test_loader_workers_do_not_change_the_result(tmp_path):
    """Augmentation is seeded per (epoch, sample): two worker processes give the single-process weights."""
    a = finetune(tiny_cfg(tmp_path / 'a', epochs=1, limit_train_batches=3, workers=0, export=False))
    b = finetune(tiny_cfg(tmp_path / 'b', epochs=1, limit_train_batches=3, workers=2, export=False))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- resume rules, output folder, warnings (issue 15) ----------------------------------------------
def test_changed_flags_are_refused_or_applied_and_recorded(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1, checkpoint_every=2)
    finetune(cfg)
    with pytest.raises(ValueError, match=r'(?s)--epochs: 1 in the checkpoint, 2 now.*--lr: 0.002 in the checkpoint, '
                                         r'0.01 now.*--allow-changed'):
        finetune(cfg, resume=True, epochs=2, lr=1e-2)
    res = finetune(cfg, resume=True, epochs=2, lr=1e-2, allow_changed=True, log_interval=1)
    assert res.global_step == 10
    recs = read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
    change = [r for r in recs if r['event'] == 'config_change']
    assert len(change) == 1 and change[0]['changed'] == {'epochs': [1, 2], 'lr': [0.002, 0.01]}
    after = [r['lr'] for r in recs if r['event'] == 'train' and r['epoch'] == 2]
    assert after and max(after) > 0.002  # the new learning rate took effect (the old schedule ends at 1e-6)
    newest = CheckpointManager(tmp_path / 'run' / 'checkpoints').load_latest()[1]
    assert newest['config_changes'][0]['changed']['lr'] == [0.002, 0.01] and newest['config']['lr'] == 0.01
    assert json.loads((tmp_path / 'run' / 'finetune_config.json').read_text())['lr'] == 0.01
    assert "lr 0.002 -> 0.01" in (tmp_path / 'run' / 'model' / 'README.md').read_text()


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1, limit_train_batches=2, checkpoint_every=1)
    finetune(cfg)
    with pytest.raises(ValueError, match='already holds a run .*--resume .*--overwrite'):
        finetune(cfg)
    (tmp_path / 'run' / 'notes.txt').write_text('mine')
    res = finetune(cfg, overwrite=True, limit_train_batches=1)
    recs = read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
    assert [r['event'] for r in recs].count('start') == 1 and res.global_step == 1
    assert [p.name for p in CheckpointManager(tmp_path / 'run' / 'checkpoints').list()] == [
        'ckpt-000000001', 'ckpt-000000001-end']
    assert (tmp_path / 'run' / 'notes.txt').read_text() == 'mine'  # only the earlier run's files were replaced


def test_checkpoint_with_bad_json_is_named_and_skipped(tmp_path, caplog):
    cfg = tiny_cfg(tmp_path, epochs=1, checkpoint_every=2, keep_last=5)
    finetune(cfg)
    newest = CheckpointManager(tmp_path / 'run' / 'checkpoints').list()[-1]
    index = json.loads((newest / 'state.json').read_text())
    index['state']['progress']['batch'] = 2  # parses, hashes match, but says another step than it is
    (newest / 'state.json').write_text(json.dumps(index))
    with caplog.at_level('WARNING'):
        res = finetune(cfg, resume=True)
    assert f'{newest.name}: state.json: field progress.global_step is 5' in caplog.text
    assert res.global_step == 5  # resumed from ckpt 4 and finished the epoch, not 83 steps of nonsense


def test_resume_without_checkpoints_starts_clean(tmp_path):
    class Stop(RuntimeError):
        pass

    def stop(step):
        raise Stop()

    cfg = tiny_cfg(tmp_path, epochs=1, limit_train_batches=2)
    with pytest.raises(Stop):
        finetune(cfg, on_step=stop)  # died before its first checkpoint
    res = finetune(cfg, resume=True)
    events = [r['event'] for r in read_jsonl(tmp_path / 'run' / 'metrics.jsonl')]
    assert events.count('start') == 1 and res.global_step == 2


def test_failure_before_training_creates_nothing(tmp_path):
    from vitfree.data import DataError
    with pytest.raises(DataError):
        finetune(tiny_cfg(tmp_path, data=str(tmp_path / 'no_such_data')))
    assert not (tmp_path / 'run').exists()


def test_warm_up_longer_than_training_warns():
    with pytest.warns(UserWarning, match=r'warmup_epochs=2 is not shorter than epochs=1: the whole run is spent'):
        FinetuneConfig(model='m', data='d', epochs=1, warmup_epochs=2).check()


def test_checkpoint_files_have_normal_permissions(tmp_path):
    import os
    import stat
    finetune(tiny_cfg(tmp_path, epochs=1, limit_train_batches=1, export=False))
    mask = os.umask(0)
    os.umask(mask)
    ckpt = CheckpointManager(tmp_path / 'run' / 'checkpoints').list()[-1]
    assert stat.S_IMODE((ckpt / 'state.safetensors').stat().st_mode) == 0o666 & ~mask


def test_window_resize_flag_reaches_the_model():
    from vitfree.train.finetune import FinetuneConfig, create_finetune_model
    cfg = FinetuneConfig(model='winft_tiny_patch16_224', data='digits', img_size=64, window_resize='keep',
                         windows='winft_prior_d12_g14')
    import numpy as np
    from vitfree.windows import get_spec
    m = create_finetune_model(cfg, 10)
    assert m.window_resize == 'keep' and m.window_spec.grid == (4, 4)
    ref = get_spec('winft_prior_d12_g14')
    kept, scaled = ref.resize((4, 4), mode='keep'), ref.resize((4, 4))
    for i in range(12):
        if not ref.is_global(i):
            assert np.array_equal(m.window_spec.blocks[i], kept.blocks[i])
    assert any(not np.array_equal(kept.blocks[i], scaled.blocks[i]) for i in range(12) if not ref.is_global(i))
