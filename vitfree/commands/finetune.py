"""``vitfree finetune MODEL DATA``: fine-tune a WinfT on an image folder or a built-in data set.

The same command runs under ``torchrun --nproc_per_node N`` for data-parallel training.
"""
from __future__ import annotations

import argparse

import dataclasses

from ..train.options import RANGES, FinetuneConfig, flag, flag_help
from ._common import add_common_flags, add_model_flags

DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}

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
    model, opt, data, run_group = (p.add_argument_group(name) for name in ('model', 'optimisation', 'data', 'run'))
    add_model_flags(p, flags=('pretrained', 'model_kwargs', 'batch_size', 'device'), batch_size=64, device=None,
                    groups={'pretrained': model, 'model_kwargs': model, 'batch_size': opt, 'device': run_group},
                    texts={'pretrained': 'start from pretrained weights (Hub or local)',
                           'model_kwargs': 'extra model arguments, e.g. depth=4 embed_dim=128',
                           'batch_size': flag_help('batch_size'),
                           'device': 'cpu, cuda, cuda:N or mps (default: cuda when available)'})
    model.add_argument('--windows', help='window spec: shipped name or .yaml/.json file (default: the model\'s own)')
    _number(model, 'img_size')
    model.add_argument('--window-resize', choices=['scale', 'keep'], default=None,
                       help="how windows follow another image size: 'scale' (default: each window keeps its share "
                            "of the image) or 'keep' (each keeps its size in patches, so cost stays linear at high "
                            "resolution)")
    _number(model, 'drop_path')
    model.add_argument('--attn-backend', help='attention backend for windowed blocks (default: auto)')
    model.add_argument('--grad-checkpointing', action='store_true',
                       help='recompute activations in backward (less memory)')
    for name in ('epochs', 'lr'):
        _number(opt, name)
    opt.add_argument('--opt', default='adamw', help='any timm optimizer name (default: %(default)s)')
    for name in ('weight_decay', 'momentum', 'layer_decay', 'clip_grad'):
        _number(opt, name)
    opt.add_argument('--sched', default='cosine', help='any timm scheduler name (default: %(default)s)')
    for name in ('warmup_epochs', 'warmup_lr', 'min_lr', 'smoothing', 'mixup', 'cutmix', 'mixup_prob'):
        _number(opt, name)
    opt.add_argument('--ema', action='store_true', help='keep an exponential moving average of the weights')
    _number(opt, 'ema_decay')
    opt.add_argument('--amp', choices=['bf16', 'fp16'], help='mixed precision (bf16 on CPU; bf16 or fp16 on CUDA)')
    data.add_argument('--no-aug', action='store_true', help='no random augmentation')
    _number(data, 'scale', nargs=2, metavar=('MIN', 'MAX'))
    for name in ('hflip', 'color_jitter'):
        _number(data, name)
    data.add_argument('--auto-augment', help='timm auto-augment policy, e.g. rand-m9-mstd0.5')
    _number(data, 'reprob')
    _number(data, 'workers', '-j')
    data.add_argument('--no-verify-images', dest='verify_images', action='store_false',
                      help='skip the up-front check that every image file opens')
    for name in ('limit_train_batches', 'limit_val_batches'):
        _number(data, name)
    _run_flags(run_group)
    add_common_flags(p, images=True)
    p.set_defaults(func=run)


def _number(group, name: str, *short: str, **kw) -> None:
    """A numeric flag, with its default from FinetuneConfig and its range from the one table (RANGES)."""
    rng = RANGES[name]
    group.add_argument(*short, flag(name), type=rng.kind, default=DEFAULTS[name],
                       help=flag_help(name), **kw)


def _run_flags(group) -> None:
    _number(group, 'seed')
    for name in ('checkpoint_every', 'keep_last'):
        _number(group, name)
    group.add_argument('--resume', nargs='?', const=True, default=False, metavar='CKPT',
                     help='continue from the newest valid checkpoint in OUTPUT (or from CKPT); the training flags '
                          'must be those of the checkpoint')
    group.add_argument('--allow-changed', action='store_true',
                     help='with --resume: continue with changed training flags (each change is recorded)')
    group.add_argument('--overwrite', action='store_true',
                     help='replace an earlier run in OUTPUT (without it, an existing run is refused)')
    _number(group, 'log_interval')
    group.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    group.add_argument('--no-export', dest='export', action='store_false', help='do not write OUTPUT/model')
    _number(group, 'threads')
    group.add_argument('--deterministic', action='store_true', help='torch deterministic algorithms')


def run(args) -> int:
    from ..train import finetune
    from ._common import check_model_kwargs, check_model_name

    options = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    options['scale'] = tuple(options['scale'])
    options['model_kwargs'] = dict(options['model_kwargs'])
    config = FinetuneConfig(**options)  # finetune() checks every flag against its range before any work
    check_model_name(args.model)  # unknown names get close matches before any work
    check_model_kwargs(args.model, config.model_kwargs, config.img_size, img_flag='--img-size')
    result = finetune(config)
    if result.export is not None:
        last = result.metrics[-1] if result.metrics else {}
        print(f'done: {result.global_step} steps, top-1 {last.get("top1", float("nan")):.2f}%, '
              f'model in {result.export}')
    return 0
