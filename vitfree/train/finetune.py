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
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import (INDEX_FILE, CheckpointError, CheckpointManager, load_checkpoint, named_os_errors, require,
                         rng_state, set_rng_state)
from .distributed import DistState, EpochSampler, ShardSampler, all_reduce_sum, barrier, init_distributed
from .options import AMP_NAMES, FinetuneConfig, flag

__all__ = ['FinetuneConfig', 'FinetuneResult', 'finetune', 'create_finetune_model', 'evaluate']

_logger = logging.getLogger(__name__)
AMP_DTYPES = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16, 'float16': torch.float16}
assert set(AMP_DTYPES) == set(AMP_NAMES)
# options that say how a run is carried out, not what it trains: they may differ on --resume
RUN_OPTIONS = frozenset({
    'output', 'resume', 'progress', 'log_interval', 'export', 'threads', 'workers', 'device', 'checkpoint_every',
    'keep_last', 'verify_images', 'strict', 'allow_changed', 'overwrite', 'deterministic', 'grad_checkpointing',
    'attn_backend'})
# what a run writes into its output folder, and whether each is a file or a folder
RUN_ENTRIES = {'metrics.jsonl': 'file', 'finetune_config.json': 'file', 'checkpoints': 'dir', 'model': 'dir',
               'model_ema': 'dir'}


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
    """timm's data config at the model's own input size: models that take any size (SAM, DINOv3) would
    otherwise get their pretrained config's size, not the ``img_size`` they were built with."""
    size = (int(model.patch_embed.proj.in_channels), *(int(s) for s in model.patch_embed.img_size))
    try:  # timm >= 1.0.2x: respects the model's current img_size
        from timm.data.model_config import resolve_input_data_config
        return resolve_input_data_config(model, args={'input_size': size})
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
    step is written); raising from it stops the run as a crash would.  A new run that fails before
    its first checkpoint removes what it wrote, so the corrected command can run in the same folder.
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


@dataclass
class _Run:
    """One fine-tuning run while it trains: what the steps below build (data, model, optimisation,
    output) and where it stands (the progress a checkpoint stores and a resume restores)."""
    cfg: FinetuneConfig
    ds: DistState
    out_dir: Path
    # data and model
    classes: List[str] = field(default_factory=list)
    model: Optional[nn.Module] = None
    train_model: Optional[nn.Module] = None  # the model, or its DistributedDataParallel wrapper
    data_config: Dict[str, Any] = field(default_factory=dict)
    windows_sha256: Optional[str] = None
    train_ds: Any = None  # vitfree.data.TransformDataset, train and val
    val_ds: Any = None
    sampler: Optional[EpochSampler] = None
    train_loader: Optional[torch.utils.data.DataLoader] = None
    val_loader: Optional[torch.utils.data.DataLoader] = None
    loader_gen: Optional[torch.Generator] = None
    steps_per_epoch: int = 0
    # optimisation (timm's optimizer, scheduler, ModelEmaV3, Mixup)
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None
    ema: Any = None
    scaler: Optional[torch.amp.GradScaler] = None
    criterion: Optional[nn.Module] = None
    mixup_fn: Optional[Callable] = None
    # output and progress
    manager: Optional[CheckpointManager] = None
    metrics_log: Optional[_JsonLines] = None
    start_epoch: int = 0
    start_batch: int = 0
    global_step: int = 0
    best_top1: Optional[float] = None
    resume_loss: Optional[Tuple[float, int]] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    config_changes: List[Dict[str, Any]] = field(default_factory=list)
    changes: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)
    resumed_from: Optional[Path] = None
    saved: bool = False  # this run has written a checkpoint

    @property
    def device(self) -> torch.device:
        return self.ds.device


