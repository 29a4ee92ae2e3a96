"""Export and local round trip: save_pretrained -> local-dir: rebuild, safe loading, manifest, the push plan.

Everything that talks to the Hub (hf-hub: downloads, the cache, offline mode, push) runs through
huggingface_hub's real HTTP code against a loopback server in tests/test_hub_loopback.py."""
import json
import shutil

import numpy as np
import pytest
import timm
import torch

import vitfree
from vitfree import WindowSpec, WindowSpecError, create_winft
from vitfree import hub, weights
from vitfree.hub import check_config, prepare_push, push_to_hub, save_pretrained
from vitfree.weights import UnsafeWeightsError, WeightsIntegrityError, add_to_manifest, load_manifest, verify_weights

TINY = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=2)


def measured_spec(grid=4, depth=2, seed=0):
    rng = np.random.default_rng(seed)
    return WindowSpec(grid, [rng.integers(0, 3, size=(grid, grid, 4)), None],
                      {'kind': 'measured', 'model': 'deit_tiny_patch16_224', 'tau': 0.9, 'num_images': 64})


def tiny_winft(**kw):
    return timm.create_model('winft_tiny_patch16_224', **dict(TINY, windows=measured_spec(), num_classes=5, **kw))


def same_outputs(a, b, size=32):
    x = torch.randn(2, 3, size, size)
    return torch.equal(a.eval()(x), b.eval()(x))


def test_save_then_local_dir_rebuilds_windows_and_weights(tmp_path):
    model = tiny_winft()
    out = save_pretrained(model, tmp_path / 'export', label_names=list('abcde'))
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'winft_tiny_patch16_224' and cfg['num_classes'] == 5
    assert cfg['num_features'] == 48 and cfg['global_pool'] == 'token' and cfg['label_names'] == list('abcde')
    assert cfg['pretrained_cfg']['input_size'] == [3, 32, 32]
    assert WindowSpec.from_dict(cfg['model_args']['windows']) == model.window_spec
    card = (out / 'README.md').read_text()
    assert '`measured`' in card and 'deit_tiny_patch16_224' in card and 'library_name: timm' in card

    again = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert isinstance(again, vitfree.WinfT) and again.window_spec == model.window_spec
    assert same_outputs(model, again)
    assert hub.load_pretrained(out).window_spec == model.window_spec  # plain path form


def test_resized_spec_round_trip(tmp_path):
    """A 224 model fine-tuned at 160: the 10x10 spec travels, not the 14x14 one."""
    model = timm.create_model('winft_tiny_patch16_224', img_size=160, embed_dim=48, num_heads=3, num_classes=3)
    assert model.window_spec.grid == (10, 10)
    out = save_pretrained(model, tmp_path / 'export160')
    again = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert again.window_spec == model.window_spec and again.window_spec.provenance['resized_from'] == [14, 14]
    assert same_outputs(model, again, size=160)
    # resizing after construction (set_input_size) is exported the same way
    model.set_input_size((96, 96))
    again = timm.create_model(f'local-dir:{save_pretrained(model, tmp_path / "export96")}', pretrained=True)
    assert again.window_spec.grid == (6, 6) and same_outputs(model, again, size=96)


def test_winft_on_any_vit_round_trips_through_vitfree_winft(tmp_path):
    model = create_winft('vit_tiny_patch16_224', windows=measured_spec(), num_classes=4, **TINY)
    out = save_pretrained(model, tmp_path / 'export')
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'vitfree_winft' and cfg['model_args']['base'] == 'vit_tiny_patch16_224'
    assert 'attn_layer' not in cfg['model_args']
    again = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert again.window_spec == model.window_spec and same_outputs(model, again)


