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

:func:`analyze` only prepares a :class:`ReportContext` (images, predictions, what every part
needs) and runs one function per part (:data:`PART_FUNCTIONS`); each part writes its pictures
and returns the HTML of its section.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..capture import attention_modules, num_prefix_tokens
from ..erf import checkpoint_hint
from ..inputs import (ImagesLike, _count, eval_mode, gather_images, load_images, model_name, patch_grid,
                      to_display_image)
from ..removal import DEFAULT_FRACTIONS
from .. import plots
from .html import escape, figure, table, to_json, write_html

__all__ = ['PARTS', 'PART_TITLES', 'PART_FUNCTIONS', 'ReportOptions', 'ReportContext', 'AnalysisReport', 'analyze']

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
class ReportOptions:
    """Settings of the analyses in a report (see their modules for what each one means).

    ``head_images``: head pruning costs ``modes x blocks x heads`` forwards per image, so it
    uses only the first ``head_images`` images (``None`` = all).  ``seed`` seeds the
    autoencoder, k-means, prompting's random masks and patch removal.
    """
    max_images: Optional[int] = None
    head_images: Optional[int] = 8
    batch_size: int = 8
    average: str = 'pairs'
    modes: Sequence[int] = (1, 2, 3, 4, 5, 6)
    latent_dim: int = 16
    k: int = 6
    epochs: int = 200
    sift_weight: str = 'count'
    spurious_threshold: float = 0.5
    prompt_by: str = 'group0'
    tau: float = 0.9
    gamma: float = 0.6
    removal_fractions: Sequence[float] = DEFAULT_FRACTIONS
    seed: int = 0
    progress: bool = True


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


@dataclass
class ReportContext:
    """Everything the parts share: the model, the images as one normalised batch ``x`` with a
    name (and, when known, a label) each, the unmasked predictions, and where to write."""
    model: nn.Module
    x: torch.Tensor
    names: List[str]
    labels: Optional[torch.Tensor]
    classes: Optional[List[str]]
    source: str
    probs: torch.Tensor
    opts: ReportOptions
    report: AnalysisReport

    @property
    def out(self) -> Path:
        return self.report.out_dir

    @property
    def files(self) -> Dict[str, Path]:
        return self.report.files

    @property
    def results(self) -> Dict[str, Any]:
        return self.report.results

    @property
    def grid(self) -> Tuple[int, int]:
        return patch_grid(self.model, self.x.shape[-2:])

    @property
    def npt(self) -> int:
        return num_prefix_tokens(self.model)

    @property
    def trivial(self) -> List[int]:
        """Blocks with 1x1 windows only (every patch attends only to itself): left out of the
        analyses of where patches look (profiles, patterns, patch-query lifts)."""
        from ..erf import trivial_blocks
        return trivial_blocks(self.model, self.grid)

    @property
    def looked_at(self) -> List[int]:
        """The blocks that are not trivial (all of them when every block is)."""
        depth = len(attention_modules(self.model))
        return [b for b in range(depth) if b not in self.trivial] or list(range(depth))

    @property
    def pred(self) -> torch.Tensor:
        return self.probs.argmax(-1)

    @property
    def common(self) -> Dict[str, Any]:
        return dict(batch_size=self.opts.batch_size, progress=self.opts.progress)

    def label(self, c: int) -> str:
        """A class index as the page shows it."""
        return f'{c}: {self.classes[c].split(",")[0]}' if self.classes and 0 <= c < len(self.classes) \
            else f'class {c}'

    def picture(self, key: str, path: Path) -> Path:
        """Record a PNG under ``key`` (every recorded PNG must also appear on the page)."""
        self.files[key] = path
        return path


