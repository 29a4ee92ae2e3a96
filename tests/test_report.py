"""The analysis report end to end on a tiny model and a bundled image, and the structure of its
HTML page (sections, images inlined as data URIs, nothing fetched from the network)."""
import base64
import io
import json
import types
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import vitfree
from vitfree import WindowSpec
from vitfree.analysis.report import PARTS, analyze, load_images
from vitfree.cli import main
from vitfree.demo import bundled_images

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)


class PageParser(HTMLParser):
    """Collects tags, attributes, section ids, headings, figure captions and visible text."""

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.sections, self.images = [], [], [], []
        self.headings, self._in_h2, self.text = [], False, []
        self.figures, self._in_figure, self._in_caption = [], False, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attrs.extend((tag, k, v) for k, v in attrs)
        if tag == 'section':
            self.sections.append(a.get('id'))
        if tag == 'img':
            self.images.append(a)
        if tag == 'figure':
            self.figures.append('')
            self._in_figure = True
        if tag == 'figcaption':
            self._in_caption = True
        self._in_h2 = tag == 'h2'

    def handle_endtag(self, tag):
        if tag == 'h2':
            self._in_h2 = False
        if tag == 'figcaption':
            self._in_caption = False
        if tag == 'figure':
            self._in_figure = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.headings.append(data)
        if self._in_caption:
            self.figures[-1] += data


def check_page(path, parts):
    page = path.read_text(encoding='utf-8')
    p = PageParser()
    p.feed(page)
    assert page.startswith('<!DOCTYPE html>') and p.tags.count('html') == 1
    assert p.sections == ['images'] + [s for s in PARTS if s in parts]
    assert len(p.headings) == len(p.sections)
    # every picture is inlined as a PNG data URI; nothing else is loaded
    assert p.images and all(img['src'].startswith('data:image/png;base64,') for img in p.images)
    for img in p.images:
        assert base64.b64decode(img['src'].split(',', 1)[1])[:8] == b'\x89PNG\r\n\x1a\n'
        assert img.get('alt')
    assert not {'script', 'link', 'iframe', 'object', 'embed'} & set(p.tags)
    for tag, key, value in p.attrs:
        if key in ('src', 'href', 'action', 'srcset', 'poster'):
            assert value.startswith(('data:', '#')), (tag, key, value[:60])
    assert 'http://' not in page and 'https://' not in page and '//cdn' not in page and 'url(' not in page
    assert 'This part failed' not in page
    # every figure explains its encodings, and is drawn to be read at 1000 px page width
    assert len(p.figures) == len(p.images) and all(len(c) > 40 for c in p.figures), p.figures
    for img in p.images:
        with Image.open(io.BytesIO(base64.b64decode(img['src'].split(',', 1)[1]))) as im:
            assert im.size[0] <= 936, (img['alt'], im.size)  # the text column of a 1000 px window: shown unscaled
    return p


def test_report_end_to_end_on_a_tiny_winft(tmp_path):
    torch.manual_seed(0)
    spec = WindowSpec(8, [1, 2, None], {'kind': 'uniform'})
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, **TINY)
    model.train()  # analyze must run in eval mode and give the mode back
    image = str(bundled_images()[0])
    rep = analyze(model, [image], tmp_path / 'rep', weights='random initialisation', epochs=30, progress=False,
                  log=lambda s: None)
    assert model.training
    assert rep.errors == {} and rep.skipped == {}
    assert set(rep.results) >= {'erf', 'profiles', 'heads', 'patterns', 'sift', 'prompting', 'removal'}
    for name, f in rep.files.items():
        assert f.is_file() and f.stat().st_size > 1000, name
    p = check_page(rep.html, PARTS)
    assert len(p.images) == len(rep.files)  # every PNG written is also on the page
    text = ' '.join(p.text)
    assert 'Random weights' in text and bundled_images()[0].name in text
    assert 'Sample size.' in text and 'steps of 100.0 points' in text  # one image
    assert 'Keypoints per image:' in text
    summary = json.loads(rep.json.read_text())
    assert summary['errors'] == {} and summary['images'] == [bundled_images()[0].name]
    assert len(summary['heads']['prob_drop']) == 6 and len(summary['profiles']['mean_entropy']) == 3
    assert summary['patterns']['k'] == 6 and 'flagged_by_class' in summary['sift']


