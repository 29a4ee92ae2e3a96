"""Recorder: exact probabilities, nothing left behind, prefix tokens, dynamic sizes, gradients."""
import pytest
import timm
import timm.layers
import torch

import vitfree
from vitfree.analysis import attention_override
from vitfree.analysis.capture import Recorder, RecordingTooLarge
from vitfree.ops import current_backend

TINY = dict(img_size=64, depth=2, embed_dim=64, num_heads=2, num_classes=5)


def tiny_vit(name='vit_tiny_patch16_224', **kw):
    return timm.create_model(name, **dict(TINY, **kw)).eval()


def tiny_winft(spec=None, **kw):
    spec = spec or vitfree.WindowSpec.from_schedule((4, 4), [1, 'global'])
    return vitfree.create_winft('vit_tiny_patch16_224', windows=spec, **dict(TINY, **kw)).eval()


def snapshot(model):
    """Everything a recorder could leave behind."""
    return {
        'forwards': [n for n, m in model.named_modules() if 'forward' in m.__dict__],
        'hooks': sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
        'fused': [b.attn.fused_attn for b in model.blocks],
        'timm_fused': timm.layers.use_fused_attn(),
        'backend': current_backend(),
    }


def capture_attn_inputs(model):
    store, handles = {}, []
    for i, b in enumerate(model.blocks):
        handles.append(b.attn.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(i, a[0].detach())))
    return store, handles


