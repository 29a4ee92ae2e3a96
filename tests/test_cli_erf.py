"""``vitfree erf``: writes a spec that loads back and builds a WinfT, plus pictures."""
import re
import shutil

import pytest
import torch

import vitfree
from vitfree.cli import main
from vitfree.windows import WindowSpec

MODEL_ARGS = ['--model-kwargs', 'img_size=64', 'depth=2', 'embed_dim=64', 'num_heads=2', 'num_classes=5']


@pytest.fixture()
def image_dir(tmp_path):
    d = tmp_path / 'imgs'
    (d / 'nested').mkdir(parents=True)
    shutil.copy('vitfree/assets/coffee.jpg', d / 'coffee.jpg')
    shutil.copy('vitfree/assets/chelsea.jpg', d / 'nested' / 'chelsea.jpg')
    return d


def test_cli_writes_spec_that_builds_a_winft(tmp_path, image_dir, capsys):
    out = tmp_path / 'spec.yaml'
    pics = tmp_path / 'pics'
    rc = main(['erf', 'vit_tiny_patch16_224', str(image_dir), '-o', str(out), '--images', '2', '--tau', '0.5',
               '--gamma', '0.95', '--pictures', str(pics), '--no-progress'] + MODEL_ARGS)
    assert rc == 0
    text = capsys.readouterr().out
    assert 'ERF area' in text and 'mean area' in text and str(out) in text
    spec = WindowSpec.load(out)
    prov = spec.provenance
    assert prov['kind'] == 'measured' and prov['num_images'] == 2 and prov['estimator'] == 'attention'
    assert prov['tau'] == 0.5 and prov['gamma'] == 0.95 and image_dir.name in prov['data']
    assert str(image_dir) not in prov['data']  # no path of this machine in a spec that travels
    assert prov['checkpoint'].startswith('none (random initialisation')
    assert spec.grid == (4, 4) and spec.depth == 2
    winft = vitfree.create_winft('vit_tiny_patch16_224', windows=str(out), img_size=64, depth=2, embed_dim=64,
                                 num_heads=2, num_classes=5)
    assert winft.window_spec.blocks[0] is None or winft.window_spec.blocks[0].shape == (4, 4, 4)
    assert winft(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert sorted(p.name for p in pics.iterdir()) == sorted(
        ['window_sizes.png', 'erf_rects.png', 'tendency.png', 'interaction_matrices.png', 'interaction_maps.png'])


def test_cli_builtin_dataset_and_ablation(tmp_path):
    out = tmp_path / 'digits.json'
    rc = main(['erf', 'vit_tiny_patch16_224', 'digits', '-o', str(out), '--images', '2', '--estimator', 'ablation',
               '--no-progress', '--model-kwargs', 'img_size=32', 'depth=1', 'embed_dim=32', 'num_heads=2'])
    assert rc == 0
    spec = WindowSpec.load(out)
    assert spec.provenance['estimator'] == 'ablation' and 'digits' in spec.provenance['data']
    assert spec.grid == (2, 2) and spec.depth == 1


@pytest.mark.parametrize('argv, match', [
    (['vit_tiny_patch16_224', '{imgs}', '-o', '{tmp}/spec.txt'], r'--output .*spec\.txt. must end in \.yaml'),
    (['vit_tiny_patch61_224', '{imgs}', '-o', '{tmp}/s.yaml'],
     r"unknown model 'vit_tiny_patch61_224'; did you mean vit_tiny_patch16_224"),
    (['vit_nope', '{imgs}', '-o', '{tmp}/s.yaml'], r"unknown model 'vit_nope'; \d+ models start with 'vit_', e\.g\."),
    (['vit_tiny_patch16_224', '{tmp}/missing', '-o', '{tmp}/s.yaml'] + MODEL_ARGS, 'neither a built-in data set'),
    (['vit_tiny_patch16_224', '{imgs}', '-o', '{tmp}/s.yaml', '--tau', '2', '--no-progress'] + MODEL_ARGS,
     r'tau must be in \(0, 1\]'),
])
def test_cli_errors(tmp_path, image_dir, capsys, argv, match):
    argv = [a.format(imgs=image_dir, tmp=tmp_path) for a in argv]
    assert main(['erf'] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and re.search(match, err[0]), err
    assert not (tmp_path / 's.yaml').exists() and not (tmp_path / 'spec.txt').exists()


def test_cli_checkpoint_is_loaded_and_recorded(tmp_path, image_dir, monkeypatch):
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(3)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, depth=2, embed_dim=64, num_heads=2, num_classes=5)
    ckpt = tmp_path / 'trained.safetensors'
    save_file(vit.state_dict(), str(ckpt))
    out = tmp_path / 'spec.yaml'
    assert main(['erf', 'vit_tiny_patch16_224', str(image_dir), '-o', str(out), '--images', '2', '--no-progress',
                 '--checkpoint', str(ckpt), '--tau', '0.5', '--gamma', '2'] + MODEL_ARGS) == 0
    spec = WindowSpec.load(out)
    assert spec.provenance['checkpoint'] == f'{tmp_path.name}/trained.safetensors'  # no machine path
    monkeypatch.chdir(tmp_path)  # a path under the current folder is recorded relative to it
    assert main(['erf', 'vit_tiny_patch16_224', str(image_dir), '-o', 'again.yaml', '--images', '1', '--no-progress',
                 '--checkpoint', str(ckpt), '--tau', '0.5', '--gamma', '2'] + MODEL_ARGS) == 0
    assert WindowSpec.load('again.yaml').provenance['checkpoint'] == 'trained.safetensors'
    expected = vitfree.measure_erf(vit, str(image_dir), tau=0.5, gamma=2, progress=False)
    assert all((a == b).all() for a, b in zip(spec.blocks, expected.blocks))


def test_cli_says_when_every_block_came_out_global(tmp_path, image_dir, capsys):
    out = tmp_path / 'spec.yaml'
    assert main(['erf', 'vit_tiny_patch16_224', str(image_dir), '-o', str(out), '--images', '2', '--no-progress',
                 '--gamma', '0.05'] + MODEL_ARGS) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning:')]
    assert len(warned) == 1 and 'every block came out global' in warned[0], warned
    assert 'gamma=0.05 of the 4x4 grid' in warned[0] and 'Lower gamma' in warned[0]
    assert all(b is None for b in WindowSpec.load(out).blocks)
