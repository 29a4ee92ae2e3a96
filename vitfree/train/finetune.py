"""Fine-tune a WinfT (or any timm ViT turned into one) on an image classification data set.

``finetune(model='winft_tiny_patch16_224', data='digits', img_size=32, epochs=3)`` runs the
whole job: data (``vitfree.data``), timm's transforms, optimizer (with layer-wise learning-rate
decay), scheduler, label smoothing, mixup/cutmix and model EMA; mixed precision; gradient
checkpointing; a progress bar; metrics as JSON lines; top-1/top-5 on the validation split after
every epoch; atomic checkpoints every N steps and at every epoch end; exact resume; and under
``torchrun`` DistributedDataParallel with only rank 0 writing.  The fine-tuned model is exported
to ``OUTPUT/model`` with :func:`vitfree.hub.save_pretrained` (window spec in ``config.json``).

Determinism: sample order depends only on ``(seed, epoch)`` and each sample's augmentation only
on ``(seed, epoch, index)``, and checkpoints hold every generator's state, so a run resumed
from a checkpoint reproduces the uninterrupted run's weights exactly on CPU.  ``batch_size``
is per process: ``P`` processes with batch ``B`` see the same samples per step as one process
with batch ``P * B``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import (INDEX_FILE, CheckpointError, CheckpointManager, load_checkpoint, named_os_errors, require,
                         rng_state, set_rng_state)
from .distributed import DistState, EpochSampler, ShardSampler, all_reduce_sum, barrier, init_distributed

__all__ = ['FinetuneConfig', 'FinetuneResult', 'finetune', 'create_finetune_model', 'evaluate']

_logger = logging.getLogger(__name__)
AMP_DTYPES = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16, 'float16': torch.float16}
# options that say how a run is carried out, not what it trains: they may differ on --resume
RUN_OPTIONS = frozenset({
    'output', 'resume', 'progress', 'log_interval', 'export', 'threads', 'workers', 'device', 'checkpoint_every',
    'keep_last', 'verify_images', 'strict', 'allow_changed', 'overwrite', 'deterministic', 'grad_checkpointing',
    'attn_backend'})
# what a run writes into its output folder, and whether each is a file or a folder
RUN_ENTRIES = {'metrics.jsonl': 'file', 'finetune_config.json': 'file', 'checkpoints': 'dir', 'model': 'dir',
               'model_ema': 'dir'}


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
        for name in ('lr', 'ema_decay', 'warmup_lr', 'min_lr'):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < float('inf'):
                raise ValueError(f'{name} must be a number >= 0, got {v!r}')
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f'amp must be one of {sorted(AMP_DTYPES)} or None, got {self.amp!r}')
        for name in ('epochs', 'batch_size', 'keep_last', 'log_interval'):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)!r}')
        for name in ('checkpoint_every', 'workers', 'warmup_epochs'):
            if int(getattr(self, name)) < 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)!r}')
        for name in ('limit_train_batches', 'limit_val_batches'):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f'{name} must be >= 1 or None, got {v!r}')
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f'layer_decay must be in (0, 1], got {self.layer_decay!r}')
        if not 0 <= self.smoothing < 1:
            raise ValueError(f'smoothing must be in [0, 1), got {self.smoothing!r}')
        if len(tuple(self.scale)) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f'scale must be (min, max) with 0 < min <= max <= 1, got {self.scale!r}')
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            warnings.warn(f'warmup_epochs={self.warmup_epochs} is not shorter than epochs={self.epochs}: the whole run '
                          f'is spent warming up and the learning rate never reaches lr={self.lr:g}', UserWarning,
                          stacklevel=3)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d['scale'] = list(self.scale)
        return d


@dataclass
class FinetuneResult:
    """What a run produced: the trained model (unwrapped), its EMA, per-epoch validation metrics."""
    model: nn.Module
    ema_model: Optional[nn.Module]
    metrics: List[Dict[str, Any]]
    global_step: int
    output: Path
    export: Optional[Path]
    classes: List[str]


# ---- building blocks ------------------------------------------------------------------------
def create_finetune_model(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """The model to fine-tune: a WinfT name, ``local-dir:``/``hf-hub:`` export, or a timm ViT/DeiT
    name (made into a WinfT with ``cfg.windows``)."""
    import timm
    from ..models import create_winft

    kwargs = dict(cfg.model_kwargs)
    kwargs.update(num_classes=num_classes)
    for key, value in (('img_size', cfg.img_size), ('drop_path_rate', cfg.drop_path),
                       ('attn_backend', cfg.attn_backend), ('windows', cfg.windows),
                       ('window_resize', cfg.window_resize)):
        if value is not None:
            kwargs[key] = value
    name = cfg.model
    source, _, rest = name.partition(':')
    arch = name.split('.')[0]
    if (source in ('local-dir', 'hf-hub') and rest) or arch.startswith(('winft_', 'vitfree_winft')):
        model = timm.create_model(name, pretrained=cfg.pretrained, **kwargs)
    elif timm.is_model(arch):
        kwargs.pop('windows', None)
        model = create_winft(name, windows=cfg.windows, pretrained=cfg.pretrained, **kwargs)
    else:
        raise ValueError(f'unknown model {name!r}: give a WinfT name ({", ".join(timm.list_models("winft_*"))}), '
                         f'a timm ViT/DeiT name (vit_small_patch16_224, ...), local-dir:PATH or hf-hub:ORG/NAME')
    if not hasattr(model, 'window_spec'):
        raise ValueError(f'{name!r} built a {type(model).__name__}, not a WinfT')
    return model


def _data_config(model: nn.Module) -> Dict[str, Any]:
    try:  # timm >= 1.0.2x: respects the model's current img_size
        from timm.data.model_config import resolve_input_data_config
        return resolve_input_data_config(model)
    except ImportError:
        from timm.data import resolve_data_config
        return resolve_data_config({'input_size': (3, *model.patch_embed.img_size)}, model=model)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(device: torch.device, amp: Optional[str]):
    if amp is None:
        return contextlib.nullcontext()
    dtype = AMP_DTYPES[amp]
    if device.type == 'cpu' and dtype == torch.float16:
        raise ValueError('fp16 autocast is not supported on CPU; use --amp bf16 (or run on CUDA)')
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        device: torch.device,
        amp: Optional[str] = None,
        limit: Optional[int] = None,
) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (in %) over the loader, summed across processes."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(y.view(-1, 1))
        sums += torch.stack([
            nn.functional.cross_entropy(out, y, reduction='sum').double(),
            hit[:, :1].any(1).sum().double(), hit.any(1).sum().double(),
            torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    all_reduce_sum(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {'loss': sums[0].item() / n, 'top1': 100.0 * sums[1].item() / n, 'top5': 100.0 * sums[2].item() / n,
            'count': int(sums[3].item())}


class _JsonLines:
    """Append-only metrics file (rank 0); on resume, records after the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, global_step: Optional[int]) -> None:
        """Drop records after ``global_step`` (all of them for ``None``: a run that starts from scratch)."""
        if not self.enabled or not self.path.is_file():
            return
        if global_step is None:
            with named_os_errors(self.path):
                self.path.write_text('')
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the crash
            if rec.get('step', 0) <= global_step:
                keep.append(line)
        with named_os_errors(self.path):
            self.path.write_text(''.join(k + '\n' for k in keep))

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record.setdefault('time', round(time.time(), 3))
        with named_os_errors(self.path), open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- the run -----------------------------------------------------------------------------
