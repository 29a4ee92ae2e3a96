"""Data sets: built-in digits / Fashion-MNIST, image folders and their error messages."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vitfree import WindowSpec
from vitfree.data import DataError, TransformDataset, build_dataset, fashion_mnist_dir
from vitfree.train import CheckpointManager, FinetuneConfig, finetune


def test_digits_split_is_fixed_disjoint_and_stratified():
    parts = {s: build_dataset('digits', s) for s in ('train', 'val', 'test')}
    assert {s: len(d) for s, d in parts.items()} == {'train': 1258, 'val': 270, 'test': 269}
    img, label = parts['train'][0]
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (28, 28) and 0 <= label < 10
    assert parts['train'].classes == [str(i) for i in range(10)]
    counts = {s: np.bincount(parts[s].targets, minlength=10) for s in parts}
    total = sum(counts.values())
    assert np.all(np.abs(counts['train'] / total - 0.7) < 0.01)  # 70/15/15 within every class
    assert np.all(np.abs(counts['val'] / total - 0.15) < 0.01)
    train_px = {parts['train'].images[i].tobytes() for i in range(len(parts['train']))}
    again = build_dataset('digits', 'train', image_size=16)
    assert again[0][0].size == (16, 16)
    assert [again.images[i].tobytes() for i in range(5)] == [parts['train'].images[i].tobytes() for i in range(5)]
    assert not any(parts['val'].images[i].tobytes() in train_px for i in range(len(parts['val']))
                   if np.any(parts['val'].images[i]))  # no image shared with training (duplicates aside)


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv('VITFREE_FASHION_MNIST_DIR', str(tmp_path))
    with pytest.raises(DataError, match='apt-get install -y dataset-fashion-mnist'):
        build_dataset('fashion_mnist', 'train')
    with pytest.raises(DataError, match='fashion_mnist'):
        build_dataset('fashion-mnist', 'val')


@pytest.mark.skipif(not (fashion_mnist_dir() / 'train-images-idx3-ubyte.gz').is_file(),
                    reason='Debian package dataset-fashion-mnist not installed')
def test_fashion_mnist_from_debian_package():
    val, test = build_dataset('fashion_mnist', 'val'), build_dataset('fashion_mnist', 'test')
    train = build_dataset('fashion_mnist', 'train')
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    img, label = test[0]
    assert img.size == (28, 28) and img.mode == 'RGB' and test.classes[label] == 'Ankle boot'


def _folder(root, spec):
    """spec: {split: {class: n_images}}; writes small PNGs."""
    rng = np.random.default_rng(0)
    for split, classes in spec.items():
        for c, n in classes.items():
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / f'{i}.png')
    return root


def test_image_folder_classes_and_items(tmp_path):
    root = _folder(tmp_path / 'data', {'train': {'cat': 3, 'dog': 2}, 'val': {'dog': 1}})
    train, val = build_dataset(root, 'train'), build_dataset(root, 'val')
    assert train.classes == val.classes == ['cat', 'dog'] and len(train) == 5
    assert val[0][1] == 1 and val[0][0].mode == 'RGB'  # dog keeps label 1 though val has no cat folder


@pytest.mark.parametrize('make, match', [
    (lambda r: _folder(r, {'train': {'a': 1}}), r'must hold train/ and val/.*missing: .*val'),
    (lambda r: _folder(r, {'val': {'a': 1}}), r'missing: .*train'),
    (lambda r: (_folder(r, {'train': {'a': 2}, 'val': {'a': 1}}), (r / 'train' / 'b').mkdir()),
     r'class folder .*train/b has no images \(it is empty\)'),
    (lambda r: (_folder(r, {'train': {'a': 2}, 'val': {'a': 1}}), (r / 'train' / 'a' / '1.png').write_bytes(b'xx')),
     r'1 unreadable image file\(s\) under .*train.*\n.*train/a/1\.png'),
    (lambda r: _folder(r, {'train': {'a': 2}, 'val': {'a': 1, 'zebra': 1}}),
     r"class folders the training split does not have: \['zebra'\]"),
    (lambda r: r.mkdir(), r'must hold train/ and val/'),
])
def test_bad_folders_give_errors_naming_the_path(tmp_path, make, match):
    root = tmp_path / 'data'
    make(root)
    with pytest.raises(DataError, match=match):
        build_dataset(root, 'train', strict=True)
        build_dataset(root, 'val', strict=True)


def test_unknown_name_and_split():
    with pytest.raises(DataError, match="neither a built-in data set .*digits.*nor an existing folder"):
        build_dataset('no_such_data')
    with pytest.raises(DataError, match="split must be one of"):
        build_dataset('digits', 'training')


def test_image_that_breaks_mid_run_is_skipped_with_a_warning(tmp_path):
    root = _folder(tmp_path / 'data', {'train': {'a': 3}, 'val': {'a': 1}})
    ds = build_dataset(root, 'train')
    (root / 'train' / 'a' / '1.png').write_bytes(b'not a png any more')
    with pytest.warns(RuntimeWarning, match=r'skipping unreadable image .*1\.png'):
        img, label = ds[1]
    assert np.array_equal(np.asarray(img), np.asarray(ds[2][0]))  # the next readable one stands in


def test_transform_dataset_is_a_function_of_seed_epoch_index():
    from timm.data import create_transform
    tf = create_transform((3, 16, 16), is_training=True, scale=(0.2, 1.0))
    ds = TransformDataset(build_dataset('digits', 'train'), tf, seed=1)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a0, a0b = ds[3][0], ds[3][0]
    ds.set_epoch(1)
    a1 = ds[3][0]
    assert torch.equal(a0, a0b) and not torch.equal(a0, a1)
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


def test_bad_image_does_not_lose_the_run(tmp_path):
    """A file that turns bad between runs stops the resumed run before training, checkpoints intact."""
    root = _folder(tmp_path / 'data', {'train': {'a': 8, 'b': 8}, 'val': {'a': 2, 'b': 2}})
    cfg = FinetuneConfig(model='winft_tiny_patch16_224', data=str(root), output=str(tmp_path / 'run'), img_size=16,
                         model_kwargs=dict(depth=1, patch_size=8, embed_dim=24, num_heads=2,
                                           windows=WindowSpec.uniform(1, 2, 0).to_dict()),
                         epochs=1, batch_size=4, workers=0, threads=1, progress=False, checkpoint_every=2)
    finetune(cfg)
    mgr = CheckpointManager(tmp_path / 'run' / 'checkpoints')
    saved = [p.name for p in mgr.list()]
    good = (root / 'train' / 'b' / '3.png').read_bytes()
    (root / 'train' / 'b' / '3.png').write_bytes(b'\x89PNG broken')
    with pytest.raises(DataError, match=r'train/b/3\.png'):
        finetune(cfg, epochs=2, resume=True, strict=True, allow_changed=True)
    assert [p.name for p in mgr.list()] == saved
    (root / 'train' / 'b' / '3.png').write_bytes(good)
    res = finetune(cfg, epochs=2, resume=True, allow_changed=True)
    assert res.global_step == 8 and [m['epoch'] for m in res.metrics] == [1, 2]


def test_unreadable_images_are_skipped_with_one_warning_listing_them(tmp_path, caplog):
    root = _folder(tmp_path / 'data', {'train': {'a': 3, 'b': 2}, 'val': {'a': 1}})
    (root / 'train' / 'a' / '1.png').write_bytes(b'not an image')
    (root / 'train' / 'b' / 'notes.jpg').write_text('text with an image suffix')
    with caplog.at_level('WARNING'):
        ds = build_dataset(root, 'train')
    assert len(ds) == 4 and sorted(p.rsplit('/', 1)[1] for p in ds.skipped) == ['1.png', 'notes.jpg']
    assert 'skipping 2 unreadable image file(s)' in caplog.text
    assert '1.png' in caplog.text and 'notes.jpg' in caplog.text
    with pytest.raises(DataError, match=r'2 unreadable image file\(s\) .*--strict'):
        build_dataset(root, 'train', strict=True)