def _run(cfg: FinetuneConfig, ds: DistState, on_step: Optional[Callable[[int], None]]) -> FinetuneResult:
    run = _Run(cfg, ds, Path(cfg.output))
    previous = _check_output(cfg, run.out_dir)  # before any work; nothing is created until data and model are ready
    train_base, val_base = _build_data(cfg)  # data first: a bad folder fails here, before anything is written
    run.classes = list(train_base.classes)
    _build_model(run)
    _build_loaders(run, train_base, val_base)
    _build_optimization(run)
    _resume(run)
    created = _start(run, previous)
    try:
        if run.resumed_from is None:  # per-process RNG for dropout / drop-path / mixup, restored exactly on resume
            _seed_all(cfg.seed + ds.rank)
        run.train_model = run.model
        if ds.distributed:
            run.train_model = nn.parallel.DistributedDataParallel(
                run.model, device_ids=[run.device.index] if run.device.type == 'cuda' else None)
        for epoch in range(run.start_epoch, cfg.epochs):
            _train_epoch(run, epoch, on_step)
        export = _export(run)
    except BaseException:
        if ds.is_main and not run.saved and run.resumed_from is None:
            _remove_created(run.out_dir, created)
        raise
    barrier()
    return FinetuneResult(model=run.model, ema_model=run.ema.module if run.ema is not None else None,
                          metrics=run.history, global_step=run.global_step, output=run.out_dir, export=export,
                          classes=run.classes)


# ---- the steps -------------------------------------------------------------------------------
def _build_data(cfg: FinetuneConfig):
    from ..data import build_dataset
    train_base = build_dataset(cfg.data, 'train', verify=cfg.verify_images, strict=cfg.strict)
    val_base = build_dataset(cfg.data, 'val', classes=list(train_base.classes), verify=cfg.verify_images,
                             strict=cfg.strict)
    return train_base, val_base


def _build_model(run: _Run) -> None:
    cfg = run.cfg
    _seed_all(cfg.seed)  # same initial weights on every process
    model = create_finetune_model(cfg, len(run.classes))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(run.device)
    run.model, run.data_config = model, _data_config(model)
    run.windows_sha256 = windows_digest(model.window_spec)


def _build_loaders(run: _Run, train_base: Any, val_base: Any) -> None:
    from timm.data import create_transform

    from ..data import TransformDataset
    cfg, ds, dc = run.cfg, run.ds, run.data_config
    with _timm_option('auto_augment', cfg.auto_augment, 'a timm auto-augment policy such as rand-m9-mstd0.5, '
                                                          'augmix-m5-w3 or original'):
        train_tf = create_transform(
            **dc, is_training=True, no_aug=cfg.no_aug, scale=tuple(cfg.scale), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment, re_prob=cfg.reprob)
    val_tf = create_transform(**dc, is_training=False)
    run.train_ds = TransformDataset(train_base, train_tf, seed=cfg.seed)
    run.val_ds = TransformDataset(val_base, val_tf, seed=cfg.seed)
    run.sampler = EpochSampler(len(run.train_ds), ds.world_size, ds.rank, shuffle=True, seed=cfg.seed)
    run.steps_per_epoch = run.sampler.num_samples // cfg.batch_size
    if run.steps_per_epoch == 0:
        raise ValueError(f'batch size {cfg.batch_size} (per process) is larger than the {run.sampler.num_samples} '
                         f'training images each of the {ds.world_size} process(es) gets; lower --batch-size')
    if cfg.limit_train_batches:
        run.steps_per_epoch = min(run.steps_per_epoch, int(cfg.limit_train_batches))
    run.loader_gen = torch.Generator()  # keeps the loader off the global RNG (exact resume)
    pin = run.device.type == 'cuda'
    run.train_loader = torch.utils.data.DataLoader(
        run.train_ds, batch_size=cfg.batch_size, sampler=run.sampler, num_workers=cfg.workers, drop_last=True,
        pin_memory=pin, generator=run.loader_gen)
    run.val_loader = torch.utils.data.DataLoader(
        run.val_ds, batch_size=cfg.batch_size, sampler=ShardSampler(len(run.val_ds), ds.world_size, ds.rank),
        num_workers=cfg.workers, pin_memory=pin)


