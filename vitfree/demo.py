"""The main job on an embedded default: ``vitfree demo`` / ``make demo``.

Builds a small WinfT, classifies an image bundled with the package, and writes pictures of
its windows into the output folder.  Everything runs offline on the CPU in well under a
minute.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

ASSETS = Path(__file__).resolve().parent / 'assets'


def bundled_images() -> List[Path]:
    """Sample photos shipped with the package (from scikit-image's data set, CC0/public domain)."""
    return sorted(ASSETS.glob('*.jpg'))


def load_image_tensor(path: Union[str, Path], model) -> torch.Tensor:
    """Read an image and apply the model's own eval transform (timm's resolve_data_config)."""
    import timm
    from PIL import Image
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    with Image.open(path) as im:
        return tf(im.convert('RGB')).unsqueeze(0)


def run_demo(out_dir: Union[str, Path] = 'vitfree-out', model_name: str = 'winft_tiny_patch16_224',
             image: Optional[Union[str, Path]] = None, seed: int = 0, log=print) -> Dict[str, object]:
    import timm

    from .analysis.render import plot_window_sizes
    from .commands.specs import format_summary

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = timm.create_model(model_name).eval()
    spec = model.window_spec
    log(f'model: {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, '
        f'{spec.grid[0]}x{spec.grid[1]} patch grid, {spec.provenance.get("kind")} window spec)')
    if True:  # no trained checkpoint is embedded yet
        log('weights: random initialisation (no pretrained checkpoint can be fetched offline); '
            'the prediction below only shows the pipeline runs')
    image = Path(image) if image else bundled_images()[0]
    x = load_image_tensor(image, model)
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    top = probs.topk(5)
    log(f'image: {image}')
    log('top-5: ' + ', '.join(f'class {i} ({p:.3f})' for p, i in zip(top.values.tolist(), top.indices.tolist())))
    log('backends per block: ' + ' '.join(model.attn_backends()))
    log(format_summary(spec))
    files = {'window_sizes': plot_window_sizes(spec, out / 'window_sizes.png',
                                               title=f'{model_name}: window area per patch and block')}
    spec_path = spec.save(out / 'window_spec.yaml')
    files['window_spec'] = spec_path
    log(f'wrote {len(files)} files to {out.resolve()}/ in {time.perf_counter() - t0:.1f}s:')
    for k, p in files.items():
        log(f'  {k:>14}: {p}')
    return {'model': model_name, 'image': str(image), 'top5': top.indices.tolist(), 'files': files}