def explicit_probs(attn, x, mask):
    """softmax(q k^T * scale) written out from the layer's weights, disallowed keys removed."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float('-inf'))
    return logits.softmax(dim=-1)


def test_winft_recording_equals_eager_probabilities():
    model = tiny_winft(reg_tokens=2)
    x = torch.randn(3, 3, 64, 64)
    store, handles = capture_attn_inputs(model)
    with vitfree.use_backend('eager'), torch.no_grad():
        ref_out = model(x)
    for h in handles:
        h.remove()
    with torch.no_grad(), vitfree.record(model) as rec:
        out = model(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert rec.num_prefix_tokens == 3 and rec.grid == (4, 4)
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        win = attn.windows_for(16)
        expected = explicit_probs(attn, store[i], None if win is None else win.mask(3))
        assert rec.attention[i].shape == (3, 2, 19, 19)
        torch.testing.assert_close(rec.attention[i], expected, rtol=1e-6, atol=1e-6)
    # block 0 is windowed: exact zeros outside the windows, rows still sum to one
    allowed = model.window_spec.mask(0, num_prefix_tokens=3)
    assert torch.all(rec.attention[0][..., ~allowed] == 0)
    torch.testing.assert_close(rec.attention[0].sum(-1), torch.ones(3, 2, 19))


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224', 'deit_tiny_patch16_224'])
def test_plain_timm_recording_equals_timm_unfused_softmax(name):
    model = tiny_vit(name, reg_tokens=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused_out = model(x)
    # timm's own non-fused path passes the probabilities through attn_drop: read them there
    ref, handles = {}, []
    for i, b in enumerate(model.blocks):
        b.attn.fused_attn = False
        handles.append(b.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: ref.__setitem__(i, o.detach())))
    with torch.no_grad():
        model(x)
    for b in model.blocks:
        b.attn.fused_attn = True
    for h in handles:
        h.remove()
    with torch.no_grad(), vitfree.record(model) as rec:
        out = model(x)
    torch.testing.assert_close(out, fused_out, rtol=1e-5, atol=1e-5)
    for i in range(2):
        torch.testing.assert_close(rec.attention[i], ref[i], rtol=1e-6, atol=1e-6)
    assert rec.num_prefix_tokens == 2


def test_subset_of_blocks_and_heads_leaves_other_blocks_fused():
    model = tiny_vit(depth=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), vitfree.record(model) as full:
        model(x)
    seen = {}
    with torch.no_grad(), vitfree.record(model, blocks=[-1], heads=[1]) as rec:
        seen = {i: not b.attn.fused_attn and len(b.attn.attn_drop._forward_pre_hooks) == 1
                for i, b in enumerate(model.blocks)}
        model(x)
    assert seen == {0: False, 1: False, 2: True}  # only the recorded block leaves timm's fused path
    assert sorted(rec.attention) == [2]
    assert rec.attention[2].shape == (2, 1, 17, 17)
    torch.testing.assert_close(rec.attention[2], full.attention[2][:, 1:2])


def test_no_state_leaks_after_exit_and_after_exceptions():
    for model in (tiny_vit(), tiny_winft()):
        before = snapshot(model)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad(), vitfree.record(model):
            model(x)
        assert snapshot(model) == before
        # a forward that fails inside the model (wrong channel count)
        with pytest.raises(RuntimeError), vitfree.record(model, blocks=[0]):
            model(torch.randn(2, 4, 64, 64))
        assert snapshot(model) == before
        # a forward that fails inside a recorded block (memory limit)
        with pytest.raises(RecordingTooLarge) as err, vitfree.record(model, max_bytes=1000):
            model(x)
        msg = str(err.value)
        assert '2 x 2 heads x 17 x 17' in msg and 'max_bytes' in msg
        assert snapshot(model) == before
        # explicit attach / detach
        rec = Recorder(model, blocks=[1]).attach()
        attn = model.blocks[1].attn
        assert not attn.fused_attn and len(attn.attn_drop._forward_pre_hooks) == 1 and rec.attached
        rec.detach()
        rec.detach()  # idempotent
        assert snapshot(model) == before


def test_memory_estimate_matches_recording():
    model = tiny_vit()
    rec = Recorder(model, blocks=[0, 1], heads=[0])
    assert rec.estimate_bytes(4, 17) == 4 * 1 * 17 * 17 * 4 * 2
    with torch.no_grad(), rec:
        model(torch.randn(4, 3, 64, 64))
    assert sum(a.numel() * a.element_size() for a in rec.attention.values()) == rec.estimate_bytes(4, 17)
    with pytest.raises(ValueError, match='head indices in 0..1'):
        Recorder(model, heads=[2])
    with pytest.raises(ValueError, match='block index 5'):
        Recorder(model, blocks=[5])


def test_dynamic_img_size_with_windows():
    model = tiny_winft(vitfree.WindowSpec.from_schedule((4, 4), [1, 1]), dynamic_img_size=True)
    x = torch.randn(1, 3, 96, 64)  # 6 x 4 patches: windows are resized to that grid
    with torch.no_grad(), vitfree.record(model) as rec:
        model(x)
    assert rec.grid == (6, 4)
    assert rec.attention[0].shape == (1, 2, 25, 25)
    allowed = model.blocks[0].attn.windows_for(24).mask(1)
    assert torch.all(rec.attention[0][..., ~allowed] == 0)
    assert rec.interaction_maps()[0].shape == (24, 24)


def test_gradients_through_recorded_attention_match_finite_differences():
    torch.manual_seed(1)
    model = tiny_vit().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with vitfree.record(model, blocks=[0], grad=True) as rec:
        score = model(x)[:, 3].sum()
        (g,) = torch.autograd.grad(score, [rec.attention[0]])
    direction = torch.randn_like(g)

    def score_at(eps):
        with torch.no_grad(), attention_override(model, [0], probs_fn=lambda b, p: p + eps * direction):
            return model(x)[:, 3].sum()

    eps = 1e-5
    numeric = (score_at(eps) - score_at(-eps)) / (2 * eps)
    torch.testing.assert_close(numeric, (g * direction).sum(), rtol=1e-5, atol=1e-7)
    # a head subset keeps its own gradient, equal to the matching slice
    with vitfree.record(model, blocks=[0], heads=[1], grad=True) as sub:
        score = model(x)[:, 3].sum()
        (g1,) = torch.autograd.grad(score, [sub.attention[0]])
    torch.testing.assert_close(g1, g[:, 1:2])
    # backward() fills .grad of the recorded tensors as well
    with vitfree.record(model, blocks=[0], grad=True) as rec2:
        model(x)[:, 3].sum().backward()
    torch.testing.assert_close(rec2.attention[0].grad, g)


def test_nested_override_is_seen_by_the_recorder():
    model = tiny_vit()
    x = torch.randn(1, 3, 64, 64)

    def drop_head0(block, probs):
        probs = probs.clone()
        probs[:, 0] = 0
        return probs

    with torch.no_grad(), attention_override(model, [0], probs_fn=drop_head0), vitfree.record(model) as rec:
        model(x)
    assert torch.all(rec.attention[0][:, 0] == 0)
    assert rec.attention[1][:, 0].sum() > 0
    assert 'forward' not in model.blocks[0].attn.__dict__
    assert model.blocks[0].attn.fused_attn and not model.blocks[0].attn.attn_drop._forward_pre_hooks


def test_interaction_maps_are_row_normalised_patch_blocks():
    model = tiny_vit(reg_tokens=2)
    with torch.no_grad(), vitfree.record(model) as rec:
        model(torch.randn(2, 3, 64, 64))
    maps = rec.interaction_maps()
    for b, m in maps.items():
        assert m.shape == (16, 16)
        torch.testing.assert_close(m.sum(-1), torch.ones(16))
        expected = rec.attention[b][:, :, 3:, 3:].mean((0, 1))
        torch.testing.assert_close(m, expected / expected.sum(-1, keepdim=True))


# ---- one attention forward: what is recorded is what runs -------------------------------------
def explicit_path(model):
    """The model's own explicit-softmax path, switched on by hand (no hooks, no recorder)."""
    saved = [b.attn.fused_attn for b in model.blocks]
    for b in model.blocks:
        b.attn.fused_attn = False
    return saved


