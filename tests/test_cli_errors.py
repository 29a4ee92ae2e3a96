"""Every bad value on the command line is one `error:` line naming the value and what is accepted, exit
status 2, and nothing written (issue 21, items 5 and 7); the ranges of `vitfree finetune` live in one
table that `--help` and the README both show; resume compares the windows by content."""
import importlib
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitfree
from vitfree.cli import build_parser, main
from vitfree.train import FinetuneConfig, finetune
from vitfree.train.options import RANGES, Range, markdown_table

README = Path(__file__).resolve().parents[1] / 'README.md'
FAST_RUN = ['--epochs', '1', '--limit-train-batches', '1', '--limit-val-batches', '1', '--batch-size', '8',
            '--workers', '0', '--no-progress', '--no-export', '--threads', '1']


def one_error(capsys, *needles):
    """The command's stderr is one `error:` line (besides warnings) holding every needle."""
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip() and not line.startswith('warning: ')]
    assert len(err) == 1 and err[0].startswith('error: '), captured.err
    assert 'unexpected' not in err[0] and 'Traceback' not in captured.err, err[0]
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def nothing_in(folder: Path):
    return not folder.exists() or not any(folder.iterdir())


# ---- --model-kwargs, --img-size, --device --------------------------------------------------------
@pytest.mark.parametrize('kwargs, needles', [
    (['depth=abc'], ["depth='abc'", 'an integer >= 1']),
    (['img_size=7'], ['img_size 7', 'smaller than one patch (16x16', 'at least 16 pixels']),
    (['num_heads=5'], ['num_heads=5', 'divisible by num_heads']),
    (['embed_dim=100', 'num_heads=3'], ['embed_dim=100 num_heads=3', 'divisible by num_heads']),
    (['patch_size=0'], ['patch_size=0', 'an integer >= 1 or a pair']),
    (['drop_path_rate=1.5'], ['drop_path_rate=1.5', 'in [0, 1)']),
])
def test_bad_model_kwargs_are_one_error_line(tmp_path, capsys, kwargs, needles):
    out = tmp_path / 'out' / 's.yaml'
    assert main(['erf', 'vit_tiny_patch16_224', 'digits', '-o', str(out), '--images', '1', '--no-progress',
                 '--model-kwargs', *kwargs]) == 2
    one_error(capsys, '--model-kwargs', *needles)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('device, needle', [
    ('tpu', "device 'tpu' is not a torch device name"),
    ('cuda', "device 'cuda': CUDA is not available"),
    ('cuda:7', "device 'cuda:7'"),
    ('meta', "device 'meta': vitfree runs on cpu, cuda and mps devices"),
])
def test_a_device_this_machine_lacks_is_one_error_line(tmp_path, capsys, device, needle):
    if (device == 'cuda' and torch.cuda.is_available()) or (device == 'cuda:7' and torch.cuda.device_count() > 7):
        pytest.skip('this machine has that CUDA device')
    out = tmp_path / 'out' / 's.yaml'
    assert main(['erf', 'winft_micro_patch2_28', 'digits', '-o', str(out), '--images', '1', '--no-progress',
                 '--device', device]) == 2
    one_error(capsys, '--device', needle, 'this machine has cpu' if not torch.cuda.is_available() else 'cuda')
    assert not (tmp_path / 'out').exists()
    assert main(['finetune', 'winft_micro_patch2_28', 'digits', '-o', str(tmp_path / 'run'), '--device', device]) == 2
    one_error(capsys, needle)
    assert not (tmp_path / 'run').exists()


def test_finetune_img_size_below_the_patch_size_names_the_patch_size(tmp_path, capsys):
    assert main(['finetune', 'winft_tiny_patch16_224', 'digits', '-o', str(tmp_path / 'run'), '--img-size', '7']
                + FAST_RUN) == 2
    one_error(capsys, '--img-size 7', 'smaller than one patch (16x16 pixels', 'at least 16 pixels')
    assert not (tmp_path / 'run').exists()
    # the library says the same without the CLI's check (the model is built, then refused)
    cfg = FinetuneConfig(model='winft_tiny_patch16_224', data='digits', output=str(tmp_path / 'api'), img_size=7,
                         workers=0, progress=False)
    with pytest.raises(ValueError, match=r'an image of \(7, 7\) px is smaller than one \(16, 16\) patch'):
        finetune(cfg)
    assert not (tmp_path / 'api').exists()


