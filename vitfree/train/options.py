"""Every option of a fine-tuning run (:class:`FinetuneConfig`, the ``vitfree finetune`` flags) and
the valid range of each numeric one: one table (:data:`RANGES`), read by three places.

:meth:`FinetuneConfig.check` refuses a value outside its range before any work starts,
``vitfree finetune --help`` prints each flag's range and default beside its help, and the
README's table is :func:`markdown_table` (a test checks that it is up to date; ``python -m
vitfree.train.options`` prints it).  No torch here: ``vitfree --help`` must not load it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = ['FinetuneConfig', 'Range', 'RANGES', 'AMP_NAMES', 'check_ranges', 'flag_help', 'markdown_table']

AMP_NAMES = ('bf16', 'bfloat16', 'fp16', 'float16')  # --amp (the torch dtypes: vitfree.train.finetune.AMP_DTYPES)


@dataclass(frozen=True)
class Range:
    """The values one numeric option accepts: ``int`` or ``float`` (a finite number), between ``low``
    and ``high`` (None: unbounded), each bound open or closed; ``optional``: None is accepted too
    (the option is off, or chosen automatically); ``pair``: two such numbers, ``min <= max``."""
    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    pair: bool = False
    help: str = ''

    def span(self) -> str:
        """``'>= 1'``, ``'in [0, 1)'``, ``'> 0'`` ..."""
        if self.low is not None and self.high is not None:
            return f'in {"(" if self.low_open else "["}{_num(self.low)}, {_num(self.high)}{")" if self.high_open else "]"}'
        if self.low is not None:
            return f'{">" if self.low_open else ">="} {_num(self.low)}'
        if self.high is not None:
            return f'{"<" if self.high_open else "<="} {_num(self.high)}'
        return 'finite'

    def describe(self) -> str:
        """``'an integer >= 1'``, ``'a number in [0, 1)'``, ``'two numbers MIN MAX, each in (0, 1], MIN <= MAX'`` ..."""
        if self.pair:
            text = f'two numbers MIN MAX, each {self.span()}, MIN <= MAX'
        else:
            text = f'{"an integer" if self.kind is int else "a number"} {self.span()}'
        return text + (', or unset' if self.optional else '')

    def problem(self, value: Any) -> Optional[str]:
        """None when ``value`` is accepted, else what is wrong with it."""
        if value is None:
            return None if self.optional else 'it must be set'
        if self.pair:
            if isinstance(value, (str, bytes)) or not hasattr(value, '__len__') or len(value) != 2:
                return 'it must be two numbers'
            inner = Range(self.kind, self.low, self.high, self.low_open, self.high_open)
            return next((p for p in map(inner.problem, value) if p), None) or (
                None if value[0] <= value[1] else 'MIN is larger than MAX')
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return 'it is not an integer' if self.kind is int else 'it is not a number'
        if not math.isfinite(value):
            return 'it is not finite'
        low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return 'it is out of range' if low_bad or high_bad else None


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f'{v:g}'


_P = dict(low=0.0, high=1.0)  # a probability
RANGES: Dict[str, Range] = {
    # model
    'img_size': Range(int, 1, optional=True, help='train at this image size (at least the patch size); the window '
                                                  'spec is resized to match'),
    'drop_path': Range(float, 0.0, 1.0, high_open=True, optional=True, help='stochastic depth rate'),
    # optimisation
    'epochs': Range(int, 1, help='training epochs'),
    'batch_size': Range(int, 1, help='images per step, per process'),
    'lr': Range(float, 0.0, low_open=True, help='peak learning rate'),
    'weight_decay': Range(float, 0.0, help='weight decay'),
    'momentum': Range(float, 0.0, 1.0, high_open=True, help='momentum (SGD-style optimizers; Adam beta1 is separate)'),
    'layer_decay': Range(float, 0.0, 1.0, low_open=True, optional=True,
                         help='layer-wise learning-rate decay, e.g. 0.75 (unset: off)'),
    'clip_grad': Range(float, 0.0, optional=True, help='clip the gradient norm to this value (unset or 0: off)'),
    'warmup_epochs': Range(int, 0, help='epochs of linear warm-up from --warmup-lr'),
    'warmup_lr': Range(float, 0.0, help='learning rate at the start of the warm-up'),
    'min_lr': Range(float, 0.0, help='learning rate at the end of the schedule'),
    'smoothing': Range(float, 0.0, 1.0, high_open=True, help='label smoothing'),
    'mixup': Range(float, 0.0, help='mixup alpha (0: off)'),
    'cutmix': Range(float, 0.0, help='cutmix alpha (0: off)'),
    'mixup_prob': Range(float, **_P, help='probability of mixup or cutmix per batch'),
    'ema_decay': Range(float, 0.0, 1.0, high_open=True, help='decay of the weights\' moving average (with --ema)'),
    # data
    'scale': Range(float, 0.0, 1.0, low_open=True, pair=True, help='random-resized-crop area range'),
    'hflip': Range(float, **_P, help='horizontal flip probability'),
    'color_jitter': Range(float, 0.0, help='colour jitter strength (0: off)'),
    'reprob': Range(float, **_P, help='random erasing probability'),
    'workers': Range(int, 0, help='data loader processes (0: load in the training process)'),
    'limit_train_batches': Range(int, 1, optional=True, help='at most this many steps per epoch'),
    'limit_val_batches': Range(int, 1, optional=True, help='at most this many validation batches'),
    # run
    'seed': Range(int, 0, 2 ** 31 - 1, help='seed of weights, sample order and augmentation'),
    'checkpoint_every': Range(int, 0, help='also checkpoint every N steps (0: at epoch ends only)'),
    'keep_last': Range(int, 1, help='checkpoints to keep'),
    'log_interval': Range(int, 1, help='steps between metrics lines'),
    'threads': Range(int, 1, optional=True, help='torch CPU threads per process (unset: torch\'s default)'),
}


def flag(name: str) -> str:
    """The command-line flag of an option: ``batch_size`` -> ``--batch-size``."""
    return '--' + name.replace('_', '-')


def check_ranges(config: Any, ranges: Optional[Dict[str, Range]] = None, error: type = ValueError,
                 cli: bool = False) -> None:
    """``error`` naming the first option of ``config`` (an object with these attributes; default table
    :data:`RANGES`) outside its range, the value and what is accepted; ``cli``: the message starts
    with the flag (``--batch-size must be >= 1, got 0``) instead of the option's name.  A list value of
    a range that is not a pair (``nargs='+'``) is checked item by item."""
    for name, rng in (RANGES if ranges is None else ranges).items():
        value = getattr(config, name)
        if isinstance(value, list) and rng.pair:
            value = tuple(value)
        for v in (value if isinstance(value, list) else [value]):
            why = rng.problem(v)
            if why is None:
                continue
            shown = rng.span() if why in ('it is out of range', 'it is not finite') and not rng.pair else rng.describe()
            detail = '' if why == 'it is out of range' else f'; {why}'
            if shown == rng.describe():  # the message already says what is accepted: add only what is wrong
                tail = f' ({why})' if cli else f' ({flag(name)}: {why})'
            else:
                tail = f' ({rng.describe()}{detail})' if cli else f' (the {flag(name)} flag takes {rng.describe()}{detail})'
            raise error(f'{flag(name) if cli else name} must be {shown}, got {v!r}{tail}')


def flag_help(name: str) -> str:
    """The ``--help`` text of a flag: what it does, and its valid range from the table."""
    rng = RANGES[name]
    return f'{rng.help} ({rng.describe()}' + (')' if rng.optional else '; default: %(default)s)')


def markdown_table() -> str:
    """The README's table of every numeric ``vitfree finetune`` flag and its valid values."""
    rows: List[str] = ['| flag | valid values | what it sets |', '|---|---|---|']
    for name, rng in RANGES.items():
        rows.append(f'| `{flag(name)}` | {rng.describe()} | {rng.help} |')
    return '\n'.join(rows) + '\n'


