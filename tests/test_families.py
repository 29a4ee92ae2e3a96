"""Every supported timm family side by side with timm's own model, on tiny configurations (random init, a few
blocks, odd 5x7 grids): all-global output equals timm's; windowed models on every backend that can run them
against a float64 dense reference, outputs and gradients (inputs and every parameter: rotary models,
relative position tables), per-head windows; an independent reference where timm takes an ``attn_mask``
(Eva); SAM's own pattern reproduces timm's SAM; timm's checkpoints load strictly through ``create_winft``
and the registered ``winft_*`` entry points; the grid follows ``dynamic_img_size`` / ``set_input_size``."""
import warnings

import pytest
import timm
import torch
from families import FAMILIES, NAMES, grid_of, images, kwargs_of, random_spec, timm_model, winft_of

import vitfree
from vitfree import WindowSpec
from vitfree.models import WinfTBeit, WinfTEva, WinfTSam, sam_pattern

pytestmark = pytest.mark.usefixtures('one_thread')

CLASSES = {'eva02': WinfTEva, 'dinov3': WinfTEva, 'pe': WinfTEva, 'rope_reg_gap': WinfTEva, 'rope_mixed': WinfTEva,
           'rope_gqa': WinfTEva, 'sam': WinfTSam, 'beit': WinfTBeit}


def _spec_for(name, **kw):
    """Random per-head windows; SAM keeps one global block (its table is read as timm's there)."""
    return random_spec(name, global_blocks=(1,) if name == 'sam' else (), **kw)


@pytest.mark.parametrize('name', [n for n in NAMES if n != 'sam'])  # SAM: its own pattern, below
def test_all_global_equals_timm(name):
    ref = timm_model(name)
    m = winft_of(name)
    assert isinstance(m, CLASSES[name]) and m.window_spec.grid == grid_of(name)
    x = images(name)
    with torch.no_grad():
        want, got = ref(x), m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert set(ref.state_dict()) == set(m.state_dict())


def test_sam_pattern_reproduces_timm_sam():
    """On a grid that is a multiple of the cell SAM pads nothing, and the WinfT with SAM's own pattern is
    timm's SAM; on a grid the cells do not tile, SAM also attends to its zero padding tokens."""
    kw = dict(img_size=(144, 96), window_size=3)  # 9x6 grid, 3x3 cells
    ref = timm_model('sam', **kw)
    m = winft_of('sam', **kw)
    assert isinstance(m, WinfTSam) and set(ref.state_dict()) == set(m.state_dict())
    m.set_window_spec(sam_pattern(m))
    assert m.window_spec.to_dict()['blocks'] == ['partition(3)', 'global', 'partition(3)']
    x = images('sam')[:, :, :1, :1].expand(2, 3, 144, 96).contiguous() + torch.randn(2, 3, 144, 96)
    for backend in ('dense', 'tiled', 'eager'):
        m.set_attn_backend(backend)
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    padded = timm_model('sam', img_size=(128, 96), window_size=3)  # 8x6: the last row of cells is cut
    w = winft_of('sam', img_size=(128, 96), window_size=3)
    w.set_window_spec(sam_pattern(w))
    with torch.no_grad():
        assert (w(x[:, :, :128]) - padded(x[:, :, :128])).abs().max() > 1e-3


def _reference(m, x):
    """The same model in float64 on the eager backend (explicit softmax over the dense window mask)."""
    import copy
    ref = copy.deepcopy(m).double()
    ref.set_attn_backend('eager')
    xd = x.double().requires_grad_()
    out = ref(xd)
    out.backward(torch.ones_like(out) + out.detach())
    return out.detach(), xd.grad, {n: p.grad for n, p in ref.named_parameters()}


def _run(m, x, backend):
    m.zero_grad()
    m.set_attn_backend(backend)
    xf = x.clone().requires_grad_()
    out = m(xf)
    out.backward(torch.ones_like(out) + out.detach())
    return out.detach(), xf.grad, {n: p.grad for n, p in m.named_parameters()}


def _close(got, want, what):
    scale = max(want.abs().max().item(), 1e-3)
    err = (got.double() - want).abs().max().item()
    assert err <= 2e-5 * scale, f'{what}: max error {err:.3g} against {scale:.3g}'


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('backend', ['tiled', 'dense'])
def test_windowed_matches_float64_reference(name, backend):
    m = winft_of(name, windows=_spec_for(name))
    x = images(name)
    ref_out, ref_dx, ref_grads = _reference(m, x)
    out, dx, grads = _run(m, x, backend)
    assert set(m.attn_backends()) <= {backend, 'global'}
    _close(out, ref_out, 'output')
    _close(dx, ref_dx, 'input gradient')
    for n, g in grads.items():
        if ref_grads[n] is not None:
            _close(g, ref_grads[n], f'gradient of {n}')
    tables = [n for n in grads if 'rel_pos' in n or 'relative_position' in n]
    assert all(grads[n].abs().sum() > 0 for n in tables)  # the position tables learn through the kernel
    with torch.no_grad():
        glob = winft_of(name)(x)
    assert (glob - out).abs().max() > 1e-3 * glob.abs().max()  # the windows matter