@pytest.mark.parametrize('kind', ['winft', 'vit'])
def test_recording_adds_no_computation_of_its_own(kind):
    """Recorded forward = unrecorded forward: within 1e-5 of the fused kernels, bit for bit the
    layer's own explicit path, and the recorded probabilities equal an explicit computation
    from the weights (windows applied by hand)."""
    torch.manual_seed(0)
    if kind == 'winft':  # a windowed block, a global block, class token + 2 registers
        model = tiny_winft(vitfree.WindowSpec.from_schedule((4, 4), [1, 'global', 0]), depth=3, reg_tokens=2)
    else:
        model = tiny_vit(depth=3, reg_tokens=2)
    x = torch.randn(2, 3, 64, 64)
    store, handles = capture_attn_inputs(model)
    with torch.no_grad():
        fused = model(x)
    saved = explicit_path(model)
    with torch.no_grad():
        explicit = model(x)
    for b, f in zip(model.blocks, saved):
        b.attn.fused_attn = f
    for h in handles:
        h.remove()
    with torch.no_grad(), vitfree.record(model) as rec:
        recorded = model(x)
    torch.testing.assert_close(recorded, fused, rtol=1e-5, atol=1e-5)
    assert torch.equal(recorded, explicit)
    assert sorted(rec.attention) == [0, 1, 2] and rec.num_prefix_tokens == 3
    for i, blk in enumerate(model.blocks):
        win = blk.attn.windows_for(16) if kind == 'winft' else None
        expected = explicit_probs(blk.attn, store[i], None if win is None else win.mask(3))
        torch.testing.assert_close(rec.attention[i], expected, rtol=1e-6, atol=1e-6)
    if kind == 'winft':
        assert not torch.all(rec.attention[0] > 0) and torch.all(rec.attention[1] > 0)  # windowed, global


