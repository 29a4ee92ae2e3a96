"""The analysis report: every analysis of a model on a few images, as PNGs and one HTML page.

    report = analyze(model, ['photo.jpg', 'more_photos/'], 'report/')
    report.html          # report/report.html: self-contained (images inlined), no network
    report.results       # the result objects, also summarised in report/results.json

The page reads top to bottom: the images and predictions; the model's windows, the measured
ERFs and the interaction maps; attention strength by hop distance and head entropy; head
importance by partial pruning; attention-pattern clusters; SIFT keypoints and semantic lifts,
spurious-correlation flags and prompting; patch-removal curves.  Parts can be chosen with
``parts=`` (see :data:`PARTS`); a part that fails is reported on the page (and in
``report.errors``) and the others still run.
"""
from __future__ import annotations

import base64
import html
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .hooks import attention_modules, num_prefix_tokens, patch_grid
from .interaction import ImageFiles, eval_mode, iter_images, list_image_files, model_name, to_display_image

__all__ = ['PARTS', 'AnalysisReport', 'analyze', 'load_images', 'write_html']

PARTS = ('erf', 'profiles', 'heads', 'patterns', 'sift', 'removal')
PART_TITLES = {
    'erf': 'Windows, ERFs and interaction maps',
    'profiles': 'Attention by hop distance',
    'heads': 'Head importance',
    'patterns': 'Attention patterns',
    'sift': 'SIFT semantics',
    'removal': 'Patch removal',
}


@dataclass
class AnalysisReport:
    """What :func:`analyze` wrote: the page, the JSON summary, every PNG, the result objects,
    and the parts that were skipped or failed (with the reason)."""
    out_dir: Path
    html: Path
    json: Path
    files: Dict[str, Path] = field(default_factory=dict)
    results: Dict[str, Any] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)


# ---- images ------------------------------------------------------------------------------------
def load_images(
        model: nn.Module,
        sources: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        max_images: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
) -> Tuple[torch.Tensor, List[str]]:
    """Image files and folders (searched recursively) -> one normalised batch ``(B, C, H, W)``
    through the model's eval transform, and a short name per image (the file name)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: List[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            files.extend(list_image_files(p))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f'image or folder not found: {str(s)!r}')
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f'max_images must be >= 1 (or None for all), got {max_images}')
        files = files[:max_images]
    if not files:
        raise ValueError('no images given')
    xs = [x for x, _ in iter_images(model, ImageFiles(files), batch_size=16, device=device)]
    names = [f.name for f in files]
    dup = {n for n in names if names.count(n) > 1}
    if dup:  # same file name in different folders: keep them apart
        names = [str(f) if f.name in dup else f.name for f in files]
    return torch.cat(xs), names


def _class_names(model: nn.Module) -> Optional[List[str]]:
    """ImageNet class descriptions when the model has the ImageNet-1k head, else ``None``."""
    if getattr(model, 'num_classes', 0) != 1000:
        return None
    try:
        from timm.data import ImageNetInfo
        info = ImageNetInfo('imagenet-1k')
        return [info.index_to_description(i) for i in range(1000)]
    except Exception:  # noqa: BLE001 - names are a nicety
        return None


def _label(c: int, names: Optional[List[str]]) -> str:
    return f'{c}: {names[c].split(",")[0]}' if names else f'class {c}'


# ---- HTML ----------------------------------------------------------------------------------------
_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #1d1d1f; background: #fafafa;
       margin: 0; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.3em; margin-top: 2.2em; padding-top: 0.6em; border-top: 2px solid #e5e5e5; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; }
p, li { max-width: 80ch; }
.sub { color: #555; margin-top: 0; }
.meta { border-collapse: collapse; margin: 0.8em 0; }
.meta td { padding: 2px 14px 2px 0; vertical-align: top; }
.meta td:first-child { color: #666; white-space: nowrap; }
.banner { background: #fff4e5; border-left: 4px solid #f0a020; padding: 8px 14px; margin: 1em 0; }
.error { background: #fdecea; border-left: 4px solid #d93025; padding: 8px 14px; margin: 1em 0; }
.skip { color: #777; font-style: italic; }
nav ol { columns: 2; max-width: 640px; padding-left: 1.4em; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 4px; max-width: 90ch; }
table.data { border-collapse: collapse; font-size: 0.88em; margin: 0.6em 0 1.2em; }
table.data th, table.data td { border-bottom: 1px solid #e5e5e5; padding: 3px 10px; text-align: right; }
table.data th { background: #f3f3f3; }
table.data td.l, table.data th.l { text-align: left; }
pre { background: #f6f6f6; padding: 8px 12px; font-size: 0.82em; overflow-x: auto; }
footer { margin-top: 3em; color: #888; font-size: 0.85em; }
"""


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _img(path: Path, alt: str, caption: str = '') -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode('ascii')
    cap = f'<figcaption>{caption}</figcaption>' if caption else ''
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}">{cap}</figure>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: Sequence[int] = (0,)) -> str:
    def cell(tag, i, v):
        cls = ' class="l"' if i in left else ''
        return f'<{tag}{cls}>{_esc(v)}</{tag}>'
    head = ''.join(cell('th', i, h) for i, h in enumerate(header))
    body = ''.join('<tr>' + ''.join(cell('td', i, v) for i, v in enumerate(r)) + '</tr>' for r in rows)
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def write_html(path: Union[str, os.PathLike], title: str, subtitle: str, meta: Sequence[Tuple[str, str]],
               sections: Sequence[Tuple[str, str, str]], banner: Optional[str] = None, footer: str = '') -> Path:
    """One self-contained page: ``sections`` are ``(anchor id, heading, body HTML)``; ``meta``
    rows go in the header table.  Images must already be inlined as data URIs in the bodies."""
    toc = ''.join(f'<li><a href="#{_esc(a)}">{_esc(t)}</a></li>' for a, t, _ in sections)
    meta_html = ''.join(f'<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>' for k, v in meta)
    body = ''.join(f'<section id="{_esc(a)}"><h2>{_esc(t)}</h2>{b}</section>' for a, t, b in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>'
            f'<h1>{_esc(title)}</h1><p class="sub">{_esc(subtitle)}</p>'
            f'<table class="meta">{meta_html}</table>'
            + (f'<div class="banner">{banner}</div>' if banner else '')
            + f'<nav><h3>Contents</h3><ol>{toc}</ol></nav>{body}'
            f'<footer>{footer}</footer></main></body></html>\n')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding='utf-8')
    return path