@pytest.mark.parametrize('name', ['eva02', 'dinov3', 'pe', 'rope_reg_gap', 'rope_mixed', 'rope_gqa'])
def test_eva_windows_equal_timm_with_the_window_mask(name):
    """timm's Eva takes an attention mask: with the windows' mask it is an independent reference (timm's
    own rotary embedding, prefix tokens and pooling)."""
    spec = random_spec(name)
    block = spec.blocks[0]
    spec = WindowSpec(spec.grid, [block] * len(spec.blocks))  # one mask for every block
    ref = timm_model(name)
    m = winft_of(name, windows=spec)
    x = images(name)
    mask = spec.mask(0, ref.num_prefix_tokens).unsqueeze(0)
    with torch.no_grad():
        want = ref(x, attn_mask=mask)
        for backend in ('tiled', 'dense', 'eager'):
            m.set_attn_backend(backend)
            torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_rope_is_applied_before_the_windows():
    """A windowed Eva block computes what timm's block computes with the window mask, rotation included:
    dropping the rope changes the result, so the comparison above sees it."""
    m = winft_of('eva02', windows=random_spec('eva02'))
    x = torch.randn(2, 1 + 35, 48)
    blk = m.blocks[0]
    rope = m.rope.get_embed()
    with torch.no_grad():
        assert (blk(x, rope=rope) - blk(x)).abs().max() > 1e-3


@pytest.mark.parametrize('name', NAMES)
def test_timm_checkpoint_loads_strictly(name, tmp_path):
    from safetensors.torch import save_file
    ref = timm_model(name)
    f = tmp_path / 'model.safetensors'
    save_file(ref.state_dict(), str(f))
    spec = _spec_for(name, per_head=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        m = vitfree.create_winft(FAMILIES[name][0], windows=spec, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(f)), **kwargs_of(name))
    head = m.pretrained_cfg['classifier']  # timm drops a classifier whose class count differs from its tag's
    reset = m.pretrained_cfg.get('num_classes') != m.num_classes
    for k, t in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], t) or (reset and k.startswith(head + '.')), k
    bad = dict(ref.state_dict())
    bad.pop(next(k for k in bad if 'blocks.0' in k))
    save_file(bad, str(f))
    with pytest.raises(Exception, match=r'blocks\.0'):
        vitfree.create_winft(FAMILIES[name][0], windows=spec, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(f)), **kwargs_of(name))


REGISTERED = {
    'winft_eva02_tiny_patch14_224': ('eva02_tiny_patch14_224', 'winft_prior_d12_g16', (16, 16)),
    'winft_vit_small_patch16_dinov3': ('vit_small_patch16_dinov3', 'winft_prior_d12_g16', (16, 16)),  # 256 px
    'winft_samvit_base_patch16': ('samvit_base_patch16', 'winft_prior_sam_d12_g64', (64, 64)),
    'winft_beit_base_patch16_224': ('beit_base_patch16_224', 'winft_prior_d12_g14', (14, 14)),
}


@pytest.mark.parametrize('entry', list(REGISTERED))
def test_registered_entry_points(entry, tmp_path):
    """``timm.create_model('winft_...', pretrained=True)`` loads timm's weights of the same shape strictly
    (here saved locally from timm's model, on a cut-down depth and width) with the prior spec at the default
    grid; the tag points at timm's own weights on the Hub."""
    from safetensors.torch import save_file
    base, spec_name, grid = REGISTERED[entry]
    tag = timm.list_pretrained(f'{entry}.*')[0]
    assert timm.models.get_pretrained_cfg(tag).hf_hub_id == 'timm/' + base + tag[len(entry):]
    prior = vitfree.windows.get_spec(spec_name)
    assert prior.grid == grid and prior.provenance['kind'] == 'prior'
    small = dict(depth=2, embed_dim=24, num_heads=3)
    torch.manual_seed(0)
    ref = timm.create_model(base, **small, **({'num_classes': 0} if 'sam' in base else {}))
    save_file(ref.state_dict(), str(tmp_path / 'w.safetensors'))
    spec = WindowSpec.uniform(2, grid, 1, global_blocks=[1])
    m = timm.create_model(entry, pretrained=True, windows=spec, pretrained_cfg_overlay=dict(
        file=str(tmp_path / 'w.safetensors')), **small, **({'num_classes': 0} if 'sam' in base else {}))
    assert vitfree.is_winft(m) and m.window_spec.same_windows(spec)
    for k, t in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], t), k