def finetune(
        config: Optional[FinetuneConfig] = None,
        *,
        on_step: Optional[Callable[[int], None]] = None,
        **options: Any,
) -> FinetuneResult:
    """Fine-tune; see :class:`FinetuneConfig` for the options (pass a config or keywords).

    ``on_step(global_step)`` is called after every optimizer step (after any checkpoint of that
    step is written); raising from it stops the run as a crash would.
    """
    if config is None:
        config = FinetuneConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    cfg = config
    cfg.check()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
    ds = init_distributed(cfg.device)
    try:
        return _run(cfg, ds, on_step)
    finally:
        ds.close()
        torch.set_num_threads(threads)


def _run(cfg: FinetuneConfig, ds: DistState, on_step: Optional[Callable[[int], None]]) -> FinetuneResult:
    from timm.data import Mixup, create_transform
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    from ..data import TransformDataset, build_dataset

    device = ds.device
    out_dir = Path(cfg.output)
    ckpt_dir = out_dir / 'checkpoints'
    previous = _check_output(cfg, out_dir)  # before any work; nothing is created until data and model are ready

    # data first: a bad folder fails here, before anything is written
    train_base = build_dataset(cfg.data, 'train', verify=cfg.verify_images, strict=cfg.strict)
    classes = list(train_base.classes)
    val_base = build_dataset(cfg.data, 'val', classes=classes, verify=cfg.verify_images, strict=cfg.strict)

    _seed_all(cfg.seed)  # same initial weights on every process
    model = create_finetune_model(cfg, len(classes))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    dc = _data_config(model)
    train_tf = create_transform(
        **dc, is_training=True, no_aug=cfg.no_aug, scale=tuple(cfg.scale), hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment, re_prob=cfg.reprob)
    val_tf = create_transform(**dc, is_training=False)
    train_ds = TransformDataset(train_base, train_tf, seed=cfg.seed)
    val_ds = TransformDataset(val_base, val_tf, seed=cfg.seed)

    sampler = EpochSampler(len(train_ds), ds.world_size, ds.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = sampler.num_samples // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f'batch size {cfg.batch_size} (per process) is larger than the {sampler.num_samples} '
                         f'training images each of the {ds.world_size} process(es) gets; lower --batch-size')
    if cfg.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, int(cfg.limit_train_batches))
    loader_gen = torch.Generator()  # keeps the loader off the global RNG (exact resume)
    pin = device.type == 'cuda'
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=True,
        pin_memory=pin, generator=loader_gen)
    val_loader = torch.utils.data.DataLoader(
        val_ds, batch_size=cfg.batch_size, sampler=ShardSampler(len(val_ds), ds.world_size, ds.rank),
        num_workers=cfg.workers, pin_memory=pin)

    optimizer = create_optimizer_v2(
        model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        layer_decay=cfg.layer_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=cfg.sched == 'plateau',
        updates_per_epoch=steps_per_epoch)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    scaler = None
    if cfg.amp in ('fp16', 'float16') and device.type == 'cuda':
        scaler = torch.amp.GradScaler('cuda')
    _autocast(device, cfg.amp)  # fail early on fp16 + CPU

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                         label_smoothing=cfg.smoothing, num_classes=len(classes))
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    # ---- resume -------------------------------------------------------------------------
    manager = CheckpointManager(ckpt_dir, keep_last=cfg.keep_last)
    start_epoch, start_batch, global_step, best_top1 = 0, 0, 0, None
    resume_loss: Optional[Tuple[float, int]] = None
    history: List[Dict[str, Any]] = []
    config_changes: List[Dict[str, Any]] = []
    changes: Dict[str, Tuple[Any, Any]] = {}
    metrics_log = _JsonLines(out_dir / 'metrics.jsonl', ds.is_main)
    resumed_from = None
    if cfg.resume:
        found = _find_resume(cfg.resume, manager, ds)
        if found is not None:
            resumed_from, state = found
            changes = changed_flags(state['config'], cfg)
            if changes and not cfg.allow_changed:
                raise ValueError(
                    f'{resumed_from} was written with other training flags, and resuming would silently mix two '
                    f'runs:\n' + ''.join(f'    {_flag(k)}: {old!r} in the checkpoint, {new!r} now\n'
                                         for k, (old, new) in changes.items())
                    + 'pass the checkpoint\'s values to resume, or --allow-changed to continue with the new ones '
                      '(the change is recorded in metrics.jsonl and the checkpoints)')
            prog = state['progress']
            if prog['steps_per_epoch'] != steps_per_epoch:
                raise CheckpointError(
                    f'{resumed_from} was written with {prog["steps_per_epoch"]} steps per epoch, this run has '
                    f'{steps_per_epoch} (batch size, data set or number of processes changed): cannot resume exactly')
            _restore(state, model, optimizer, scheduler, ema, scaler, ds, resumed_from, changes)
            start_epoch, start_batch = prog['epoch'], prog['batch']
            global_step, best_top1 = prog['global_step'], prog.get('best_top1')
            if prog.get('loss_n') is not None:
                resume_loss = (float(prog['loss_sum']), int(prog['loss_n']))
            history = list(state['history'])
            config_changes = list(state.get('config_changes') or [])
            if changes:
                config_changes.append({'step': global_step, 'checkpoint': resumed_from.name,
                                       'changed': {k: [old, new] for k, (old, new) in changes.items()}})
                if ds.is_main:
                    _logger.warning(f'resuming {resumed_from} with changed training flags (--allow-changed): '
                                    + ', '.join(f'{_flag(k)} {old!r} -> {new!r}' for k, (old, new) in changes.items()))
            if ds.is_main:
                _logger.info(f'resumed from {resumed_from} (epoch {start_epoch}, step {global_step})')
        elif ds.is_main:
            _logger.info(f'no checkpoint in {ckpt_dir}: starting from scratch')
    if ds.is_main:
        _start_output(out_dir, previous, cfg)
        manager.clean_temporary()
        metrics_log.truncate_after(global_step if resumed_from is not None else None)
        with named_os_errors(out_dir / 'finetune_config.json'):
            (out_dir / 'finetune_config.json').write_text(json.dumps(cfg.to_dict(), indent=1) + '\n')
        if changes:
            metrics_log.write(event='config_change', step=global_step, checkpoint=str(resumed_from),
                              changed={k: [old, new] for k, (old, new) in changes.items()})
        if resumed_from is None:
            metrics_log.write(event='start', step=0, model=cfg.model, data=cfg.data, classes=len(classes),
                              train_images=len(train_ds), val_images=len(val_ds), world_size=ds.world_size,
                              input_size=list(dc['input_size']), window_spec=model.window_spec.provenance.get('kind'))

    # per-process RNG for dropout / drop-path / mixup, restored exactly on resume
    if resumed_from is None:
        _seed_all(cfg.seed + ds.rank)

    train_model: nn.Module = model
    if ds.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    def make_state(epoch: int, batch: int, loss: Tuple[float, int]) -> Dict[str, Any]:
        rng = rng_state()
        if ds.distributed:
            import torch.distributed as dist
            rngs: List[Any] = [None] * ds.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        state = {
            'model': model.state_dict(),
            'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(),
            'rng': rngs,
            'progress': {'epoch': epoch, 'batch': batch, 'global_step': global_step, 'best_top1': best_top1,
                         'steps_per_epoch': steps_per_epoch, 'world_size': ds.world_size,
                         'loss_sum': loss[0], 'loss_n': loss[1]},  # this epoch's train loss so far (rank 0's)
            'sampler': {'seed': cfg.seed, 'epoch': epoch, 'start': batch * cfg.batch_size},
            'history': history,
            'config': cfg.to_dict(),
        }
        if config_changes:
            state['config_changes'] = config_changes
        if ema is not None:
            state['ema'] = ema.module.state_dict()
        if scaler is not None:
            state['scaler'] = scaler.state_dict()
        return state

    def checkpoint(epoch: int, batch: int, epoch_end: bool, loss: Tuple[float, int]) -> None:
        state = make_state(epoch, batch, loss)  # collective in DDP: every rank takes part
        if ds.is_main:
            manager.save(state, global_step, epoch_end=epoch_end)
        barrier()

    # ---- loop ---------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        skip = start_batch if epoch == start_epoch else 0
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch, start=skip * cfg.batch_size)
        loader_gen.manual_seed(cfg.seed * 100_003 + epoch)
        train_model.train()
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f'epoch {epoch + 1}/{cfg.epochs}',
                   disable=not (cfg.progress and ds.is_main), dynamic_ncols=True, leave=True)
        t0, seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
        if skip and resume_loss is not None:  # the resumed epoch's train loss covers the whole epoch
            loss_sum, loss_n = resume_loss
        elif skip and ds.is_main:
            _logger.warning(f'{resumed_from} holds no partial train loss (written by an older vitfree): epoch '
                            f'{epoch + 1}\'s train loss covers only the steps after the resume')
        batch = skip
        for x, y in train_loader:
            if batch >= steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            with _autocast(device, cfg.amp):
                out = train_model(x)
                loss = criterion(out, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'loss is {loss.item()} at step {global_step + 1} (epoch {epoch + 1}); '
                                         f'lower --lr or use --amp bf16 instead of fp16')
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
            global_step += 1
            batch += 1
            if ema is not None:
                ema.update(model, step=global_step)
            scheduler.step_update(num_updates=global_step)

            loss_val = loss.item()
            loss_sum, loss_n = loss_sum + loss_val, loss_n + 1
            seen += x.shape[0] * ds.world_size
            ips = seen / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f'{loss_sum / loss_n:.4f}', img_s=f'{ips:.0f}', refresh=False)
            if global_step % cfg.log_interval == 0 or batch == steps_per_epoch:
                metrics_log.write(event='train', epoch=epoch + 1, step=global_step, loss=loss_val,
                                  loss_avg=loss_sum / loss_n, lr=optimizer.param_groups[0]['lr'], img_per_s=ips)
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                checkpoint(epoch, batch, epoch_end=False, loss=(loss_sum, loss_n))
            if on_step is not None:
                on_step(global_step)
        bar.close()
        train_time = time.perf_counter() - t0

        val = evaluate(train_model, val_loader, device, cfg.amp, cfg.limit_val_batches)
        record = {'epoch': epoch + 1, 'step': global_step, 'train_loss': loss_sum / max(loss_n, 1),
                  'val_loss': val['loss'], 'top1': val['top1'], 'top5': val['top5'], 'val_images': val['count'],
                  'train_time_s': train_time, 'img_per_s': seen / max(train_time, 1e-9) if seen else None}
        if ema is not None:
            ev = evaluate(ema.module, val_loader, device, cfg.amp, cfg.limit_val_batches)
            record.update(ema_top1=ev['top1'], ema_top5=ev['top5'], ema_val_loss=ev['loss'])
        best_top1 = val['top1'] if best_top1 is None else max(best_top1, val['top1'])
        history.append(record)
        metrics_log.write(event='val', **record)
        if ds.is_main:
            msg = (f'epoch {epoch + 1}/{cfg.epochs}: train loss {record["train_loss"]:.4f}, '
                   f'val loss {val["loss"]:.4f}, top-1 {val["top1"]:.2f}%, top-5 {val["top5"]:.2f}%')
            if ema is not None:
                msg += f', EMA top-1 {record["ema_top1"]:.2f}%'
            (tqdm.write if cfg.progress else _logger.info)(msg)
        scheduler.step(epoch + 1, val['top1'])
        checkpoint(epoch + 1, 0, epoch_end=True, loss=(0.0, 0))

    export = None
    if cfg.export and ds.is_main:
        from ..hub import save_pretrained
        card = {'dataset': str(cfg.data), 'epochs': cfg.epochs, 'metrics': history[-1] if history else None,
                'initialised_from': cfg.model if cfg.pretrained else None,
                'initialisation': None if cfg.pretrained else f'random (trained from scratch, seed {cfg.seed})',
                'changed_on_resume': '; '.join(f'step {c["step"]}: ' + ', '.join(
                    f'{k} {v[0]!r} -> {v[1]!r}' for k, v in c['changed'].items()) for c in config_changes) or None}
        export = save_pretrained(model, out_dir / 'model', label_names=classes, data_config=dc, training=card)
        if ema is not None:
            save_pretrained(ema.module, out_dir / 'model_ema', label_names=classes, data_config=dc,
                            training=dict(card, ema_decay=cfg.ema_decay))
    barrier()
    return FinetuneResult(model=model, ema_model=ema.module if ema is not None else None, metrics=history,
                          global_step=global_step, output=out_dir, export=export, classes=classes)