# ---- analyze, specs, demo, bench -----------------------------------------------------------------
def test_analyze_latent_dim_0_is_refused_before_any_report(tmp_path, capsys):
    out = tmp_path / 'rep'
    assert main(['analyze', 'winft_micro_patch2_28', 'vitfree/assets/coffee.jpg', '-o', str(out), '--parts',
                 'patterns', '--latent-dim', '0', '--no-progress']) == 2
    line = one_error(capsys, '--latent-dim must be >= 2, got 0')
    assert capsys.readouterr().out == '' and line
    assert not out.exists()


@pytest.mark.parametrize('content, needle', [
    (b'\x89PNG\r\n\x1a\n\x00\x00garbage \xff\xfe', 'is not UTF-8 text: byte 0x89 at offset 0'),
    (b'format: vitfree.window_spec\nblocks: [1, 2\n', 'not valid YAML'),
    (b'- just\n- a list\n', 'expected a mapping, got list'),
    (b'just a sentence\n', 'expected a mapping, got str'),
    (b'a: &x [1]\nb: *x\n', 'YAML alias *x'),
])
def test_specs_on_a_garbage_file_names_the_file(tmp_path, capsys, content, needle):
    path = tmp_path / 'garbage.yaml'
    path.write_bytes(content)
    assert main(['specs', str(path)]) == 2
    one_error(capsys, str(path), needle)


def test_demo_with_a_corrupt_image_names_the_file(tmp_path, capsys):
    corrupt = tmp_path / 'corrupt.png'
    corrupt.write_bytes(b'\x89PNG\r\n\x1a\n this is not a picture')
    out = tmp_path / 'out'
    assert main(['demo', '--image', str(corrupt), '-o', str(out)]) == 2
    one_error(capsys, str(corrupt), 'cannot be read as an image')
    cut = tmp_path / 'cut.jpg'
    cut.write_bytes(Path('vitfree/assets/coffee.jpg').read_bytes()[:3000])  # a valid header, then nothing
    assert main(['demo', '--image', str(cut), '-o', str(out)]) == 2
    one_error(capsys, str(cut), 'cannot be read as an image')
    (tmp_path / 'folder.png').mkdir()
    assert main(['demo', '--image', str(tmp_path / 'folder.png'), '-o', str(out)]) == 2
    one_error(capsys, 'folder.png', 'is a folder')
    assert not out.exists()


def test_bench_refuses_windows_and_radius_together(capsys):
    assert main(['bench', 'vit_tiny_patch16_224', '--windows', 'winft_prior_d12_g14', '--radius', '2',
                 '--img-size', '32']) == 2
    one_error(capsys, '--windows winft_prior_d12_g14 and --radius 2 contradict each other')
    assert main(['bench', 'vit_tiny_patch16_224', '--radius', '-1', '--img-size', '32']) == 2
    one_error(capsys, '--radius must be >= 0, got -1')


# ---- finetune: every numeric flag has a range, checked before any work ---------------------------
def _outside(rng: Range):
    """A value just outside the range (as a CLI string), or None when the range is unbounded."""
    if rng.low is not None:
        v = rng.low if rng.low_open else rng.low - 1
    elif rng.high is not None:
        v = rng.high if rng.high_open else rng.high + 1
    else:
        return None
    return str(int(v)) if rng.kind is int else repr(float(v))


@pytest.mark.parametrize('name', sorted(RANGES))
def test_every_finetune_number_outside_its_range_is_refused_before_work(tmp_path, capsys, name):
    rng = RANGES[name]
    bad = _outside(rng)
    out = tmp_path / 'run'
    values = [bad, '1'] if rng.pair else [bad]
    assert main(['finetune', 'winft_micro_patch2_28', 'digits', '-o', str(out), '--workers', '0', '--no-progress',
                 f'--{name.replace("_", "-")}', *values]) == 2
    one_error(capsys, f'--{name.replace("_", "-")}', rng.describe())
    assert not out.exists()