# ---- inputs ------------------------------------------------------------------------------------
def _class_names(model: nn.Module) -> Optional[List[str]]:
    """The model's own label names (``pretrained_cfg['label_names']``), ImageNet class
    descriptions for an ImageNet-1k head, else ``None``."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('label_names')
    if names and len(names) == getattr(model, 'num_classes', 0):
        return [str(n) for n in names]
    if getattr(model, 'num_classes', 0) != 1000:
        return None
    try:
        from timm.data import ImageNetInfo
        info = ImageNetInfo('imagenet-1k')
        return [info.index_to_description(i) for i in range(1000)]
    except Exception:  # noqa: BLE001 - names are a nicety
        return None


def _read_images(model: nn.Module, images: Any, names: Optional[Sequence[str]], max_images: Optional[int],
                 device: torch.device, split: str, log: Callable[[str], None]):
    """``(x, names, labels, classes, source)`` for any image source :func:`analyze` takes; says when
    ``max_images`` leaves images out."""
    labels = classes = None
    if isinstance(images, (str, os.PathLike)) or (isinstance(images, (list, tuple)) and images
                                                  and all(isinstance(s, (str, os.PathLike)) for s in images)):
        loaded = load_images(model, images, max_images, device, split=split)
        x, default_names, labels, classes, source = (loaded.x, loaded.names, loaded.labels, loaded.classes,
                                                     loaded.source)
        total = loaded.total
    else:
        x, labels = gather_images(model, images, max_images, device)
        default_names = [f'image {i}' for i in range(len(x))]
        source = f'{len(x)} image(s) given as {type(images).__name__}'
        total = _count(images, None)
    if total is not None and total > len(x):
        log(f'using the first {len(x)} of the {total} images (max_images / --max-images {max_images})')
    names = list(names) if names is not None else default_names
    if len(names) != len(x):
        raise ValueError(f'{len(names)} names for {len(x)} images')
    return x, names, labels, classes, source


def _options(options: Optional[ReportOptions], overrides: Dict[str, Any]) -> ReportOptions:
    known = {f.name for f in dataclasses.fields(ReportOptions)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f'analyze() got unknown option(s) {", ".join(bad)}; options are: {", ".join(sorted(known))}')
    return dataclasses.replace(options or ReportOptions(), **overrides)


def _check_parts(parts: Optional[Sequence[str]]) -> List[str]:
    parts = list(PARTS) if parts is None else [parts] if isinstance(parts, str) else list(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f'parts must be a non-empty list drawn from {PARTS}, got {parts!r}')
    return parts


# ---- sample sizes ----------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval (95 % by default) of a proportion ``k / n``."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_text(k: int, n: int) -> str:
    """``k / n`` as a percentage with its 95 % interval and the step one image makes."""
    lo, hi = wilson_interval(k, n)
    return (f'{k}/{n} = {100 * k / n:.1f}% (95% interval {100 * lo:.0f}-{100 * hi:.0f}%; one image moves it by '
            f'{100 / n:.1f} points)')


def caveat(text: str) -> str:
    """A highlighted note on how far a result can be trusted."""
    return f'<p class="caveat">{text}</p>'


# ---- the parts -----------------------------------------------------------------------------------
def images_section(ctx: ReportContext) -> str:
    """The images as the model sees them, with the top predictions (and the labels when known)."""
    top = ctx.probs.topk(min(3, ctx.probs.shape[-1]), dim=-1)
    rgb = [to_display_image(img, ctx.model) for img in ctx.x[:8]]
    ctx.picture('images', plots.plot_images(rgb, ctx.names[:8], ctx.out / 'images.png'))
    ctx.results['predictions'] = {'names': ctx.names, 'top3': top.indices.tolist(), 'top3_prob': top.values.tolist(),
                                  'labels': None if ctx.labels is None else ctx.labels.tolist()}
    header = ['image'] + ([] if ctx.labels is None else ['label']) + \
        [f'prediction {i + 1}' for i in range(top.indices.shape[1])]
    rows = []
    for i, (pv, cv) in enumerate(zip(top.values, top.indices)):
        label = [] if ctx.labels is None else [ctx.label(int(ctx.labels[i]))]
        rows.append([ctx.names[i]] + label + [f'{ctx.label(int(c))} ({p:.3f})'
                                              for p, c in zip(pv.tolist(), cv.tolist())])
    more = f' (the first 8 of {len(ctx.names)} shown)' if len(ctx.names) > 8 else ''
    body = (f'<p>{len(ctx.x)} image(s) from {escape(ctx.source)}, each after the model\'s own resize and crop: the '
            f'pixels the model and SIFT see{more}.</p>'
            + figure(ctx.files['images'], 'images', 'The images as the model sees them (after its resize and crop, '
                     'with the normalisation undone), with their names.'))
    if ctx.labels is not None:
        k = int((ctx.pred == ctx.labels.cpu()).sum())
        ctx.results['predictions']['accuracy'] = k / len(ctx.x)
        body += f'<p>Top-1 accuracy on these images: {accuracy_text(k, len(ctx.x))}.</p>'
    return body + table(header, rows, left=tuple(range(len(header))))


def _model_windows_section(ctx: ReportContext) -> str:
    """The model's own windows (one picture), or a line saying it has none."""
    spec = getattr(ctx.model, 'window_spec', None)
    grid, mname = ctx.grid, model_name(ctx.model)
    if spec is None:
        return ('<p>This model has no windows (every block attends globally); below are the windows its ERFs '
                'would give.</p>')
    ctx.picture('model_windows', plots.plot_window_sizes(spec, ctx.out / 'model_windows.png',
                                                         title=f'{mname}: window area per patch and block'))
    trivial = ctx.trivial
    note = (f' Block{"s" if len(trivial) > 1 else ""} {", ".join(map(str, trivial))} '
            f'{"have" if len(trivial) > 1 else "has"} 1x1 windows: every patch attends only to itself (and the '
            f'prefix tokens), so the analyses of where patches look call {"them" if len(trivial) > 1 else "it"} '
            f'trivial and leave {"them" if len(trivial) > 1 else "it"} out.') if trivial else ''
    return (f'<h3>The model\'s windows</h3><p>The window of every patch in every block '
            f'({escape(spec.provenance.get("kind"))} spec).{note}</p>'
            + figure(ctx.files['model_windows'], 'model windows',
                     f'Each panel is one block; each patch is coloured by the area of its window as a share of '
                     f'the {grid[0]}x{grid[1]} grid (colour bar); "global" blocks have no window.'))


