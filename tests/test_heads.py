"""Head importance: the six pruning masks, the batched pruning against direct interventions,
the gradient gate score, and the dataset-level scores."""
import numpy as np
import pytest
import timm
import torch

import vitfree
from vitfree import WindowSpec
from vitfree.analysis.heads import (MODES, HeadImportance, gate_gradients, head_importance, prune_heads,
                                    pruning_keep_mask)

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, reg_tokens=1,
                            num_classes=7).eval()
    spec = WindowSpec(8, [1, 2, None], {'kind': 'uniform'})
    win = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, **TINY).eval()
    return {'vit': vit, 'winft': win}


def test_keep_masks_by_hand():
    # 2 prefix tokens, 3 patches; 0 marks a zeroed entry (rows: queries)
    p, t = 2, 5
    m = {k: pruning_keep_mask(k, t, p).int().tolist() for k in MODES}
    assert m[1] == [[1] * 5] * 5
    assert m[2] == [[0] * 5] * 5
    assert m[3] == [[0] * 5, [0] * 5, [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert m[4] == [[1] * 5, [1] * 5, [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert m[5] == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert m[6] == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1] * 5, [1] * 5, [1] * 5]


@pytest.mark.parametrize('prefix', [0, 1, 4])
def test_modes_4_5_6_partition_the_head_and_3_is_5_plus_6(prefix):
    t = prefix + 6
    zero = {k: 1 - pruning_keep_mask(k, t, prefix) for k in MODES}
    assert torch.equal(zero[4] + zero[5] + zero[6], zero[2])
    assert torch.equal(zero[5] + zero[6], zero[3])
    if prefix == 0:
        for k in (3, 5, 6):
            assert torch.equal(zero[k], zero[1])


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match=r'drawn from \(1, 2, 3, 4, 5, 6\).*got \[7\]'):
        pruning_keep_mask(7, 5, 1)


@pytest.mark.parametrize('name', ['vit', 'winft'])
def test_mode1_leaves_predictions_unchanged(models, name):
    model = models[name]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        p = model(x).softmax(-1)
    t = p.argmax(-1)
    prob, pred = prune_heads(model, x, t, modes=[1])
    base = p.gather(1, t[:, None]).squeeze(1)
    assert torch.allclose(prob, base[:, None, None, None].expand_as(prob), atol=1e-5)
    assert torch.equal(pred, t[:, None, None, None].expand_as(pred))


def forward_with_head_zeroed(model, x, block, head):
    attn = model.blocks[block].attn
    hd = attn.head_dim

    def pre(module, args):
        a = args[0].clone()
        a[..., head * hd:(head + 1) * hd] = 0
        return (a,)

    handle = attn.proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return model(x).softmax(-1)
    finally:
        handle.remove()


@pytest.mark.parametrize('name', ['vit', 'winft'])
def test_mode2_equals_zeroing_the_head_output(models, name):
    model = models[name]
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([3, 5])
    prob, pred = prune_heads(model, x, t, modes=[2, 1], prune_batch=5)  # odd batch: rows span blocks
    for b in range(len(model.blocks)):
        for h in range(model.blocks[0].attn.num_heads):
            ref = forward_with_head_zeroed(model, x, b, h)
            assert torch.allclose(prob[:, 0, b, h], ref.gather(1, t[:, None]).squeeze(1), atol=1e-5)
            assert torch.equal(pred[:, 0, b, h], ref.argmax(-1))


def test_batching_and_resuming_do_not_change_the_result(models, monkeypatch):
    from vitfree.analysis import heads
    model = models['vit']
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0, 6])
    assert heads._block_inputs(model, x, [0, 1]) is not None  # masked forwards resume at the pruned block
    a = prune_heads(model, x, t, prune_batch=1)
    b = prune_heads(model, x, t, prune_batch=1000)
    monkeypatch.setattr(heads, '_block_inputs', lambda *args: None)  # every masked forward from the start
    c = prune_heads(model, x, t, prune_batch=7)
    assert a[0].shape == (2, 6, 2, 3)
    for other in (b, c):
        assert torch.allclose(a[0], other[0], atol=1e-6) and torch.equal(a[1], other[1])


