"""The Hub path for real: huggingface_hub's own HTTP code against a Hub stand-in on 127.0.0.1.

Nothing here answers a download call with a local file: every weight and config goes through
``hf_hub_download`` (HEAD with ETag and commit headers, the redirect of ``.safetensors`` files to
a storage host, the cache), and ``vitfree push`` through ``HfApi.create_repo`` / ``upload_folder``
(preupload, commit).  See ``tests/hub_server.py``.
"""
import json
import os
import subprocess
import sys
import types

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save

import vitfree
from hub_server import HubServer, hub  # noqa: F401  (the fixture)
from vitfree import WindowSpec
from vitfree.hub import load_pretrained, save_pretrained
from vitfree.weights import HubUnreachableError, WeightsIntegrityError, add_to_manifest

TINY = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=2, num_classes=5)


def tiny_winft():
    rng = np.random.default_rng(0)
    spec = WindowSpec(4, [rng.integers(0, 3, size=(4, 4, 4)), None],
                      {'kind': 'measured', 'model': 'deit_tiny_patch16_224', 'tau': 0.9})
    return timm.create_model('winft_tiny_patch16_224', windows=spec, **TINY)


def same_outputs(a, b, size=32):
    x = torch.randn(2, 3, size, size)
    return torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture
def no_retries(monkeypatch):
    """huggingface_hub sleeps only between retries: make any retry fail the test."""
    from huggingface_hub.utils import _http

    def sleep(seconds):
        raise AssertionError(f'huggingface_hub retried (it would sleep {seconds} s)')

    monkeypatch.setattr(_http, 'time', types.SimpleNamespace(sleep=sleep))


def publish(hub, tmp_path, repo='org/winft-tiny', model=None):
    model = model if model is not None else tiny_winft()
    folder = save_pretrained(model, tmp_path / repo.replace('/', '--'))
    hub.upload_folder(repo, folder)
    return model, folder


# ---- pull -------------------------------------------------------------------------------------------
def test_hf_hub_export_round_trip_over_http(hub, tmp_path, no_retries):
    model, folder = publish(hub, tmp_path)
    again = timm.create_model('hf-hub:org/winft-tiny', pretrained=True)
    assert isinstance(again, vitfree.WinfT) and again.window_spec == model.window_spec
    assert same_outputs(model, again)
    assert ('HEAD', '/org/winft-tiny/resolve/main/config.json') in hub.requests
    assert ('HEAD', '/org/winft-tiny/resolve/main/model.safetensors') in hub.requests
    sha = json.loads((folder / 'config.json').read_text())['weights']['sha256']
    assert ('GET', f'/{sha}') in hub.requests  # the weights came from the storage host the Hub redirected to
    blobs = list((tmp_path / 'hub-cache').glob('models--org--winft-tiny/blobs/*'))
    assert sha in {b.name for b in blobs}  # cached under its SHA-256, as huggingface_hub does for LFS files
    # the cache serves it again once the Hub is gone, without a retry
    hub.stop()
    cached = timm.create_model('hf-hub:org/winft-tiny', pretrained=True)
    assert same_outputs(model, cached)


def test_a_revision_is_resolved_by_commit(hub, tmp_path):
    first, _ = publish(hub, tmp_path)
    sha = hub.repos['org/winft-tiny'][-1][0]
    publish(hub, tmp_path / 'second', model=tiny_winft())  # a new commit on main with other weights
    old = timm.create_model(f'hf-hub:org/winft-tiny@{sha}', pretrained=True)
    assert same_outputs(first, old)
    assert ('HEAD', f'/org/winft-tiny/resolve/{sha}/model.safetensors') in hub.requests


@pytest.mark.parametrize('tag, depth', [('winft_tiny_patch16_224.fb_in1k', None),
                                        ('winft_tiny_patch16_384.augreg_in21k_ft_in1k', 1)])
def test_pretrained_tags_load_timms_checkpoints_over_http(hub, tag, depth, no_retries):
    """A registered tag names timm's own repo (e.g. timm/deit_tiny_patch16_224.fb_in1k): serve a
    checkpoint of that timm model there and the WinfT loads exactly those weights, with the tag's
    prior windows (the 384 px one one block deep, to stay small)."""
    repo = timm.models.get_pretrained_cfg(tag).hf_hub_id
    torch.manual_seed(1)
    small = {} if depth is None else {'depth': depth}
    base = timm.create_model(repo.split('/')[1], **small)  # timm's own ViT of that name, random weights
    hub.commit(repo, {'model.safetensors': save(base.state_dict())})
    if depth is not None:
        small['windows'] = WindowSpec.uniform(depth, base.patch_embed.grid_size, 3)
    winft = timm.create_model(tag, pretrained=True, **small)
    sd = winft.state_dict()
    assert set(sd) == set(base.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in base.state_dict().items())
    assert winft.window_spec.provenance['kind'] == ('prior' if depth is None else 'uniform')
    assert [r for r in hub.requests if r[1].startswith(f'/{repo}/')] == [
        ('HEAD', f'/{repo}/resolve/main/model.safetensors')] * 2  # vitfree's probe, then huggingface_hub's
    assert not any(p.endswith('pytorch_model.bin') for _, p in hub.requests)  # no pickle lookup