def test_cli_selected_parts_on_a_vit_with_registers(tmp_path, capsys):
    out = tmp_path / 'cli'
    folder = bundled_images()[0].parent
    code = main(['analyze', 'vit_tiny_patch16_224', str(folder), '-o', str(out), '--parts', 'profiles', 'heads',
                 'sift', '--skip', 'heads', '--head-images', '1', '--no-progress', '--model-kwargs', 'img_size=32',
                 'patch_size=8', 'depth=2', 'reg_tokens=2', 'num_classes=4'])
    assert code == 0
    assert 'report:' in capsys.readouterr().out
    p = check_page(out / 'report.html', ['profiles', 'sift'])
    assert len(p.images) == 5  # images, hop profiles, entropy, keypoints, lifts
    assert json.loads((out / 'results.json').read_text())['parts'] == ['profiles', 'sift']


def test_bad_inputs_are_named(tmp_path):
    model = vitfree.create_winft('vit_tiny_patch16_224', **TINY)
    with pytest.raises(ValueError, match=r"parts must be a non-empty list drawn from .*'heads'.*got \['hedas'\]"):
        analyze(model, torch.randn(1, 3, 32, 32), tmp_path, parts=['hedas'])
    with pytest.raises(FileNotFoundError, match='no_such.jpg'):
        load_images(model, [tmp_path / 'no_such.jpg'])
    loaded = load_images(model, bundled_images()[0].parent, max_images=1)
    assert loaded.x.shape == (1, 3, 32, 32) and loaded.names == [bundled_images()[0].name]
    assert loaded.labels is None


def test_report_on_labelled_small_images_states_its_caveats(tmp_path):
    """The bundled 28x28 Fashion-MNIST samples, with labels: accuracy with its interval and step,
    the SIFT keypoint counts and the small-image caveat, small clusters, and the checkpoint in
    the header."""
    torch.manual_seed(0)
    spec = WindowSpec.uniform(2, 7, 1)
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, img_size=28, patch_size=4, embed_dim=32,
                                 depth=2, num_heads=2, num_classes=10,
                                 pretrained_cfg_overlay=dict(file='weights/example.safetensors'))
    npz = 'vitfree/assets/fashion_mnist_samples.npz'
    rep = analyze(model, npz, tmp_path / 'rep', parts=['erf', 'patterns', 'sift', 'removal'], max_images=6, epochs=20,
                  weights='random initialisation (test)', progress=False, log=lambda s: None)
    p = check_page(rep.html, ['erf', 'patterns', 'sift', 'removal'])
    text = ' '.join(p.text)
    labels = np.load(npz)['labels'][:6]
    pred = np.asarray(rep.results['predictions']['top3'])[:, 0]
    k = int((pred == labels).sum())
    assert f'{k}/6 = {100 * k / 6:.1f}%' in text and 'one image moves it by 16.7 points' in text
    assert 'steps of 16.7' in text
    counts = [len(s.keypoints) for s in rep.results['sift'].images]
    assert 'Keypoints per image: ' + ', '.join(map(str, counts)) in text
    assert 'on these 28x28-pixel images' in text  # the small-image caveat
    assert 'weights/example.safetensors' in text and 'fashion_mnist_samples.npz' in text
    sizes = rep.results['patterns'].cluster_sizes()
    if min(sizes) < 3:
        assert 'read them as single examples' in text or 'read it as single examples' in text
    assert rep.results['removal'].accuracy['random'][0] == pytest.approx(k / 6)  # against the labels
    assert '|t - u|' in text  # the ERF area table


