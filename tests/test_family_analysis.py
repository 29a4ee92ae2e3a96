"""vitfree's analysis and training on every family, models with no class token included (SAM: no prefix token at
all; a RoPE ViT with register tokens only and average pooling; DINOv3: class and register tokens): the recorder,
the three interaction estimators, ERF windows, ``vitfree analyze`` and ``vitfree finetune``."""
import json
import warnings

import pytest
import timm
import torch
from families import FAMILIES, grid_of, images, random_spec, winft_of

import vitfree
from vitfree import WindowSpec
from vitfree.analysis.capture import capture_block_io, rerun_block
from vitfree.cli import main

pytestmark = pytest.mark.usefixtures('one_thread')

ANALYSED = ['eva02', 'dinov3', 'rope_reg_gap', 'sam', 'beit']


def _model(name):
    return winft_of(name, windows=random_spec(name, per_head=False, global_blocks=(1,)))


def _prefix(m):
    return int(getattr(m, 'num_prefix_tokens', 0)) if not isinstance(m, vitfree.WinfTSam) else 0


@pytest.mark.parametrize('name', ANALYSED)
def test_recorder_sees_the_windows(name):
    m = _model(name)
    x = images(name)
    with vitfree.record(m) as rec:
        m(x)
    p = _prefix(m)
    n = grid_of(name)[0] * grid_of(name)[1]
    a = rec.attention[0]
    assert a.shape == (2, FAMILIES[name][1]['num_heads'], p + n, p + n)
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    outside = ~m.window_spec.mask(0, p)
    assert a[..., outside].abs().max() == 0 and a[..., ~outside].min() > 0
    assert rec.interaction_maps()[0].shape == (n, n)


@pytest.mark.parametrize('name', ANALYSED)
def test_a_block_reruns_as_the_model_ran_it(name):
    """The ablation estimator reruns one block from its recorded call: rotary embedding, shared bias and the
    block's own layout (SAM: (B, H, W, C)) come with it."""
    m = _model(name)
    with torch.no_grad(), capture_block_io(m, [0, 1]) as io:
        m(images(name))
        for b in (0, 1):
            torch.testing.assert_close(rerun_block(m, b, io[b], io[b]['input']), io[b]['output'])


@pytest.mark.parametrize('name', ['rope_reg_gap', 'sam', 'beit'])
def test_three_estimators_keep_to_the_windows(name):
    m = _model(name)
    x = images(name)
    outside = ~m.window_spec.mask(0, 0)
    for est in ('attention', 'attribution', 'ablation'):
        res = vitfree.interaction(m, x, est, progress=False, ablation_batch=12)
        p = res[0]
        assert p.shape == outside.shape and torch.isfinite(p).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]))
        assert p[outside].abs().max() == 0, est  # a key outside a window has no effect in that block
        assert res[1].shape == outside.shape


def test_measure_erf_on_sam_gives_a_spec_the_winft_takes():
    m = _model('sam')
    spec = vitfree.measure_erf(m, images('sam'), progress=False)
    assert spec.grid == grid_of('sam') and spec.depth == 3 and spec.provenance['kind'] == 'measured'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        again = vitfree.create_winft(FAMILIES['sam'][0], windows=spec, **dict(FAMILIES['sam'][1],
                                                                              img_size=(80, 112)))
    again.load_state_dict(m.state_dict())
    assert again.window_spec.same_windows(spec)


@pytest.mark.parametrize('entry,kwargs,parts', [
    ('winft_samvit_base_patch16', ['global_attn_indexes=[1]', 'window_size=2'], ['erf', 'heads']),  # no prefix
    ('vit_betwixt_patch16_rope_reg4_gap_256', [], ['patterns', 'sift']),  # register tokens only
])
def test_vitfree_analyze(entry, kwargs, parts, tmp_path):
    WindowSpec.uniform(2, 3, 1, global_blocks=[1]).save(tmp_path / 'spec.yaml')
    out = tmp_path / 'rep'
    args = ['analyze', entry, 'vitfree/assets', '-o', str(out), '--parts', *parts, '--max-images', '2',
            '--head-images', '1', '--epochs', '5', '--no-progress', '--model-kwargs', 'img_size=48', 'depth=2',
            'embed_dim=24', 'num_heads=3', 'num_classes=4', *kwargs]
    if entry.startswith('winft_'):
        args.append(f'windows={tmp_path / "spec.yaml"}')
    assert main(args) == 0
    summary = json.loads((out / 'results.json').read_text())
    assert summary['errors'] == {} and summary['parts'] == parts


@pytest.mark.parametrize('model,extra', [('winft_samvit_base_patch16', dict(global_attn_indexes=[1], window_size=2)),
                                         ('vit_betwixt_patch16_rope_reg4_gap_256', {}),
                                         ('winft_beit_base_patch16_224', {})])
def test_vitfree_finetune_and_export(model, extra, tmp_path):
    from vitfree.train import FinetuneConfig, finetune
    spec = WindowSpec.uniform(2, 4, 1, global_blocks=[1])
    spec.save(tmp_path / 'spec.yaml')
    cfg = FinetuneConfig(model=model, data='digits', output=str(tmp_path / 'run'), img_size=32,
                         windows=str(tmp_path / 'spec.yaml'),
                         model_kwargs=dict(depth=2, patch_size=8, embed_dim=48, num_heads=3, **extra),
                         epochs=1, batch_size=16, lr=2e-3, limit_train_batches=2, limit_val_batches=1, workers=0,
                         threads=1, progress=False, seed=3)
    res = finetune(cfg)
    assert res.model.window_spec.same_windows(spec) and res.global_step == 2
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        again = timm.create_model(f'local-dir:{res.export}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert type(again) is type(res.model) and again.window_spec.same_windows(spec)
    assert torch.equal(again(x), res.model.eval()(x))