def _erf_captions(ctx: ReportContext, windowed: bool) -> Dict[str, str]:
    o, n = ctx.opts, ctx.grid[0] * ctx.grid[1]
    return {
        'window_sizes': f'The window spec these ERFs would give: each patch coloured by its window area as a share '
                        f'of the {n}-patch grid (colour bar); blocks whose mean ERF covers at least {o.gamma:g} of '
                        f'the grid are global.',
        'erf_rects': f'ERF rectangles of {plots.MAX_PATCHES} query patches (the centre, two corners and one '
                     f'off-centre patch): each filled square is a query patch, the solid outline of the same colour '
                     f'its ERF' + (', the dashed outline its window in this model' if windowed else '')
                     + ' (legend). Panel titles: mean ERF area; trivial blocks say so.',
        'tendency': 'Excess tendency t(i) - u(i): where a patch draws its interaction from, minus where uniform '
                    'interaction over the keys it may see would draw from, so that a border patch is not shown pulled '
                    'to the centre by geometry alone. Arrows from each patch (key arrow: length in patches); colour: '
                    'the arrow\'s length, |t - u| in the table (colour bar, one scale for all blocks).',
    }


def _interaction_section(ctx: ReportContext, pics: Dict[str, Path]) -> str:
    n = ctx.grid[0] * ctx.grid[1]
    if 'interaction_matrices' not in pics and 'interaction_maps' not in pics:
        return ''
    body = ('<h3>Interaction maps</h3><p>How much each patch (query) draws on every other patch (key): '
            'attention averaged over heads and images, each query\'s row rescaled to sum to one.</p>')
    if 'interaction_maps' in pics:
        body += figure(pics['interaction_maps'], 'interaction maps',
                       f'Rows: blocks; columns: query patches (cyan squares) over {escape(ctx.names[0])}. '
                       f'Colour: the interaction of the query with each key patch, on one logarithmic scale '
                       f'shared by all panels (colour bar); keys with exactly zero interaction (outside the '
                       f'query\'s window) are grey.')
    if 'interaction_matrices' in pics:
        body += figure(pics['interaction_matrices'], 'interaction matrices',
                       f'The whole {n} x {n} map of each block (row = query patch, column = key patch, both in '
                       f'raster order), all blocks on one logarithmic colour scale (colour bar); grey entries '
                       f'are exactly zero (the key is outside the query\'s window).')
    return body


def part_erf(ctx: ReportContext) -> str:
    """The model's windows, the ERFs measured on the images, interaction maps."""
    import warnings

    from ..erf import measure_erf
    o = ctx.opts
    body = [_model_windows_section(ctx)]
    with warnings.catch_warnings():  # an all-global result is said on the page, below
        warnings.simplefilter('ignore', UserWarning)
        res = measure_erf(ctx.model, ctx.x, tau=o.tau, gamma=o.gamma, return_result=True,
                          data=f'{len(ctx.x)} report image(s)', **ctx.common)
    ctx.results['erf'] = res
    pics = plots.erf_pictures(res, ctx.out, image=ctx.x[0], model=ctx.model, prefix='erf_')
    for key, path in pics.items():
        ctx.picture(f'erf_{key}', path)
    trivial = (' "trivial": every patch interacts only with itself, so there is no tendency (-).'
               if res.trivial_blocks else '')
    body.append(f'<h3>Measured ERFs</h3><p>For every patch and block, the smallest rectangle holding {o.tau:g} of '
                f'the patch\'s interaction mass (attention estimator, {len(ctx.x)} image(s)); a block whose mean ERF '
                f'covers at least {o.gamma:g} of the grid becomes global. Areas are in patches; |t| is the mean '
                f'length of the tendency (where a patch draws from, in patches), |t - u| the same beyond what uniform '
                f'interaction over the keys the patch may see would give.{trivial}</p>'
                + table(list(res.SUMMARY_HEADER), res.summary_rows(), left=()))
    if len(res.global_blocks) == len(res.blocks):
        body.append(caveat(f'Every block came out global: each mean ERF covers at least gamma = {o.gamma:g} of the '
                           f'{ctx.grid[0]}x{ctx.grid[1]} grid, so these ERFs give no windows. A lower gamma or tau '
                           f'would.'))
    if len(ctx.x) < 32:
        body.append(caveat(f'Measured on {len(ctx.x)} image(s): measure ERFs for a window spec on a few hundred '
                           f'held-out images (vitfree erf).'))
    for key, cap in _erf_captions(ctx, getattr(ctx.model, 'window_spec', None) is not None).items():
        if key in pics:
            body.append(figure(pics[key], key, cap))
    body.append(_interaction_section(ctx, pics))
    return ''.join(body)


