"""``vitfree erf MODEL DATA -o spec.yaml``: measure per-patch ERFs and write a window spec.

MODEL is any timm ViT-family model name (``deit_small_patch16_224``, ``vit_tiny_patch16_224``,
``winft_*``, ``hf-hub:...``, ``local-dir:...``).  DATA is a folder of images (read recursively,
labels unknown), one image file, a ``.npz`` file of images (e.g. the bundled
``vitfree/assets/fashion_mnist_samples.npz``), or a built-in data set name (``digits``,
``fashion_mnist``; see :mod:`vitfree.data`); :func:`vitfree.analysis.inputs.open_data` reads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

from ..train.options import Range, check_ranges
from ._common import CommandError, add_model_flags, create_model

RANGES = {'images': Range(int, 1), 'tau': Range(float, 0.0, 1.0, low_open=True), 'gamma': Range(float, 0.0),
          'seed': Range(int, 0)}


def add_parser(sub) -> None:
    p = sub.add_parser(
        'erf', help='measure per-patch ERFs of a ViT on images and write the window spec they give',
        description='Measure the effective receptive field of every patch in every block of a timm ViT-family '
                    'model on a sample of images (vitfree.measure_erf), print a per-block table, and write the '
                    'measured window spec (and pictures).  The spec builds a WinfT with '
                    'vitfree.create_winft(MODEL, windows=SPEC).')
    p.add_argument('model', metavar='MODEL', help='timm model name (or hf-hub:/local-dir: reference)')
    p.add_argument('data', metavar='DATA', help='image folder (recursive), image file, .npz file of images, or '
                                                'built-in data set (digits, fashion_mnist)')
    p.add_argument('-o', '--output', required=True, help='where to write the window spec (.yaml/.yml/.json)')
    p.add_argument('--estimator', default='attention', choices=['attention', 'attribution', 'ablation'],
                   help='interaction estimator (default: attention)')
    p.add_argument('--images', type=int, default=32, metavar='N', help='number of images to use (default: 32)')
    p.add_argument('--tau', type=float, default=0.9, help='interaction mass an ERF must hold, in (0, 1] (default 0.9)')
    p.add_argument('--gamma', type=float, default=0.6,
                   help='a block becomes global when its mean ERF area >= gamma * patches (default 0.6)')
    p.add_argument('--per-head', action='store_true', help='one window per head (attention/attribution only)')
    p.add_argument('--target', default='predicted',
                   help="attribution target: predicted, label or a class index (default: predicted)")
    p.add_argument('--pictures', metavar='DIR', default=None, help='write PNG pictures into DIR')
    add_model_flags(p, batch_size=16, texts={
        'pretrained': "load the model's pretrained weights (from the Hub cache, a local-dir: model, or a file given "
                      "as --model-kwargs 'pretrained_cfg_overlay={file: weights.safetensors}')"})
    p.add_argument('--split', default='train', help='split of a built-in data set (default: train)')
    p.add_argument('--seed', type=int, default=0, help='seed for random initialisation (default 0)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.set_defaults(func=run, outputs=[('output', 'file', ('.yaml', '.yml', '.json')), ('pictures', 'dir', None)],
                   image_inputs=['data'])


def run(args) -> int:
    from ..analysis.erf import checkpoint_hint, measure_erf
    from ..analysis.inputs import open_data
    from ..analysis.tables import format_spec

    out = Path(args.output)
    if out.suffix.lower() not in ('.yaml', '.yml', '.json'):
        raise SystemExit(f'error: -o/--output must end in .yaml, .yml or .json, got {args.output!r}')
    check_ranges(args, RANGES, CommandError, cli=True)
    target: Any = int(args.target) if args.target.isdigit() else args.target
    if target not in ('predicted', 'label') and not isinstance(target, int):
        raise CommandError(f"--target {args.target!r}: give predicted, label or a class index (an integer >= 0)")
    model = create_model(args)
    if args.checkpoint:
        checkpoint = args.checkpoint  # recorded relative to the project (measure_erf keeps machine paths out)
    elif args.pretrained:
        checkpoint = checkpoint_hint(model) or args.model
    else:
        checkpoint = f'none (random initialisation, seed {args.seed})'
        if args.model.startswith(('local-dir:', 'hf-hub:')):
            print(f'note: {args.model} is built with random weights; add --pretrained to load the weights it ships')
    try:
        dataset, data_desc = open_data(args.data, args.split)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from None
    print(f'model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), '
          f'weights: {checkpoint}')
    print(f'data: {data_desc}; using up to {args.images} images, estimator {args.estimator}, '
          f'tau={args.tau:g}, gamma={args.gamma:g}')
    try:
        result = measure_erf(
            model, dataset, estimator=args.estimator, tau=args.tau, gamma=args.gamma, num_images=args.images,
            batch_size=args.batch_size, per_head=args.per_head, target=target, data=data_desc,
            checkpoint=checkpoint, progress=not args.no_progress, return_result=True, device=args.device)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    spec = result.spec
    print(result.format_summary())
    print()
    print('window spec:')
    print(format_spec(spec))
    path = spec.save(out)
    written: List[Path] = [path]
    if args.pictures:
        from ..analysis.inputs import iter_images
        from ..analysis.plots import erf_pictures
        x, _ = next(iter_images(model, dataset, batch_size=1, num_images=1, device=args.device))
        written += list(erf_pictures(result, args.pictures, image=x[0], model=model).values())
    print(f'wrote {len(written)} file(s):')
    for p in written:
        print(f'  {p}')
    return 0