def _to_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_json(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---- the analysis --------------------------------------------------------------------------------
def analyze(
        model: nn.Module,
        images: Union[torch.Tensor, str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        out_dir: Union[str, os.PathLike],
        parts: Optional[Sequence[str]] = None,
        *,
        names: Optional[Sequence[str]] = None,
        weights: Optional[str] = None,
        title: Optional[str] = None,
        max_images: Optional[int] = None,
        head_images: Optional[int] = 8,
        batch_size: int = 8,
        average: str = 'pairs',
        modes: Sequence[int] = (1, 2, 3, 4, 5, 6),
        latent_dim: int = 16,
        k: int = 6,
        epochs: int = 200,
        sift_weight: str = 'count',
        spurious_threshold: float = 0.5,
        prompt_by: str = 'group0',
        tau: float = 0.9,
        gamma: float = 0.6,
        removal_fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        seed: int = 0,
        device: Union[str, torch.device, None] = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
) -> AnalysisReport:
    """Run the chosen analyses and write ``out_dir/report.html``, ``out_dir/results.json`` and
    the PNGs.

    Args:
        model: any timm ViT-family classifier (WinfT, ``vit_*``, ``deit_*``; class and register
            tokens are fine).  It runs in eval mode and is left as it was found.
        images: a normalised tensor ``(B, C, H, W)``, or image files and folders.
        out_dir: output folder (created).
        parts: any of :data:`PARTS` (default: all).
        names: a name per image (default: file names, or ``image 0, 1, ...`` for tensors).
        weights: how to describe the model's weights on the page (e.g. ``'random initialisation'``,
            which also puts a warning on the page).
        max_images: use at most this many images.
        head_images: head pruning costs ``modes x blocks x heads`` forwards per image, so it uses
            only the first ``head_images`` images (``None`` = all).
        batch_size: images per forward.
        average, modes, latent_dim, k, epochs, sift_weight, spurious_threshold, prompt_by, tau,
            gamma, removal_fractions: passed to the analyses (see their modules).
        seed: seeds the autoencoder, k-means, prompting's random masks and patch removal.
        progress: progress bars.
        log: where progress messages go (``print`` by default).
    """
    from . import render, render_report
    from .heads import MODE_NAMES, head_importance
    from .patterns import attention_patterns, pattern_descriptors
    from .profiles import distance_profiles
    from .semantic import prompting, semantic_interrelation

    parts = list(PARTS) if parts is None else [parts] if isinstance(parts, str) else list(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f'parts must be a non-empty list drawn from {PARTS}, got {parts!r}')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dev = torch.device(device) if device is not None else None
    if torch.is_tensor(images):
        x = images.unsqueeze(0) if images.dim() == 3 else images
        x = x[:max_images] if max_images else x
        names = list(names) if names is not None else [f'image {i}' for i in range(len(x))]
    else:
        x, file_names = load_images(model, images, max_images, dev)
        names = list(names) if names is not None else file_names
    x = x.to(dev if dev is not None else next(iter(model.parameters())).device)
    if len(names) != len(x):
        raise ValueError(f'{len(names)} names for {len(x)} images')
    report = AnalysisReport(out, out / 'report.html', out / 'results.json')
    files, results = report.files, report.results
    grid = patch_grid(model, x.shape[-2:])
    mods = attention_modules(model)
    depth, heads = len(mods), mods[0].num_heads
    npt = num_prefix_tokens(model)
    mname = model_name(model)
    classes = _class_names(model)
    common = dict(batch_size=batch_size, progress=progress)

    with eval_mode(model), torch.no_grad():
        logits = torch.cat([model(x[s:s + batch_size]) for s in range(0, len(x), batch_size)]).float().cpu()
    probs = logits.softmax(-1)
    pred = probs.argmax(-1)
    top = probs.topk(min(3, probs.shape[-1]), dim=-1)
    rgb = [to_display_image(img, model) for img in x]
    captions = ['; '.join(f'{_label(int(c), classes)} ({p:.3f})' for p, c in zip(pv.tolist(), cv.tolist()))
                for pv, cv in zip(top.values, top.indices)]
    files['images'] = render_report.plot_images(rgb[:8], names[:8], out / 'images.png')
    results['predictions'] = {'names': names, 'top3': top.indices.tolist(), 'top3_prob': top.values.tolist()}
    pred_rows = [[n] + c.split('; ') for n, c in zip(names, captions)]
    more = f' (the first 8 of {len(names)} shown)' if len(names) > 8 else ''

    sections: List[Tuple[str, str, str]] = []
    sections.append(('images', 'Images and predictions',
                     f'<p>Each image after the model\'s own resize and crop: the pixels the model and SIFT see{more}.'
                     f'</p>' + _img(files['images'], 'images')
                     + _table(['image'] + [f'prediction {i + 1}' for i in range(top.indices.shape[1])], pred_rows,
                              left=tuple(range(4)))))

    def run_part(part: str, fn: Callable[[], str]) -> None:
        if part not in parts:
            return
        log(f'[{part}] {PART_TITLES[part]} ...')
        t0 = time.perf_counter()
        try:
            body = fn()
        except Exception as e:  # noqa: BLE001 - one failed part must not lose the others
            report.errors[part] = f'{type(e).__name__}: {e}'
            log(f'[{part}] failed: {type(e).__name__}: {e}')
            body = (f'<div class="error">This part failed: {_esc(type(e).__name__)}: {_esc(e)}</div>'
                    f'<pre>{_esc(traceback.format_exc(limit=4))}</pre>')
        else:
            log(f'[{part}] done in {time.perf_counter() - t0:.1f}s')
        sections.append((part, PART_TITLES[part], body))

    # ---- windows, ERFs, interaction maps ---------------------------------------------------
    def part_erf() -> str:
        from .erf import measure_erf
        body = []
        spec = getattr(model, 'window_spec', None)
        if spec is not None:
            files['model_windows'] = render.plot_window_sizes(spec, out / 'model_windows.png',
                                                              title=f'{mname}: window area per patch and block')
            body.append(f'<h3>The model\'s windows</h3><p>The window of every patch in every block, coloured by '
                        f'its area as a share of the {grid[0]}x{grid[1]} grid ({_esc(spec.provenance.get("kind"))} '
                        f'spec).</p>' + _img(files['model_windows'], 'model windows'))
        else:
            body.append('<p>This model has no windows (every block attends globally); below are the windows its '
                        'ERFs would give.</p>')
        res = measure_erf(model, x, tau=tau, gamma=gamma, batch_size=batch_size, progress=progress,
                          return_result=True, data=f'{len(x)} report image(s)')
        results['erf'] = res
        pics = render.erf_pictures(res, out, image=x[0], model=model, prefix='erf_')
        files.update({f'erf_{k}': v for k, v in pics.items()})
        body.append(f'<h3>Measured ERFs</h3><p>For every patch and block, the smallest rectangle holding '
                    f'{tau:g} of the patch\'s interaction mass (attention estimator, {len(x)} image(s)); a block '
                    f'whose mean ERF covers at least {gamma:g} of the grid becomes global.</p>'
                    f'<pre>{_esc(res.format_summary())}</pre>')
        captions_ = {
            'window_sizes': 'Window area per patch of the spec these ERFs give.',
            'erf_rects': 'ERF rectangles of sample patches (filled square: the patch itself).',
            'tendency_arrows': 'Tendency: the mean offset, in patches, of where each patch draws from.',
            'tendency_flow': 'Tendency as colour: hue is the direction, saturation the length.',
        }
        for key, cap in captions_.items():
            if key in pics:
                body.append(_img(pics[key], key, cap))
        if 'interaction_matrices' in pics or 'interaction_maps' in pics:
            body.append('<h3>Interaction maps</h3><p>How much each patch (row, query) draws on every other patch '
                        '(column, key), attention averaged over heads and images, rows rescaled to sum to one.</p>')
            if 'interaction_maps' in pics:
                body.append(_img(pics['interaction_maps'], 'interaction maps',
                                 f'Rows: query patches (cyan) of {_esc(names[0])}; columns: blocks.'))
            if 'interaction_matrices' in pics:
                body.append(_img(pics['interaction_matrices'], 'interaction matrices', 'Whole N x N maps.'))
        return ''.join(body)

    # ---- distance profiles ---------------------------------------------------------------------
    def part_profiles() -> str:
        prof = distance_profiles(model, x, average=average, **common)
        results['profiles'] = prof
        files['hop_profiles'] = render_report.plot_hop_profiles(prof, out / 'hop_profiles.png')
        files['entropy'] = render_report.plot_entropy_by_layer(prof, out / 'entropy_by_layer.png')
        me = prof.mean_entropy
        rows = [(b, f'{np.nanmin(me[i]):.3f}', f'{np.nanmean(me[i]):.3f}', f'{np.nanmax(me[i]):.3f}',
                 int(np.nanargmin(me[i])) if np.isfinite(me[i]).any() else '-')
                for i, b in enumerate(prof.blocks)]
        return (f'<p>Hop distance is the Chebyshev distance between patches (0 = the patch itself, up to '
                f'{prof.hops - 1}). A head\'s strength at hop n is its attention averaged over the patch pairs n '
                f'hops apart ({_esc(average)}); normalised over n it is a distribution whose entropy is 0 for a head '
                f'that only looks at its own patch and ln({prof.hops}) = {np.log(prof.hops):.2f} for a head with no '
                f'distance preference.</p>'
                + _img(files['hop_profiles'], 'hop profiles', 'Share of attention strength per hop, one line per '
                       'head (dataset mean); dotted: uniform.')
                + _img(files['entropy'], 'entropy by layer', 'Head entropy per block; coloured dots are dataset '
                       'means, grey dots single images.')
                + _table(['block', 'min entropy', 'mean', 'max', 'most local head'], rows, left=()))

    # ---- head importance -------------------------------------------------------------------------
    def part_heads() -> str:
        xi = x[:head_images] if head_images else x
        imp = head_importance(model, xi, modes=modes, batch_size=max(1, batch_size // 2), progress=progress)
        results['heads'] = imp
        files['head_importance'] = render_report.plot_head_importance(imp, out / 'head_importance.png')
        rank = imp.ranking(2 if 2 in imp.modes else imp.modes[0], 10)
        gate = imp.gate_score()
        rows = [(f'block {b}, head {h}', f'{d:+.4f}',
                 '-' if gate is None else f'{gate[imp.blocks.index(b), h]:.3g}') for b, h, d in rank]
        zeroed = {1: 'nothing (a control: must not change the prediction)', 2: 'every entry (the whole head)',
                  3: 'every entry whose query or key is a prefix token', 4: 'patch queries on patch keys',
                  5: 'prefix on patch and patch on prefix', 6: 'prefix queries on prefix keys'}
        mode_table = _table(['mode', 'name', 'zeroed entries'],
                            [(m, MODE_NAMES[m], zeroed[m]) for m in imp.modes], left=(1, 2))
        note = '' if npt else ('<p class="skip">This model has no prefix tokens, so modes 3, 5 and 6 zero nothing '
                               'and equal mode 1.</p>')
        return (f'<p>Each head is pruned alone by multiplying its post-softmax attention with a 0/1 mask '
                f'({"renormalised" if imp.renormalize else "not renormalised"}), and the softmax probability of '
                f'the predicted class is recorded ({imp.num_images} image(s); masked heads batched per forward). '
                f'Modes, by which entries are zeroed:</p>{mode_table}{note}'
                + _img(files['head_importance'], 'head importance',
                       'Top row: mean drop of the target probability; bottom row: accuracy drop (against the '
                       'unpruned prediction when there are no labels); right: the gradient gate score.')
                + '<h3>Most important heads (whole head pruned)</h3>'
                + _table(['head', 'probability drop', 'gate score'], rows))

    # ---- attention patterns ------------------------------------------------------------------------
    def part_patterns() -> str:
        desc = pattern_descriptors(model, x, average=average, **common)
        kk = min(k, len(desc))
        pat = attention_patterns(desc, latent_dim=latent_dim, k=kk, epochs=epochs, seed=seed)
        results['patterns'] = pat
        files['pattern_map'] = render_report.plot_pattern_map(pat, out / 'pattern_map.png')
        files['pattern_clusters'] = render_report.plot_pattern_clusters(pat, out / 'pattern_clusters.png')
        note = f' (k lowered from {k} to {kk}: only {len(desc)} descriptors)' if kk != k else ''
        return (f'<p>Every (image, block, head) is described by where the {_esc(desc.source)} attends on the '
                f'{grid[0]}x{grid[1]} grid and by its hop distribution. A small autoencoder (latent size '
                f'{latent_dim}, {epochs} epochs, final loss {pat.loss[-1]:.4f}) compresses the {len(desc)} '
                f'descriptors; k-means (k={kk}{note}) clusters the latents and PCA draws them in 2-D. Seed {seed}: '
                f'the same inputs give the same clusters.</p>'
                + _img(files['pattern_map'], 'pattern map')
                + _img(files['pattern_clusters'], 'pattern clusters'))

    # ---- SIFT semantics ------------------------------------------------------------------------------
    def part_sift() -> str:
        sem = semantic_interrelation(model, x, weight=sift_weight, threshold=spurious_threshold, names=names,
                                     **common)
        results['sift'] = sem
        files['sift_keypoints'] = render_report.plot_sift_keypoints(sem.images, names, out / 'sift_keypoints.png')
        files['sift_lifts'] = render_report.plot_semantic_lifts(sem, out / 'sift_lifts.png')
        body = [f'<p>OpenCV SIFT keypoints on each image as the model sees it. A patch\'s semantic mass is its '
                f'keypoint {_esc(sift_weight)}; group 0 holds the keypoint-free patches, groups 1-3 split the others '
                f'at the tertiles of the mass. A lift compares the attention on keypoint mass (or on a group) with '
                f'what uniform attention over the same keys would give: above 1 means the heads seek out structure.'
                f'</p>', _img(files['sift_keypoints'], 'SIFT keypoints'), _img(files['sift_lifts'], 'semantic lifts')]
        g0 = sem.group0_mass()
        if g0 is not None:
            flags = sem.flags()
            rows = [(names[i], len(s.keypoints), f'{(s.groups == 0).mean():.2f}', f'{g0[i]:.2f}',
                     _label(int(sem.predictions[i]), classes), 'FLAGGED' if flags[i] else '')
                    for i, s in enumerate(sem.images)]
            flagged = sem.flagged_by_class([_label(c, classes) for c in range(len(probs[0]))])
            fl = ''.join(f'<li>{_esc(c)}: {_esc(", ".join(v))}</li>' for c, v in flagged.items()) or \
                '<li>none</li>'
            body.append(f'<h3>Spurious-correlation flags</h3><p>An image is flagged when the class token of block '
                        f'{sem.flag_block}, averaged over heads, puts more than {spurious_threshold:g} of its patch '
                        f'attention on keypoint-free patches.</p>'
                        + _table(['image', 'keypoints', 'keypoint-free share of patches',
                                  'class-token share on them', 'prediction', 'flag'], rows, left=(0, 4))
                        + f'<p>Flagged images by predicted class:</p><ul>{fl}</ul>')
        else:
            body.append('<p class="skip">No class token: no class-token lift and no spurious-correlation flags.</p>')
        pr = prompting(model, x, by=prompt_by, weight=sift_weight, seed=seed, **common)
        results['prompting'] = pr
        s = pr.summary()
        what = 'keypoint-free patches' if prompt_by == 'group0' else 'lowest-mass patches'
        body.append(f'<h3>Prompting</h3><p>Re-prediction with the {what} masked out as keys in every block (on '
                    f'average {s["mean_masked"]:.1f} patches per image), against masking as many random patches '
                    f'({pr.repeats} draws per image).</p>'
                    + _table(['masking', 'predictions changed', 'mean confidence change'],
                             [(f'{what}', f'{100 * s["semantic"]["changed"]:.0f}%',
                               f'{s["semantic"]["conf_change"]:+.4f}'),
                              ('random patches', f'{100 * s["random"]["changed"]:.0f}%',
                               f'{s["random"]["conf_change"]:+.4f}')]))
        return ''.join(body)

    # ---- patch removal ---------------------------------------------------------------------------------
    def part_removal() -> str:
        from .removal import patch_removal
        res = patch_removal(model, (x, pred.to(x.device)), fractions=removal_fractions, batch_size=batch_size,
                            seed=seed, progress=progress)
        results['removal'] = res
        files['removal'] = render.plot_removal(res, out / 'removal.png')
        return ('<p>Patches are ranked per image by a score (interaction: how much the other patches draw on it; '
                'sift: its share of keypoints; random), and the lowest-ranked fraction is masked as keys in every '
                'block. With no labels, accuracy is agreement with the unmasked prediction.</p>'
                + _img(files['removal'], 'patch removal') + f'<pre>{_esc(res.format_table())}</pre>')

    run_part('erf', part_erf)
    run_part('profiles', part_profiles)
    run_part('heads', part_heads)
    run_part('patterns', part_patterns)
    run_part('sift', part_sift)
    run_part('removal', part_removal)
    for p in PARTS:
        if p not in parts:
            report.skipped[p] = 'not selected'

    from .. import __version__
    weights_text = weights or 'as given (not stated)'
    banner = None
    if weights and 'random' in weights.lower():
        banner = ('<b>Random weights.</b> This model was not trained, so the pictures below show what the analyses '
                  'compute, not what a trained model has learned.')
    if report.errors:
        msg = '; '.join(f'{_esc(k)}' for k in report.errors)
        banner = (banner + '<br>' if banner else '') + f'<b>Some parts failed:</b> {msg} (see their sections).'
    meta = [('model', mname), ('weights', weights_text),
            ('shape', f'{depth} blocks x {heads} heads, {grid[0]}x{grid[1]} patch grid, {npt} prefix token(s)'),
            ('windows', _windows_text(model)), ('images', f'{len(x)}: ' + ', '.join(names[:8])
                                                + (' ...' if len(names) > 8 else '')),
            ('parts', ', '.join(parts))]
    if report.skipped:
        meta.append(('not run', ', '.join(report.skipped)))
    elapsed = time.perf_counter() - t_start
    write_html(report.html, title or f'vitfree analysis: {mname}', 'Attention windows, ERFs, distance profiles, head '
               'importance, attention patterns and SIFT semantics of one model on a few images.', meta, sections,
               banner=banner, footer=f'vitfree {_esc(__version__)}; generated in {elapsed:.0f}s. All pictures are '
                                     f'embedded in this file; the same PNGs are in the report folder.')
    summary = {'model': mname, 'weights': weights_text, 'grid': list(grid), 'images': names, 'parts': parts,
               'errors': report.errors, 'files': {k: v.name for k, v in files.items()}}
    for key, res in results.items():
        summary[key] = res.to_dict() if hasattr(res, 'to_dict') else res if isinstance(res, dict) else None
    if 'erf' in results:
        summary['erf'] = results['erf'].summary()
    if 'sift' in results:
        summary['sift']['flagged_by_class'] = results['sift'].flagged_by_class()
    report.json.write_text(json.dumps(_to_json(summary), indent=1), encoding='utf-8')
    log(f'wrote {report.html} ({len(files)} pictures) in {elapsed:.0f}s')
    return report


def _windows_text(model: nn.Module) -> str:
    spec = getattr(model, 'window_spec', None)
    if spec is None:
        return 'none (every block global)'
    loc = [i for i in range(spec.depth) if not spec.is_global(i)]
    return (f'{spec.provenance.get("kind", "?")} spec, {len(loc)} of {spec.depth} blocks windowed '
            f'(mean window {np.mean([spec.layer(i).mean_area() for i in loc]) if loc else 0:.1f} patches)')
