"""Bad inputs, as a table: each must fail with the expected error class and a message that names the bad
value (issue 15).  CLI cases run `main([..., '--debug'])`, so the exception itself is checked; the same
cases without `--debug` must print exactly one `error: ...` line naming the value and exit with status 2.

Each row: (id, make, error class, text the message must contain).  `make(ctx)` prepares the bad input
under `ctx.tmp` and returns a callable that must raise, or a CLI argv list.
"""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vitfree
from vitfree import WindowSpec, WindowSpecError
from vitfree.cli import main
from vitfree.commands._common import CommandError
from vitfree.hub import HubError, prepare_push, save_pretrained
from vitfree.train import CheckpointError, FinetuneConfig, finetune
from vitfree.data import DataError, build_dataset
from vitfree.weights import UnsafeWeightsError, WeightsError, WeightsIntegrityError

TINY = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=3)
SPEC = WindowSpec.uniform(3, 4, 1)
TINY_ARGS = ['--model-kwargs', 'img_size=32', 'patch_size=8', 'embed_dim=48', 'num_heads=3', 'depth=3',
             'num_classes=5']


class Ctx:
    def __init__(self, tmp: Path, shared: dict):
        self.tmp = tmp
        self.shared = shared

    def export(self, name='export'):
        """A fresh copy of a saved tiny WinfT export."""
        return Path(shutil.copytree(self.shared['export'], self.tmp / name))

    def weights(self, name='w.safetensors', drop=(), add=()):
        sd = load_file(str(self.shared['export'] / 'model.safetensors'))
        for k in drop:
            sd.pop(k)
        for k in add:
            sd[k] = torch.zeros(1)
        path = self.tmp / name
        save_file(sd, str(path))
        return path

    def run(self):
        """A copy of a finished tiny fine-tuning run (checkpoints at steps 2, 3-end)."""
        return Path(shutil.copytree(self.shared['run'], self.tmp / 'run'))

    def images(self, bad=('broken.jpg',)):
        d = self.tmp / 'imgs'
        d.mkdir()
        shutil.copy('vitfree/assets/coffee.jpg', d / 'coffee.jpg')
        for name in bad:
            (d / name).write_bytes(b'this is not an image')
        return d


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp('shared')
    torch.manual_seed(0)
    model = timm.create_model('winft_tiny_patch16_224', windows=SPEC, num_classes=5, **TINY)
    export = save_pretrained(model, root / 'export')
    run = root / 'run'
    finetune(run_config(run))
    return {'export': export, 'run': run}


def run_config(out, **kw):
    base = dict(model='winft_tiny_patch16_224', data='digits', output=str(out), img_size=32,
                model_kwargs=dict(depth=1, patch_size=8, embed_dim=24, num_heads=2,
                                  windows=WindowSpec.uniform(1, 4, 1).to_dict()),
                epochs=1, batch_size=16, lr=2e-3, limit_train_batches=3, limit_val_batches=1, workers=0, threads=1,
                progress=False, checkpoint_every=2, export=False, seed=1)
    base.update(kw)
    return FinetuneConfig(**base)


def edit_state(run, edit, name='ckpt-000000002'):
    """Change a checkpoint's state.json (the JSON only: the tensors file and its hash stay valid)."""
    path = run / 'checkpoints' / name / 'state.json'
    index = json.loads(path.read_text())
    index = edit(index)
    path.write_text(json.dumps(index))
    return run / 'checkpoints' / name


def _del_progress(index):
    del index['state']['progress']
    return index


def _set(field, value):
    def edit(index):
        *parents, last = field.split('.')
        node = index['state']
        for p in parents:
            node = node[p]
        node[last] = value
        return index
    return edit


def flip_bytes(path, n=1):
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[-1 - 7 * i] ^= 0x55
    path.write_bytes(bytes(data))
    return path


def flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor's bytes
    path.write_bytes(bytes(data))
    return path


def shipped_dir(ctx, monkeypatch):
    """A private copy of the shipped-weights folder and manifest, so a flipped byte hurts nothing."""
    import vitfree.weights as weights
    d = ctx.tmp / 'weights'
    shutil.copytree(Path(vitfree.__file__).parent.parent / 'weights', d)
    monkeypatch.setattr(weights, '_weights_dirs', lambda: [d])
    monkeypatch.setenv('VITFREE_WEIGHTS_MANIFEST', str(d / 'manifest.json'))
    return d


def _overlay(path, **kw):
    return lambda: timm.create_model('winft_tiny_patch16_224', pretrained=True, windows=SPEC,
                                     pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **TINY, **kw)


