"""Training checkpoints that lose nothing and are never half-written.

A checkpoint is a folder ``ckpt-<global step>[-end]/`` holding

* ``state.safetensors``: every tensor of the training state (model, EMA, optimizer moments,
  RNG states ...), keyed by its path in the state tree (``optimizer/state/3/exp_avg``);
* ``state.json``: the rest of the tree (numbers, strings, lists, dicts) with each tensor
  replaced by a reference to its key, plus the SHA-256 and size of ``state.safetensors``.

Writing goes to a hidden temporary folder first; both files are fsync'ed, then the folder is
renamed into place (an atomic step on POSIX file systems) and its parent fsync'ed.  A crash or
``kill -9`` at any point leaves either the complete checkpoint or no checkpoint at all.
Loading checks the JSON, the size and the SHA-256, so a truncated or corrupted checkpoint is
reported with a clear error, and :meth:`CheckpointManager.load_latest` then falls back to the
previous one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..weights import set_default_mode, sha256_file

__all__ = ['CheckpointError', 'CheckpointManager', 'save_checkpoint', 'load_checkpoint', 'encode_state',
           'decode_state', 'rng_state', 'set_rng_state', 'require', 'named_os_errors']

_logger = logging.getLogger(__name__)

CKPT_FORMAT = 'vitfree.checkpoint'
CKPT_VERSION = 1
TENSORS_FILE = 'state.safetensors'
INDEX_FILE = 'state.json'
_NAME_RE = re.compile(r'^ckpt-(\d{9})(-end)?$')


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the path and the fault."""