def _build_optimization(run: _Run) -> None:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2, list_optimizers
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    cfg, device = run.cfg, run.device
    with _timm_option('opt', cfg.opt, f'a timm optimizer name such as {", ".join(list_optimizers()[:6])} '
                                      f'(all: timm.optim.list_optimizers())'):
        run.optimizer = create_optimizer_v2(
            run.model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            layer_decay=cfg.layer_decay)
    with _timm_option('sched', cfg.sched, 'a timm scheduler name: cosine, tanh, step, multistep, plateau or poly'):
        run.scheduler, _ = create_scheduler_v2(
            run.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=cfg.sched == 'plateau',
            updates_per_epoch=run.steps_per_epoch)
    run.ema = ModelEmaV3(run.model, decay=cfg.ema_decay) if cfg.ema else None
    if cfg.amp in ('fp16', 'float16') and device.type == 'cuda':
        run.scaler = torch.amp.GradScaler('cuda')
    _autocast(device, cfg.amp)  # fail early on fp16 + CPU
    if cfg.mixup > 0 or cfg.cutmix > 0:
        run.mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                             label_smoothing=cfg.smoothing, num_classes=len(run.classes))
        run.criterion = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        run.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        run.criterion = nn.CrossEntropyLoss()


@contextlib.contextmanager
def _timm_option(name: str, value: Any, accepted: str):
    """A value timm refuses (with an assert or a bare message) as one ``ValueError`` naming the flag."""
    try:
        yield
    except (AssertionError, ValueError, KeyError, RuntimeError) as e:
        if value is None or str(value) not in str(e):  # about something else: not this option's fault
            raise
        raise ValueError(f'{name} {value!r} ({flag(name)}) is not accepted: {str(e).strip() or type(e).__name__}; '
                         f'give {accepted}') from None


def _resume(run: _Run) -> None:
    """With ``resume``: find the checkpoint, refuse (or, with ``allow_changed``, record) changed
    training flags, and restore everything from it."""
    cfg, ds = run.cfg, run.ds
    run.manager = CheckpointManager(run.out_dir / 'checkpoints', keep_last=cfg.keep_last)
    run.metrics_log = _JsonLines(run.out_dir / 'metrics.jsonl', ds.is_main)
    if not cfg.resume:
        return
    found = _find_resume(cfg.resume, run.manager, ds)
    if found is None:
        if ds.is_main:
            _logger.info(f'no checkpoint in {run.manager.dir}: starting from scratch')
        return
    path, state = found
    changes = changed_flags(state['config'], cfg, run.windows_sha256)
    if changes and not cfg.allow_changed:
        raise ValueError(
            f'{path} was written with other training flags, and resuming would silently mix two runs:\n'
            + ''.join(f'    {_flag(k)}: {old!r} in the checkpoint, {new!r} now\n' for k, (old, new) in changes.items())
            + 'pass the checkpoint\'s values to resume, or --allow-changed to continue with the new ones '
              '(the change is recorded in metrics.jsonl and the checkpoints)')
    prog = state['progress']
    if prog['steps_per_epoch'] != run.steps_per_epoch:
        raise CheckpointError(
            f'{path} was written with {prog["steps_per_epoch"]} steps per epoch, this run has '
            f'{run.steps_per_epoch} (batch size, data set or number of processes changed): cannot resume exactly')
    _restore(state, run.model, run.optimizer, run.scheduler, run.ema, run.scaler, ds, path, changes)
    run.resumed_from, run.changes = path, changes
    run.start_epoch, run.start_batch = prog['epoch'], prog['batch']
    run.global_step, run.best_top1 = prog['global_step'], prog.get('best_top1')
    if prog.get('loss_n') is not None:
        run.resume_loss = (float(prog['loss_sum']), int(prog['loss_n']))
    run.history = list(state['history'])
    run.config_changes = list(state.get('config_changes') or [])
    if changes:
        run.config_changes.append({'step': run.global_step, 'checkpoint': path.name,
                                   'changed': {k: [old, new] for k, (old, new) in changes.items()}})
        if ds.is_main:
            _logger.warning(f'resuming {path} with changed training flags (--allow-changed): '
                            + ', '.join(f'{_flag(k)} {old!r} -> {new!r}' for k, (old, new) in changes.items()))
    if ds.is_main:
        _logger.info(f'resumed from {path} (epoch {run.start_epoch}, step {run.global_step})')


