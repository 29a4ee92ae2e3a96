"""The analysis report end to end on a tiny model and a bundled image, and the structure of its
HTML page (sections, images inlined as data URIs, nothing fetched from the network)."""
import base64
import json
from html.parser import HTMLParser

import pytest
import torch

import vitfree
from vitfree import WindowSpec
from vitfree.analysis.report import PARTS, analyze, load_images
from vitfree.cli import main
from vitfree.demo import bundled_images

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)


class PageParser(HTMLParser):
    """Collects tags, attributes, section ids, headings and visible text."""

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.sections, self.images = [], [], [], []
        self.headings, self._in_h2, self.text = [], False, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attrs.extend((tag, k, v) for k, v in attrs)
        if tag == 'section':
            self.sections.append(a.get('id'))
        if tag == 'img':
            self.images.append(a)
        self._in_h2 = tag == 'h2'

    def handle_endtag(self, tag):
        if tag == 'h2':
            self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.headings.append(data)


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