# ---- state tree <-> (tensors, JSON) ---------------------------------------------------------
def encode_state(state: Any) -> Tuple[Dict[str, torch.Tensor], Any]:
    """Split a nested state into a flat ``{key: tensor}`` dict and a JSON-ready tree.

    Handles dicts (any str/int keys), lists, tuples, tensors, NumPy arrays and scalars, and
    JSON scalars.  Tensors that share storage are cloned so safetensors accepts them.
    """
    tensors: Dict[str, torch.Tensor] = {}
    seen_ptrs: set = set()

    def put(key: str, t: torch.Tensor) -> str:
        t = t.detach().cpu()
        if t.numel() and t.untyped_storage().data_ptr() in seen_ptrs:
            t = t.clone()
        t = t.contiguous()
        if t.numel():
            seen_ptrs.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return key

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            return {'__tensor__': put(path, x)}
        if isinstance(x, np.ndarray):
            dtype = str(x.dtype)
            arr = x.astype(np.int64) if x.dtype.kind == 'u' else x
            return {'__ndarray__': put(path, torch.from_numpy(np.ascontiguousarray(arr))), 'dtype': dtype}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not k.startswith('__') for k in x):
                return {k: enc(v, f'{path}/{k}') for k, v in x.items()}
            return {'__items__': [[_enc_key(k), enc(v, f'{path}/{k}')] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {'__tuple__': [enc(v, f'{path}/{i}') for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f'{path}/{i}') for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.dtype):
            return {'__dtype__': str(x).replace('torch.', '')}
        raise CheckpointError(f'cannot store {type(x).__name__} at {path!r} in a checkpoint '
                              f'(tensors, arrays, dicts, lists, tuples and JSON scalars only)')

    tree = enc(state, 'state')
    return tensors, tree


def _enc_key(k: Any) -> Any:
    if isinstance(k, (str, int, float, bool)) or k is None:
        return k
    raise CheckpointError(f'dict keys must be str or int in a checkpoint, got {type(k).__name__} {k!r}')


def decode_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(tree, list):
        return [decode_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if '__tensor__' in tree:
            return tensors[tree['__tensor__']]
        if '__ndarray__' in tree:
            return tensors[tree['__ndarray__']].numpy().astype(tree['dtype'])
        if '__tuple__' in tree:
            return tuple(decode_state(v, tensors) for v in tree['__tuple__'])
        if '__items__' in tree:
            return {k: decode_state(v, tensors) for k, v in tree['__items__']}
        if '__dtype__' in tree:
            return getattr(torch, tree['__dtype__'])
        return {k: decode_state(v, tensors) for k, v in tree.items()}
    return tree


# ---- random number generators ---------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """The state of Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    import random
    state = {
        'python': random.getstate(),
        'numpy': np.random.get_state(),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import random
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state['numpy']
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state['torch'].to(torch.uint8))
    if 'cuda' in state and torch.cuda.is_available():
        cuda = [s.to(torch.uint8) for s in state['cuda']]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            _logger.warning(f'checkpoint has CUDA RNG states for {len(cuda)} devices, this machine has '
                            f'{torch.cuda.device_count()}: CUDA generators not restored')


@contextlib.contextmanager
def named_os_errors(path: Union[str, os.PathLike]):
    """An ``OSError`` raised without a file name (a full disk shows up at ``write``/``close``) gets
    ``path`` as its file name, so the message says which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise type(e)(e.errno, e.strerror or str(e), str(path)) from None


# ---- one checkpoint ---------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write ``state`` as a checkpoint folder ``path`` atomically (see module docs)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f'.tmp-{path.name}-{os.getpid()}'
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors, tree = encode_state(state)
    tfile = tmp / TENSORS_FILE
    try:
        save_file(tensors, str(tfile))
    except SafetensorError as e:  # a full disk, for one, comes back as this
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f'cannot write checkpoint {path}: {e}') from None
    set_default_mode(tfile)
    with open(tfile, 'rb+') as f:
        os.fsync(f.fileno())
    index = {
        'format': CKPT_FORMAT,
        'version': CKPT_VERSION,
        'tensors': {'file': TENSORS_FILE, 'sha256': sha256_file(tfile), 'size': tfile.stat().st_size,
                    'count': len(tensors)},
        'state': tree,
    }
    with named_os_errors(path / INDEX_FILE), open(tmp / INDEX_FILE, 'w') as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if path.exists():  # re-saving the same step: move the old one aside, never delete before the new is in place
        old = parent / f'.old-{path.name}-{os.getpid()}'
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    _fsync_dir(parent)
    return path


# ---- checking what a checkpoint holds -------------------------------------------------------------
_MISSING = object()


def require(tree: Any, field: str, where: str, kind: str = 'any', low: Optional[float] = None,
            high: Optional[float] = None, optional: bool = False) -> Any:
    """The value at dotted ``field`` of ``tree``, checked; :class:`CheckpointError` naming ``where`` and
    the field otherwise.  ``kind``: ``int`` (not bool), ``number`` (int or finite float), ``str``,
    ``sha256``, ``dict``, ``list`` or ``any``; ``low``/``high`` bound numbers; ``optional`` allows
    ``None`` and absence."""
    value: Any = tree
    for part in field.split('.'):
        if not isinstance(value, Mapping):
            raise CheckpointError(f'{where}: {field.rsplit(".", 1)[0] if "." in field else "the top level"} must be '
                                  f'an object, got {type(value).__name__}')
        value = value.get(part, _MISSING)
        if value is _MISSING:
            if optional:
                return None
            raise CheckpointError(f'{where}: field {field} is missing')
    if value is None and optional:
        return None
    ok = {
        'int': isinstance(value, int) and not isinstance(value, bool),
        'number': isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        'str': isinstance(value, str),
        'sha256': isinstance(value, str) and len(value) == 64 and all(c in '0123456789abcdef' for c in value),
        'dict': isinstance(value, Mapping),
        'list': isinstance(value, (list, tuple)),
        'any': True,
    }[kind]
    want = {'int': 'an integer', 'number': 'a finite number', 'str': 'a string', 'sha256': '64 hex digits',
            'dict': 'an object', 'list': 'a list', 'any': 'a value'}[kind]
    if kind in ('int', 'number'):
        if ok:
            ok = (low is None or value >= low) and (high is None or value <= high)
        if low is not None and high is not None:
            want += f' in [{low:g}, {high:g}]'
        elif low is not None:
            want += f' >= {low:g}'
    if not ok:
        raise CheckpointError(f'{where}: field {field} must be {want}, got {value!r:.80}')
    return value


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = 'cpu') -> Dict[str, Any]:
    """Read and verify a checkpoint folder; raises :class:`CheckpointError` naming what is wrong.

    ``state.json`` is checked against its schema (format, version, the tensors file's name, size,
    SHA-256 and count), the tensors file against that size and hash, and every tensor reference in
    the state against the tensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f'checkpoint {path} not found (expected a folder with {INDEX_FILE} and {TENSORS_FILE})')
    ipath, tpath = path / INDEX_FILE, path / TENSORS_FILE
    if not ipath.is_file():
        raise CheckpointError(f'checkpoint {path} is incomplete: {INDEX_FILE} is missing')
    try:
        index = json.loads(ipath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f'checkpoint {path} is corrupt: {ipath.name} is not valid JSON ({e})') from None
    where = f'checkpoint {path}: {INDEX_FILE}'
    if not isinstance(index, dict):
        raise CheckpointError(f'{where} must hold a JSON object, got {type(index).__name__}')
    if index.get('format') != CKPT_FORMAT:
        raise CheckpointError(f'{where} is not a vitfree checkpoint index (format {index.get("format")!r}, '
                              f'expected {CKPT_FORMAT!r})')
    if index.get('version') != CKPT_VERSION:
        raise CheckpointError(f'{where}: checkpoint version {index.get("version")!r}; '
                              f'this vitfree reads {CKPT_VERSION}')
    if require(index, 'tensors.file', where, 'str') != TENSORS_FILE:
        raise CheckpointError(f'{where}: field tensors.file must be {TENSORS_FILE!r}, got {index["tensors"]["file"]!r}')
    expected_size = require(index, 'tensors.size', where, 'int', low=0)
    expected_sha = require(index, 'tensors.sha256', where, 'sha256')
    count = require(index, 'tensors.count', where, 'int', low=0)
    require(index, 'state', where)
    if not tpath.is_file():
        raise CheckpointError(f'checkpoint {path} is incomplete: {TENSORS_FILE} is missing')
    size = tpath.stat().st_size
    if size != expected_size:
        raise CheckpointError(f'checkpoint {path} is truncated or corrupt: {TENSORS_FILE} has {size} bytes, '
                              f'expected {expected_size}')
    digest = sha256_file(tpath)
    if digest != expected_sha:
        raise CheckpointError(f'checkpoint {path} is corrupt: {TENSORS_FILE} has SHA-256 {digest[:16]}..., '
                              f'expected {expected_sha[:16]}...')
    try:
        tensors = load_file(str(tpath), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'checkpoint {path}: cannot read {TENSORS_FILE} ({e})') from None
    if len(tensors) != count:
        raise CheckpointError(f'{where}: field tensors.count is {count}, but {TENSORS_FILE} holds {len(tensors)}')
    try:
        return decode_state(index['state'], tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f'checkpoint {path}: index does not match its tensors '
                              f'({type(e).__name__}: {e})') from None


# ---- a folder of checkpoints --------------------------------------------------------------------
class CheckpointManager:
    """Numbered checkpoints in one folder: save, keep the last ``keep_last``, resume from the newest valid.

    Names are ``ckpt-<global step>`` (every N steps) and ``ckpt-<global step>-end`` (end of an
    epoch, after validation); they sort in the order they were written.
    """

    def __init__(self, directory: Union[str, os.PathLike], keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f'keep_last must be >= 1, got {keep_last}')
        self.dir = Path(directory)
        self.keep_last = keep_last

    def path_for(self, global_step: int, epoch_end: bool = False) -> Path:
        return self.dir / f'ckpt-{int(global_step):09d}{"-end" if epoch_end else ""}'

    def list(self) -> List[Path]:
        """Checkpoint folders, oldest first (leftover temporary folders are ignored)."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _NAME_RE.match(p.name)
            if m and p.is_dir():
                found.append(((int(m.group(1)), m.group(2) is not None), p))
        return [p for _, p in sorted(found)]

    def clean_temporary(self) -> None:
        """Remove half-written folders left by a crash."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(('.tmp-ckpt-', '.old-ckpt-')) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)

    def save(self, state: Mapping[str, Any], global_step: int, epoch_end: bool = False) -> Path:
        path = save_checkpoint(state, self.path_for(global_step, epoch_end))
        for old in self.list()[:-self.keep_last]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def load_latest(self, map_location: Union[str, torch.device] = 'cpu',
                    validate: Optional[Callable[[Path, Dict[str, Any]], None]] = None,
                    ) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The newest checkpoint that loads and verifies, falling back past corrupt ones.

        ``validate(path, state)`` may raise :class:`CheckpointError` for a checkpoint whose content
        is wrong (schema, consistency); such a checkpoint is reported and skipped like a truncated one.
        Returns ``None`` when the folder holds no checkpoint; raises :class:`CheckpointError`
        listing every fault when checkpoints exist but none is valid.
        """
        errors = []
        for path in reversed(self.list()):
            try:
                state = load_checkpoint(path, map_location)
                if validate is not None:
                    validate(path, state)
            except CheckpointError as e:
                _logger.warning(f'{e}; trying the previous checkpoint')
                errors.append(str(e))
                continue
            if errors:
                _logger.warning(f'resuming from {path.name} (newer checkpoints were not usable)')
            return path, state
        if errors:
            raise CheckpointError(f'no valid checkpoint in {self.dir}:\n  ' + '\n  '.join(errors))
        return None