def _start(run: _Run, previous: List[str]) -> Optional[Tuple[bool, List[str]]]:
    """Rank 0 creates the output folder and starts its records; returns what existed before (whether
    the folder did, and the run entries in it that this run keeps), for :func:`_remove_created`."""
    cfg, ds = run.cfg, run.ds
    if not ds.is_main:
        return None
    existed = run.out_dir.exists()
    kept = [] if cfg.overwrite and not cfg.resume else list(previous)
    _start_output(run.out_dir, previous, cfg)
    run.manager.clean_temporary()
    run.metrics_log.truncate_after(run.global_step if run.resumed_from is not None else None)
    with named_os_errors(run.out_dir / 'finetune_config.json'):
        (run.out_dir / 'finetune_config.json').write_text(json.dumps(_saved_config(run), indent=1) + '\n')
    if run.changes:
        run.metrics_log.write(event='config_change', step=run.global_step, checkpoint=str(run.resumed_from),
                              changed={k: [old, new] for k, (old, new) in run.changes.items()})
    if run.resumed_from is None:
        run.metrics_log.write(
            event='start', step=0, model=cfg.model, data=cfg.data, classes=len(run.classes),
            train_images=len(run.train_ds), val_images=len(run.val_ds), world_size=ds.world_size,
            input_size=list(run.data_config['input_size']), window_spec=run.model.window_spec.provenance.get('kind'))
    return existed, kept


def _remove_created(out_dir: Path, created: Optional[Tuple[bool, List[str]]]) -> None:
    """After a new run failed before its first checkpoint: remove the run entries it wrote (and the
    output folder when this run made it and nothing else is in it), so they block no corrected run."""
    if created is None:
        return
    existed, kept = created
    try:
        for name in RUN_ENTRIES:
            p = out_dir / name
            if name not in kept and (p.exists() or p.is_symlink()):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
    except OSError as e:  # cleaning up must not hide the real error
        _logger.warning(f'could not remove what the failed run wrote in {out_dir}: {e}')


def _saved_config(run: _Run) -> Dict[str, Any]:
    """The run's flags as checkpoints and ``finetune_config.json`` record them, with the SHA-256 of
    the windows the model trains with (so a resume notices an edited spec file)."""
    return dict(run.cfg.to_dict(), windows_sha256=run.windows_sha256)


def _make_state(run: _Run, epoch: int, batch: int, loss: Tuple[float, int]) -> Dict[str, Any]:
    ds = run.ds
    rng = rng_state()
    if ds.distributed:
        import torch.distributed as dist
        rngs: List[Any] = [None] * ds.world_size
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    state = {
        'model': run.model.state_dict(),
        'optimizer': run.optimizer.state_dict(),
        'scheduler': run.scheduler.state_dict(),
        'rng': rngs,
        'progress': {'epoch': epoch, 'batch': batch, 'global_step': run.global_step, 'best_top1': run.best_top1,
                     'steps_per_epoch': run.steps_per_epoch, 'world_size': ds.world_size,
                     'loss_sum': loss[0], 'loss_n': loss[1]},  # this epoch's train loss so far (rank 0's)
        'sampler': {'seed': run.cfg.seed, 'epoch': epoch, 'start': batch * run.cfg.batch_size},
        'history': run.history,
        'config': _saved_config(run),
    }
    if run.config_changes:
        state['config_changes'] = run.config_changes
    if run.ema is not None:
        state['ema'] = run.ema.module.state_dict()
    if run.scaler is not None:
        state['scaler'] = run.scaler.state_dict()
    return state


def _checkpoint(run: _Run, epoch: int, batch: int, epoch_end: bool, loss: Tuple[float, int]) -> None:
    state = _make_state(run, epoch, batch, loss)  # collective in DDP: every rank takes part
    if run.ds.is_main:
        run.manager.save(state, run.global_step, epoch_end=epoch_end)
    run.saved = True
    barrier()


