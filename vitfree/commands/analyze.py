"""``vitfree analyze MODEL DATA... -o DIR``: every analysis, as PNGs and one HTML page.

MODEL is any timm ViT-family model name (``deit_small_patch16_224``, ``vit_tiny_patch16_224``,
``winft_*``, ``hf-hub:...``, ``local-dir:...``).  DATA takes what ``vitfree erf`` takes (read by
:func:`vitfree.analysis.inputs.open_data`): image files, folders (searched recursively), ``.npz``
files of images, built-in data sets (``digits``, ``fashion_mnist``, with ``--split``).  The page ``DIR/report.html`` embeds every picture, so it can be mailed or
opened offline; ``DIR/results.json`` holds the numbers.
"""
from __future__ import annotations

from pathlib import Path

from ..train.options import Range, check_ranges
from ._common import CommandError, add_model_flags, create_model

PARTS = ('erf', 'profiles', 'heads', 'patterns', 'sift', 'removal')  # same as vitfree.analysis.report.PARTS
# every numeric flag, checked before any work (the analyses check them again, but only when they run)
RANGES = {'max_images': Range(int, 1), 'head_images': Range(int, 1), 'batch_size': Range(int, 1),
          'k': Range(int, 1), 'latent_dim': Range(int, 2), 'epochs': Range(int, 1),
          'spurious_threshold': Range(float, 0.0, 1.0), 'tau': Range(float, 0.0, 1.0, low_open=True),
          'gamma': Range(float, 0.0), 'seed': Range(int, 0)}


def add_parser(sub) -> None:
    p = sub.add_parser(
        'analyze', help='analyse a ViT on images: windows, ERFs, profiles, head importance, patterns, SIFT; '
                        'writes PNGs and one HTML page',
        description='Run the vitfree analyses of a timm ViT-family model on a few images and write PNGs, '
                    'results.json and one self-contained HTML page (pictures embedded, no network) into DIR. '
                    f'Parts: {", ".join(PARTS)} (all by default; choose with --parts or drop with --skip).')
    p.add_argument('model', metavar='MODEL', help='timm model name (or hf-hub:/local-dir: reference)')
    p.add_argument('images', metavar='DATA', nargs='+',
                   help='image files, folders (recursive), .npz files of images (e.g. '
                        'vitfree/assets/fashion_mnist_samples.npz) or built-in data sets (digits, fashion_mnist); '
                        'as for vitfree erf')
    p.add_argument('--split', default='train', help='split of a built-in data set (default: train)')
    p.add_argument('-o', '--output', required=True, metavar='DIR', help='output folder (created)')
    p.add_argument('--parts', nargs='+', choices=PARTS, default=None, metavar='PART',
                   help=f'run only these parts ({", ".join(PARTS)})')
    p.add_argument('--skip', nargs='+', choices=PARTS, default=[], metavar='PART', help='leave these parts out')
    add_model_flags(p, flags=('pretrained', 'checkpoint', 'model_kwargs'))
    p.add_argument('--max-images', type=int, default=32, metavar='N', help='use at most N images (default 32)')
    p.add_argument('--head-images', type=int, default=8, metavar='N',
                   help='images for head pruning, which costs 6 x blocks x heads forwards each (default 8)')
    add_model_flags(p, flags=('batch_size',), batch_size=8)
    p.add_argument('--average', choices=['pairs', 'queries'], default='pairs',
                   help='hop-strength averaging (default: pairs)')
    p.add_argument('--k', type=int, default=6, help='attention-pattern clusters (default 6)')
    p.add_argument('--latent-dim', type=int, default=16, help='pattern autoencoder latent size (default 16)')
    p.add_argument('--epochs', type=int, default=200, help='pattern autoencoder epochs (default 200)')
    p.add_argument('--sift-weight', choices=['count', 'response', 'scale'], default='count',
                   help='patch semantic mass from SIFT keypoints (default: count)')
    p.add_argument('--spurious-threshold', type=float, default=0.5,
                   help='flag an image when its class token puts more than this share on keypoint-free patches '
                        '(default 0.5)')
    p.add_argument('--prompt-by', choices=['group0', 'lowest'], default='group0',
                   help='prompting masks keypoint-free patches (group0) or the lowest-mass quarter (lowest)')
    p.add_argument('--tau', type=float, default=0.9, help='ERF mass (default 0.9)')
    p.add_argument('--gamma', type=float, default=0.6, help='global-block threshold on mean ERF area (default 0.6)')
    add_model_flags(p, flags=('device',))
    p.add_argument('--seed', type=int, default=0, help='seed for initialisation, clustering and masks (default 0)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.set_defaults(func=run, outputs=[('output', 'dir', None)], image_inputs=['images'])


def run(args) -> int:
    from ..analysis.report import analyze

    parts = [p for p in (args.parts or PARTS) if p not in set(args.skip)]
    if not parts:
        raise SystemExit('error: --parts/--skip leave nothing to run')
    check_ranges(args, RANGES, CommandError, cli=True)
    model = create_model(args)
    if args.checkpoint:
        weights = f'checkpoint {Path(args.checkpoint).resolve()}'
    elif args.pretrained:
        weights = 'pretrained (timm)'
    else:
        weights = f'random initialisation (seed {args.seed}; pass --pretrained or --checkpoint for trained weights)'
    if args.model.startswith(('local-dir:', 'hf-hub:')) and not (args.pretrained or args.checkpoint):
        print(f'note: {args.model} is built with random weights; add --pretrained to load the weights it ships')
    print(f'model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters); '
          f'weights: {weights}')
    try:
        report = analyze(
            model, args.images, args.output, parts, weights=weights, max_images=args.max_images,
            head_images=args.head_images, batch_size=args.batch_size, average=args.average, latent_dim=args.latent_dim,
            k=args.k, epochs=args.epochs, sift_weight=args.sift_weight, spurious_threshold=args.spurious_threshold,
            prompt_by=args.prompt_by, tau=args.tau, gamma=args.gamma, seed=args.seed, device=args.device,
            progress=not args.no_progress, split=args.split)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from None
    print(f'report: {report.html}')
    if report.errors:
        for part, msg in report.errors.items():
            print(f'  part {part!r} failed: {msg}')
        return 1
    return 0