@pytest.mark.parametrize('flag, value, needle', [
    ('--clip-grad', '-1', 'clip_grad must be >= 0, got -1.0'),
    ('--ema-decay', '2', 'ema_decay must be in [0, 1), got 2.0'),
    ('--hflip', '2', 'hflip must be in [0, 1], got 2.0'),
    ('--reprob', '2', 'reprob must be in [0, 1], got 2.0'),
    ('--mixup', '-1', 'mixup must be >= 0, got -1.0'),
    ('--threads', '0', 'threads must be >= 1, got 0'),
    ('--weight-decay', 'nan', 'weight_decay must be >= 0, got nan'),
    ('--lr', 'inf', 'lr must be > 0, got inf'),
    ('--lr', '0', 'lr must be > 0, got 0.0'),
])
def test_the_quoted_finetune_values_are_refused(tmp_path, capsys, flag, value, needle):
    assert main(['finetune', 'winft_micro_patch2_28', 'digits', '-o', str(tmp_path / 'run'), flag, value]) == 2
    line = one_error(capsys, needle, flag)
    assert '--lr' not in line or flag == '--lr'  # nan weight decay is not reported as a learning-rate problem
    assert not (tmp_path / 'run').exists()


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(RANGES)), data=st.data())
def test_ranges_accept_exactly_their_interval(name, data):
    """Hypothesis draws values inside and outside each range from its bounds; the table agrees."""
    rng = RANGES[name]
    big = 10 ** 12
    low, high = (rng.low if rng.low is not None else -big), (rng.high if rng.high is not None else big)
    if rng.kind is int:
        inside = data.draw(st.integers(int(low) + int(rng.low_open), int(high) - int(rng.high_open)))
    else:
        inside = data.draw(st.floats(low, high, exclude_min=rng.low_open, exclude_max=rng.high_open))
    outside = []
    if rng.low is not None:
        outside.append(data.draw(st.integers(max_value=int(low) - int(not rng.low_open)) if rng.kind is int else
                                 st.floats(max_value=low, exclude_max=not rng.low_open, allow_nan=False)))
    if rng.high is not None:
        outside.append(data.draw(st.integers(min_value=int(high) + int(not rng.high_open)) if rng.kind is int else
                                 st.floats(min_value=high, exclude_min=not rng.high_open, allow_nan=False)))
    outside += [float('nan'), True, '1', 2.5 if rng.kind is int else None]
    as_value = (lambda v: (v, inside)) if rng.pair else (lambda v: v)
    assert rng.problem(as_value(inside)) is None
    for v in outside:
        if v is None and rng.optional and not rng.pair:
            continue
        assert rng.problem(as_value(v)) is not None, (name, v)


def test_help_and_readme_show_the_one_table():
    parser = build_parser()
    ft = parser._subparsers._group_actions[0].choices['finetune']
    helps = {a.dest: a.help for a in ft._actions}
    for name, rng in RANGES.items():
        assert name in helps, f'--{name} is in the table but not a flag'
        assert rng.describe() in helps[name] and rng.help in helps[name], (name, helps[name])
    numeric = {a.dest for a in ft._actions if a.type in (int, float)}
    assert numeric == set(RANGES), f'numeric flags without a range: {sorted(numeric - set(RANGES))}'
    assert markdown_table() in README.read_text(), 'README is stale: paste `python -m vitfree.train.options`'


# ---- a failed run leaves nothing that blocks the corrected command -------------------------------
def test_failed_finetune_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    assert main(['finetune', 'winft_micro_patch2_28', 'digits', '-o', str(out), '--attn-backend', 'bogus']
                + FAST_RUN) == 2
    one_error(capsys, "attn_backend (--attn-backend) must be one of", "got 'bogus'")
    assert not out.exists()
    # a failure inside the first step (after the folder was started) cleans up too, and keeps what was there
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    ft = importlib.import_module('vitfree.train.finetune')  # (vitfree.train.finetune is the function)

    def broken_step(run, x, y, epoch):
        raise ValueError('broken on purpose')
    monkeypatch.setattr(ft, '_train_step', broken_step)
    assert main(['finetune', 'winft_micro_patch2_28', 'digits', '-o', str(out)] + FAST_RUN) == 2
    one_error(capsys, 'broken on purpose')
    assert sorted(p.name for p in out.iterdir()) == ['notes.txt']
    monkeypatch.undo()
    assert main(['finetune', 'winft_micro_patch2_28', 'digits', '-o', str(out), '--attn-backend', 'auto']
                + FAST_RUN) == 0  # the corrected command: no --overwrite needed
    assert (out / 'metrics.jsonl').is_file() and (out / 'notes.txt').read_text() == 'mine'


# ---- resume compares the windows by content ------------------------------------------------------
def _tiny(tmp_path, spec_path, **kw):
    base = dict(model='winft_tiny_patch16_224', data='digits', output=str(tmp_path / 'run'), img_size=32,
                windows=str(spec_path), model_kwargs=dict(depth=2, patch_size=8, embed_dim=24, num_heads=2),
                epochs=1, batch_size=16, lr=2e-3, limit_train_batches=3, limit_val_batches=1, workers=0, threads=1,
                progress=False, checkpoint_every=1, export=False, seed=1)
    base.update(kw)
    return FinetuneConfig(**base)