def test_models_without_prefix_tokens_prune_nothing_in_modes_3_5_6():
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, class_token=False,
                              global_pool='avg', num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    prob, _ = prune_heads(model, x, torch.tensor([1, 2]))
    for m in (2, 4, 5):  # mode index of 3, 5, 6
        assert torch.allclose(prob[:, m], prob[:, 0], atol=1e-6)
    assert torch.allclose(prob[:, 1], prob[:, 3], atol=1e-6)  # mode 2 == mode 4 without prefix tokens


def test_gate_gradient_equals_gradient_of_a_gate_on_the_head_output(models):
    model = models['winft']
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([1, 4])
    g = gate_gradients(model, x, t)
    assert g.shape == (2, 3, 3)
    block, head = 1, 2
    attn = model.blocks[block].attn
    hd = attn.head_dim
    for i in range(2):
        gate = torch.ones((), requires_grad=True)

        sel = torch.zeros(attn.num_heads * hd)
        sel[head * hd:(head + 1) * hd] = 1

        def pre(module, args):
            return (args[0] * (1 - sel) + args[0] * sel * gate,)

        handle = attn.proj.register_forward_pre_hook(pre)
        try:
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 1]), t[i:i + 1])
            (ref,) = torch.autograd.grad(loss, gate)
        finally:
            handle.remove()
        assert float(g[i, block, head]) == pytest.approx(abs(float(ref)), rel=1e-4, abs=1e-8)
    assert all(p.grad is None for p in model.parameters())


def test_head_importance_dataset_scores(models):
    model = models['vit']
    x = torch.randn(3, 3, 32, 32)
    imp = head_importance(model, x, batch_size=2, progress=False)
    assert imp.prob.shape == (3, 6, 2, 3) and imp.gate.shape == (3, 2, 3)
    assert imp.labels is None and np.array_equal(imp.targets, imp.base_pred)
    assert np.allclose(imp.prob_drop()[0], 0, atol=1e-5)
    assert np.all(imp.accuracy_drop()[0] == 0)
    assert imp.gate_score().shape == (2, 3) and np.all(imp.gate_score() >= 0)
    # with labels: accuracy is measured against them
    y = torch.tensor([0, 1, 2])
    imp2 = head_importance(model, (x, y), modes=[1, 2], target='label', gate=False, progress=False)
    assert imp2.gate is None and imp2.gate_score() is None
    assert np.array_equal(imp2.labels, y.numpy()) and np.array_equal(imp2.targets, y.numpy())
    assert imp2.to_dict()['accuracy_against'] == 'labels'


def test_aggregates_on_hand_built_results():
    prob = np.array([[[[0.2, 0.9]]], [[[0.5, 0.1]]]])  # (2 images, 1 mode, 1 block, 2 heads)
    pred = np.array([[[[1, 0]]], [[[1, 1]]]])
    imp = HeadImportance(modes=[2], blocks=[0], heads=[0, 1], prob=prob, pred=pred,
                         base_prob=np.array([0.8, 0.6]), base_pred=np.array([0, 1]), targets=np.array([0, 1]))
    assert np.allclose(imp.prob_drop(), [[[(0.6 + 0.1) / 2, (-0.1 + 0.5) / 2]]])
    assert np.allclose(imp.accuracy_drop(), [[[0.5, 0.0]]])  # head 0 flips image 0, head 1 nothing
    assert imp.ranking(2, k=1) == [(0, 0, pytest.approx(0.35))]
    imp.labels = np.array([1, 1])  # now the base prediction of image 0 is wrong
    assert np.allclose(imp.accuracy_drop(), [[[0.5 - 1.0, 0.5 - 0.5]]])
    with pytest.raises(KeyError, match='mode 4 was not measured'):
        imp.ranking(4)