def test_wilson_interval_and_accuracy_text():
    from vitfree.analysis.report.orchestrate import accuracy_text, wilson_interval
    lo, hi = wilson_interval(5, 6)
    assert lo == pytest.approx(0.4365, abs=1e-3) and hi == pytest.approx(0.9699, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert accuracy_text(5, 6).startswith('5/6 = 83.3% (95% interval 44-97%')


def test_cli_takes_the_data_arguments_of_erf(tmp_path, capsys):
    """A built-in data set with --split and a bundled .npz, as vitfree erf takes them."""
    common = ['--parts', 'profiles', '--max-images', '2', '--no-progress', '--model-kwargs', 'img_size=28',
              'patch_size=7', 'depth=1', 'embed_dim=16', 'num_heads=2', 'num_classes=10']
    assert main(['analyze', 'vit_tiny_patch16_224', 'digits', '--split', 'val', '-o', str(tmp_path / 'd')]
                + common) == 0
    summary = json.loads((tmp_path / 'd' / 'results.json').read_text())
    assert summary['data'].startswith('digits (val split') and len(summary['predictions']['labels']) == 2
    npz = 'vitfree/assets/fashion_mnist_samples.npz'
    assert main(['analyze', 'vit_tiny_patch16_224', npz, '-o', str(tmp_path / 'n')] + common) == 0
    summary = json.loads((tmp_path / 'n' / 'results.json').read_text())
    assert npz in summary['data'] and summary['images'] == ['fashion_mnist_samples.npz #0',
                                                            'fashion_mnist_samples.npz #1']
    assert main(['analyze', 'vit_tiny_patch16_224', 'no_such_set', '-o', str(tmp_path / 'x')] + common) == 2
    err = capsys.readouterr().err
    assert 'neither a built-in data set' in err and 'no_such_set' in err


def test_demo_writes_the_report(tmp_path, monkeypatch):
    """``vitfree demo`` (make demo) also writes the analysis report of the shipped WinfT."""
    import timm

    from vitfree import demo
    if not demo.shipped_weights_available():
        pytest.skip('shipped weights not available')
    calls, lines = [], []

    def fake_report(model, x, labels, out, log):
        calls.append((model, out))
        return types.SimpleNamespace(html=out / 'report.html', files={'model_windows': out / 'model_windows.png'})

    monkeypatch.setattr(demo, '_demo_report', fake_report)
    result = demo.run_demo(tmp_path, log=lines.append)
    assert result['files']['report'] == tmp_path / 'report' / 'report.html' and type(calls[0][0]).__name__ == 'WinfT'
    # every stage announces itself, and the times come at the end
    for stage in ('classify', 'shipped ERFs', 'live ERFs', 'report'):
        assert any(line.startswith(f'[{stage}] ') for line in lines), stage
    assert lines[-1].startswith('stage times: classify ') and set(result['stage_times']) == {
        'classify', 'shipped ERFs', 'live ERFs', 'report'}
    # the shipped windows are drawn once (in the report), not again from the ERFs that give them
    assert result['files']['shipped_window_sizes'] == tmp_path / 'report' / 'model_windows.png'
    assert sorted(p.name for p in tmp_path.glob('*window_sizes.png')) == ['live_window_sizes.png']
    # the last block's ERFs are the patch itself: the table says trivial, as the tendency picture does
    for res in (result['shipped_erf'], result['live_erf']):
        assert res.trivial_blocks == [5] and res.summary_rows()[5][-2:] == ('-', 'local, trivial')
    assert not any('5.35' in line for line in lines)
    monkeypatch.undo()
    model = timm.create_model('winft_micro_patch2_28.fmnist', pretrained=True).eval()
    samples = demo.fashion_mnist_samples()
    x = demo.grey_to_model_input(samples['images'][:2], model)
    monkeypatch.setattr(demo, 'REPORT_IMAGES', 2)
    page = demo._demo_report(model, x, torch.from_numpy(samples['labels'][:2]).long(), tmp_path / 'r',
                             lambda s: None).html
    assert page == tmp_path / 'r' / 'report.html'
    p = check_page(page, PARTS)
    text = ' '.join(p.text)
    assert 'winft_micro_patch2_28.fmnist' in text and 'Ankle boot' in text and 'with labels' in text
