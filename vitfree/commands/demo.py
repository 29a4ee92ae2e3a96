"""``vitfree demo``: the main job on an embedded default (writes ./vitfree-out/)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser('demo', help='run the main job on the embedded default model and image')
    p.add_argument('-o', '--out', default='vitfree-out', help='output folder (default: ./vitfree-out)')
    p.add_argument('--model', default=None, help='timm model name (default: the embedded default)')
    p.add_argument('--image', default=None, help='image file (default: a bundled sample photo)')
    p.set_defaults(func=run, outputs=[('out', 'dir', None)])


def run(args) -> int:
    from ..demo import run_demo
    from ._common import CommandError, check_model_name
    if args.model:
        check_model_name(args.model)
    if args.image:
        from ..data import find_unreadable_images
        from ..windows import file_problem
        problem = file_problem(args.image)
        if problem is not None:
            raise CommandError(f'--image {args.image!r}: {"no such image file" if problem == "not found" else problem}')
        bad = find_unreadable_images([args.image], decode=True)
        if bad:
            raise CommandError(f'--image {args.image!r} cannot be read as an image ({bad[str(args.image)]})')
    run_demo(args.out, model_name=args.model, image=args.image)
    return 0
