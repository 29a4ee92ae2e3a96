"""The main job on an embedded default: ``vitfree demo`` / ``make demo``.

With the checkpoints this project trained and ships (``weights/``, from
``benchmarks/fmnist_study.py``), the demo

1. loads the trained micro ViT and WinfT (Fashion-MNIST, 28x28, 14x14 patch grid) offline through
   timm (``timm.create_model('winft_micro_patch2_28.fmnist', pretrained=True)``) and classifies
   the 100 Fashion-MNIST test images bundled with the package with both,
2. draws the ERFs behind the shipped WinfT's windows (the study's interaction maps of the trained
   ViT on 1,000 validation images, shipped beside the weights): ERF rectangles, the excess
   tendency (against uniform attention over the same keys), interaction matrices and maps over
   an image (the windows they give are the shipped ones, drawn once, in the report),
3. measures the trained ViT's ERFs again, live, on the bundled images (``vitfree.measure_erf``)
   and writes their window sizes and spec, and
4. writes the analysis report of the shipped WinfT on the first bundled test images
   (``report/report.html``, the page ``vitfree analyze`` writes).

Each stage prints a line when it starts (the report one per part, with its time), and the stage
times close the run.  Without shipped checkpoints it falls back to an untrained
``winft_tiny_patch16_224`` on a bundled photo and says so.  Everything runs offline on the CPU.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from .data import FASHION_MNIST_CLASSES

ASSETS = Path(__file__).resolve().parent / 'assets'


def bundled_images() -> List[Path]:
    """Sample photos shipped with the package (from scikit-image's data set, CC0/public domain)."""
    return sorted(ASSETS.glob('*.jpg'))


def fashion_mnist_samples() -> Dict[str, np.ndarray]:
    """The first 100 Fashion-MNIST test images (uint8 (100, 28, 28)) and labels, bundled."""
    with np.load(ASSETS / 'fashion_mnist_samples.npz') as d:
        return {'images': d['images'].copy(), 'labels': d['labels'].copy()}


def grey_to_model_input(images: np.ndarray, model) -> torch.Tensor:
    """uint8 grey images (N, H, W) -> normalised RGB tensors for ``model`` (its pretrained cfg)."""
    import timm
    cfg = timm.data.resolve_data_config({}, model=model)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
    return (x - mean) / std


def load_image_tensor(path: Union[str, Path], model) -> torch.Tensor:
    """Read an image and apply the model's own eval transform (timm's resolve_data_config)."""
    import timm
    from PIL import Image
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    with Image.open(path) as im:
        return tf(im.convert('RGB')).unsqueeze(0)


def shipped_weights_available() -> bool:
    import timm
    import vitfree.models  # noqa: F401  (registers the models)
    cfgs = [timm.models.get_pretrained_cfg(n) for n in ('winft_micro_patch2_28.fmnist', 'vit_micro_patch2_28.fmnist')]
    return all(c is not None and c.file and Path(c.file).is_file() for c in cfgs)


@contextlib.contextmanager
def one_thread():
    """One torch thread for the duration.  The micro models' operations (197 tokens of 64 channels)
    are too small to share between threads.  Measured on the shared 2-core machine this project runs
    on: at load 4.5 the demo took 28-33 s of CPU with one thread against 40-64 s with two (wall time
    about the same, 60-70 s); at load 6 the report stage took 24 s with one thread and 142 s with
    two, whose threads then mostly wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Stages:
    """The demo's stages: each announces itself when it starts (so a long one is never silent) and
    its time is kept for the summary at the end."""

    def __init__(self, log) -> None:
        self.log, self.times = log, {}

    @contextlib.contextmanager
    def __call__(self, name: str, what: str):
        self.log(f'[{name}] {what} ...')
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = time.perf_counter() - t0

    def summary(self) -> str:
        parts = ', '.join(f'{k} {v:.1f}s' for k, v in self.times.items())
        return f'stage times: {parts}; total {sum(self.times.values()):.1f}s'


def run_demo(out_dir: Union[str, Path] = 'vitfree-out', model_name: Optional[str] = None,
             image: Optional[Union[str, Path]] = None, seed: int = 0, log=print) -> Dict[str, object]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    stages = Stages(log)
    if model_name is None and image is None and shipped_weights_available():
        with one_thread():
            result = _demo_trained(out, log, stages)
    else:
        result = _demo_untrained(out, model_name or 'winft_tiny_patch16_224', image, log, stages)
    files = result['files']
    log(f'wrote {len(files)} files to {out.resolve()}/ in {time.perf_counter() - t0:.1f}s:')
    for k, p in files.items():
        log(f'  {k:>20}: {p}')
    log(stages.summary())
    result['stage_times'] = dict(stages.times)
    return result


ERF_MAPS_FILE = 'winft_micro_patch2_28.fmnist.erf_maps.safetensors'  # written by fmnist_study.py ship


def shipped_erf(log=print):
    """The ERFs behind the shipped WinfT's windows: the interaction maps the study measured on the
    trained ViT (``weights/winft_micro_patch2_28.fmnist.erf_maps.safetensors``) turned into ERFs
    with the shipped spec's tau and gamma.  Returns an :class:`~vitfree.analysis.erf.ErfResult`
    whose spec has exactly the shipped windows, or ``None`` when the maps are not shipped."""
    from safetensors import safe_open

    from .analysis.erf import erf_from_interaction
    from .analysis.interaction import InteractionResult
    from .weights import shipped_weights_file
    from .windows import get_spec
    path = Path(shipped_weights_file(ERF_MAPS_FILE))
    if not path.is_file():
        return None
    with safe_open(str(path), framework='pt') as f:
        meta = f.metadata()
        maps = {int(k.split('_')[1]): f.get_tensor(k) for k in f.keys()}
    spec = get_spec('winft_micro_fmnist')
    prov = spec.provenance
    inter = InteractionResult(maps=maps, grid=spec.grid, estimator=meta['estimator'],
                              num_images=int(prov.get('num_images', 0)), num_prefix_tokens=1,
                              data=prov.get('data'), model=meta.get('model'))
    res = erf_from_interaction(inter, tau=float(prov['tau']), gamma=float(prov['gamma']), provenance=dict(prov))
    if not res.spec.same_windows(spec):
        log(f'warning: the shipped interaction maps ({path.name}) do not reproduce the shipped windows')
    return res


def _classify(log) -> Dict[str, tuple]:
    """Both shipped models on the bundled test images: ``{name: (model, x, predictions)}``."""
    import timm
    samples = fashion_mnist_samples()
    labels = torch.from_numpy(samples['labels']).long()
    models = {}
    for name in ('vit_micro_patch2_28.fmnist', 'winft_micro_patch2_28.fmnist'):
        m = timm.create_model(name, pretrained=True).eval()
        x = grey_to_model_input(samples['images'], m)
        with torch.inference_mode():
            pred = m(x).argmax(-1)
        models[name] = (m, x, pred)
        log(f'{name}: top-1 {float((pred == labels).float().mean() * 100):.0f}% on the {len(labels)} bundled '
            f'Fashion-MNIST test images (trained here, see weights/manifest.json)')
    models['labels'] = labels
    return models


def _describe_winft(winft, pred: torch.Tensor, labels: torch.Tensor, log) -> None:
    from .analysis.tables import format_spec
    spec = winft.window_spec
    prov = spec.provenance
    log(f'WinfT windows: {prov.get("kind")} on the trained micro ViT ({prov.get("num_images")} '
        f'{prov.get("data")}; estimator {prov.get("estimator")}, tau {prov.get("tau")}, gamma {prov.get("gamma")}); '
        f'backends per block: ' + ' '.join(winft.attn_backends()))
    log(format_spec(spec))
    shown = ', '.join(f'{FASHION_MNIST_CLASSES[p]}' + ('' if p == t else f' (true: {FASHION_MNIST_CLASSES[t]})')
                      for p, t in zip(pred[:6].tolist(), labels[:6].tolist()))
    log(f'WinfT predictions, first 6 images: {shown}')


def _demo_trained(out: Path, log, stages: Stages) -> Dict[str, object]:
    from .analysis.erf import measure_erf
    from .analysis.plots import erf_pictures, plot_window_sizes

    with stages('classify', 'loading the shipped micro ViT and WinfT and classifying the 100 bundled test images'):
        models = _classify(log)
    labels = models['labels']
    winft, x, pred = models['winft_micro_patch2_28.fmnist']
    vit, xv, _ = models['vit_micro_patch2_28.fmnist']
    _describe_winft(winft, pred, labels, log)
    spec, files = winft.window_spec, {}
    with stages('shipped ERFs', 'drawing the ERFs behind the shipped windows (the study\'s interaction maps, '
                                'shipped beside the weights)'):
        shipped = shipped_erf(log)
        if shipped is not None:
            log(shipped.format_summary())
            # the windows these ERFs give are the shipped ones: the report draws them once (model_windows.png)
            files.update(erf_pictures(shipped, out, image=xv[0], model=vit, prefix='shipped_erf_',
                                      window_sizes=not shipped.spec.same_windows(spec)))
    prov = spec.provenance
    est = prov.get('estimator') if prov.get('estimator') in ('attention', 'attribution') else 'attention'
    tau, gamma = float(prov.get('tau', 0.9)), float(prov.get('gamma', 0.6))
    with stages('live ERFs', f'measuring the trained ViT\'s ERFs again, live, on the {len(labels)} bundled test '
                             f'images ({est} estimator, tau {tau}, gamma {gamma})'):
        res = measure_erf(vit, (xv, labels), estimator=est, tau=tau, gamma=gamma, return_result=True, progress=False,
                          data=f'{len(labels)} bundled Fashion-MNIST test images',
                          checkpoint='vit_micro_patch2_28.fmnist (trained here)')
        log(res.format_summary())
        files['live_window_sizes'] = plot_window_sizes(
            res.spec, out / 'live_window_sizes.png',
            title=f'vit_micro_patch2_28.fmnist: windows measured live ({est}, {len(labels)} test images)')
        if shipped is None:
            files.update(erf_pictures(res, out, image=xv[0], model=vit, prefix='vit_erf_'))
        files['measured_spec'] = res.spec.save(out / 'vit_measured_spec.yaml')
    with stages('report', f'writing the analysis report of winft_micro_patch2_28.fmnist on the first '
                          f'{REPORT_IMAGES} bundled test images'):
        report = _demo_report(winft, x, labels, out / 'report', log)
    files['report'] = report.html
    if 'model_windows' in report.files:
        files['shipped_window_sizes'] = report.files['model_windows']
    return {'model': 'winft_micro_patch2_28.fmnist', 'files': files, 'shipped_erf': shipped, 'live_erf': res,
            'accuracy': {k: float((v[2] == labels).float().mean() * 100) for k, v in models.items() if k != 'labels'}}


REPORT_IMAGES = 8  # the report's head pruning and pattern clustering keep the demo's report stage short


def _demo_report(model, x: torch.Tensor, labels: torch.Tensor, out: Path, log):
    """The analysis report (``vitfree analyze``) of the shipped WinfT on the first bundled test images;
    every part prints a line when it starts and its time when done."""
    from .analysis.report import analyze
    n = REPORT_IMAGES
    report = analyze(
        model, (x[:n], labels[:n]), out, names=[f'test #{i}' for i in range(n)], classes=FASHION_MNIST_CLASSES,
        weights="the shipped winft_micro_patch2_28.fmnist weights (trained here), loaded by "
                "timm.create_model('winft_micro_patch2_28.fmnist', pretrained=True)",
        source=f'the first {n} of the Fashion-MNIST test images bundled with vitfree '
               f'(vitfree/assets/fashion_mnist_samples.npz)',
        head_images=4, epochs=100, batch_size=8, progress=False, log=lambda msg: log(f'  {msg}'))
    if report.errors:
        log('report parts that failed: ' + '; '.join(f'{k}: {v}' for k, v in report.errors.items()))
    return report


def _demo_untrained(out: Path, model_name: str, image, log, stages: Stages) -> Dict[str, object]:
    import timm

    from .analysis.erf import measure_erf
    from .analysis.plots import erf_pictures, plot_window_sizes
    from .analysis.tables import format_spec

    with stages('classify', f'building {model_name} and classifying one image'):
        model = timm.create_model(model_name).eval()
        spec = model.window_spec
        image = Path(image) if image else bundled_images()[0]
        x = load_image_tensor(image, model)
        with torch.inference_mode():
            probs = model(x).softmax(-1)[0]
    top = probs.topk(5)
    log(f'model: {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, '
        f'{spec.grid[0]}x{spec.grid[1]} patch grid, {spec.provenance.get("kind")} window spec)')
    log('weights: random initialisation (no trained checkpoint for this model here); '
        'the prediction below only shows the pipeline runs')
    log(f'image: {image}')
    log('top-5: ' + ', '.join(f'class {i} ({p:.3f})' for p, i in zip(top.values.tolist(), top.indices.tolist())))
    log('backends per block: ' + ' '.join(model.attn_backends()))
    log(format_spec(spec))
    files = {'model_window_sizes': plot_window_sizes(spec, out / 'window_sizes.png',
                                                     title=f'{model_name}: window area per patch and block')}
    files['window_spec'] = spec.save(out / 'window_spec.yaml')
    with stages('ERFs', 'measuring its ERFs on the image'):
        res = measure_erf(model, x, return_result=True, progress=False, data=f'bundled image {image.name}',
                          checkpoint='none (random initialisation)')
        log(res.format_summary())
        files.update(erf_pictures(res, out, image=x[0], model=model, prefix='erf_'))
    return {'model': model_name, 'image': str(image), 'top5': top.indices.tolist(), 'files': files}