def _train_epoch(run: _Run, epoch: int, on_step: Optional[Callable[[int], None]]) -> None:
    """One epoch (from the resume point when it is the resumed one), its evaluation and its checkpoint."""
    from tqdm import tqdm
    cfg, ds = run.cfg, run.ds
    skip = run.start_batch if epoch == run.start_epoch else 0
    run.train_ds.set_epoch(epoch)
    run.sampler.set_epoch(epoch, start=skip * cfg.batch_size)
    run.loader_gen.manual_seed(cfg.seed * 100_003 + epoch)
    run.train_model.train()
    bar = tqdm(total=run.steps_per_epoch, initial=skip, desc=f'epoch {epoch + 1}/{cfg.epochs}',
               disable=not (cfg.progress and ds.is_main), dynamic_ncols=True, leave=True)
    t0, seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
    if skip and run.resume_loss is not None:  # the resumed epoch's train loss covers the whole epoch
        loss_sum, loss_n = run.resume_loss
    elif skip and ds.is_main:
        _logger.warning(f'{run.resumed_from} holds no partial train loss (written by an older vitfree): epoch '
                        f'{epoch + 1}\'s train loss covers only the steps after the resume')
    batch = skip
    for x, y in run.train_loader:
        if batch >= run.steps_per_epoch:
            break
        loss_val = _train_step(run, x, y, epoch)
        batch += 1
        loss_sum, loss_n = loss_sum + loss_val, loss_n + 1
        seen += x.shape[0] * ds.world_size
        ips = seen / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f'{loss_sum / loss_n:.4f}', img_s=f'{ips:.0f}', refresh=False)
        if run.global_step % cfg.log_interval == 0 or batch == run.steps_per_epoch:
            run.metrics_log.write(event='train', epoch=epoch + 1, step=run.global_step, loss=loss_val,
                                  loss_avg=loss_sum / loss_n, lr=run.optimizer.param_groups[0]['lr'], img_per_s=ips)
        if cfg.checkpoint_every and run.global_step % cfg.checkpoint_every == 0:
            _checkpoint(run, epoch, batch, epoch_end=False, loss=(loss_sum, loss_n))
        if on_step is not None:
            on_step(run.global_step)
    bar.close()
    _end_epoch(run, epoch, loss_sum / max(loss_n, 1), seen, time.perf_counter() - t0)


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor, epoch: int) -> float:
    """One optimizer step on one batch; returns its loss."""
    cfg, device, model = run.cfg, run.device, run.model
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if run.mixup_fn is not None:
        x, y = run.mixup_fn(x, y)
    with _autocast(device, cfg.amp):
        out = run.train_model(x)
        loss = run.criterion(out, y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f'loss is {loss.item()} at step {run.global_step + 1} (epoch {epoch + 1}); '
                                 f'lower --lr or use --amp bf16 instead of fp16')
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        if cfg.clip_grad:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        run.optimizer.step()
    run.global_step += 1
    if run.ema is not None:
        run.ema.update(model, step=run.global_step)
    run.scheduler.step_update(num_updates=run.global_step)
    return loss.item()