def _left_out(ctx: ReportContext) -> str:
    """The note that trivial blocks are not analysed in a section (empty when there are none)."""
    trivial = [b for b in ctx.trivial if b not in ctx.looked_at]
    if not trivial:
        return ''
    many = len(trivial) > 1
    return (f'<p class="skip">Block{"s" if many else ""} {", ".join(map(str, trivial))}: trivial (1x1 windows, every '
            f'patch attends only to itself), not analysed here.</p>')


def part_profiles(ctx: ReportContext) -> str:
    """Attention strength by hop distance and head entropy."""
    from ..profiles import distance_profiles
    o = ctx.opts
    prof = distance_profiles(ctx.model, ctx.x, blocks=ctx.looked_at, average=o.average, **ctx.common)
    ctx.results['profiles'] = prof
    ctx.picture('hop_profiles', plots.plot_hop_profiles(prof, ctx.out / 'hop_profiles.png'))
    ctx.picture('entropy', plots.plot_entropy_by_layer(prof, ctx.out / 'entropy_by_layer.png'))
    me = prof.mean_entropy
    rows = [(b, f'{np.nanmin(me[i]):.3f}', f'{np.nanmean(me[i]):.3f}', f'{np.nanmax(me[i]):.3f}',
             int(np.nanargmin(me[i])) if np.isfinite(me[i]).any() else '-')
            for i, b in enumerate(prof.blocks)]
    return (f'<p>Hop distance is the Chebyshev distance between patches (0 = the patch itself, up to '
            f'{prof.hops - 1}). A head\'s strength at hop n is its attention averaged over the patch pairs n hops apart '
            f'({escape(o.average)}); normalised over n it is a distribution whose entropy is 0 for a head that only '
            f'looks at its own patch and ln({prof.hops}) = {np.log(prof.hops):.2f} for a head with no distance '
            f'preference.</p>' + _left_out(ctx)
            + figure(ctx.files['hop_profiles'], 'hop profiles',
                     'Each panel is one block and each coloured line one head (legend): its share of attention '
                     'strength at each hop distance, averaged over the images. Dotted: uniform attention.')
            + figure(ctx.files['entropy'], 'entropy by layer',
                     f'Head entropy per block: coloured dots are each head\'s mean over the {prof.num_images} image(s) '
                     f'(legend), grey dots single images; dashed: the largest possible entropy.')
            + table(['block', 'min entropy', 'mean', 'max', 'most local head'], rows, left=()))