@dataclass
class FinetuneConfig:
    """Every option of a fine-tuning run (the ``vitfree finetune`` flags, same names)."""
    model: str
    data: str
    output: str = 'vitfree-finetune'
    # model
    pretrained: bool = False
    windows: Optional[str] = None
    window_resize: Optional[str] = None  # 'scale' (the model's default) or 'keep'; see WindowSpec.resize
    img_size: Optional[int] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    drop_path: Optional[float] = None
    attn_backend: Optional[str] = None
    grad_checkpointing: bool = False
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    opt: str = 'adamw'
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: Optional[float] = None
    clip_grad: Optional[float] = None
    sched: str = 'cosine'
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    ema: bool = False
    ema_decay: float = 0.9998
    amp: Optional[str] = None
    # data
    no_aug: bool = False
    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: Optional[str] = None
    reprob: float = 0.0
    workers: int = 2
    verify_images: bool = True
    limit_train_batches: Optional[int] = None
    limit_val_batches: Optional[int] = None
    # run
    seed: int = 0
    device: Optional[str] = None
    checkpoint_every: int = 0
    keep_last: int = 3
    resume: Union[bool, str] = False
    log_interval: int = 10
    progress: bool = True
    export: bool = True
    threads: Optional[int] = None
    deterministic: bool = False
    strict: bool = False
    allow_changed: bool = False
    overwrite: bool = False

    def check(self) -> None:
        """Raise ``ValueError`` naming the first option that cannot work; warn about ones that work badly."""
        if self.resume and self.overwrite:
            raise ValueError('resume and overwrite exclude each other: resume continues the run in the output folder, '
                             'overwrite replaces it')
        check_ranges(self)  # every numeric option against its range (RANGES)
        if self.amp is not None and self.amp not in AMP_NAMES:
            raise ValueError(f'amp must be one of {sorted(AMP_NAMES)} or None, got {self.amp!r}')
        from ..ops import list_backends
        from ..windows import RESIZE_MODES
        from .distributed import check_device
        for name, choices in (('window_resize', RESIZE_MODES), ('attn_backend', tuple(list_backends()))):
            value = getattr(self, name)
            if value is not None and str(value).strip().lower() not in choices:
                raise ValueError(f'{name} ({flag(name)}) must be one of {", ".join(choices)}, got {value!r}')
        check_device(self.device)
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            warnings.warn(f'warmup_epochs={self.warmup_epochs} is not shorter than epochs={self.epochs}: the whole run '
                          f'is spent warming up and the learning rate never reaches lr={self.lr:g}', UserWarning,
                          stacklevel=3)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d['scale'] = list(self.scale)
        return d


if __name__ == '__main__':
    print(markdown_table(), end='')