@pytest.mark.parametrize('breaks, match', [
    (lambda w: w['blocks'].__setitem__(0, [1, 2, 3]),
     r'model_args\.windows: blocks\[0\]: expected \[up, down, left, right\]'),
    (lambda w: w.pop('grid'), r"model_args\.windows: missing field 'grid'"),
    (lambda w: w['provenance'].__setitem__('kind', 'guessed'), r'model_args\.windows: provenance\.kind must be one of'),
])
def test_malformed_spec_in_config_is_named(tmp_path, breaks, match):
    out = save_pretrained(tiny_winft(), tmp_path / 'export')
    cfg = json.loads((out / 'config.json').read_text())
    breaks(cfg['model_args']['windows'])
    (out / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(WindowSpecError, match=match) as e:
        timm.create_model(f'local-dir:{out}', pretrained=True)
    assert 'config.json' in str(e.value)
    with pytest.raises(WindowSpecError, match=match):
        check_config(out / 'config.json')


def test_check_config_names_other_fields(tmp_path):
    with pytest.raises(ValueError, match='"architecture" is .*not a registered timm model'):
        check_config({'architecture': 'winft_giant', 'model_args': {}})
    with pytest.raises(ValueError, match='model_args.base'):
        check_config({'architecture': 'vitfree_winft', 'model_args': {}})
    with pytest.raises(WindowSpecError, match='expected a window spec object'):
        check_config({'architecture': 'winft_tiny_patch16_224', 'model_args': {'windows': 3}})


def test_pickle_weights_are_refused_from_the_network_and_read_safely_from_disk(tmp_path):
    with pytest.raises(UnsafeWeightsError, match="refusing to load 'pytorch_model.bin' from hf-hub:org/x"):
        weights.secure_pretrained_cfg('winft_tiny_patch16_224',
                                  {'hf_hub_id': 'org/x', 'hf_hub_filename': 'pytorch_model.bin', 'source': 'hf-hub'})
    with pytest.raises(UnsafeWeightsError, match='refusing to load pickle weights from https://'):
        weights.secure_pretrained_cfg('winft_tiny_patch16_224', {'url': 'https://example.org/w.pth'})
    # a local pickle is fine, read with weights_only=True by timm, once config.json no longer records the
    # model.safetensors it replaced
    local = save_pretrained(tiny_winft(), tmp_path / 'local')
    sd = timm.create_model(f'local-dir:{local}', pretrained=True).state_dict()
    (local / 'model.safetensors').unlink()
    torch.save(sd, local / 'pytorch_model.bin')
    with pytest.raises(weights.WeightsError, match=r'model.safetensors is missing, though .*config.json records it'):
        timm.create_model(f'local-dir:{local}', pretrained=True)
    cfg = json.loads((local / 'config.json').read_text())
    del cfg['weights']
    (local / 'config.json').write_text(json.dumps(cfg))
    assert timm.create_model(f'local-dir:{local}', pretrained=True).window_spec.grid == (4, 4)


# ---- sha256 manifest of shipped weights ----------------------------------------------------------
def test_shipped_manifest_is_valid():
    entries = load_manifest()
    assert isinstance(entries, dict)
    for name, e in entries.items():
        assert len(e['sha256']) == 64, name


def test_verify_weights_and_the_shipped_weights_hook(tmp_path, monkeypatch):
    shipped = tmp_path / 'weights'
    shipped.mkdir()
    monkeypatch.setattr(weights, '_weights_dirs', lambda: [shipped])
    monkeypatch.setenv('VITFREE_WEIGHTS_MANIFEST', str(shipped / 'manifest.json'))
    model = tiny_winft()
    w = shipped / 'winft_test.safetensors'
    shutil.copy(save_pretrained(model, tmp_path / 'x') / 'model.safetensors', w)

    def build():
        return timm.create_model('winft_tiny_patch16_224', pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(w), num_classes=5),
                                 **dict(TINY, windows=measured_spec(), num_classes=5))

    with pytest.raises(WeightsIntegrityError, match='shipped with vitfree but not listed'):
        build()
    entry = add_to_manifest(w, 'winft_test.demo', hf_hub_id='org/winft-test')
    assert load_manifest()['winft_test.demo']['sha256'] == entry['sha256']
    assert verify_weights(w) == 'winft_test.demo'
    assert same_outputs(model, build())
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    w.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError,
                       match=r'SHA-256 [0-9a-f]{64} but [0-9a-f]{64} is recorded \(manifest entry .winft_test.demo'):
        build()
    w.write_bytes(bytes(data[:-1]))
    with pytest.raises(WeightsIntegrityError, match='truncated'):
        verify_weights(w)


# ---- push: the plan (the upload itself: tests/test_hub_loopback.py) ------------------------------------------------------------
class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(('create_repo', repo_id, kw))
        from huggingface_hub.hf_api import RepoUrl
        return RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, **kw):
        self.calls.append(('upload_folder', kw['repo_id'], kw))
        return 'commit-info'


def test_push_prepares_create_repo_and_upload(tmp_path):
    out = save_pretrained(tiny_winft(), tmp_path / 'export')
    (out / 'notes.txt').write_text('not uploaded')
    api = RecordingApi()
    assert push_to_hub(out, 'org/winft-tiny', private=True, api=api) == 'commit-info'
    (name1, repo1, kw1), (name2, repo2, kw2) = api.calls
    assert (name1, repo1) == ('create_repo', 'org/winft-tiny')
    assert kw1 == {'private': True, 'exist_ok': True, 'repo_type': 'model'}
    assert (name2, repo2) == ('upload_folder', 'org/winft-tiny')
    assert kw2['folder_path'] == str(out) and kw2['allow_patterns'] == ['config.json', 'model.safetensors', 'README.md']
    assert kw2['commit_message'] == 'Upload WinfT (winft_tiny_patch16_224)'
    recorded = json.loads((out / 'config.json').read_text())['weights']['sha256']
    assert prepare_push(out, 'org/x').sha256 == recorded  # checked before anything is sent