def test_timm_attention_extract_sees_every_winft_block():
    """timm's AttentionExtract (hook method) on a WinfT built with fused attention off returns a
    map for every block, windowed ones included, equal to vitfree's recording."""
    from timm.layers import config as timm_config
    from timm.utils import AttentionExtract
    spec = vitfree.WindowSpec.from_schedule((4, 4), [1, 'global', 0])
    before = timm_config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(False)
    try:
        model = tiny_winft(spec, depth=3, reg_tokens=1)
    finally:
        timm_config._USE_FUSED_ATTN = before
    assert not any(b.attn.fused_attn for b in model.blocks)
    x = torch.randn(2, 3, 64, 64)
    extract = AttentionExtract(model, method='hook')
    with torch.no_grad():
        maps = extract(x)
    assert sorted(maps) == [f'blocks.{i}.attn.attn_drop' for i in range(3)]
    with torch.no_grad(), vitfree.record(model) as rec:
        model(x)
    for i in range(3):
        assert torch.equal(maps[f'blocks.{i}.attn.attn_drop'], rec.attention[i])
    assert not any(b.attn.fused_attn for b in model.blocks)  # the recorder gives the flags back as found
    allowed = model.window_spec.mask(0, num_prefix_tokens=2)
    assert torch.all(maps['blocks.0.attn.attn_drop'][..., ~allowed] == 0)


def test_override_replacement_reaches_the_output_and_attn_mask_is_honoured():
    """A probs_fn's replacement is what multiplies the values; a caller's attn_mask reaches the
    recorded probabilities (keys hidden through the standard argument)."""
    model = tiny_winft(vitfree.WindowSpec.from_schedule((4, 4), [1, 'global']))
    x = torch.randn(1, 3, 64, 64)
    tokens = torch.randn(1, 17, 64)
    blk = model.blocks[0]
    with torch.no_grad(), attention_override(model, [0], probs_fn=lambda b, p: torch.zeros_like(p)):
        out = blk.attn(tokens)
    torch.testing.assert_close(out, blk.attn.proj(torch.zeros(1, 17, 64)).expand_as(out))
    allowed = torch.ones(1, 1, 1, 17, dtype=torch.bool)
    allowed[..., 5] = False
    with torch.no_grad(), vitfree.record(model) as rec:
        model(x, attn_mask=allowed)
    for i in range(2):
        assert torch.all(rec.attention[i][..., 5] == 0)
        torch.testing.assert_close(rec.attention[i].sum(-1), torch.ones(1, 2, 17))


def test_negative_block_indices_are_keys_too():
    model = tiny_vit(depth=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), vitfree.record(model, blocks=[0, -1]) as rec:
        model(x)
    assert sorted(rec.attention) == [0, 2] and rec.blocks == [0, 2]
    assert rec.attention[-1] is rec.attention[2] and -1 in rec.attention and -3 in rec.attention
    assert rec.attention.get(-2) is None and 1 not in rec.attention
    assert torch.equal(rec.patch_attention(-1), rec.patch_attention(2))
    maps = rec.interaction_maps()
    assert torch.equal(maps[-1], maps[2])
    with pytest.raises(KeyError, match='block 1 was not recorded'):
        rec.patch_attention(1)


def test_result_reprs_are_short_and_hold_no_tensors():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 64, 64)
    inter = vitfree.interaction(model, x, progress=False)
    assert torch.equal(inter[-1], inter[1])  # negative indices count from the model's last block
    text = repr(inter)
    assert text == ("InteractionResult(attention, 2 block(s) [0, 1], grid 4x4, maps (16, 16) per block, 2 image(s), "
                    "data='tensor batch of shape (2, 3, 64, 64)')")
    res = vitfree.measure_erf(model, x, tau=0.5, gamma=2.0, progress=False, return_result=True)
    for r in (res, res.blocks[0]):
        assert 'tensor' not in repr(r) and 'array' not in repr(r) and len(repr(r)) < 300, repr(r)
    assert repr(res).startswith('ErfResult(grid 4x4, tau 0.5, gamma 2, 2 blocks; mean ERF area per block: ')
