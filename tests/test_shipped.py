"""The checkpoints and measured spec this project trained (benchmarks/fmnist_study.py) and ships."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import vitfree
from vitfree.weights import WeightsIntegrityError, load_manifest, verify_weights
from vitfree.windows import get_spec

DATA = Path(__file__).parent / 'data' / 'fashion_mnist_test_first1000.npz'
SHIPPED = ['vit_micro_patch2_28.fmnist', 'winft_micro_patch2_28.fmnist']


def _accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    from vitfree.demo import grey_to_model_input
    with torch.inference_mode():
        pred = torch.cat([model(grey_to_model_input(images[i:i + 250], model)).argmax(-1)
                          for i in range(0, len(images), 250)])
    return float((pred.numpy() == labels).mean() * 100)


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_weights_reproduce_recorded_accuracy(name):
    entry = load_manifest()[name]
    model = timm.create_model(name, pretrained=True).eval()  # offline: weights/ through timm's file path
    with np.load(DATA) as d:
        acc = _accuracy(model, d['images'], d['labels'].astype(np.int64))
    assert abs(acc - entry['test_top1_first1000']) <= 0.5, (acc, entry)
    assert acc > 85.0  # a well-trained model, not chance (10 %)


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_manifest_records_recipe_and_accuracy(name):
    # the full 10,000-image test split is not bundled; the study records its top-1 when shipping
    # (the 1,000-image test above ties these weights to that record)
    entry = load_manifest()[name]
    assert entry['test_top1_full'] > 85.0 and entry['val_top1'] > 85.0, entry
    assert entry['source'].startswith('benchmarks/fmnist_study.py run ') and entry['seed'] == 0
    recipe = entry['recipe'].get('first', entry['recipe'])
    assert recipe['epochs'] == 30 and recipe['opt'] == 'adamw' and recipe['sched'] == 'cosine'


def test_shipped_files_are_checked_against_the_manifest(tmp_path):
    entries = load_manifest()
    for name in SHIPPED:
        cfg = timm.models.get_pretrained_cfg(name)
        assert verify_weights(cfg.file, required=True) == name
    # a corrupted copy of a shipped file is refused with a clear message
    src = Path(timm.models.get_pretrained_cfg(SHIPPED[1]).file)
    bad = tmp_path / src.name
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match='SHA-256'):
        verify_weights(bad, name=SHIPPED[1])
    assert entries[SHIPPED[1]]['windows'] == 'winft_micro_fmnist'


def test_shipped_spec_matches_its_provenance():
    spec = get_spec('winft_micro_fmnist')
    prov = spec.provenance
    assert prov['kind'] == 'measured'
    assert prov['estimator'] in ('attention', 'attribution', 'ablation')
    assert 0 < prov['tau'] <= 1 and prov['gamma'] > 0  # gamma > 1: no block becomes global
    assert 'Fashion-MNIST' in prov['data'] and prov['num_images'] > 0
    assert spec.grid == (14, 14) and spec.depth == 6
    # the gamma rule of the provenance holds for every block that stayed local
    n = 14 * 14
    for i in range(spec.depth):
        if not spec.is_global(i):
            assert spec.areas(i).mean() < prov['gamma'] * n
    # and the registered model uses it
    model = timm.create_model('winft_micro_patch2_28')
    assert model.window_spec == spec


def test_shipped_erf_maps_reproduce_the_shipped_windows():
    """The interaction maps shipped beside the weights give exactly the shipped windows (make demo
    draws them)."""
    from vitfree.demo import shipped_erf
    warnings = []
    res = shipped_erf(log=warnings.append)
    assert res is not None and not warnings
    spec = get_spec('winft_micro_fmnist')
    for b, (got, want) in enumerate(zip(res.spec.blocks, spec.blocks)):
        assert (got is None) == (want is None), b
        if want is not None:
            np.testing.assert_array_equal(got, want)
    assert res.interaction.estimator == spec.provenance['estimator']


def test_shipped_files_name_no_machine_paths():
    """Specs, manifest and the ERF maps' metadata travel to other machines: no absolute path in them
    (a checkpoint is named relative to the project, e.g. bench-out/fmnist-v2/runs/vit_s0/model)."""
    import re

    from safetensors import safe_open
    root = Path(vitfree.__file__).resolve().parent.parent
    absolute = re.compile(r'(?<![\w./-])(?:~/|/(?!/))[\w.-]+/')
    files = sorted((root / 'configs').glob('*.yaml')) + sorted((root / 'weights').glob('*.json'))
    assert any(f.name == 'winft_micro_fmnist.yaml' for f in files)
    for f in files:
        text = f.read_text()
        assert not absolute.search(text), (f.name, absolute.search(text).group(0))
    for f in sorted((root / 'weights').glob('*.safetensors')):
        with safe_open(str(f), framework='pt') as st:
            meta = ' '.join((st.metadata() or {}).values())
        assert not absolute.search(meta), f.name
    assert get_spec('winft_micro_fmnist').provenance['checkpoint'].startswith('bench-out/fmnist-v2/runs/vit_s0/')


@pytest.mark.parametrize('name', SHIPPED)
def test_manifest_gives_the_pretrained_cfg_origin_accuracy_and_notes(name):
    from timm.models._pretrained import PretrainedCfg

    from vitfree.weights import manifest_cfg_fields
    entry = load_manifest()[name]
    fields = manifest_cfg_fields(entry['file'])
    PretrainedCfg(**fields)  # only fields timm's pretrained config has
    assert entry['source'] in fields['description'] and f'{entry["test_top1_full"]} %' in fields['description']
    notes = ' '.join(fields['notes'])
    assert f'origin: {entry["source"]}' in notes and entry['recipe']['note'] in notes
    assert f'{entry["test_top1_first1000"]} %' in notes and entry['sha256'] in notes
    assert manifest_cfg_fields('not_shipped.safetensors') == {}