# ---- output folder -------------------------------------------------------------------------
def _check_output(cfg: FinetuneConfig, out_dir: Path) -> List[str]:
    """Check the output folder before any work: it is a folder (or can be made), what a run writes
    there has the right kind, and a folder that already holds a run is used only with ``resume``
    (continue it) or ``overwrite`` (replace it).  Returns the run entries already there."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'output {str(out_dir)!r} exists and is not a folder; choose another -o/--output')
    anchor = out_dir
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ValueError(f'output {str(out_dir)!r} cannot be created: {anchor} is a file')
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, 'not writable, so the run cannot be written there', str(anchor))
    found = []
    for name, kind in RUN_ENTRIES.items():
        p = out_dir / name
        if p.exists():
            if p.is_dir() != (kind == 'dir'):
                raise ValueError(f'{p} is a {"folder" if p.is_dir() else "file"}, but a run writes its {name} '
                                 f'{"folder" if kind == "dir" else "file"} there; move it away or choose another -o')
            found.append(name)
    if found and not cfg.resume and not cfg.overwrite:
        raise ValueError(f'output {str(out_dir)!r} already holds a run ({", ".join(found)}); pass --resume to continue '
                         f'it, --overwrite to replace it, or choose another -o/--output')
    return found


def _start_output(out_dir: Path, previous: List[str], cfg: FinetuneConfig) -> None:
    """Create the output folder (rank 0, once data and model are ready); with ``overwrite``, remove
    what the earlier run wrote there (and only that)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        for name in previous:
            p = out_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if previous:
            _logger.warning(f'--overwrite: removed the earlier run in {out_dir} ({", ".join(previous)})')