def _end_epoch(run: _Run, epoch: int, train_loss: float, seen: int, train_time: float) -> None:
    """Evaluate after an epoch, record and report it, step the schedule and write the epoch's checkpoint."""
    from tqdm import tqdm
    cfg, device = run.cfg, run.device
    val = evaluate(run.train_model, run.val_loader, device, cfg.amp, cfg.limit_val_batches)
    record = {'epoch': epoch + 1, 'step': run.global_step, 'train_loss': train_loss,
              'val_loss': val['loss'], 'top1': val['top1'], 'top5': val['top5'], 'val_images': val['count'],
              'train_time_s': train_time, 'img_per_s': seen / max(train_time, 1e-9) if seen else None}
    if run.ema is not None:
        ev = evaluate(run.ema.module, run.val_loader, device, cfg.amp, cfg.limit_val_batches)
        record.update(ema_top1=ev['top1'], ema_top5=ev['top5'], ema_val_loss=ev['loss'])
    run.best_top1 = val['top1'] if run.best_top1 is None else max(run.best_top1, val['top1'])
    run.history.append(record)
    run.metrics_log.write(event='val', **record)
    if run.ds.is_main:
        msg = (f'epoch {epoch + 1}/{cfg.epochs}: train loss {record["train_loss"]:.4f}, '
               f'val loss {val["loss"]:.4f}, top-1 {val["top1"]:.2f}%, top-5 {val["top5"]:.2f}%')
        if run.ema is not None:
            msg += f', EMA top-1 {record["ema_top1"]:.2f}%'
        (tqdm.write if cfg.progress else _logger.info)(msg)
    run.scheduler.step(epoch + 1, val['top1'])
    _checkpoint(run, epoch + 1, 0, epoch_end=True, loss=(0.0, 0))


def _export(run: _Run) -> Optional[Path]:
    """Rank 0 writes the trained model (and its EMA) to ``OUTPUT/model`` with the window spec and a card."""
    cfg = run.cfg
    if not (cfg.export and run.ds.is_main):
        return None
    from ..hub import save_pretrained
    card = {'dataset': str(cfg.data), 'epochs': cfg.epochs, 'metrics': run.history[-1] if run.history else None,
            'initialised_from': cfg.model if cfg.pretrained else None,
            'initialisation': None if cfg.pretrained else f'random (trained from scratch, seed {cfg.seed})',
            'changed_on_resume': '; '.join(f'step {c["step"]}: ' + ', '.join(
                f'{k} {v[0]!r} -> {v[1]!r}' for k, v in c['changed'].items()) for c in run.config_changes) or None}
    export = save_pretrained(run.model, run.out_dir / 'model', label_names=run.classes, data_config=run.data_config,
                             training=card)
    if run.ema is not None:
        save_pretrained(run.ema.module, run.out_dir / 'model_ema', label_names=run.classes,
                        data_config=run.data_config, training=dict(card, ema_decay=cfg.ema_decay))
    return export


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
    return name.upper() if name in ('model', 'data') else flag(name)


def _same(old: Any, new: Any) -> bool:
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and (Path(old).exists() or Path(new).exists()):
        try:
            return Path(old).resolve() == Path(new).resolve()
        except OSError:
            return False
    return False


def changed_flags(saved: Mapping[str, Any], cfg: FinetuneConfig,
                  windows_sha256: Optional[str] = None) -> Dict[str, Tuple[Any, Any]]:
    """Training flags of ``cfg`` that differ from the ``saved`` config of a checkpoint: ``{name: (old, new)}``.
    Options that do not change what is trained (:data:`RUN_OPTIONS`) and flags the checkpoint does
    not record (an older vitfree) are not compared.  The windows are compared by content: by the
    SHA-256 of the spec the model trains with (``windows_sha256``, :func:`windows_digest`) when the
    checkpoint records one, so an edited spec file counts as a changed ``--windows``."""
    new = json.loads(json.dumps(cfg.to_dict(), default=str))  # the form the checkpoint stored
    changes = {}
    for k, v in new.items():
        if k in RUN_OPTIONS or k not in saved:
            continue
        if k == 'windows' and windows_sha256 is not None and saved.get('windows_sha256') is not None:
            if saved['windows_sha256'] != windows_sha256:
                changes[k] = (_windows_text(saved[k], saved['windows_sha256']), _windows_text(v, windows_sha256))
        elif not _same(saved[k], v):
            changes[k] = (saved[k], v)
    return changes


def windows_digest(spec: Any) -> str:
    """SHA-256 of a window spec's content (grid and every block's windows; not its provenance)."""
    d = spec.to_dict()
    text = json.dumps({'grid': d['grid'], 'blocks': d['blocks']}, sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(text.encode()).hexdigest()


def _windows_text(windows: Any, sha256: str) -> str:
    return f'{windows or "the model default"} (sha256 {sha256[:16]})'


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