def test_resume_notices_an_edited_spec_file(tmp_path):
    spec_path = tmp_path / 'spec.yaml'
    vitfree.WindowSpec.uniform(2, 4, 1).save(spec_path)

    class Crash(RuntimeError):
        pass

    def crash(step):
        if step == 2:
            raise Crash()
    cfg = _tiny(tmp_path, spec_path)
    with pytest.raises(Crash):
        finetune(cfg, on_step=crash)
    # the same windows under another name and path: not a change
    same = tmp_path / 'same.json'
    vitfree.WindowSpec.uniform(2, 4, 1).save(same)
    vitfree.WindowSpec.uniform(2, 4, 2).save(spec_path)  # edited between the kill and the resume
    with pytest.raises(ValueError, match=r"(?s)--windows: '.*spec.yaml \(sha256 [0-9a-f]{16}\)' in the checkpoint, "
                                         r"'.*spec.yaml \(sha256 [0-9a-f]{16}\)' now.*--allow-changed") as e:
        finetune(cfg, resume=True)
    assert '--epochs' not in str(e.value) and '--lr' not in str(e.value)
    def crash_now(step):
        raise Crash()
    with pytest.raises(Crash):  # only the path differs, not the windows: it resumes (and stops at the next step)
        finetune(_tiny(tmp_path, same), resume=True, on_step=crash_now)
    res = finetune(cfg, resume=True, allow_changed=True)
    assert res.global_step == 3
    events = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    change = [r for r in events if r['event'] == 'config_change']
    assert len(change) == 1 and list(change[0]['changed']) == ['windows']
    old, new = change[0]['changed']['windows']
    assert re.search(r'sha256 [0-9a-f]{16}', old) and old != new
    assert json.loads((tmp_path / 'run' / 'finetune_config.json').read_text())['windows_sha256']


# ---- more cases of the same kind -----------------------------------------------------------------
@pytest.mark.parametrize('flag, value, needle', [
    ('--opt', 'bogus', "opt 'bogus' (--opt) is not accepted"),
    ('--sched', 'bogus', "sched 'bogus' (--sched) is not accepted"),
    ('--auto-augment', 'bogus', "auto_augment 'bogus' (--auto-augment) is not accepted"),
    ('--window-resize', 'shrink', "invalid choice: 'shrink'"),
])
def test_finetune_names_that_timm_refuses_are_one_error_line(tmp_path, capsys, flag, value, needle):
    out = tmp_path / 'run'
    code = main(['finetune', 'winft_micro_patch2_28', 'digits', '-o', str(out), flag, value] + FAST_RUN) \
        if flag != '--window-resize' else None
    if code is None:  # argparse refuses it: usage error, also one line
        with pytest.raises(SystemExit) as e:
            main(['finetune', 'winft_micro_patch2_28', 'digits', '-o', str(out), flag, value])
        code = e.value.code
    assert code == 2
    one_error(capsys, needle)
    assert not out.exists()


def test_erf_target_and_bench_image_size_are_checked(tmp_path, capsys):
    assert main(['erf', 'winft_micro_patch2_28', 'digits', '-o', str(tmp_path / 's.yaml'), '--target', 'abc']) == 2
    one_error(capsys, "--target 'abc': give predicted, label or a class index")
    assert main(['bench', 'vit_tiny_patch16_224', '--img-size', '7', '--reps', '1']) == 2
    one_error(capsys, '--img-size 7: the image is smaller than one patch (16x16 pixels')
    assert not (tmp_path / 's.yaml').exists()


@pytest.mark.parametrize('damage, needle', [
    (lambda text: text[:len(text) // 2].encode(), 'not valid JSON'),
    (lambda text: text.encode().replace(b'"architecture"', b'"arch\xe9"'), 'is not UTF-8 text: byte 0xe9'),
])
def test_a_broken_config_json_of_a_local_dir_model_is_named(tmp_path, capsys, damage, needle):
    import timm

    from vitfree.hub import save_pretrained
    model = timm.create_model('winft_tiny_patch16_224', windows=vitfree.WindowSpec.uniform(1, 4, 1), img_size=32,
                              patch_size=8, embed_dim=24, num_heads=2, depth=1, num_classes=3)
    export = save_pretrained(model, tmp_path / 'export')
    config = export / 'config.json'
    config.write_bytes(damage(config.read_text()))
    assert main(['erf', f'local-dir:{export}', 'digits', '-o', str(tmp_path / 's.yaml')]) == 2
    one_error(capsys, str(config), needle)