def test_hub_weights_without_safetensors_are_refused_not_swapped_for_a_pickle(hub, tmp_path):
    _, folder = publish(hub, tmp_path)
    hub.commit('org/winft-tiny', {'pytorch_model.bin': b'not loaded'}, replace=True)
    hub.commit('org/winft-tiny', {'config.json': (folder / 'config.json').read_bytes()})
    with pytest.raises(vitfree.weights.UnsafeWeightsError, match='will not fall back to pytorch_model.bin'):
        timm.create_model('hf-hub:org/winft-tiny', pretrained=True)
    assert not any(p.endswith('pytorch_model.bin') for _, p in hub.requests)


# ---- integrity -------------------------------------------------------------------------------------
def test_a_flipped_byte_in_the_download_is_refused_by_the_sha256_check(hub, tmp_path):
    publish(hub, tmp_path)
    hub.flip_byte('org/winft-tiny', 'model.safetensors')  # the storage host sends one wrong byte
    with pytest.raises(WeightsIntegrityError,
                       match=r'model.safetensors has SHA-256 [0-9a-f]{64} but [0-9a-f]{64} is recorded '
                             r'\(hf-hub:org/winft-tiny/config.json\)'):
        timm.create_model('hf-hub:org/winft-tiny', pretrained=True)


def test_a_hub_download_listed_in_the_manifest_is_checked(hub, tmp_path, monkeypatch):
    _, folder = publish(hub, tmp_path)
    config = json.loads((folder / 'config.json').read_text())
    del config['weights']  # only the manifest vouches for these weights now
    hub.commit('org/winft-tiny', {'config.json': json.dumps(config).encode()})
    monkeypatch.setenv('VITFREE_WEIGHTS_MANIFEST', str(tmp_path / 'manifest.json'))
    add_to_manifest(folder / 'model.safetensors', 'winft_test.hub', hf_hub_id='org/winft-tiny')
    assert timm.create_model('hf-hub:org/winft-tiny', pretrained=True).num_classes == 5
    hub.flip_byte('org/winft-tiny', 'model.safetensors')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'fresh-cache'))
    with pytest.raises(WeightsIntegrityError, match=r"manifest entry 'winft_test.hub'"):
        timm.create_model('hf-hub:org/winft-tiny', pretrained=True)


# ---- push -------------------------------------------------------------------------------------------
def test_push_cli_uploads_through_hfapi_and_the_upload_loads_again(hub, tmp_path, capsys):
    from vitfree.cli import main
    model = tiny_winft()
    run = tmp_path / 'run'
    out = save_pretrained(model, run / 'model')
    assert main(['push', str(run), 'org/pushed', '--dry-run']) == 0  # a finetune output folder; nothing sent
    assert 'dry run' in capsys.readouterr().out and not [r for r in hub.requests if r[0] == 'POST']
    assert main(['push', str(out), 'org/pushed', '--token', 'hf_test', '--message', 'first upload']) == 0
    printed = capsys.readouterr().out
    assert 'matches the SHA-256 config.json records' in printed and f'{hub.endpoint}/org/pushed/commit/' in printed
    posts = [p for m, p in hub.requests if m == 'POST']
    assert posts[0] == '/api/repos/create' and posts[-1] == '/api/models/org/pushed/commit/main'
    served = hub.files('org/pushed')
    for name in ('config.json', 'model.safetensors', 'README.md'):
        assert served[name] == (out / name).read_bytes(), name
    again = timm.create_model('hf-hub:org/pushed', pretrained=True)
    assert again.window_spec == model.window_spec and same_outputs(model, again)
    # pushing again: the repo exists (409, exist_ok) and a second commit lands
    assert main(['push', str(out), 'org/pushed', '--token', 'hf_test']) == 0
    assert len(hub.repos['org/pushed']) == 3  # .gitattributes at creation, then two pushes


