"""The CLI's one error path, its warnings, its output-path guard, and a `--help` that does not load torch."""
import os
import subprocess
import sys
import time

import pytest

from vitfree.cli import main
from vitfree.commands._common import CommandError, Outputs, key_value

MICRO_32 = ['--model-kwargs', 'img_size=32']


def _python(code):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)


def test_help_does_not_import_torch():
    res = _python('import sys, vitfree.cli\n'
                  'vitfree.cli.build_parser().format_help()\n'
                  'print(sorted(m for m in ("torch", "timm", "numpy", "PIL") if m in sys.modules))')
    assert res.returncode == 0 and res.stdout.strip() == '[]', res.stderr
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, '-m', 'vitfree.cli', '--help'], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and 'finetune' in res.stdout
    print(f'vitfree --help: {time.perf_counter() - t0:.2f} s')  # measured, not asserted (shared machines)


def test_import_vitfree_then_timm_registers_the_models():
    """`import vitfree` alone loads no torch; timm imported afterwards knows the winft_* models (the other
    order, timm first, is what every other test does)."""
    res = _python('import sys, vitfree\n'
                  'assert "torch" not in sys.modules\n'
                  'import timm\n'
                  'print(timm.is_model("winft_micro_patch2_28"), vitfree.WinfT.__name__,\n'
                  '      vitfree.ops.use_backend.__name__)')
    assert res.returncode == 0 and res.stdout.split() == ['True', 'WinfT', 'use_backend'], res.stderr


def test_unexpected_error_is_one_line_and_debug_shows_it(tmp_path, capsys, monkeypatch):
    import vitfree.commands.specs as specs

    def broken(args):
        raise TypeError('a bug')

    monkeypatch.setattr(specs, 'run', broken)
    assert main(['specs']) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: TypeError: a bug (unexpected; run again with --debug')
    with pytest.raises(TypeError, match='a bug'):
        main(['--debug', 'specs'])
    with pytest.raises(TypeError, match='a bug'):
        main(['specs', '--debug'])


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(['erf', 'vit_tiny_patch16_224'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: the following arguments are required: DATA, -o/--output')


def test_key_value_reads_python_then_yaml():
    assert key_value('img_size=(32, 32)') == ('img_size', (32, 32))
    assert key_value('lr=1e-3') == ('lr', 1e-3)
    assert key_value('class_token=false') == ('class_token', False)
    assert key_value('pretrained_cfg_overlay={file: w.safetensors}') == ('pretrained_cfg_overlay',
                                                                          {'file': 'w.safetensors'})
    assert key_value('windows=winft_prior_d6_g14') == ('windows', 'winft_prior_d6_g14')


def test_failed_command_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / 'new' / 'deeper' / 'spec.yaml'
    pics = tmp_path / 'pics'
    assert main(['erf', 'winft_micro_patch2_28', 'vitfree/assets/coffee.jpg', '-o', str(out), '--pictures', str(pics),
                 '--tau', '2', '--images', '1', '--no-progress']) == 2
    assert 'tau' in capsys.readouterr().err
    assert not (tmp_path / 'new').exists() and not pics.exists()


def test_outputs_guard_removes_only_what_the_command_created(tmp_path):
    import argparse
    kept = tmp_path / 'report'
    kept.mkdir()
    (kept / 'old.txt').write_text('from before')
    args = argparse.Namespace(output=str(kept), spec=str(tmp_path / 'a' / 'b' / 'spec.yaml'), pics=None,
                              outputs=[('output', 'dir', None), ('spec', 'file', ('.yaml',)), ('pics', 'dir', None)])
    with pytest.raises(RuntimeError):
        with Outputs(args):
            (kept / 'new.png').write_text('x')
            (kept / 'sub').mkdir()
            (tmp_path / 'a' / 'b').mkdir(parents=True)
            (tmp_path / 'a' / 'b' / 'spec.yaml').write_text('x')
            raise RuntimeError('failed half-way')
    assert sorted(os.listdir(kept)) == ['old.txt'] and not (tmp_path / 'a').exists()
    with Outputs(args):  # success keeps everything
        (kept / 'new.png').write_text('x')
    assert (kept / 'new.png').exists()
    bad = argparse.Namespace(output=str(kept / 'old.txt'), outputs=[('output', 'dir', None)])
    with pytest.raises(CommandError, match=r"--output '.*old.txt' exists and is not a folder"):
        Outputs(bad)


def test_unreadable_images_are_skipped_with_a_warning(tmp_path, capsys):
    import shutil

    from vitfree.windows import WindowSpec
    imgs = tmp_path / 'imgs'
    imgs.mkdir()
    shutil.copy('vitfree/assets/coffee.jpg', imgs / 'coffee.jpg')
    (imgs / 'broken.jpg').write_bytes(b'not a jpeg')
    out = tmp_path / 'spec.yaml'
    assert main(['erf', 'winft_micro_patch2_28', str(imgs), '-o', str(out), '--images', '1', '--no-progress']) == 0
    err = capsys.readouterr().err
    assert 'warning: skipping 1 unreadable image file(s)' in err and 'broken.jpg' in err
    assert WindowSpec.load(out).provenance['num_images'] == 1
    assert main(['erf', 'winft_micro_patch2_28', str(imgs), '-o', str(out), '--strict']) == 2


def test_user_warnings_are_warning_lines(tmp_path, capsys):
    # a spec made for another grid is resized: the user sees it
    assert main(['erf', 'winft_micro_patch2_28', 'vitfree/assets/coffee.jpg', '-o', str(tmp_path / 's.yaml'),
                 '--images', '1', '--no-progress'] + MICRO_32) == 0
    err = capsys.readouterr().err
    assert 'warning: window spec made for a 14x14 patch grid is resized to the model grid 16x16' in err
    # a warm-up longer than training
    assert main(['finetune', 'winft_micro_patch2_28', 'digits', '-o', str(tmp_path / 'run'), '--epochs', '1',
                 '--warmup-epochs', '2', '--limit-train-batches', '1', '--limit-val-batches', '1', '--batch-size',
                 '8', '--workers', '0', '--no-progress', '--no-export', '--threads', '1']) == 0
    assert 'warning: warmup_epochs=2 is not shorter than epochs=1' in capsys.readouterr().err