# ---- resume -----------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return name.upper() if name in ('model', 'data') else '--' + name.replace('_', '-')


def _same(old: Any, new: Any) -> bool:
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and (Path(old).exists() or Path(new).exists()):
        try:
            return Path(old).resolve() == Path(new).resolve()
        except OSError:
            return False
    return False


def changed_flags(saved: Mapping[str, Any], cfg: FinetuneConfig) -> Dict[str, Tuple[Any, Any]]:
    """Training flags of ``cfg`` that differ from the ``saved`` config of a checkpoint: ``{name: (old, new)}``.
    Options that do not change what is trained (:data:`RUN_OPTIONS`) and flags the checkpoint does
    not record (an older vitfree) are not compared."""
    new = json.loads(json.dumps(cfg.to_dict(), default=str))  # the form the checkpoint stored
    return {k: (saved[k], v) for k, v in new.items()
            if k not in RUN_OPTIONS and k in saved and not _same(saved[k], v)}


def check_training_state(path: Path, state: Any) -> None:
    """Check a fine-tuning checkpoint's state against its schema (types, ranges) and for internal
    consistency (step = epoch x steps per epoch + batch, sampler position, history, RNG states);
    :class:`CheckpointError` names the checkpoint and the field."""
    where = f'checkpoint {path}: {INDEX_FILE}'
    if not isinstance(state, Mapping):
        raise CheckpointError(f'{where}: the state must be an object, got {type(state).__name__}')
    for key, kind in (('model', 'dict'), ('optimizer', 'dict'), ('scheduler', 'dict'), ('rng', 'list'),
                      ('progress', 'dict'), ('sampler', 'dict'), ('history', 'list'), ('config', 'dict')):
        require(state, key, where, kind)
    require(state, 'optimizer.param_groups', where, 'list')
    require(state, 'optimizer.state', where, 'dict')
    epoch = require(state, 'progress.epoch', where, 'int', low=0)
    batch = require(state, 'progress.batch', where, 'int', low=0)
    step = require(state, 'progress.global_step', where, 'int', low=0)
    spe = require(state, 'progress.steps_per_epoch', where, 'int', low=1)
    world = require(state, 'progress.world_size', where, 'int', low=1)
    require(state, 'progress.best_top1', where, 'number', low=0, high=100, optional=True)
    loss_sum = require(state, 'progress.loss_sum', where, 'number', low=0, optional=True)
    loss_n = require(state, 'progress.loss_n', where, 'int', low=0, optional=True)
    epochs = require(state, 'config.epochs', where, 'int', low=1)
    batch_size = require(state, 'config.batch_size', where, 'int', low=1)
    seed = require(state, 'config.seed', where, 'int')
    if batch >= spe:
        raise CheckpointError(f'{where}: field progress.batch is {batch}, but an epoch has only '
                              f'progress.steps_per_epoch = {spe} steps')
    if step != epoch * spe + batch:
        raise CheckpointError(f'{where}: field progress.global_step is {step}, but progress.epoch {epoch} x '
                              f'steps_per_epoch {spe} + progress.batch {batch} = {epoch * spe + batch}; '
                              f'the file was edited or damaged')
    if epoch > epochs:
        raise CheckpointError(f'{where}: field progress.epoch is {epoch}, but the run has config.epochs = {epochs}')
    if (loss_sum is None) != (loss_n is None) or (loss_n is not None and loss_n > batch):
        raise CheckpointError(f'{where}: fields progress.loss_sum / progress.loss_n ({loss_sum!r} / {loss_n!r}) '
                              f'must both be given, with loss_n <= progress.batch = {batch}')
    for name, expected in (('sampler.epoch', epoch), ('sampler.start', batch * batch_size), ('sampler.seed', seed)):
        if require(state, name, where, 'int') != expected:
            raise CheckpointError(f'{where}: field {name} is {state["sampler"][name.split(".")[1]]!r}, but the '
                                  f'progress and config say {expected}')
    if len(state['rng']) != world:
        raise CheckpointError(f'{where}: field rng holds {len(state["rng"])} generator states for '
                              f'progress.world_size = {world} processes')
    for i, rng in enumerate(state['rng']):
        for key in ('python', 'numpy', 'torch'):
            require(rng, key, f'{where} (rng[{i}])')
    if len(state['history']) != epoch:
        raise CheckpointError(f'{where}: field history has {len(state["history"])} epoch records, but '
                              f'progress.epoch = {epoch} epochs are done')
    for i, rec in enumerate(state['history']):
        if require(rec, 'epoch', f'{where} (history[{i}])', 'int') != i + 1:
            raise CheckpointError(f'{where}: field history[{i}].epoch is {rec["epoch"]!r}, expected {i + 1}')