def test_push_refuses_an_export_whose_weights_fail_their_recorded_sha256(hub, tmp_path, capsys):
    from vitfree.cli import main
    out = save_pretrained(tiny_winft(), tmp_path / 'export')
    data = bytearray((out / 'model.safetensors').read_bytes())
    data[-3] ^= 0x01
    (out / 'model.safetensors').write_bytes(bytes(data))
    for extra in (['--dry-run'], ['--token', 'hf_test']):
        assert main(['push', str(out), 'org/bad'] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and 'has SHA-256' in err[0] and 'is recorded' in err[0], err
    assert not [r for r in hub.requests if r[0] == 'POST']  # nothing was sent


def test_push_without_a_token_is_one_error_line(hub, tmp_path, capsys, monkeypatch):
    from vitfree.cli import main
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf-home'))  # no cached login either
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'),
                        raising=False)
    out = save_pretrained(tiny_winft(), tmp_path / 'export')
    assert main(['push', str(out), 'org/name']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: cannot create hf-hub:org/name'), err


# ---- the Hub going away -------------------------------------------------------------------------------
def test_server_stopped_mid_run_fails_at_once_naming_what_was_wanted(hub, tmp_path, no_retries):
    from huggingface_hub import hf_hub_download
    model, _ = publish(hub, tmp_path, 'org/first')
    publish(hub, tmp_path, 'org/second')
    timm.create_model('hf-hub:org/first', pretrained=True)
    hf_hub_download('org/second', 'config.json')  # the run got as far as the second model's config
    hub.stop()
    assert same_outputs(model, timm.create_model('hf-hub:org/first', pretrained=True))  # cached: fine
    with pytest.raises(HubUnreachableError) as e:
        timm.create_model('hf-hub:org/second', pretrained=True)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('hf-hub:org/second: cannot get model.safetensors of hf-hub:org/second')
    assert 'cannot be reached' in msg and '--checkpoint' in msg and 'local-dir:' in msg
    with pytest.raises(HubUnreachableError, match=r'^hf-hub:org/third: cannot get config.json of hf-hub:org/third'):
        load_pretrained('org/third')  # nothing cached: the config itself
    with pytest.raises(HubUnreachableError, match=r'^winft_tiny_patch16_224.fb_in1k: cannot get model.safetensors '
                                                  r'of hf-hub:timm/deit_tiny_patch16_224.fb_in1k'):
        timm.create_model('winft_tiny_patch16_224.fb_in1k', pretrained=True)


def test_a_hub_outage_is_the_same_error(hub, tmp_path, no_retries):
    publish(hub, tmp_path)
    hub.status = 503
    with pytest.raises(HubUnreachableError, match=r'answered HTTP 503, and it is not in the local cache'):
        load_pretrained('org/winft-tiny')


def test_offline_mode_fails_at_once(hub, tmp_path, monkeypatch, no_retries):
    from huggingface_hub import constants
    publish(hub, tmp_path)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(HubUnreachableError, match=r'offline mode is on \(HF_HUB_OFFLINE=1\)'):
        timm.create_model('winft_tiny_patch16_224.fb_in1k', pretrained=True)
    assert hub.requests == []


def test_cli_pretrained_with_the_hub_down_is_one_line_and_leaves_nothing(hub, tmp_path, capsys, no_retries):
    from vitfree.cli import main
    hub.stop()
    spec = tmp_path / 'out' / 'spec.yaml'
    for model in ('hf-hub:org/gone', 'deit_tiny_patch16_224.fb_in1k', 'winft_tiny_patch16_224.fb_in1k'):
        assert main(['erf', model, 'vitfree/assets/fashion_mnist_samples.npz', '-o', str(spec), '--pretrained',
                     '--images', '2']) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('error: ') and model in err[0], err
        assert 'cannot be reached' in err[0] and '--checkpoint' in err[0] and 'Retrying' not in err[0]
    assert not spec.parent.exists()


def test_hf_endpoint_in_a_fresh_process(tmp_path):
    """The documented way: HF_ENDPOINT set before huggingface_hub is imported (here in a fresh
    process, which imports huggingface_hub only)."""
    server = HubServer().start()
    try:
        _, folder = publish(server, tmp_path)
        code = ('import json, huggingface_hub as h; '
                'print(json.load(open(h.hf_hub_download("org/winft-tiny", "config.json")))["architecture"])')
        env = dict(os.environ, **server.env(tmp_path))
        done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ['winft_tiny_patch16_224']
        assert ('HEAD', '/org/winft-tiny/resolve/main/config.json') in server.requests
    finally:
        server.stop()
