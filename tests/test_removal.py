"""Patch removal: masking keys in every block, SIFT patch mass, accuracy curves."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vitfree
from vitfree.analysis.inputs import model_transform
from vitfree.analysis.removal import mask_patch_keys, patch_removal, patch_scores

TINY = dict(img_size=64, depth=2, embed_dim=64, num_heads=2, num_classes=5)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', **TINY).eval()


def test_masked_keys_get_no_attention_in_any_block(model):
    x = torch.randn(2, 3, 64, 64)
    removed = torch.zeros(2, 16, dtype=torch.bool)
    removed[0, [0, 5, 6]] = True
    removed[1, 15] = True
    with torch.no_grad(), mask_patch_keys(model, removed), vitfree.record(model) as rec:
        model(x)
    for b in range(2):
        a = rec.attention[b]
        cols = torch.cat([torch.zeros(2, 1, dtype=torch.bool), removed], 1)  # class token stays visible
        assert torch.all(a.permute(0, 2, 1, 3)[cols[:, None, None, :].expand(-1, 17, 2, -1)] == 0)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 17))
        assert torch.all(a[1, :, :, 1:16] > 0)
    assert not any('forward' in m.__dict__ for m in model.modules())
    assert all(b.attn.fused_attn for b in model.blocks)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_curves_start_at_plain_accuracy_and_are_reproducible(model):
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = pred.clone()
    labels[:2] = (labels[:2] + 1) % 5  # plain accuracy 4/6
    fractions = [0.0, 0.5, 1.0]
    res = patch_removal(model, (x, labels), scores=['interaction', 'random'], fractions=fractions, batch_size=4,
                        progress=False)
    assert res.removed == [0, 8, 16] and res.num_images == 6 and res.grid == (4, 4)
    for s in ('interaction', 'random'):
        assert res.accuracy[s][0] == pytest.approx(4 / 6)
    # with every patch hidden, the ranking no longer matters
    assert res.accuracy['interaction'][2] == res.accuracy['random'][2]
    again = patch_removal(model, (x, labels), scores=['interaction', 'random'], fractions=fractions,
                          batch_size=4, progress=False)
    assert again.accuracy == res.accuracy
    assert 'interaction' in res.format_table() and res.to_dict()['removed'] == [0, 8, 16]


def test_sift_score_follows_texture(model):
    rng = np.random.default_rng(0)
    img = np.full((64, 64, 3), 128, dtype=np.uint8)
    img[32:, 32:] = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)  # texture bottom-right only
    x = model_transform(model)(Image.fromarray(img)).unsqueeze(0)
    w = patch_scores(model, x, 'sift')[0].reshape(4, 4)
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(w[2:, 2:].sum()) > 0.8


def test_scores_and_errors(model):
    x = torch.randn(2, 3, 64, 64)
    inter = patch_scores(model, x, 'interaction')
    assert inter.shape == (2, 16)
    torch.testing.assert_close(inter.sum(1), torch.full((2,), 16.0))  # column sums of row-stochastic maps
    assert patch_scores(model, x, 'sift').shape == (2, 16)
    dataset_level = vitfree.interaction(model, x, progress=False)
    s = patch_scores(model, x, 'interaction', interaction=dataset_level)
    torch.testing.assert_close(s[0], dataset_level.importance())
    res = patch_removal(model, (x, torch.tensor([0, 1])), fractions=[0.25], progress=False)
    assert set(res.accuracy) == {'interaction', 'sift', 'random'}
    assert res.against == 'labels'
    # without labels: agreement with the model's own unmasked prediction, as `analyze` does
    own = model.eval()(x).argmax(1)
    unlabelled = patch_removal(model, x, fractions=[0.0, 0.25], progress=False, seed=3)
    same = patch_removal(model, (x, own), fractions=[0.0, 0.25], progress=False, seed=3)
    assert unlabelled.against == 'predictions' and unlabelled.accuracy == same.accuracy
    assert all(acc[0] == 1.0 for acc in unlabelled.accuracy.values())  # nothing hidden: full agreement
    assert 'against predictions' in repr(unlabelled) and 'tensor' not in repr(unlabelled)
    with pytest.raises(ValueError, match='scores must be a non-empty list'):
        patch_removal(model, (x, torch.tensor([0, 1])), scores=['entropy'], progress=False)
    with pytest.raises(ValueError, match=r'fractions must be a non-empty list of numbers in \[0, 1\]'):
        patch_removal(model, (x, torch.tensor([0, 1])), fractions=[1.5], progress=False)


def test_a_query_left_with_no_key_gets_a_zero_attention_output():
    """No prefix tokens and 1x1 windows: hiding patch 5 leaves query 5 of block 0 with no key at
    all.  Its attention row is zero (not NaN), so its attention output is the projection bias."""
    spec = vitfree.WindowSpec.uniform(2, (4, 4), 0)
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, class_token=False, global_pool='avg',
                                 **TINY).eval()
    assert model.num_prefix_tokens == 0
    x = torch.randn(2, 3, 64, 64)
    removed = torch.zeros(2, 16, dtype=torch.bool)
    removed[:, 5] = True
    seen = {}
    blk = model.blocks[0]
    handle = blk.attn.register_forward_hook(lambda m, a, o: seen.__setitem__('out', o))
    try:
        with torch.no_grad(), mask_patch_keys(model, removed), vitfree.record(model) as rec:
            logits = model(x)
    finally:
        handle.remove()
    assert torch.isfinite(logits).all()
    a = rec.attention[0]
    assert torch.all(a[:, :, 5] == 0)
    torch.testing.assert_close(seen['out'][:, 5], blk.attn.proj.bias.expand(2, -1))
    keep = torch.ones(16, dtype=torch.bool)
    keep[5] = False
    torch.testing.assert_close(a[:, :, keep][:, :, :, keep].sum(-1), torch.ones(2, 2, 15))
    # the ablation estimator takes the same path: finite maps, and key 5 affects query 5 only
    res = vitfree.interaction(model, x, 'ablation', progress=False, ablation_batch=5)
    assert torch.isfinite(res[0]).all()
    assert torch.count_nonzero(res[0] - torch.diag(torch.diag(res[0]))) == 0