def _find_resume(resume: Union[bool, str], manager: CheckpointManager, ds: DistState):
    """Rank 0 picks the checkpoint (newest valid), every rank loads the same one.  A checkpoint that
    fails its checks (files, schema, consistency) is reported and the previous one is tried; one
    named explicitly must pass them."""
    path = None
    if ds.is_main:
        if isinstance(resume, (str, os.PathLike)) and not isinstance(resume, bool):
            p = Path(resume)
            if (p / 'state.json').is_file() or p.name.startswith('ckpt-'):
                check_training_state(p, load_checkpoint(p))  # raises a clear error when it is broken
                path = str(p)
            else:
                sub = p / 'checkpoints' if (p / 'checkpoints').is_dir() else p
                found = CheckpointManager(sub).load_latest(validate=check_training_state)
                path = str(found[0]) if found else None
                if found is None:
                    raise CheckpointError(f'--resume {resume}: no checkpoint found there')
        else:
            found = manager.load_latest(validate=check_training_state)
            path = str(found[0]) if found else None
    if ds.distributed:
        import torch.distributed as dist
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    if path is None:
        return None
    state = load_checkpoint(path)
    check_training_state(Path(path), state)
    return Path(path), state


OPTIMIZER_FLAGS = ('lr', 'weight_decay', 'momentum', 'layer_decay')
SCHEDULE_FLAGS = ('lr', 'epochs', 'sched', 'warmup_epochs', 'warmup_lr', 'min_lr')