def part_heads(ctx: ReportContext) -> str:
    """Head importance by partial pruning, and the gradient gate score."""
    from ..heads import head_importance
    o = ctx.opts
    xi = ctx.x[:o.head_images] if o.head_images else ctx.x
    yi = None if ctx.labels is None else ctx.labels[:len(xi)].to(xi.device)
    imp = head_importance(ctx.model, xi if yi is None else (xi, yi), modes=o.modes,
                          batch_size=max(1, o.batch_size // 2), progress=o.progress)
    ctx.results['heads'] = imp
    for measure in ('prob_drop', 'accuracy_drop') + (('gate',) if imp.gate is not None else ()):
        ctx.picture(f'head_{measure}', plots.plot_head_importance(imp, ctx.out / f'head_{measure}.png', measure))
    rank = imp.ranking(2 if 2 in imp.modes else imp.modes[0], 10)
    gate = imp.gate_score()
    rows = [(f'block {b}, head {h}', f'{d:+.4f}', '-' if gate is None else f'{gate[imp.blocks.index(b), h]:.3g}')
            for b, h, d in rank]
    zeroed = {1: 'nothing (a control: must not change the prediction)', 2: 'every entry (the whole head)',
              3: 'every entry whose query or key is a prefix token', 4: 'patch queries on patch keys',
              5: 'prefix on patch and patch on prefix', 6: 'prefix queries on prefix keys'}
    mode_table = table(['mode', 'name', 'zeroed entries'], [(m, imp.mode_names[m], zeroed[m]) for m in imp.modes],
                       left=(1, 2))
    note = '' if ctx.npt else ('<p class="skip">This model has no prefix tokens, so modes 3, 5 and 6 zero nothing '
                               'and equal mode 1.</p>')
    m = imp.num_images
    against = 'the labels' if imp.labels is not None else 'the unpruned prediction'
    merged = [g for g in imp.mode_groups('prob_drop') if len(g) > 1]
    same = (' Modes whose results agree within 1 % of the colour scale share one panel: '
            + '; '.join(f'modes {", ".join(map(str, g))}' for g in merged) + '.') if merged else ''
    figs = (figure(ctx.files['head_prob_drop'], 'head importance: probability drop',
                   'One panel per pruning mode: blocks (rows) x heads (columns); each cell gives the mean drop of the '
                   'predicted class\'s probability when that head alone is pruned in that mode. Red: pruning hurts, '
                   f'blue: it helps; one colour scale for all panels (colour bar).{same}')
            + figure(ctx.files['head_accuracy_drop'], 'head importance: accuracy drop',
                     f'The same layout for the drop in top-1 accuracy (against {against}), one colour scale for all '
                     f'panels; modes with equal results share a panel.'))
    if 'head_gate' in ctx.files:
        figs += figure(ctx.files['head_gate'], 'head importance: gate score',
                       'Gradient gate score per block (rows) and head (columns): the mean absolute derivative of the '
                       'loss with respect to a gate g = 1 scaling the head\'s attention (colour bar); larger = the '
                       'loss is more sensitive to the head.')
    warn = caveat(f'Head pruning used {m} image(s) (the first {m} of {len(ctx.x)}): an accuracy drop moves in steps '
                  f'of {100 / m:.1f} points, and probability drops of a few hundredths are within image-to-image '
                  f'noise.') if m < 50 else ''
    return (f'<p>Each head is pruned alone by multiplying its post-softmax attention with a 0/1 mask '
            f'({"renormalised" if imp.renormalize else "not renormalised"}), and the softmax probability of the '
            f'predicted class is recorded ({m} image(s); masked heads batched per forward). Modes, by which entries '
            f'are zeroed:</p>{mode_table}{note}{warn}{figs}'
            + '<h3>Most important heads (whole head pruned)</h3>'
            + table(['head', 'probability drop', 'gate score'], rows))


def part_patterns(ctx: ReportContext) -> str:
    """Attention patterns: autoencoder on per-head descriptors, 2-D map, k-means clusters."""
    from ..patterns import attention_patterns, pattern_descriptors
    o, grid = ctx.opts, ctx.grid
    desc = pattern_descriptors(ctx.model, ctx.x, blocks=ctx.looked_at, average=o.average, **ctx.common)
    kk = min(o.k, len(desc))
    pat = attention_patterns(desc, latent_dim=o.latent_dim, k=kk, epochs=o.epochs, seed=o.seed)
    ctx.results['patterns'] = pat
    ctx.picture('pattern_map', plots.plot_pattern_map(pat, ctx.out / 'pattern_map.png'))
    ctx.picture('pattern_clusters', plots.plot_pattern_clusters(pat, ctx.out / 'pattern_clusters.png'))
    note = f' (k lowered from {o.k} to {kk}: only {len(desc)} descriptors)' if kk != o.k else ''
    sizes = pat.cluster_sizes()
    small = [c for c in range(kk) if sizes[c] < 3]
    warn = ''
    if small:
        many = len(small) > 1
        warn = caveat(f'Cluster{"s" if many else ""} {", ".join(map(str, small))} hold{"" if many else "s"} fewer than '
                      f'3 of the {len(desc)} descriptors (n = {", ".join(str(sizes[c]) for c in small)}): read '
                      f'{"them" if many else "it"} as single examples, not as patterns. With {len(ctx.x)} image(s) '
                      f'each head gives only {len(ctx.x)} descriptor(s).')
    return (f'<p>Every (image, block, head) is described by where the {escape(desc.source)} attends on the '
            f'{grid[0]}x{grid[1]} grid and by its hop distribution. A small autoencoder (latent size {o.latent_dim}, '
            f'{o.epochs} epochs, final loss {pat.loss[-1]:.4f}) compresses the {len(desc)} descriptors; k-means '
            f'(k={kk}{note}) clusters the latents and PCA draws them in 2-D. Seed {o.seed}: the same inputs give the '
            f'same clusters.</p>' + _left_out(ctx) + warn
            + figure(ctx.files['pattern_map'], 'pattern map',
                     'Left: each dot is one (image, block, head) descriptor, placed by the first two principal '
                     'components of its autoencoder code and coloured by k-means cluster (legend, with cluster sizes). '
                     'Right: the cluster each head falls in for most images (blocks x heads, colours as on the left).')
            + figure(ctx.files['pattern_clusters'], 'pattern clusters',
                     f'One column per cluster (n = its number of descriptors): top, the mean map of where the '
                     f'{escape(desc.source)} attends on the patch grid (brighter = more attention, one logarithmic '
                     f'colour scale for all clusters, colour bar); bottom, the mean share of attention strength per '
                     f'hop distance (dotted: uniform).'))


def part_sift(ctx: ReportContext) -> str:
    """SIFT keypoints, semantic lifts, spurious-correlation flags and prompting."""
    from ..semantic import prompting, semantic_interrelation
    o = ctx.opts
    sem = semantic_interrelation(ctx.model, ctx.x, weight=o.sift_weight, threshold=o.spurious_threshold,
                                 names=ctx.names, **ctx.common)
    ctx.results['sift'] = sem
    ctx.picture('sift_keypoints', plots.plot_sift_keypoints(sem.images, ctx.names, ctx.out / 'sift_keypoints.png'))
    ctx.picture('sift_lifts', plots.plot_semantic_lifts(sem, ctx.out / 'sift_lifts.png', trivial=ctx.trivial))
    counts = [len(s.keypoints) for s in sem.images]
    h_px, w_px = sem.images[0].image.shape[:2]
    shown = min(4, len(sem.images))
    listed = ', '.join(map(str, counts[:32])) + (' ...' if len(counts) > 32 else '')
    body = [f'<p>OpenCV SIFT keypoints on each image as the model sees it ({w_px}x{h_px} pixels). A patch\'s semantic '
            f'mass is its keypoint {escape(o.sift_weight)}; group 0 holds the keypoint-free patches, groups 1-3 split '
            f'the others at the tertiles of the mass. A lift compares the attention on keypoint mass (or on a group) '
            f'with what uniform attention over the same keys would give: above 1 means the heads seek out structure. '
            f'Keypoints per image: {listed} (min {min(counts)}, median {np.median(counts):g}, max {max(counts)}).</p>']
    few = float(np.median(counts)) < 10 or min(h_px, w_px) < 64
    if few:
        body.append(caveat(
            f'SIFT finds only {min(counts)}-{max(counts)} keypoints per image on these {w_px}x{h_px}-pixel images, so '
            f'most patches are keypoint-free (group 0) whatever the image shows. The lifts rest on very few patches, '
            f'and a class token lands mostly on keypoint-free patches simply because nearly all patches are: the '
            f'spurious-correlation flags below then say more about the image size than about spurious correlations. '
            f'SIFT semantics need larger images (at least 100-200 pixels a side).'))
    body += [figure(ctx.files['sift_keypoints'], 'SIFT keypoints',
                    f'Left: the first {shown} image(s) with their SIFT keypoints (yellow circles of the keypoint\'s '
                    f'size; the title gives the count). Right: the concentration group of every patch (legend: the '
                    f'group and how many patches it holds).'),
             figure(ctx.files['sift_lifts'], 'semantic lifts',
                    'Top left: query lift per block (rows) and head (columns), value in each cell; red = more attention '
                    'on keypoint mass than uniform attention over the same keys, blue = less (colour bar; 1 = no '
                    'preference). Top right: group-to-group lift in the last block (row = query group, column = key '
                    'group; grey = an empty group). Bottom: the class token\'s lift on each group, per block '
                    '(legend).')]
    g0 = sem.group0_mass()
    if g0 is not None:
        flags = sem.flags()
        rows = [(ctx.names[i], len(s.keypoints), f'{(s.groups == 0).mean():.2f}', f'{g0[i]:.2f}',
                 ctx.label(int(sem.predictions[i])), 'FLAGGED' if flags[i] else '')
                for i, s in enumerate(sem.images)]
        flagged = sem.flagged_by_class([ctx.label(c) for c in range(ctx.probs.shape[-1])])
        fl = ''.join(f'<li>{escape(c)}: {escape(", ".join(v))}</li>' for c, v in flagged.items()) or '<li>none</li>'
        small = ' (See the caveat above: on images this small nearly every image gets flagged.)' if few else ''
        body.append(f'<h3>Spurious-correlation flags</h3><p>An image is flagged when the class token of block '
                    f'{sem.flag_block}, averaged over heads, puts more than {o.spurious_threshold:g} of its patch '
                    f'attention on keypoint-free patches: {int(flags.sum())} of {len(flags)} image(s).{small}</p>'
                    + table(['image', 'keypoints', 'keypoint-free share of patches', 'class-token share on them',
                             'prediction', 'flag'], rows, left=(0, 4))
                    + f'<p>Flagged images by {"label" if sem.labels is not None else "predicted class"}:</p>'
                      f'<ul>{fl}</ul>')
    else:
        body.append('<p class="skip">No class token: no class-token lift and no spurious-correlation flags.</p>')
    pr = prompting(ctx.model, ctx.x, by=o.prompt_by, weight=o.sift_weight, seed=o.seed, **ctx.common)
    ctx.results['prompting'] = pr
    s = pr.summary()
    what = 'keypoint-free patches' if o.prompt_by == 'group0' else 'lowest-mass patches'
    body.append(f'<h3>Prompting</h3><p>Re-prediction with the {what} masked out as keys in every block (on average '
                f'{s["mean_masked"]:.1f} patches per image), against masking as many random patches ({pr.repeats} '
                f'draws per image). With {len(pr.masked)} image(s), "predictions changed" moves in steps of '
                f'{100 / len(pr.masked):.1f} points.</p>'
                + table(['masking', 'predictions changed', 'mean confidence change'],
                        [(what, f'{100 * s["semantic"]["changed"]:.0f}%', f'{s["semantic"]["conf_change"]:+.4f}'),
                         ('random patches', f'{100 * s["random"]["changed"]:.0f}%',
                          f'{s["random"]["conf_change"]:+.4f}')]))
    return ''.join(body)


def part_removal(ctx: ReportContext) -> str:
    """Accuracy against the fraction of patches hidden as keys, per ranking score."""
    from ..removal import patch_removal
    o = ctx.opts
    images = ctx.x if ctx.labels is None else (ctx.x, ctx.labels.to(ctx.x.device))  # no labels: agreement
    res = patch_removal(ctx.model, images, fractions=o.removal_fractions, seed=o.seed, **ctx.common)
    ctx.results['removal'] = res
    ctx.picture('removal', plots.plot_removal(res, ctx.out / 'removal.png'))
    against = ('the labels' if res.against == 'labels' else
               'the unmasked prediction (there are no labels, so every curve starts at 100%)')
    n = res.num_images
    rows = [(f'{100 * f:.0f}%', k) + tuple(f'{100 * res.accuracy[s][i]:.1f}%' for s in res.accuracy)
            for i, (f, k) in enumerate(zip(res.fractions, res.removed))]
    warn = caveat(f'{n} image(s): every point moves in steps of {100 / n:.1f} accuracy points, so curves a step or '
                  f'two apart do not differ.') if n < 200 else ''
    return ('<p>Patches are ranked per image by a score (interaction: how much the other patches draw on it; sift: '
            'its share of keypoints; random), and the lowest-ranked fraction is masked as keys in every block. '
            f'Accuracy is measured against {against}.</p>' + warn
            + figure(ctx.files['removal'], 'patch removal',
                     'Top-1 accuracy (vertical) against the share of patches hidden as keys, lowest-ranked first '
                     '(horizontal); one line per ranking score (legend).')
            + table(['hidden', 'patches'] + [f'{s} ranking' for s in res.accuracy], rows, left=()))


PART_FUNCTIONS: Dict[str, Callable[[ReportContext], str]] = {
    'erf': part_erf, 'profiles': part_profiles, 'heads': part_heads, 'patterns': part_patterns,
    'sift': part_sift, 'removal': part_removal,
}


def run_part(ctx: ReportContext, part: str, log: Callable[[str], None]) -> Tuple[str, str, str]:
    """One part as a page section ``(id, heading, body)``; a failure becomes an error box (and
    ``report.errors[part]``) so that the other parts still run."""
    log(f'[{part}] {PART_TITLES[part]} ...')
    t0 = time.perf_counter()
    try:
        body = PART_FUNCTIONS[part](ctx)
    except Exception as e:  # noqa: BLE001 - one failed part must not lose the others
        ctx.report.errors[part] = f'{type(e).__name__}: {e}'
        log(f'[{part}] failed: {type(e).__name__}: {e}')
        body = (f'<div class="error">This part failed: {escape(type(e).__name__)}: {escape(e)}</div>'
                f'<pre>{escape(traceback.format_exc(limit=4))}</pre>')
    else:
        log(f'[{part}] done in {time.perf_counter() - t0:.1f}s')
    return part, PART_TITLES[part], body


# ---- the page ------------------------------------------------------------------------------------
def _windows_text(model: nn.Module) -> str:
    spec = getattr(model, 'window_spec', None)
    if spec is None:
        return 'none (every block global)'
    loc = [i for i in range(spec.depth) if not spec.is_global(i)]
    return (f'{spec.provenance.get("kind", "?")} spec, {len(loc)} of {spec.depth} blocks windowed '
            f'(mean window {np.mean([spec.layer(i).mean_area() for i in loc]) if loc else 0:.1f} patches)')


def write_page(ctx: ReportContext, parts: Sequence[str], sections: Sequence[Tuple[str, str, str]],
               weights: Optional[str], title: Optional[str], elapsed: float) -> None:
    """The HTML page and ``results.json``."""
    from ...version import __version__
    report, model = ctx.report, ctx.model
    mods = attention_modules(model)
    grid, mname = ctx.grid, model_name(model)
    weights_text = weights or 'not stated (pass weights= to analyze, or --pretrained / --checkpoint to the command)'
    checkpoint = checkpoint_hint(model)
    n = len(ctx.x)
    banner = None
    if weights and 'random' in weights.lower():
        banner = ('<b>Random weights.</b> This model was not trained, so the pictures below show what the analyses '
                  'compute, not what a trained model has learned.')
    if report.errors:
        msg = '; '.join(escape(k) for k in report.errors)
        banner = (banner + '<br>' if banner else '') + f'<b>Some parts failed:</b> {msg} (see their sections).'
    meta = [('model', mname), ('weights', weights_text)]
    if checkpoint:
        meta.append(('checkpoint', f'{checkpoint} (the weights file named by the model\'s timm config; '
                                   f'"weights" above says whether it was loaded)'))
    meta += [('shape', f'{len(mods)} blocks x {mods[0].num_heads} heads, {grid[0]}x{grid[1]} patch grid, '
                       f'{ctx.npt} prefix token(s)'),
             ('windows', _windows_text(model)),
             ('data', ctx.source),
             ('images', f'{n}' + (' with labels' if ctx.labels is not None else ' without labels') + ': '
              + ', '.join(ctx.names[:8]) + (' ...' if n > 8 else '')),
             ('parts', ', '.join(parts))]
    if report.skipped:
        meta.append(('not run', ', '.join(report.skipped)))
    sample = (f'<b>Sample size.</b> Everything below comes from {n} image(s): a share of images (accuracy, '
              f'predictions changed) moves in steps of {100 / n:.1f} points, and a difference of one or two steps is '
              f'noise. Treat this page as a picture of the method on this model, not as a measurement; for numbers, '
              f'run the analyses on hundreds of held-out images.') if n < 200 else None
    write_html(report.html, title or f'vitfree analysis: {mname}', 'Attention windows, ERFs, distance profiles, head '
               'importance, attention patterns and SIFT semantics of one model on a few images.', meta, sections,
               banner=banner, note=sample,
               footer=f'vitfree {escape(__version__)}; generated in {elapsed:.0f}s. All pictures are embedded in this '
                      f'file; the same PNGs are in the report folder.')
    summary = {'model': mname, 'weights': weights_text, 'checkpoint': checkpoint, 'data': ctx.source, 'grid': list(grid),
               'images': ctx.names, 'parts': list(parts), 'errors': report.errors,
               'files': {k: v.name for k, v in report.files.items()}}
    for key, res in report.results.items():
        summary[key] = res.to_dict() if hasattr(res, 'to_dict') else res if isinstance(res, dict) else None
    if 'erf' in report.results:
        summary['erf'] = report.results['erf'].summary()
    if 'sift' in report.results:
        summary['sift']['flagged_by_class'] = report.results['sift'].flagged_by_class()
    report.json.write_text(json.dumps(to_json(summary), indent=1), encoding='utf-8')


# ---- the analysis --------------------------------------------------------------------------------
def analyze(
        model: nn.Module,
        images: Union[ImagesLike, str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        out_dir: Union[str, os.PathLike],
        parts: Optional[Sequence[str]] = None,
        *,
        names: Optional[Sequence[str]] = None,
        classes: Optional[Sequence[str]] = None,
        weights: Optional[str] = None,
        source: Optional[str] = None,
        title: Optional[str] = None,
        split: str = 'train',
        options: Optional[ReportOptions] = None,
        device: Union[str, torch.device, None] = None,
        log: Callable[[str], None] = print,
        **option_values: Any,
) -> AnalysisReport:
    """Run the chosen analyses and write ``out_dir/report.html``, ``out_dir/results.json`` and
    the PNGs.

    Args:
        model: any timm ViT-family classifier (WinfT, ``vit_*``, ``deit_*``; class and register
            tokens are fine).  It runs in eval mode and is left as it was found.
        images: a normalised tensor ``(B, C, H, W)`` (or an ``(images, labels)`` pair, a
            Dataset, ...: anything :func:`~vitfree.analysis.inputs.iter_images` takes), or what
            a user names as DATA: image files and folders, ``.npz`` files of images, built-in
            data set names (see :func:`~vitfree.analysis.inputs.open_data`; ``split`` picks the
            split of a built-in set).
        out_dir: output folder (created).
        parts: any of :data:`PARTS` (default: all).
        names: a name per image (default: file names, or ``image 0, 1, ...`` for tensors).
        classes: class names, index = label (default: the model's ``label_names``, the data
            set's classes, ImageNet's for a 1000-class head, else ``class 3``).
        weights: how to describe the model's weights on the page (e.g. ``'random initialisation'``,
            which also puts a warning on the page); the header also names the checkpoint file the
            model's timm config points at.
        source: how to describe where the images come from (default: derived from ``images``).
        options: a :class:`ReportOptions`; single settings may also be given as keywords
            (``epochs=30``, ``max_images=8``, ``progress=False``, ...).
        device: where to run (default: where the model is).
        log: where progress messages go (``print`` by default).
    """
    opts = _options(options, option_values)
    parts = _check_parts(parts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dev = torch.device(device) if device is not None else next(iter(model.parameters())).device
    x, names, labels, data_classes, data_source = _read_images(model, images, names, opts.max_images, dev, split,
                                                                log)
    report = AnalysisReport(out, out / 'report.html', out / 'results.json')
    with eval_mode(model):
        with torch.no_grad():
            logits = torch.cat([model(x[s:s + opts.batch_size]) for s in range(0, len(x), opts.batch_size)])
        ctx = ReportContext(model, x, names, labels, list(classes) if classes else _class_names(model) or data_classes,
                            source or data_source, logits.float().softmax(-1).cpu(), opts, report)
        sections = [('images', 'Images and predictions', images_section(ctx))]
        sections += [run_part(ctx, p, log) for p in parts]
    for p in PARTS:
        if p not in parts:
            report.skipped[p] = 'not selected'
    elapsed = time.perf_counter() - t_start
    write_page(ctx, parts, sections, weights, title, elapsed)
    log(f'wrote {report.html} ({len(report.files)} pictures) in {elapsed:.0f}s')
    return report
