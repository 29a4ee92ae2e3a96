"""``vitfree calibrate``: measure the attention backends on this machine for the dispatcher."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser('calibrate', help="time the attention backends on this CPU or GPU and save the dispatcher's "
                                         'cost table (a few minutes)')
    p.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)')
    p.add_argument('--backends', nargs='+', default=None, help='default: every backend auto may pick there')
    p.add_argument('--quick', action='store_true', help='three shapes, low precision only')
    p.add_argument('--no-fp32', action='store_true', help='calibrate float16/bfloat16 only')
    p.add_argument('--threads', type=int, default=None, help='CPU threads to measure with (default: torch default)')
    p.add_argument('--out', default=None, help='also write the table into this folder')
    p.add_argument('--commit', action='store_true',
                   help='also write it into vitfree/ops/calibrations/ (the tables shipped with vitfree)')
    p.set_defaults(func=run)


def run(args) -> int:
    from ._common import CommandError
    if args.threads is not None and args.threads < 1:
        raise CommandError(f'--threads must be >= 1, got {args.threads}')
    import torch

    from ..ops.calibrate import calibrate, shapes_for, write_table
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes, fp32 = shapes_for(args.quick, not args.no_fp32)
    cal = calibrate(args.device, args.backends, shapes, fp32)
    for folder in ([args.out] if args.out else []) + ([None] if args.commit else []):
        print('wrote', write_table(cal, folder))
    return 0