def _restore(state: Dict[str, Any], model, optimizer, scheduler, ema, scaler, ds: DistState, path: Path,
             changes: Mapping[str, Any]) -> None:
    """Load a checkpoint into the run.  With changed flags (``allow_changed``), the new optimizer
    hyper-parameters and schedule take effect from here on; the optimizer's moments are kept unless
    the optimizer itself changed."""
    try:
        model.load_state_dict(state['model'])
    except RuntimeError as e:
        raise CheckpointError(f'{path}: its model weights do not fit the model of this run '
                              f'({str(e).splitlines()[0]} ...)') from None
    if 'opt' in changes:
        _logger.warning(f'--opt changed: the optimizer starts afresh (the state in {path.name} is for '
                        f'{changes["opt"][0]!r})')
    else:
        fresh = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(state['optimizer'])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f'{path}: its optimizer state does not fit this run ({e})') from None
        if any(k in changes for k in OPTIMIZER_FLAGS):
            for group, new in zip(optimizer.param_groups, fresh):
                group.update(new)
    if any(k in changes for k in SCHEDULE_FLAGS):
        scheduler.step_update(num_updates=int(state['progress']['global_step']))  # the new schedule, from here on
    else:
        scheduler.load_state_dict(state['scheduler'])
    if ema is not None:
        if 'ema' in state:
            ema.module.load_state_dict(state['ema'])
        else:
            _logger.warning('checkpoint has no EMA weights: EMA restarts from the current weights')
            ema.module.load_state_dict(state['model'])
    if scaler is not None and 'scaler' in state:
        scaler.load_state_dict(state['scaler'])
    rngs = state['rng']
    if len(rngs) == ds.world_size:
        set_rng_state(rngs[ds.rank])
    else:
        _logger.warning(f'checkpoint was written by {len(rngs)} process(es), this run has {ds.world_size}: '
                        f'random generators restart from the seed (the run stays valid but is not bit-identical)')
        _seed_all(int(state['config'].get('seed', 0)) + ds.rank + 7919 * int(state['progress']['global_step']))
