"""``vitfree bench``: a WinfT against timm's ViT of the same shape, side by side.

Prints inference images/s (and optionally one training step) per image size, the ratio
WinfT / ViT, the training-step peak memory of each, and which attention backend every block
ran.  Measuring method: :mod:`vitfree.benchmark`, shared with the scripts in ``benchmarks/``.
"""
from __future__ import annotations

import json
import textwrap
from typing import Any, Dict

__all__ = ['add_parser', 'run']


from ..benchmark import interleaved, machine_info, peak_memory, set_threads  # noqa: F401 (re-exported)
from ..train.options import Range, check_ranges

DEFAULT_RADIUS = 3
RANGES = {'img_size': Range(int, 1), 'batch': Range(int, 1, optional=True), 'reps': Range(int, 1),
          'threads': Range(int, 1), 'radius': Range(int, 0, optional=True)}


def add_parser(sub) -> None:
    p = sub.add_parser('bench', help="a WinfT against timm's ViT of the same shape: images/s, memory, backends",
                       description=__doc__.split('\n\n')[0])
    p.add_argument('model', nargs='?', default='vit_small_patch16_224',
                   help='timm ViT/DeiT architecture to compare against (default: vit_small_patch16_224)')
    p.add_argument('--windows', default=None,
                   help='window spec (shipped name or .yaml/.json file); default: --radius in every block')
    p.add_argument('--radius', type=int, default=None,
                   help=f'the same window in every block instead of --windows: radius R gives (2R+1)x(2R+1) patches '
                        f'(an integer >= 0; default {DEFAULT_RADIUS})')
    p.add_argument('--window-resize', choices=['scale', 'keep'], default='scale',
                   help="how --windows follow the image size: 'scale' (default) or 'keep' (size in patches)")
    p.add_argument('--img-size', type=int, nargs='+', default=[224, 448], help='image sizes in pixels')
    p.add_argument('--batch', type=int, default=None, help='images per batch (default: fewer for larger images)')
    p.add_argument('--train', action='store_true', help='also time one training step and measure its peak memory')
    p.add_argument('--bf16', action='store_true', help='run under torch.autocast(bfloat16)')
    p.add_argument('--reps', type=int, default=3, help='timed rounds (interleaved), median reported')
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: CPU-time clock; default 1)')
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    p.set_defaults(func=run, outputs=[('json', 'file', ('.json',))])


def default_batch(img_size: int) -> int:
    """Images per batch that keep one step around a second on a CPU core for ViT-S."""
    return max(1, min(16, (448 // img_size) ** 2 * 4)) if img_size <= 448 else 1


def _build(model: str, img: int, windows: Any, radius: int, window_resize: str = 'scale'):
    import timm

    from ..models import create_winft
    from ..windows import WindowSpec
    vit = timm.create_model(model, img_size=img, num_classes=1000)
    depth, grid = len(vit.blocks), tuple(vit.patch_embed.grid_size)
    spec = windows if windows is not None else WindowSpec.uniform(depth, grid, radius)
    winft = create_winft(model, windows=spec, img_size=img, num_classes=1000, window_resize=window_resize)
    winft.load_state_dict(vit.state_dict())
    return vit, winft


def run(args) -> int:
    import torch

    from ..windows import resolve_spec
    from ._common import CommandError, check_model_kwargs, check_model_name
    check_ranges(args, RANGES, CommandError, cli=True)
    if args.windows is not None and args.radius is not None:
        raise CommandError(f'--windows {args.windows} and --radius {args.radius} contradict each other: --radius '
                           f'builds the same window in every block, --windows reads them from a spec; give one')
    if args.radius is None:
        args.radius = DEFAULT_RADIUS
    check_model_name(args.model)
    for img in args.img_size:
        check_model_kwargs(args.model, {}, img, img_flag='--img-size')
    if args.windows is not None:
        resolve_spec(args.windows)  # a bad spec file is named before any model is built
    set_threads(args.threads)
    rows = []
    amp = torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.bf16)
    for img in args.img_size:
        batch = args.batch or default_batch(img)
        vit, winft = _build(args.model, img, args.windows, args.radius, args.window_resize)
        vit.eval(), winft.eval()
        x = torch.randn(batch, 3, img, img)

        def infer(m):
            with torch.no_grad(), amp:
                m(x)
        res = interleaved({'vit': lambda: infer(vit), 'winft': lambda: infer(winft)}, reps=args.reps)
        row = {'img_size': img, 'batch': batch, 'vit_img_s': batch / res['vit']['median'],
               'winft_img_s': batch / res['winft']['median'], 'backends': winft.attn_backends()}
        row['speedup'] = row['winft_img_s'] / row['vit_img_s']
        if args.train:
            def train(m):
                m.train()
                with amp:
                    loss = m(x).float().logsumexp(-1).mean()
                loss.backward()
                m.zero_grad(set_to_none=True)
            tr = interleaved({'vit': lambda: train(vit), 'winft': lambda: train(winft)}, reps=args.reps)
            row['train_speedup'] = tr['vit']['median'] / tr['winft']['median']
            for name, spec in (('vit', None), ('winft', args.windows)):
                setup = _train_setup(args.model, img, batch, name == 'winft', spec, args.radius, args.bf16,
                                     args.window_resize)
                row[f'{name}_train_peak_mb'] = peak_memory(setup, args.threads).get('peak_mb')
            if row['vit_train_peak_mb'] and row['winft_train_peak_mb']:
                row['train_memory_ratio'] = row['winft_train_peak_mb'] / row['vit_train_peak_mb']
        rows.append(row)
        _print_row(args.model, row)
    if args.json:
        text = json.dumps({'machine': machine_info(), 'model': args.model, 'rows': rows}, indent=1)
        try:
            with open(args.json, 'w') as f:
                f.write(text)
        except OSError as e:
            raise OSError(e.errno, e.strerror, args.json) from None
    return 0


def _train_setup(model: str, img: int, batch: int, winft: bool, windows: Any, radius: int, bf16: bool,
                 window_resize: str = 'scale') -> str:
    return textwrap.dedent(f'''
        import timm, vitfree
        from vitfree.windows import WindowSpec
        if {winft!r}:
            vit = timm.create_model({model!r}, img_size={img})
            spec = {windows!r} or WindowSpec.uniform(len(vit.blocks), tuple(vit.patch_embed.grid_size), {radius})
            m = vitfree.create_winft({model!r}, windows=spec, img_size={img}, window_resize={window_resize!r})
            del vit
        else:
            m = timm.create_model({model!r}, img_size={img})
        m.train()
        x = torch.randn({batch}, 3, {img}, {img})

        def step():
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled={bf16!r}):
                loss = m(x).float().logsumexp(-1).mean()
            loss.backward()
    ''')


def _print_row(model: str, row: Dict[str, Any]) -> None:
    used = sorted(set(row['backends']))
    line = (f'{model} @ {row["img_size"]}px, batch {row["batch"]}: ViT {row["vit_img_s"]:.2f} img/s, '
            f'WinfT {row["winft_img_s"]:.2f} img/s ({row["speedup"]:.2f}x)')
    if 'train_speedup' in row:
        line += f'; train step {row["train_speedup"]:.2f}x'
        if row.get('train_memory_ratio'):
            line += (f', peak memory {row["winft_train_peak_mb"]:.0f} / {row["vit_train_peak_mb"]:.0f} MiB '
                     f'({row["train_memory_ratio"]:.2f}x)')
    print(line + f'; backends: {", ".join(used)}')
