"""Process-group setup and samplers for single-process and ``torchrun`` training.

Under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment) the process group
is initialised with NCCL on CUDA and gloo on CPU; otherwise everything runs in one process.
The samplers are pure functions of ``(seed, epoch)``: a resumed epoch replays the same batches,
and with ``P`` processes of batch ``B`` each, step ``s`` covers exactly the samples a single
process of batch ``P * B`` would see at step ``s``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ['DistState', 'init_distributed', 'check_device', 'EpochSampler', 'ShardSampler', 'all_reduce_sum', 'barrier']


@dataclass
class DistState:
    """Who this process is: ``rank`` of ``world_size``, its ``device``, and whether it made the group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: Optional[str] = None) -> DistState:
    """Join the ``torchrun`` process group when there is one; pick the device.

    Args:
        device: ``'cpu'``, ``'cuda'`` or ``None`` (CUDA when available).  Under torchrun each
            process takes ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = check_device(device)
    if dev.type == 'cuda' and dev.index is None:
        dev = torch.device('cuda', local_rank if world_size > 1 else 0)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    owns = False
    if world_size > 1:
        if dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
            owns = True
    return DistState(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, owns_group=owns)


def check_device(device: Optional[Union[str, torch.device]]) -> Optional[torch.device]:
    """The torch device ``device`` names, when this machine has it; ``ValueError`` naming the value and
    what is available otherwise (``None`` passes: the caller picks a default)."""
    if device is None:
        return None
    available = ['cpu'] + (['cuda'] + [f'cuda:{i}' for i in range(torch.cuda.device_count())]
                           if torch.cuda.is_available() else [])
    if _mps_available():
        available.append('mps')
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f'device {device!r} is not a torch device name; this machine has {", ".join(available)}') \
            from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device!r}: CUDA is not available on this machine (no GPU, or torch was built '
                         f'without CUDA); this machine has {", ".join(available)}')
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f'device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), '
                         f'{", ".join(available)}')
    if dev.type == 'mps' and not _mps_available():
        raise ValueError(f'device {device!r}: MPS is not available here; this machine has {", ".join(available)}')
    if dev.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f'device {device!r}: vitfree runs on cpu, cuda and mps devices, not on {dev.type!r} ones; '
                         f'this machine has {", ".join(available)}')
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, 'mps', None)
    return bool(mps is not None and mps.is_available())


class EpochSampler(Sampler[int]):
    """Shuffled indices for this process, fixed by ``(seed, epoch)``, optionally starting mid-epoch.

    Like :class:`torch.utils.data.DistributedSampler` (the permutation is padded to a multiple
    of ``num_replicas`` and process ``rank`` takes every ``num_replicas``-th index), plus
    ``start``: the number of this process's indices to skip in the current epoch (set on resume).
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        if size < 1:
            raise ValueError('cannot sample from an empty data set')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank must be in [0, {num_replicas}), got {rank}')
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.shuffle, self.seed = shuffle, int(seed)
        self.epoch = 0
        self.start = 0
        self.num_samples = math.ceil(size / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> list:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.num_samples * self.num_replicas
        order += order[:total - len(order)]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict:
        return {'seed': self.seed, 'epoch': self.epoch, 'start': self.start}


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + P, ...`` in order, no padding: for evaluation, each sample exactly once."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.size, self.num_replicas, self.rank = size, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
