"""``vitfree finetune MODEL DATA``: fine-tune a WinfT on an image folder or a built-in data set.

The same command runs under ``torchrun --nproc_per_node N`` for data-parallel training.
"""
from __future__ import annotations

import argparse

from ._common import add_common_flags, key_value

EPILOG = """\
MODEL: a WinfT name (winft_tiny_patch16_224, ...), a timm ViT/DeiT name made into a WinfT with
--windows, or an export (local-dir:PATH, hf-hub:ORG/NAME).
DATA: digits | fashion_mnist | a folder with train/<class>/* and val/<class>/*.

Writes OUTPUT/metrics.jsonl, OUTPUT/checkpoints/ckpt-*, and the fine-tuned model to OUTPUT/model
(config.json with the window spec, model.safetensors, README.md) ready for `vitfree push`.

example:
  vitfree finetune winft_tiny_patch16_224 digits --img-size 32 --model-kwargs depth=4 \\
      --epochs 5 --batch-size 64 --lr 1e-3 --hflip 0 --scale 0.7 1 -o runs/digits
  torchrun --nproc_per_node 2 -m vitfree.cli finetune ...   # same flags, several processes
"""


def add_parser(sub) -> None:
    p = sub.add_parser('finetune', help='fine-tune a WinfT on an image folder or a built-in data set',
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('model', help='WinfT / timm ViT name, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('data', help='digits, fashion_mnist, or a folder with train/ and val/ class folders')
    p.add_argument('-o', '--output', default='vitfree-finetune', help='output folder (default: %(default)s)')

    g = p.add_argument_group('model')
    g.add_argument('--pretrained', action='store_true', help='start from pretrained weights (Hub or local)')
    g.add_argument('--windows', help='window spec: shipped name or .yaml/.json file (default: the model\'s own)')
    g.add_argument('--img-size', type=int, help='train at this image size; the window spec is resized to match')
    g.add_argument('--window-resize', choices=['scale', 'keep'], default=None,
                   help="how windows follow another image size: 'scale' (default: each window keeps its share of "
                        "the image) or 'keep' (each keeps its size in patches, so cost stays linear at high resolution)")
    g.add_argument('--model-kwargs', nargs='*', default=[], type=key_value, metavar='KEY=VALUE',
                   help='extra model arguments, e.g. depth=4 embed_dim=128')
    g.add_argument('--drop-path', type=float, help='stochastic depth rate')
    g.add_argument('--attn-backend', help='attention backend for windowed blocks (default: auto)')
    g.add_argument('--grad-checkpointing', action='store_true', help='recompute activations in backward (less memory)')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=10)
    g.add_argument('-b', '--batch-size', type=int, default=64, help='per process (default: %(default)s)')
    g.add_argument('--lr', type=float, default=5e-4)
    g.add_argument('--opt', default='adamw', help='any timm optimizer name (default: %(default)s)')
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--layer-decay', type=float, help='layer-wise learning-rate decay, e.g. 0.75')
    g.add_argument('--clip-grad', type=float, help='clip the gradient norm to this value')
    g.add_argument('--sched', default='cosine', help='any timm scheduler name (default: %(default)s)')
    g.add_argument('--warmup-epochs', type=int, default=0)
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=1e-6)
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: %(default)s)')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0 = off)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0 = off)')
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--ema', action='store_true', help='keep an exponential moving average of the weights')
    g.add_argument('--ema-decay', type=float, default=0.9998)
    g.add_argument('--amp', choices=['bf16', 'fp16'], help='mixed precision (bf16 on CPU; bf16 or fp16 on CUDA)')

    g = p.add_argument_group('data')
    g.add_argument('--no-aug', action='store_true', help='no random augmentation')
    g.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), metavar=('MIN', 'MAX'),
                   help='random-resized-crop area range (default: 0.08 1)')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--auto-augment', help='timm auto-augment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    g.add_argument('-j', '--workers', type=int, default=2, help='data loader processes (default: %(default)s)')
    g.add_argument('--no-verify-images', dest='verify_images', action='store_false',
                   help='skip the up-front check that every image file opens')
    g.add_argument('--limit-train-batches', type=int, help='at most this many steps per epoch')
    g.add_argument('--limit-val-batches', type=int, help='at most this many validation batches')

    g = p.add_argument_group('run')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', help='cpu or cuda (default: cuda when available)')
    g.add_argument('--checkpoint-every', type=int, default=0, help='also checkpoint every N steps (0: epochs only)')
    g.add_argument('--keep-last', type=int, default=3, help='checkpoints to keep (default: %(default)s)')
    g.add_argument('--resume', nargs='?', const=True, default=False, metavar='CKPT',
                   help='continue from the newest valid checkpoint in OUTPUT (or from CKPT); the training flags '
                        'must be those of the checkpoint')
    g.add_argument('--allow-changed', action='store_true',
                   help='with --resume: continue with changed training flags (each change is recorded)')
    g.add_argument('--overwrite', action='store_true',
                   help='replace an earlier run in OUTPUT (without it, an existing run is refused)')
    g.add_argument('--log-interval', type=int, default=10, help='steps between metrics lines')
    g.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    g.add_argument('--no-export', dest='export', action='store_false', help='do not write OUTPUT/model')
    g.add_argument('--threads', type=int, help='torch CPU threads per process')
    g.add_argument('--deterministic', action='store_true', help='torch deterministic algorithms')
    add_common_flags(p, images=True)
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from ..train import FinetuneConfig, finetune
    from ._common import check_model_name

    check_model_name(args.model)  # unknown names get close matches before any work
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    options = {k: v for k, v in vars(args).items() if k in names}
    options['scale'] = tuple(options['scale'])
    options['model_kwargs'] = dict(options['model_kwargs'])
    result = finetune(FinetuneConfig(**options))
    if result.export is not None:
        last = result.metrics[-1] if result.metrics else {}
        print(f'done: {result.global_step} steps, top-1 {last.get("top1", float("nan")):.2f}%, '
              f'model in {result.export}')
    return 0