def test_push_refuses_what_it_cannot_vouch_for(tmp_path, capsys):
    from vitfree.cli import main
    out = save_pretrained(tiny_winft(), tmp_path / 'export')
    with pytest.raises(ValueError, match='repo id must look like "org/name"'):
        prepare_push(out, 'just-a-name')
    torch.save({}, out / 'pytorch_model.bin')
    (out / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors \(only pickle files \['pytorch_model.bin'\]"):
        prepare_push(out, 'org/name')
    assert main(['push', str(out), 'org/name']) == 2
    assert 'no model.safetensors' in capsys.readouterr().err


# ---- honest exports, strict and checked loading (issue 15) ----------------------------------------
def test_export_records_weights_hash_real_architecture_and_no_borrowed_tag(tmp_path):
    import os
    import stat
    model = timm.create_model('winft_tiny_patch16_224', img_size=28, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                              num_classes=10, windows=WindowSpec.uniform(2, 7, 1))
    assert model.pretrained_cfg['tag'] == 'fb_in1k' and model.pretrained_cfg['notes']  # the registry's cfg ...
    out = save_pretrained(model, tmp_path / 'export', training={'initialisation': 'random (trained from scratch)'})
    cfg = json.loads((out / 'config.json').read_text())
    for borrowed in ('tag', 'notes', 'hf_hub_id'):  # ... describes DeiT weights, not these
        assert borrowed not in cfg['pretrained_cfg'], borrowed
    args = cfg['model_args']
    assert (args['embed_dim'], args['depth'], args['num_heads'], args['patch_size'], args['img_size']) == (
        64, 2, 4, 4, [28, 28])
    assert cfg['weights'] == {'file': 'model.safetensors', 'sha256': weights.sha256_file(out / 'model.safetensors'),
                              'size': (out / 'model.safetensors').stat().st_size}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((out / 'model.safetensors').stat().st_mode) == 0o666 & ~mask  # 0644, not 0600
    card = (out / 'README.md').read_text()
    assert '`embed_dim=64`' in card and 'random (trained from scratch)' in card and 'base_model' not in card
    again = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert (again.embed_dim, len(again.blocks), again.patch_embed.patch_size) == (64, 2, (4, 4))
    assert same_outputs(model, again, size=28)
    assert again.pretrained_cfg.get('tag') is None and again.pretrained_cfg.get('notes') is None


def test_exported_weights_are_checked_against_config_json(tmp_path):
    out = save_pretrained(tiny_winft(), tmp_path / 'export')
    data = bytearray((out / 'model.safetensors').read_bytes())
    data[-3] ^= 0x01  # one bit in a tensor: safetensors itself cannot notice
    (out / 'model.safetensors').write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match=r'export/model.safetensors has SHA-256 .* recorded .*config.json'):
        timm.create_model(f'local-dir:{out}', pretrained=True)
    with pytest.raises(WeightsIntegrityError, match='model.safetensors'):
        hub.load_pretrained(out)
    (out / 'model.safetensors').write_bytes(bytes(data[:len(data) // 2]))
    with pytest.raises(WeightsIntegrityError, match=r'has \d+ bytes but \d+ are recorded'):
        timm.create_model(f'local-dir:{out}', pretrained=True)


def test_truncated_file_without_a_record_is_named(tmp_path):
    w = tmp_path / 'half.safetensors'
    full = save_pretrained(tiny_winft(), tmp_path / 'x') / 'model.safetensors'
    w.write_bytes(full.read_bytes()[:1000])
    with pytest.raises(WeightsIntegrityError, match=r'half.safetensors is truncated or not a safetensors file'):
        timm.create_model('winft_tiny_patch16_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(w)),
                          **dict(TINY, windows=measured_spec(), num_classes=5))


def test_classifier_reset_stays_legitimate(tmp_path):
    """Only the head may differ: another num_classes, no head, features only."""
    model = tiny_winft()
    w = tmp_path / 'w.safetensors'
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(w))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith('head.')}
    for kw in (dict(num_classes=3), dict(num_classes=0), dict(features_only=True, out_indices=(1,))):
        m = create_winft('vit_tiny_patch16_224', windows=measured_spec(), pretrained=True,
                         pretrained_cfg_overlay=dict(file=str(w), num_classes=5), **dict(TINY, **kw))
        sd = (m.model if hasattr(m, 'model') else m).state_dict()
        assert all(torch.equal(sd[k], v) for k, v in body.items() if k in sd), kw
    out = save_pretrained(model, tmp_path / 'export')
    m = timm.create_model(f'local-dir:{out}', pretrained=True, num_classes=2)
    assert m.head.weight.shape == (2, 48) and torch.equal(m.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    # partial loading stays possible on purpose
    from safetensors.torch import load_file
    sd = load_file(str(w))
    sd.pop('blocks.1.mlp.fc2.bias')
    save_file(sd, str(w))
    m = timm.create_model('winft_tiny_patch16_224', pretrained=True, pretrained_strict=False,
                          pretrained_cfg_overlay=dict(file=str(w), num_classes=5),
                          **dict(TINY, windows=measured_spec(), num_classes=5))
    assert torch.equal(m.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_cli_checkpoint_keeps_a_head_of_another_size(tmp_path, caplog):
    model = tiny_winft()
    from safetensors.torch import save_file
    w = tmp_path / 'w.safetensors'
    save_file(model.state_dict(), str(w))
    m = timm.create_model('winft_tiny_patch16_224', **dict(TINY, windows=measured_spec(), num_classes=3))
    with caplog.at_level('WARNING'):
        info = weights.load_weights(m, w)
    assert sorted(info['skipped']) == ['head.bias', 'head.weight'] and 'classifier' in caplog.text
    assert m.head.weight.shape == (3, 48)
    assert torch.equal(m.blocks[1].attn.proj.weight, model.blocks[1].attn.proj.weight)
    with pytest.raises(weights.WeightsError, match='is a folder; .* load it as local-dir:'):
        weights.load_weights(m, save_pretrained(model, tmp_path / 'export'))


def test_shipped_models_carry_label_names_and_the_224_tags_say_what_they_are():
    m = timm.create_model('winft_micro_patch2_28.fmnist', pretrained=True)
    assert m.pretrained_cfg['label_names'][9] == 'Ankle boot'
    for name, entry in load_manifest().items():
        assert list(entry['label_names']) == list(timm.models.get_pretrained_cfg(name).label_names), name
    from vitfree.data import FASHION_MNIST_CLASSES
    assert tuple(FASHION_MNIST_CLASSES) == tuple(m.pretrained_cfg['label_names'])
    tags = [t for t in timm.list_pretrained('winft_*') if not t.endswith('.fmnist')]
    assert len(tags) == 13  # 9 ViT/DeiT, EVA-02, DINOv3, SAM, BEiT
    for tag in tags:
        notes = ' '.join(timm.models.get_pretrained_cfg(tag).notes)
        base = timm.models.get_pretrained_cfg(tag).hf_hub_id.split('/')[1]
        if tag.startswith('winft_samvit'):  # trained with SAM's windows; the prior is that pattern
            assert "trained with SAM's own windows" in notes and 'not measured' in notes, tag
        else:
            assert 'trained without windows' in notes and 'not been measured' in notes, tag
        assert f'vitfree erf {base.split(".")[0]}' in notes and f'vitfree finetune {base.split(".")[0]}' in notes
    # an export of the shipped model keeps its label names, not its tag
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        cfg = json.loads((save_pretrained(m, d) / 'config.json').read_text())
    assert cfg['label_names'][9] == 'Ankle boot' and 'tag' not in cfg['pretrained_cfg']


def test_full_disk_while_exporting_names_the_file(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **kw):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(safetensors.torch, 'save_file', full)
    with pytest.raises(weights.WeightsError, match=r'cannot write .*export/model.safetensors: .*No space left'):
        save_pretrained(tiny_winft(), tmp_path / 'export')
    (tmp_path / 'file').write_text('x')
    with pytest.raises(NotADirectoryError, match='file'):
        save_pretrained(tiny_winft(), tmp_path / 'file')


def test_push_without_network_is_one_error_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as constants
    from vitfree.cli import main
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True, raising=False)
    out = save_pretrained(tiny_winft(), tmp_path / 'export')
    assert main(['push', str(out), 'org/name', '--token', 'hf_dummy']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: cannot create hf-hub:org/name') and 'offline' in err[0], err


def test_model_card_names_data_sets_and_checkpoints_without_machine_paths(tmp_path):
    from vitfree.hub import dataset_name
    spec = measured_spec()
    spec.provenance['checkpoint'] = '/home/someone/runs/vit_s0/model (seed 0)'
    model = timm.create_model('winft_tiny_patch16_224', **dict(TINY, windows=spec, num_classes=5))
    out = save_pretrained(model, tmp_path / 'export', training={'dataset': '/data/sets/flowers/', 'epochs': 3,
                                                                 'initialised_from': 'local-dir:/home/someone/x/model'})
    card = (out / 'README.md').read_text()
    assert '**dataset:** flowers' in card and '/data/sets' not in card
    assert 'vit_s0/model (seed 0)' in card and '/home/someone' not in card
    assert dataset_name('digits') == 'digits' and dataset_name('runs/data/') == 'data'