def test_dynamic_img_size_follows_the_grid():
    """DINOv3 takes any image size: the windows are resized to each input's grid and the rope is timm's
    for that grid (reference: timm's model with the resized windows' mask)."""
    spec = random_spec('dinov3', per_head=False)
    spec = WindowSpec(spec.grid, [spec.blocks[0]] * len(spec.blocks))
    m = winft_of('dinov3', windows=spec, window_resize='keep')
    ref = timm_model('dinov3')
    x = torch.randn(1, 3, 112, 64)  # 7x4 patches
    resized = spec.resize((7, 4), 'keep')
    mask = resized.mask(0, ref.num_prefix_tokens).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x, attn_mask=mask), rtol=1e-5, atol=1e-5)
    assert m.blocks[0].attn.grid == (7, 4)


@pytest.mark.parametrize('name', ['eva02', 'beit'])
def test_set_input_size_follows_the_grid(name):
    spec = _spec_for(name, per_head=False)
    m = winft_of(name, windows=spec, window_resize='keep')
    ref = timm_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        m.set_input_size(img_size=(112, 84) if name == 'beit' else (98, 84))
        ref.set_input_size(img_size=(112, 84) if name == 'beit' else (98, 84))
    new = tuple(ref.patch_embed.grid_size)
    assert m.window_spec.grid == new and m.window_spec.same_windows(spec.resize(new, 'keep'))
    x = torch.randn(1, 3, *ref.patch_embed.img_size)
    single = WindowSpec(new, [m.window_spec.blocks[0]] * len(spec.blocks))
    m.set_window_spec(single)
    with torch.no_grad():
        if name == 'eva02':  # timm's rope and the windows at the new grid
            want = ref(x, attn_mask=single.mask(0, 1).unsqueeze(0))
            torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        else:  # BEiT's tables resized by timm: all-global output equals timm's
            m.set_window_spec(None)
            torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_naflexvit_is_refused_with_one_clear_error():
    with pytest.raises(ValueError, match=r'NaFlexVit, which vitfree cannot give windows \(NaFlexVit runs padded '
                                         r'sequences.*supported timm model classes: Beit, Eva, VisionTransformer, '
                                         r'VisionTransformerSAM'):
        vitfree.create_winft('naflexvit_base_patch16_gap', depth=1, embed_dim=24, num_heads=2)


def test_sam_with_rotary_embeddings_is_refused():
    with pytest.raises(ValueError, match=r'use_rope=True\) cannot be given windows'):
        vitfree.create_winft('samvit_base_patch16', img_size=64, depth=2, embed_dim=24, num_heads=2, window_size=2,
                             use_rel_pos=False, use_rope=True, global_attn_indexes=(1,))


@pytest.mark.parametrize('name', ['eva02', 'sam', 'beit'])
def test_local_dir_round_trip(name, tmp_path):
    """vitfree's export and timm's save_for_hf write the spec into config.json; local-dir: rebuilds the
    same model."""
    import json

    from timm.models import save_for_hf

    from vitfree.hub import save_pretrained
    spec = _spec_for(name)
    m = winft_of(name, windows=spec)
    x = images(name, batch=1)
    out = save_pretrained(m, tmp_path / 'export')
    save_for_hf(m, str(tmp_path / 'hf'), safe_serialization=True)
    for folder in (out, tmp_path / 'hf'):
        cfg = json.loads((folder / 'config.json').read_text())
        assert cfg['architecture'] == 'vitfree_winft' and cfg['model_args']['base'] == FAMILIES[name][0]
        assert WindowSpec.from_dict(cfg['model_args']['windows']).same_windows(spec)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            r = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        assert type(r) is type(m) and r.window_spec.same_windows(spec)
        with torch.no_grad():
            assert torch.equal(r(x), m(x))


def test_readme_family_tour_runs_as_written():
    """The README's block under "Model families", as it is written there (random weights)."""
    from pathlib import Path
    text = (Path(vitfree.__file__).resolve().parent.parent / 'README.md').read_text()
    section = text.split('## Model families', 1)[1]
    code = section.split('```python', 1)[1].split('```', 1)[0]
    ns = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        exec(compile(code, 'README.md', 'exec'), ns)
    sam = ns['sam']
    assert sam.window_spec.same_windows(vitfree.windows.get_spec('winft_local_sam_d12_g64'))
    assert vitfree.windows.get_spec('winft_prior_sam_d12_g64').to_dict()['blocks'][:3] == [
        'partition(14)', 'partition(14)', 'global']
    with torch.no_grad():
        assert ns['eva'](torch.randn(1, 3, 224, 224)).shape == (1, 192)
        assert ns['dino'](torch.randn(1, 3, 320, 224)).shape == (1, 384)
    assert ns['dino'].blocks[0].attn.grid == (20, 14)