CASES = [
    # ---- loading: strict on every path, whatever num_classes is --------------------------------------
    ('local-dir missing key, other num_classes',
     lambda c, m: (lambda e: (save_file({k: v for k, v in load_file(str(e / 'model.safetensors')).items()
                                          if k != 'blocks.2.attn.qkv.weight'}, str(e / 'model.safetensors')),
                              _forget_hash(e),
                              lambda: timm.create_model(f'local-dir:{e}', pretrained=True, num_classes=7))[-1])(
         c.export()),
     WeightsError, 'blocks.2.attn.qkv.weight'),
    ('overlay file missing key, same num_classes',
     lambda c, m: _overlay(c.weights(drop=['blocks.2.attn.qkv.weight']), num_classes=5),
     WeightsError, 'blocks.2.attn.qkv.weight'),
    ('overlay file missing key, other num_classes',
     lambda c, m: _overlay(c.weights(drop=['blocks.1.norm1.weight']), num_classes=3),
     WeightsError, 'blocks.1.norm1.weight'),
    ('create_winft pretrained, unexpected key',
     lambda c, m: (lambda w: lambda: vitfree.create_winft(
         'vit_tiny_patch16_224', windows=SPEC, pretrained=True, num_classes=9,
         pretrained_cfg_overlay=dict(file=str(w), num_classes=5), **TINY))(c.weights(add=['extra.weight'])),
     WeightsError, 'extra.weight'),
    ('CLI --checkpoint missing key',
     lambda c, m: ['erf', 'vit_tiny_patch16_224', 'digits', '-o', str(c.tmp / 's.yaml'), '--images', '1',
                   '--checkpoint', str(c.weights(drop=['blocks.0.mlp.fc1.bias']))] + TINY_ARGS,
     WeightsError, 'blocks.0.mlp.fc1.bias'),
    ('CLI --checkpoint shipped weights with one flipped byte',
     lambda c, m: ['erf', 'winft_micro_patch2_28', 'digits', '-o', str(c.tmp / 's.yaml'), '--images', '1',
                   '--checkpoint', str(flip_bytes(shipped_dir(c, m) / 'winft_micro_patch2_28.fmnist.safetensors'))],
     WeightsIntegrityError, 'winft_micro_patch2_28.fmnist.safetensors'),
    ('CLI analyze --checkpoint shipped weights with one flipped byte',
     lambda c, m: ['analyze', 'winft_micro_patch2_28', 'vitfree/assets/coffee.jpg', '-o', str(c.tmp / 'rep'),
                   '--parts', 'profiles',
                   '--checkpoint', str(flip_bytes(shipped_dir(c, m) / 'winft_micro_patch2_28.fmnist.safetensors'))],
     WeightsIntegrityError, 'winft_micro_patch2_28.fmnist.safetensors'),
    ('local-dir export with 400 flipped bytes',
     lambda c, m: (lambda e: (flip_bytes(e / 'model.safetensors', 400),
                              lambda: timm.create_model(f'local-dir:{e}', pretrained=True))[-1])(c.export()),
     WeightsIntegrityError, 'model.safetensors'),
    ('truncated safetensors through pretrained_cfg_overlay',
     lambda c, m: (lambda w: (w.write_bytes(w.read_bytes()[:-50]), _overlay(w))[-1])(c.weights('cut.safetensors')),
     WeightsIntegrityError, 'cut.safetensors'),
    ('truncated safetensors through --checkpoint',
     lambda c, m: (lambda w: (w.write_bytes(w.read_bytes()[:-50]),
                              ['erf', 'vit_tiny_patch16_224', 'digits', '-o', str(c.tmp / 's.yaml'),
                               '--checkpoint', str(w)] + TINY_ARGS)[-1])(c.weights('cut2.safetensors')),
     WeightsIntegrityError, 'cut2.safetensors'),
    ('truncated torch.save file through pretrained_cfg_overlay',
     lambda c, m: (lambda w: (torch.save(load_file(str(c.shared['export'] / 'model.safetensors')), w),
                              w.write_bytes(w.read_bytes()[:-200]), _overlay(w))[-1])(c.tmp / 'cut.pth'),
     WeightsIntegrityError, 'cut.pth'),
    ('torch.save file with a flipped byte through --checkpoint',
     lambda c, m: (lambda w: (torch.save(load_file(str(c.shared['export'] / 'model.safetensors')), w),
                              flip_middle_byte(w),
                              ['erf', 'vit_tiny_patch16_224', 'digits', '-o', str(c.tmp / 's.yaml'),
                               '--checkpoint', str(w)] + TINY_ARGS)[-1])(c.tmp / 'flipped.pth'),
     WeightsIntegrityError, 'flipped.pth'),
    ('config.json weights record with a bad hash',
     lambda c, m: (lambda e: (_edit_json(e / 'config.json', lambda d: d['weights'].update(sha256='xyz')),
                              lambda: timm.create_model(f'local-dir:{e}', pretrained=True))[-1])(c.export()),
     WeightsError, 'xyz'),
    ('pickle weights from a URL',
     lambda c, m: lambda: vitfree.weights.secure_pretrained_cfg('winft_tiny_patch16_224',
                                                                {'url': 'https://example.org/evil.pth'}),
     UnsafeWeightsError, 'evil.pth'),
    # ---- checkpoint JSON ------------------------------------------------------------------------------
    ('checkpoint without progress',
     lambda c, m: (lambda ck: lambda: finetune(run_config(c.tmp / 'run', resume=str(ck))))(
         edit_state(c.run(), _del_progress)),
     CheckpointError, 'progress'),
    ('checkpoint JSON that is a list',
     lambda c, m: (lambda ck: lambda: finetune(run_config(c.tmp / 'run', resume=str(ck))))(
         edit_state(c.run(), lambda index: [index])),
     CheckpointError, 'list'),
    ('checkpoint global_step "x"',
     lambda c, m: (lambda ck: lambda: finetune(run_config(c.tmp / 'run', resume=str(ck))))(
         edit_state(c.run(), _set('progress.global_step', 'x'))),
     CheckpointError, "progress.global_step must be an integer >= 0, got 'x'"),
    ('checkpoint progress.batch edited',
     lambda c, m: (lambda ck: lambda: finetune(run_config(c.tmp / 'run', resume=str(ck))))(
         edit_state(c.run(), _set('progress.batch', 1))),
     CheckpointError, 'progress.global_step is 2'),
    ('checkpoint tensors.size not a number',
     lambda c, m: (lambda ck: lambda: finetune(run_config(c.tmp / 'run', resume=str(ck))))(
         edit_state(c.run(), lambda index: (index['tensors'].update(size='big'), index)[1])),
     CheckpointError, "tensors.size must be an integer >= 0, got 'big'"),
    # ---- resume and output folder -----------------------------------------------------------------------
    ('resume with a changed --lr',
     lambda c, m: (lambda r: lambda: finetune(run_config(r, resume=True, lr=1e-2)))(c.run()),
     ValueError, '--lr: 0.002 in the checkpoint, 0.01 now'),
    ('resume with a changed --seed',
     lambda c, m: (lambda r: lambda: finetune(run_config(r, resume=True, seed=7)))(c.run()),
     ValueError, '--seed: 1 in the checkpoint, 7 now'),
    ('run into an existing run folder',
     lambda c, m: (lambda r: lambda: finetune(run_config(r)))(c.run()),
     ValueError, 'already holds a run'),
    ('resume and overwrite together',
     lambda c, m: lambda: finetune(run_config(c.tmp / 'x', resume=True, overwrite=True)),
     ValueError, 'resume and overwrite'),
    ('finetune output is a file',
     lambda c, m: (lambda f: (f.write_text('x'), ['finetune', 'winft_micro_patch2_28', 'digits', '-o', str(f)])[-1])(
         c.tmp / 'taken'),
     ValueError, 'taken'),
    ('finetune checkpoints/ is a file',
     lambda c, m: (lambda r: (shutil.rmtree(r / 'checkpoints'), (r / 'checkpoints').write_text('x'),
                              lambda: finetune(run_config(r, resume=True)))[-1])(c.run()),
     ValueError, 'checkpoints'),
    ('finetune bad learning rate',
     lambda c, m: lambda: finetune(run_config(c.tmp / 'x', lr=-1.0)),
     ValueError, 'lr must be > 0, got -1.0'),
    ('finetune data folder missing',
     lambda c, m: ['finetune', 'winft_micro_patch2_28', str(c.tmp / 'no_data'), '-o', str(c.tmp / 'o')],
     DataError, 'no_data'),
    ('unreadable image in a training folder, --strict',
     lambda c, m: (lambda d: lambda: build_dataset(d, 'train', strict=True))(_class_folders(c.tmp)),
     DataError, 'broken.png'),
    # ---- CLI ------------------------------------------------------------------------------------------
    ('finetune unknown model',
     lambda c, m: ['finetune', 'winft_tiny_patch16_24', 'digits', '-o', str(c.tmp / 'o')],
     CommandError, "'winft_tiny_patch16_24'; did you mean winft_tiny_patch16_224"),
    ('bench unknown model',
     lambda c, m: ['bench', 'vit_tinyy_patch16_224', '--img-size', '32'],
     CommandError, 'vit_tinyy_patch16_224'),
    ('bench image size 0',
     lambda c, m: ['bench', 'vit_tiny_patch16_224', '--img-size', '0'],
     CommandError, '--img-size must be >= 1, got 0'),
    ('bench bad spec file',
     lambda c, m: (lambda f: (f.write_text('blocks: [1,'), ['bench', 'vit_tiny_patch16_224', '--windows', str(f),
                                                           '--img-size', '32'])[-1])(c.tmp / 'bad_spec.yaml'),
     WindowSpecError, 'bad_spec.yaml'),
    ('specs bad spec file',
     lambda c, m: (lambda f: (f.write_text('format: vitfree.window_spec\nversion: 1\ngrid: [2, 2]\n'),
                              ['specs', str(f)])[-1])(c.tmp / 'no_blocks.yaml'),
     WindowSpecError, 'no_blocks.yaml'),
    ('unknown --model-kwargs',
     lambda c, m: ['erf', 'vit_tiny_patch16_224', 'digits', '-o', str(c.tmp / 's.yaml'), '--model-kwargs',
                   'bogus_arg=1'],
     CommandError, 'bogus_arg'),
    ('erf output under a file',
     lambda c, m: (lambda f: (f.write_text('x'), ['erf', 'vit_tiny_patch16_224', 'digits', '-o',
                                                  str(f / 'spec.yaml')])[-1])(c.tmp / 'plain.txt'),
     CommandError, 'plain.txt'),
    ('analyze output is a file',
     lambda c, m: (lambda f: (f.write_text('x'), ['analyze', 'vit_tiny_patch16_224', 'vitfree/assets/coffee.jpg',
                                                  '-o', str(f)])[-1])(c.tmp / 'report.txt'),
     CommandError, 'report.txt'),
    ('erf --strict with an unreadable image',
     lambda c, m: ['erf', 'vit_tiny_patch16_224', str(c.images()), '-o', str(c.tmp / 's.yaml'), '--strict']
     + TINY_ARGS,
     CommandError, 'broken.jpg'),
    ('push without network',
     lambda c, m: (m.setenv('HF_HUB_OFFLINE', '1'), _hf_offline(m),
                   ['push', str(c.export()), 'org/name', '--token', 'hf_dummy'])[-1],
     HubError, 'hf-hub:org/name'),
    ('push with a bad repo id',
     lambda c, m: lambda: prepare_push(c.export(), 'just-a-name'),
     ValueError, 'just-a-name'),
]


