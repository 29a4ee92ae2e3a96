"""The README's Python snippets run as written.

Each block is taken from README.md as it stands and executed; a test only supplies what a reader
would have at hand (the names a snippet assumes, image files, a Hub: the loopback stand-in of
``tests/hub_server.py`` serving timm's repo ids with weights made here).  The measuring example is
run in ``tests/test_erf.py``."""
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save

import vitfree
from hub_server import hub  # noqa: F401  (the fixture)

README = Path(__file__).resolve().parents[1] / 'README.md'
pytestmark = pytest.mark.usefixtures('one_thread')


def blocks(heading: str):
    """Every ```python block of the README section that starts with ``heading``."""
    text = README.read_text()
    start = text.index(heading + '\n')
    end = text.find('\n## ', start + len(heading))
    return re.findall(r'```python\n(.*?)```', text[start:end if end > 0 else None], re.S)


def run(code: str, **names):
    ns = dict(names)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # resized specs, the cost-table note: said, not the point here
        exec(compile(code, 'README.md', 'exec'), ns)
    return ns


def serve_timm_weights(hub, name: str, **kwargs) -> None:
    """timm's repo for ``name`` (e.g. timm/deit_small_patch16_224.fb_in1k) with weights made here."""
    model = timm.create_model(name.split('.')[0], **kwargs)
    hub.commit(f'timm/{name}', {'model.safetensors': save({k: v.contiguous() for k, v in model.state_dict().items()})})


def test_the_tour_runs(hub, monkeypatch):
    serve_timm_weights(hub, 'deit_small_patch16_224.fb_in1k')
    code, = blocks('## A short tour')
    ns = run(code)
    assert ns['rec'].attention[-1].shape == (4, 4, 197, 197)
    assert isinstance(ns['w'], vitfree.WinfT) and not ns['w'].window_spec.is_global(0)


def test_the_measure_then_build_snippet_runs(hub):
    serve_timm_weights(hub, 'deit_small_patch16_224.fb_in1k')
    snippets = blocks('## Models')
    assert len(snippets) == 1
    images = torch.randn(2, 3, 224, 224)  # the snippet's `images`: any batch normalised for the model
    ns = run(snippets[0], timm=timm, vitfree=vitfree, images=images)
    assert isinstance(ns['model'], vitfree.WinfT) and ns['model'].window_spec.same_windows(ns['spec'])


def _fashion_mnist_test_split(folder: Path) -> None:
    """Debian's idx files for the test split, from the 1,000 bundled test images."""
    import gzip
    import struct
    data = np.load(Path(__file__).parent / 'data' / 'fashion_mnist_test_first1000.npz')
    x, y = data[data.files[0]], data[data.files[1]]
    for name, arr in (('t10k-images-idx3-ubyte.gz', x), ('t10k-labels-idx1-ubyte.gz', y)):
        header = struct.pack('>HBB', 0, 8, arr.ndim) + struct.pack(f'>{arr.ndim}I', *arr.shape)
        with gzip.open(folder / name, 'wb') as f:
            f.write(header + arr.astype(np.uint8).tobytes())


def test_the_analysis_snippet_runs(tmp_path, monkeypatch):
    from PIL import Image

    from vitfree.demo import ASSETS
    monkeypatch.chdir(tmp_path)
    Image.open(ASSETS / 'chelsea.jpg').convert('RGB').resize((28, 28)).save('cat.jpg')
    Path('photos').mkdir()
    Image.open(ASSETS / 'coffee.jpg').convert('RGB').resize((28, 28)).save('photos/coffee.jpg')
    (tmp_path / 'fmnist').mkdir()
    _fashion_mnist_test_split(tmp_path / 'fmnist')
    monkeypatch.setenv('VITFREE_FASHION_MNIST_DIR', str(tmp_path / 'fmnist'))
    model = timm.create_model('winft_micro_patch2_28.fmnist', pretrained=True)
    images = torch.randn(4, 3, 28, 28)
    code, = blocks('## Analysing a model: `vitfree analyze`')
    code = code.replace('max_images=32, head_images=8', 'max_images=4, head_images=2')  # shrunk: minutes -> seconds
    ns = run(code, vitfree=vitfree, model=model, images=images, mass=torch.rand(2, 196))
    assert (tmp_path / 'report' / 'report.html').is_file()
    assert np.ndim(ns['imp'].prob_drop()) == 3 and ns['masks'].dtype == torch.bool


def test_the_fine_tuning_and_hub_snippets_run(hub, tmp_path, monkeypatch):
    from vitfree.hub import save_pretrained
    monkeypatch.chdir(tmp_path)
    model = timm.create_model('winft_micro_patch2_28.fmnist', pretrained=True).eval()
    save_pretrained(model, 'runs/digits/model')  # what the README's finetune command leaves there
    code, = blocks('## Fine-tune on your data')
    ns = run(code, timm=timm)
    assert ns['model'].window_spec.same_windows(model.window_spec)
    save_pretrained(model, tmp_path / 'pub')
    hub.upload_folder('org/name', tmp_path / 'pub')  # the repo the Hub snippet loads
    code, = blocks('## Hub')
    ns = run(code, timm=timm, vitfree=vitfree, model=model)
    assert (tmp_path / 'export' / 'config.json').is_file()