def _forget_hash(export):
    """Drop the recorded hash, so the strict key check (not the hash) is what refuses the file."""
    _edit_json(export / 'config.json', lambda d: d.pop('weights'))


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _class_folders(root):
    import numpy as np
    from PIL import Image
    for split in ('train', 'val'):
        d = root / 'cls' / split / 'a'
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / 'ok.png')
    (root / 'cls' / 'train' / 'a' / 'broken.png').write_bytes(b'\x89PNG broken')
    return root / 'cls'


def _hf_offline(monkeypatch):
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True, raising=False)


@pytest.mark.parametrize('name, make, error, needle', CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_the_right_error_naming_the_value(tmp_path, shared, monkeypatch, name, make, error, needle):
    target = make(Ctx(tmp_path, shared), monkeypatch)
    with pytest.raises(error) as info:
        if isinstance(target, list):
            main(target + ['--debug'])
        else:
            target()
    assert needle in str(info.value), str(info.value)


CLI_CASES = [c for c in CASES if c[0].startswith(('CLI', 'finetune unknown', 'bench', 'specs', 'unknown',
                                                   'erf', 'analyze', 'push without', 'finetune output'))]


@pytest.mark.parametrize('name, make, error, needle', CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_prints_one_error_line_and_exits_2(tmp_path, shared, monkeypatch, capsys, name, make, error, needle):
    argv = make(Ctx(tmp_path, shared), monkeypatch)
    assert isinstance(argv, list)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith('warning: ')]
    assert err[0].startswith('error: ') and needle in err[0], err
    assert 'Traceback' not in '\n'.join(err)
