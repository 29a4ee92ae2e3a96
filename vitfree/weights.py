"""Safe weight sources: where pretrained weights come from, and that they are what they claim to be.

Below :mod:`vitfree.models` (the WinfT factories call :func:`prepare_factory_kwargs`) and above
:mod:`vitfree.windows`; :mod:`vitfree.hub`, :mod:`vitfree.train` and the CLI build on it.

Rules, applied whenever a WinfT (or ``vit_micro_patch2_28``) is built with ``pretrained=True``:

* Weights from the network (Hub, URL) load only from ``.safetensors`` files; pickle files are
  refused (:class:`UnsafeWeightsError`).  ``.pth`` / ``.bin`` load only from local paths, with
  ``torch.load(weights_only=True)``.
* Weight files the project ships are listed with their SHA-256 and size in
  ``weights/manifest.json`` and checked before they load (:func:`verify_weights`); a shipped
  file that is not listed is refused.
* An export folder (``local-dir:``, ``hf-hub:``) whose ``config.json`` records the SHA-256 of its
  ``model.safetensors`` (field ``weights``, written by :func:`vitfree.hub.save_pretrained`) is
  checked against it.
* A truncated or corrupt safetensors file is an error that names the file.
* Loading is strict on every path: a key missing from the weights, an unexpected key or a shape
  that does not fit is an error naming the file and the keys, whatever ``num_classes`` is.  Only
  the classifier head may differ (timm's own reset of the head for another number of classes);
  pass ``pretrained_strict=False`` to load partially on purpose.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .windows import MAX_SPEC_BYTES, WindowSpec, WindowSpecError, file_problem, parse_json, read_text_file

__all__ = [
    'WeightsError', 'UnsafeWeightsError', 'WeightsIntegrityError', 'HubUnreachableError', 'prefetch_pretrained',
    'network_error',
    'prepare_factory_kwargs', 'secure_pretrained_cfg', 'strict_filter', 'check_state_dict',
    'load_manifest', 'verify_weights', 'add_to_manifest', 'manifest_path', 'shipped_weights_file',
    'sha256_file', 'set_default_mode', 'check_weights_file', 'read_weights', 'load_weights', 'recorded_weights',
    'parse_windows', 'read_json', 'secure_factory_kwargs', 'check_loaded_weights', 'manifest_cfg_fields',
    'portable_path', 'portable_text',
    'CONFIG_NAME', 'WEIGHTS_NAME', 'PICKLE_SUFFIXES',
]

_logger = logging.getLogger(__name__)

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
MANIFEST_FORMAT = 'vitfree.weights_manifest'
MANIFEST_VERSION = 1
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pth.tar', '.ckpt', '.pkl')
_HEX = set('0123456789abcdef')


class WeightsError(RuntimeError):
    """Weights cannot be loaded safely; the message names the file and the fault."""


class UnsafeWeightsError(WeightsError):
    """A pickle weight file was requested from the network."""


class WeightsIntegrityError(WeightsError):
    """A weight file does not match its recorded SHA-256 / size, or is truncated."""


class HubUnreachableError(WeightsError):
    """The Hugging Face Hub cannot be reached (no network, ``HF_HUB_OFFLINE=1``, the server down) and
    the file is not in the local cache; the one-line message names the model, the repo and file it
    looked for, and how to pass local weights instead."""


# ---- files ---------------------------------------------------------------------------------------
def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def set_default_mode(path: Union[str, os.PathLike]) -> None:
    """Give a file the mode a plain ``open()`` would (0666 less the umask, 0644 usually): safetensors
    writes its files 0600, which hides shared weights from the rest of a group or a serving user."""
    mask = None
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    mask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def portable_path(path: Union[str, os.PathLike]) -> str:
    """A path as a provenance record or a model card may name it, without the machine's own folders: a
    relative path as given; an absolute one relative to the project (the folder that holds the
    ``vitfree`` package, so ``weights/...``, ``bench-out/...``) or to the current folder when it lies
    under one of them; anything else by its last two parts (``runs/model``)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        return str(path)
    p = Path(os.path.normpath(p))
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        try:
            return str(p.relative_to(root))
        except ValueError:
            continue
    return str(Path(*p.parts[-2:])) if len(p.parts) > 2 else p.name


def portable_text(text: str) -> str:
    """``text`` with every absolute path in it (a word starting with ``/`` or ``~/``, also after a
    prefix such as ``local-dir:``; URLs stay) made :func:`portable_path`."""
    import re
    return re.sub(r'(?<![\w./-])(?:~/|/(?!/))[^\s,;()\'"]+', lambda m: portable_path(m.group(0)), text)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def read_json(path: Union[str, os.PathLike], what: str = 'file', source: Optional[str] = None) -> Any:
    """A JSON file (UTF-8, bounded in size); :class:`WeightsError` naming the file and what is wrong
    with it (missing, a folder, not UTF-8, truncated JSON ...)."""
    return parse_json(read_text_file(path, what, WeightsError, MAX_SPEC_BYTES), source or str(path), WeightsError)


def _require_file(path: Path, what: str = 'weight file') -> None:
    """:class:`WeightsError` naming ``path`` and what it is instead of a regular file."""
    problem = file_problem(path)
    if problem == 'not found':
        raise WeightsError(f'{what} not found: {path}')
    if problem is not None:
        raise WeightsError(f'{what} {path} {problem}')


def check_weights_file(
        path: Union[str, os.PathLike],
        sha256: Optional[str] = None,
        size: Optional[int] = None,
        recorded_in: Optional[str] = None,
) -> Path:
    """Check one weight file: it exists, has the recorded ``size`` and ``sha256`` (when given), and,
    for ``.safetensors``, a complete header that covers the whole file (a truncated file is caught
    here, not deep inside safetensors).  Errors name the file and where the record came from."""
    path = Path(path)
    _require_file(path)
    where = f' ({recorded_in})' if recorded_in else ''
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise WeightsIntegrityError(f'{path} has {actual} bytes but {size} are recorded{where}: the file is truncated '
                                    f'or not the one that was saved; delete it and download or export it again')
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256:
            raise WeightsIntegrityError(f'{path} has SHA-256 {digest} but {sha256} is recorded{where}: the file is '
                                        f'corrupt or not the one that was saved; delete it and download or export '
                                        f'it again')
    if path.name.endswith('.safetensors'):
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework='pt') as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends carry no file name
            raise WeightsIntegrityError(f'{path} is truncated or not a safetensors file ({e})') from None
    elif path.name.endswith(PICKLE_SUFFIXES):
        _check_torch_zip(path)
    return path


def _check_torch_zip(path: Path) -> None:
    """``torch.save`` files are zip archives: a truncated one has lost its central directory, a corrupt
    one fails a member's CRC.  (Old non-zip torch files pass unchecked.)"""
    import zipfile
    with open(path, 'rb') as f:
        is_zip_start = f.read(4) == b'PK\x03\x04'
    if not zipfile.is_zipfile(path):
        if is_zip_start:
            raise WeightsIntegrityError(f'{path} is truncated (a torch.save zip archive without its end)')
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise WeightsIntegrityError(f'{path} is corrupt ({e})') from None
    if bad is not None:
        raise WeightsIntegrityError(f'{path} is corrupt: its member {bad} fails the CRC check')


def recorded_weights(folder: Union[str, os.PathLike], config: Optional[Mapping[str, Any]] = None
                     ) -> Optional[Dict[str, Any]]:
    """The ``weights`` record (``file``, ``sha256``, ``size``) of an export folder's ``config.json``,
    or ``None`` when the folder has no config or the config records no hash (older exports)."""
    if config is None:
        cpath = Path(folder) / CONFIG_NAME
        if not cpath.exists() and not cpath.is_symlink():
            return None
        config = read_json(cpath, 'config')
    record = config.get('weights') if isinstance(config, Mapping) else None
    if record is None:
        return None
    src = f'{Path(folder) / CONFIG_NAME}: field "weights"'
    if not isinstance(record, Mapping) or not _is_sha256(record.get('sha256')):
        raise WeightsError(f'{src} must be {{"file": "{WEIGHTS_NAME}", "sha256": <64 hex digits>, "size": <bytes>}}, '
                           f'got {record!r:.120}')
    size = record.get('size')
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise WeightsError(f'{src}: "size" must be a byte count, got {size!r}')
    name = record.get('file', WEIGHTS_NAME)
    if not isinstance(name, str) or Path(name).name != name:
        raise WeightsError(f'{src}: "file" must be a file name in the folder, got {name!r}')
    return {'file': name, 'sha256': record['sha256'], 'size': size}


def _check_export_file(path: Path, config: Optional[Mapping[str, Any]] = None) -> bool:
    """Check ``path`` against the ``config.json`` beside it when that config records it; True when checked."""
    record = recorded_weights(path.parent, config)
    if record is None or record['file'] != path.name:
        return False
    check_weights_file(path, record['sha256'], record['size'], recorded_in=f'{path.parent / CONFIG_NAME}')
    return True


def read_weights(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """A local state dict, after every check that applies to it: a shipped file against the manifest,
    an export's ``model.safetensors`` against its ``config.json``, any ``.safetensors`` for a complete
    header.  ``.pth``/``.bin`` load with ``torch.load(weights_only=True)``; a ``{'state_dict': ...}`` or
    ``{'model': ...}`` wrapper is taken off."""
    path = Path(path)
    if path.is_dir():
        hint = (f'; it is an export folder: load it as local-dir:{path}' if (path / CONFIG_NAME).is_file() else '')
        raise WeightsError(f'{path} is a folder; expected a .safetensors (or local .pth) weight file{hint}')
    _require_file(path)
    if _is_shipped(path):
        verify_weights(path, required=True)
    elif not _check_export_file(path):
        verify_weights(path, required=False)
    check_weights_file(path)
    if path.name.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device='cpu')
        except Exception as e:  # noqa: BLE001
            raise WeightsIntegrityError(f'{path} cannot be read as safetensors ({e})') from None
    import torch
    try:
        sd = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise WeightsError(f'{path} cannot be read as a state dict with torch.load(weights_only=True) '
                           f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None
    if isinstance(sd, Mapping):
        for key in ('state_dict', 'model'):
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise WeightsError(f'{path} does not hold a state dict (a mapping of parameter names to tensors)')
    return dict(sd)


# ---- strict loading -------------------------------------------------------------------------------
def _head_keys(model: Any, classifier: Any = None) -> Tuple[str, ...]:
    if classifier is None:
        classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    if classifier is None:
        return ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f'{n}.{p}' for n in names for p in ('weight', 'bias'))


def _list(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


def check_state_dict(
        state_dict: Mapping[str, Any],
        model: Any,
        source: str,
        head_may_differ: bool = True,
        classifier: Any = None,
        skip_shapes: Sequence[str] = (),
) -> List[str]:
    """Raise :class:`WeightsError` naming ``source`` when ``state_dict`` does not fit ``model`` exactly:
    keys the weights lack, keys the model lacks, or shapes that differ.  The classifier head
    (``classifier``, default the model's ``pretrained_cfg['classifier']``) is exempt when
    ``head_may_differ``; returns the head keys that do not fit (the caller resets or skips them)."""
    expected = model.state_dict()
    head = set(_head_keys(model, classifier)) if head_may_differ else set()
    missing = [k for k in expected if k not in state_dict and k not in head]
    unexpected = [k for k in state_dict if k not in expected and k not in head]
    shapes = [k for k in state_dict if k in expected and k not in head and k not in skip_shapes
              and hasattr(state_dict[k], 'shape') and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    faults = []
    if missing:
        faults.append(f'{len(missing)} key(s) the model needs are missing: {_list(missing)}')
    if unexpected:
        faults.append(f'{len(unexpected)} key(s) the model does not have: {_list(unexpected)}')
    if shapes:
        faults.append('shapes differ: ' + _list([f'{k} {tuple(state_dict[k].shape)} in the file, '
                                                 f'{tuple(expected[k].shape)} in the model' for k in shapes], 4))
    if faults:
        raise WeightsError(f'weights in {source} do not fit {type(model).__name__} '
                           f'({"; ".join(faults)}); they are for another architecture or the file is damaged. '
                           f'Pass pretrained_strict=False to load a part on purpose')
    return [k for k in head if k in state_dict and k in expected
            and tuple(state_dict[k].shape) != tuple(expected[k].shape)]


def strict_filter(filter_fn: Optional[Callable] = None) -> Callable:
    """Wrap a timm ``pretrained_filter_fn`` so that, after it ran, the weights must fit the model exactly
    (:func:`check_state_dict`).  timm's ``load_pretrained`` drops the head and loads non-strictly when
    ``num_classes`` differs from the weights', logging any other missing key only; this check runs
    before that, so only the head may differ.  The source is read from ``model.pretrained_cfg``."""

    def filter_then_check(state_dict: Dict[str, Any], model: Any) -> Dict[str, Any]:
        if filter_fn is not None:
            try:
                state_dict = filter_fn(state_dict, model)
            except TypeError:  # one-argument filters, as timm allows
                state_dict = filter_fn(state_dict)
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        source = cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url') or cfg.get('architecture') or 'weights'
        first_conv = cfg.get('first_conv')
        convs = (first_conv,) if isinstance(first_conv, str) else tuple(first_conv or ())
        check_state_dict(state_dict, model, str(source), skip_shapes=[f'{c}.weight' for c in convs])
        return state_dict

    filter_then_check.__wrapped__ = filter_fn  # type: ignore[attr-defined]
    return filter_then_check


def load_weights(model: Any, path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Load a local weight file into ``model`` strictly (:func:`read_weights`, :func:`check_state_dict`).

    Only the classifier head may differ: a head of another shape (another number of classes) is
    left as it is, with a warning.  Returns ``{'file', 'skipped'}``."""
    path = Path(path)
    sd = read_weights(path)
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier', 'head')
    skipped = check_state_dict(sd, model, str(path), classifier=classifier)
    for k in skipped:
        sd.pop(k)
    if skipped:
        _logger.warning(f'{path}: classifier {", ".join(skipped)} not loaded (the file has another number of '
                        f'classes than the model); the model keeps its own head')
    model.load_state_dict(sd, strict=not skipped)
    return {'file': str(path), 'skipped': skipped}


# ---- window specs in config.json ---------------------------------------------------------------------
def parse_windows(windows: Any, where: str) -> Optional[WindowSpec]:
    """The :class:`WindowSpec` in a ``config.json`` field (``None`` for names, paths and specs, which
    the model resolves itself); errors name ``where``."""
    if windows is None or isinstance(windows, (WindowSpec, str)):
        return None
    if not isinstance(windows, Mapping):
        raise WindowSpecError(f'{where}: expected a window spec object (format, version, grid, provenance, '
                              f'blocks), got {type(windows).__name__}')
    return WindowSpec.from_dict(windows, source=where)


# ---- what the factories call before building ----------------------------------------------------------
def secure_factory_kwargs(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A model entry point's keyword arguments with a spec from ``config.json`` decoded (errors name that
    file) and, with ``pretrained=True``, the weight source resolved to a checked local file
    (:func:`secure_pretrained_cfg`)."""
    kwargs = dict(kwargs)
    cfg = kwargs.get('pretrained_cfg')
    saved = kwargs.get('pretrained_model_args') or {}
    if isinstance(cfg, Mapping) and cfg.get('source') in ('local-dir', 'hf-hub'):
        where = cfg.get('file') if cfg.get('source') == 'local-dir' else f'hf-hub:{cfg.get("hf_hub_id")}'
        if 'windows' in kwargs and kwargs['windows'] is saved.get('windows'):
            spec = parse_windows(kwargs['windows'], f'{where}/{CONFIG_NAME}: model_args.windows')
            if spec is not None:
                kwargs['windows'] = spec
    if pretrained:
        kwargs['pretrained_cfg'] = secure_pretrained_cfg(
            variant, kwargs.get('pretrained_cfg'), kwargs.pop('pretrained_cfg_overlay', None), kwargs.get('cache_dir'))
    return kwargs


def prepare_factory_kwargs(variant: str, pretrained: bool, kwargs: Dict[str, Any],
                           filter_fn: Optional[Callable] = None) -> Dict[str, Any]:
    """:func:`secure_factory_kwargs`, and loading made strict: the ``pretrained_filter_fn`` to build with
    (``filter_fn`` wrapped by :func:`strict_filter` unless ``pretrained_strict=False``)."""
    kwargs = secure_factory_kwargs(variant, pretrained, kwargs)
    if kwargs.get('pretrained_strict', True):
        kwargs['pretrained_filter_fn'] = strict_filter(filter_fn)
    elif filter_fn is not None:
        kwargs['pretrained_filter_fn'] = filter_fn
    return kwargs


def _weights_file_of(cfg: Mapping[str, Any]) -> Optional[Path]:
    """The local weight file a resolved (:func:`secure_pretrained_cfg`) pretrained config loads."""
    if cfg.get('source') == 'local-dir':
        folder = Path(cfg.get('file') or '')
        record = recorded_weights(folder)
        if record is not None:
            return folder / record['file']
        return next((folder / n for n in (WEIGHTS_NAME, 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
                     if (folder / n).is_file()), None)
    return Path(cfg['file']) if cfg.get('file') else None


def _shapes_only(path: Path) -> Dict[str, Any]:
    """The state dict of a weight file as meta tensors (names, shapes, dtypes; no data read)."""
    import torch
    if path.name.endswith('.safetensors'):
        from safetensors import safe_open
        out = {}
        with safe_open(str(path), framework='pt') as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = torch.empty(sl.get_shape(), dtype=getattr(torch, _ST_DTYPES.get(sl.get_dtype(), 'float32')),
                                     device='meta')
        return out
    return read_weights(path)


_ST_DTYPES = {'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'F64': 'float64', 'I64': 'int64',
              'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U8': 'uint8', 'BOOL': 'bool'}


def check_loaded_weights(model: Any, pretrained_cfg: Mapping[str, Any], filter_fn: Optional[Callable] = None) -> None:
    """After timm loaded pretrained weights its own way, check they fit the model exactly: the file's
    keys, after the family's ``filter_fn``, against the model's (only the classifier may differ).
    timm's own loading relaxes to non-strict when the number of classes changes; this closes that gap."""
    path = _weights_file_of(pretrained_cfg)
    if path is None or not path.is_file():
        return
    def filtered(sd):
        if filter_fn is None:
            return sd
        try:
            return filter_fn(sd, model)
        except TypeError:  # one-argument filters, as timm allows
            return filter_fn(sd)
    try:
        sd = filtered(_shapes_only(path))
    except Exception:  # noqa: BLE001 - a filter that needs real values: read them
        sd = filtered(read_weights(path))
    first_conv = pretrained_cfg.get('first_conv')
    convs = (first_conv,) if isinstance(first_conv, str) else tuple(first_conv or ())
    check_state_dict(sd, model, str(path), skip_shapes=[f'{c}.weight' for c in convs])


def secure_pretrained_cfg(
        variant: str,
        pretrained_cfg: Optional[Union[str, Mapping[str, Any]]] = None,
        pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> Dict[str, Any]:
    """Resolve timm's pretrained config for ``variant`` to a weight source that is safe to load.

    * Hub (``hf-hub:`` or a registry ``hf_hub_id``): the safetensors file is downloaded here
      (``model.safetensors`` unless ``hf_hub_filename`` names another ``.safetensors``); pickle
      files are refused with :class:`UnsafeWeightsError`.  A hash recorded in the repo's
      ``config.json`` or in the manifest is checked.  When the Hub cannot be reached and the file
      is not cached, :class:`HubUnreachableError` is raised at once (no retries), naming the model,
      the repo and the file.
    * URL: only ``.safetensors`` URLs.
    * local folder (``local-dir:``): its ``model.safetensors`` is checked against the hash its
      ``config.json`` records; pickles load with ``weights_only=True``.
    * local file: any format timm reads; shipped files must match the manifest.

    Returns a pretrained_cfg dict whose ``file`` points at the checked local weights.
    """
    from timm.models._builder import resolve_pretrained_cfg

    if isinstance(pretrained_cfg, Mapping):
        pretrained_cfg = dict(pretrained_cfg)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=dict(pretrained_cfg_overlay or {})).to_dict()
    source = cfg.get('source')
    if source == 'local-dir':
        folder = Path(cfg.get('file') or '')
        record = recorded_weights(folder)
        weights = folder / (record['file'] if record else WEIGHTS_NAME)
        if record is not None:
            if file_problem(weights) == 'not found':
                raise WeightsError(f'{weights} is missing, though {folder / CONFIG_NAME} records it (field "weights"); '
                                   f'restore it, or delete that field to load the other weights in the folder')
            check_weights_file(weights, record['sha256'], record['size'], recorded_in=str(folder / CONFIG_NAME))
        else:
            for name in (WEIGHTS_NAME, 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth'):  # timm's preference
                if file_problem(folder / name) != 'not found':  # a folder or a link loop here is an error too
                    check_weights_file(folder / name)
                    break
        return cfg
    if cfg.get('state_dict') is not None and source != 'hf-hub':
        return cfg
    if source == 'hf-hub' or (not cfg.get('file') and cfg.get('hf_hub_id')):
        return _secure_hub_cfg(variant, cfg, cache_dir)
    if cfg.get('file'):
        path = Path(cfg['file'])
        if _is_shipped(path):
            verify_weights(path, required=True)
        elif not (path.is_file() and _check_export_file(path)):
            verify_weights(path, required=False)
        check_weights_file(path)
        return cfg
    url = cfg.get('url')
    if url:
        url_s = url[0] if isinstance(url, (list, tuple)) else url
        if not str(url_s).endswith('.safetensors'):
            raise UnsafeWeightsError(f'refusing to load pickle weights from {url_s}: vitfree loads weights from the '
                                     f'network only as .safetensors (a pickle can run code when loaded)')
        from timm.models._hub import download_cached_file
        path = download_cached_file(url, check_hash=False, cache_dir=cache_dir)
        verify_weights(path, required=False)
        check_weights_file(path)
        cfg.update(file=path, source='file')
        return cfg
    raise WeightsError(f'{variant}: no pretrained weights are registered for this configuration '
                       f'(tag {cfg.get("tag")!r}); use pretrained=False, local-dir:PATH or hf-hub:ORG/NAME')


def _secure_hub_cfg(variant: str, cfg: Dict[str, Any], cache_dir=None) -> Dict[str, Any]:
    """The Hub branch of :func:`secure_pretrained_cfg`: download the safetensors file, check it
    against the manifest and the repo's ``config.json``, and point ``cfg['file']`` at it."""
    source, repo = cfg.get('source'), cfg['hf_hub_id']
    filename = cfg.get('hf_hub_filename') or WEIGHTS_NAME
    model = f'hf-hub:{repo}' if source == 'hf-hub' else \
        f'{variant}.{cfg["tag"]}' if cfg.get('tag') and '.' not in variant else variant
    path = Path(_download_safetensors(repo, filename, cache_dir, model))
    verify_weights(path, hub=f'{_strip_revision(repo)}/{filename}', required=False)
    if source == 'hf-hub':
        record = recorded_weights(path.parent, _hub_config(repo, cache_dir, model))
        if record is not None and record['file'] == filename:
            check_weights_file(path, record['sha256'], record['size'], recorded_in=f'hf-hub:{repo}/{CONFIG_NAME}')
    check_weights_file(path)
    cfg.update(file=str(path), source='file')
    return cfg


def _strip_revision(repo: str) -> str:
    return repo.split('@')[0]


def _hub_errors():
    from huggingface_hub.utils import EntryNotFoundError
    try:
        from huggingface_hub.utils import LocalEntryNotFoundError  # offline / not cached: not a missing file
    except ImportError:  # pragma: no cover - very old huggingface_hub
        LocalEntryNotFoundError = ()
    return EntryNotFoundError, LocalEntryNotFoundError


_NETWORK_MODULES = ('huggingface_hub', 'httpx', 'httpx2', 'httpcore', 'requests', 'urllib3', 'ssl', 'socket')


def network_error(e: BaseException) -> bool:
    """True for what the network and the Hub raise (no connection, offline mode, timeouts, HTTP
    errors): an ``OSError`` or an exception class of the HTTP stack; programming errors are not."""
    return isinstance(e, OSError) or type(e).__module__.split('.')[0] in _NETWORK_MODULES


def _unreachable_reason(e: BaseException) -> Optional[str]:
    """Why the Hub could not be asked (offline mode, no connection, a timeout, a server error), or
    ``None`` when ``e`` is an answer (a missing repo or file, a refused token) to pass on."""
    from huggingface_hub import constants
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
    if isinstance(e, (EntryNotFoundError, RepositoryNotFoundError)):
        return None
    if type(e).__name__ == 'OfflineModeIsEnabled':
        return 'offline mode is on (HF_HUB_OFFLINE=1)'
    status = getattr(getattr(e, 'response', None), 'status_code', None)
    if isinstance(e, HfHubHTTPError):
        return f'{constants.ENDPOINT} answered HTTP {status}' if status is None or status >= 500 or status == 429 \
            else None
    if not network_error(e):
        return None
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ''
    return f'{constants.ENDPOINT} cannot be reached ({type(e).__name__}{": " + detail[:120] if detail else ""})'


def _probe_hub(repo_id: str, filename: str, revision: Optional[str]) -> None:
    """One HEAD request for the file, without huggingface_hub's retries (which take about 20 s, and
    minutes on a network that drops packets): raises what it met."""
    import inspect

    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    timeout = constants.HF_HUB_ETAG_TIMEOUT
    if timeout == getattr(constants, 'DEFAULT_ETAG_TIMEOUT', timeout):
        timeout = min(float(timeout), 5.0)  # unless HF_HUB_ETAG_TIMEOUT asks for more
    extra = {'retry_on_errors': False} if 'retry_on_errors' in inspect.signature(get_hf_file_metadata).parameters \
        else {}
    get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=timeout, **extra)


@contextlib.contextmanager
def _quiet_hub_logs():
    """huggingface_hub's retry messages stay out of the user's way (errors still raise)."""
    hub_logger = logging.getLogger('huggingface_hub')
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _unreachable(model: Optional[str], repo: str, filename: str, reason: str, cache_dir=None) -> HubUnreachableError:
    from huggingface_hub import constants
    who = f'{model}: ' if model else ''
    cache = cache_dir or constants.HF_HUB_CACHE
    return HubUnreachableError(
        f'{who}cannot get {filename} of hf-hub:{repo}: {reason}, and it is not in the local cache ({cache}). '
        f'Pass local weights instead: --checkpoint FILE.safetensors on the command line, '
        f'pretrained_cfg_overlay=dict(file=FILE) in Python, or an exported folder as local-dir:PATH')


def _hub_fetch(repo: str, filename: str, cache_dir=None, model: Optional[str] = None) -> str:
    """The local path of ``filename`` of ``repo`` (``org/name[@revision]``), through huggingface_hub's own
    download and cache.  When the Hub cannot be reached (no network, offline mode, server down) this
    fails at once, after one request without retries, with :class:`HubUnreachableError` naming
    ``model``, the repo and the file, unless the file is in the cache.  A missing repo or file raises
    huggingface_hub's own error (``EntryNotFoundError``, ``RepositoryNotFoundError``)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    repo_id, _, revision = repo.partition('@')
    revision = revision or None
    try:
        _probe_hub(repo_id, filename, revision)
    except Exception as e:  # noqa: BLE001 - sorted by _unreachable_reason
        reason = _unreachable_reason(e)
        if reason is None:
            raise
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return cached
        raise _unreachable(model, repo, filename, reason, cache_dir) from None
    _, LocalEntryNotFoundError = _hub_errors()
    try:
        with _quiet_hub_logs():
            return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, library_name='vitfree')
    except LocalEntryNotFoundError as e:  # the Hub went away between the probe and the download
        raise _unreachable(model, repo, filename, _unreachable_reason(e.__cause__ or e) or 'the download failed',
                           cache_dir) from None


def _hub_config(repo: str, cache_dir=None, model: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The repo's ``config.json`` (timm has just downloaded it, so this reads the cache), ``None``
    when the repo has none."""
    EntryNotFoundError, _ = _hub_errors()
    try:
        path = _hub_fetch(repo, CONFIG_NAME, cache_dir, model)
    except EntryNotFoundError:
        return None
    return read_json(path, 'config', source=f'hf-hub:{repo}/{CONFIG_NAME}')


def _download_safetensors(repo: str, filename: str, cache_dir=None, model: Optional[str] = None) -> str:
    if not filename.endswith('.safetensors'):
        raise UnsafeWeightsError(f'refusing to load {filename!r} from hf-hub:{repo}: vitfree loads weights from the '
                                 f'Hub only as .safetensors (a pickle can run code when loaded). Convert it locally '
                                 f'and load it with local-dir:PATH, or upload a model.safetensors')
    EntryNotFoundError, _ = _hub_errors()
    try:
        return _hub_fetch(repo, filename, cache_dir, model)
    except EntryNotFoundError:
        raise UnsafeWeightsError(f'hf-hub:{repo} has no {filename}; vitfree loads weights from the Hub only as '
                                 f'safetensors and will not fall back to pytorch_model.bin or other pickles') from None


def prefetch_pretrained(name: str, kwargs: Optional[Mapping[str, Any]] = None, cache_dir=None) -> None:
    """Fetch what ``timm.create_model(name, pretrained=True, **kwargs)`` will download from the Hub
    (an ``hf-hub:`` model's ``config.json``; the safetensors weights of a registered model whose
    pretrained config names a Hub repo), so that an unreachable Hub fails at once with
    :class:`HubUnreachableError` (the model, the repo and file, how to pass local weights) instead of
    timm's own retries and pickle fallbacks.  Files in the cache are not fetched again."""
    kwargs = dict(kwargs or {})
    EntryNotFoundError, _ = _hub_errors()
    if name.startswith('hf-hub:'):
        repo = name[len('hf-hub:'):]
        _hub_fetch(repo, CONFIG_NAME, cache_dir, name)
        targets = [(repo, WEIGHTS_NAME)]
    elif name.startswith('local-dir:'):
        return
    else:
        from timm.models._builder import resolve_pretrained_cfg
        cfg = resolve_pretrained_cfg(name, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=dict(kwargs.get('pretrained_cfg_overlay') or {})).to_dict()
        if cfg.get('file') or cfg.get('state_dict') is not None or not cfg.get('hf_hub_id'):  # timm's order
            return
        targets = [(cfg['hf_hub_id'], cfg.get('hf_hub_filename') or WEIGHTS_NAME)]
    for repo, filename in targets:
        try:
            _hub_fetch(repo, filename, cache_dir, name)
        except EntryNotFoundError:
            pass  # no such file: the model's own loader says what it does instead


# ---- manifest of shipped weights ----------------------------------------------------------------------
def _weights_dirs() -> List[Path]:
    here = Path(__file__).resolve().parent
    return [d for d in (here.parent / 'weights', here / '_weights') if d.is_dir()]


def shipped_weights_file(name: str) -> str:
    """Absolute path of a shipped weight file (source checkout ``weights/`` or installed ``vitfree/_weights/``)."""
    for d in _weights_dirs():
        if (d / name).is_file():
            return str(d / name)
    return str(Path(__file__).resolve().parent.parent / 'weights' / name)


def manifest_path() -> Path:
    """``weights/manifest.json`` in a checkout, ``vitfree/_weights/manifest.json`` when installed."""
    env = os.environ.get('VITFREE_WEIGHTS_MANIFEST')
    if env:
        return Path(env)
    dirs = _weights_dirs()
    return (dirs[0] if dirs else Path(__file__).resolve().parent.parent / 'weights') / 'manifest.json'


def _is_shipped(path: Path) -> bool:
    try:
        parent = path.resolve().parent
    except OSError:
        return False
    return any(parent == d.resolve() for d in _weights_dirs())


def load_manifest(path: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Dict[str, Any]]:
    """Entries of the weights manifest: ``{name: {file?, hf_hub_id?, hf_hub_filename?, sha256, size?, ...}}``."""
    path = Path(path) if path is not None else manifest_path()
    if not path.exists() and not path.is_symlink():
        return {}
    data = read_json(path, 'weights manifest')
    if not isinstance(data, dict) or data.get('format') != MANIFEST_FORMAT:
        raise WeightsError(f'{path}: expected {{"format": "{MANIFEST_FORMAT}", "version": 1, "weights": {{...}}}}')
    entries = data.get('weights', {})
    if not isinstance(entries, dict):
        raise WeightsError(f'{path}: "weights" must be an object of name -> entry')
    for name, e in entries.items():
        sha = e.get('sha256') if isinstance(e, dict) else None
        if not _is_sha256(sha):
            raise WeightsError(f'{path}: weights[{name!r}].sha256 must be 64 lowercase hex digits, got {sha!r}')
    return entries


def _find_entry(entries: Mapping[str, Dict[str, Any]], path: Path, name: Optional[str], hub: Optional[str]):
    if name is not None:
        if name not in entries:
            listed = ', '.join(sorted(entries)) or '(none)'
            raise WeightsError(f'{name!r} is not in the weights manifest; listed: {listed}')
        return name, entries[name]
    for key, e in entries.items():
        if hub and e.get('hf_hub_id') and f'{e["hf_hub_id"]}/{e.get("hf_hub_filename", WEIGHTS_NAME)}' == hub:
            return key, e
    for key, e in entries.items():
        if e.get('file') and Path(e['file']).name == path.name and _is_shipped(path):
            return key, e
    return None, None


def verify_weights(
        path: Union[str, os.PathLike],
        name: Optional[str] = None,
        hub: Optional[str] = None,
        required: bool = False,
        manifest: Optional[Union[str, os.PathLike]] = None,
) -> Optional[str]:
    """Check a weight file against its SHA-256 (and size) in the manifest.

    Args:
        path: the local file.
        name: the manifest entry to check against (default: found by ``hub`` id or file name).
        hub: ``org/name/filename`` the file was downloaded as.
        required: raise when the manifest has no entry for the file (shipped files must be listed).
        manifest: another manifest file (default :func:`manifest_path`).

    Returns:
        the entry name that matched, or ``None`` when the file is not listed (and not required).
    """
    path = Path(path)
    _require_file(path)
    entries = load_manifest(manifest)
    key, entry = _find_entry(entries, path, name, hub)
    if entry is None:
        if required:
            raise WeightsIntegrityError(f'{path} is shipped with vitfree but not listed in '
                                        f'{manifest or manifest_path()}; add it with vitfree.weights.add_to_manifest')
        return None
    check_weights_file(path, entry['sha256'], entry.get('size'),
                       recorded_in=f'manifest entry {key!r} in {manifest or manifest_path()}')
    return key


def manifest_cfg_fields(weights_file: str, manifest: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Any]:
    """``pretrained_cfg`` fields for a shipped weight file, from its manifest entry: ``description``
    (what the weights are, where they come from, their test top-1) and ``notes`` (origin, accuracy,
    recipe, initialisation, windows, as timm's ``notes`` tuple).  ``{}`` when the manifest does not
    list the file or cannot be read (loading the file then says why)::

        _cfg(file=shipped_weights_file(name), **manifest_cfg_fields(name), ...)
    """
    try:
        entries = load_manifest(manifest)
    except WeightsError:
        return {}
    entry = next((e for e in entries.values() if Path(str(e.get('file', ''))).name == Path(weights_file).name), None)
    if entry is None:
        return {}
    origin = entry.get('source')
    acc = [f'{entry["test_top1_full"]} % on the full test set' if 'test_top1_full' in entry else None,
           f'{entry["test_top1_first1000"]} % on the first 1,000 test images (tests/data)'
           if 'test_top1_first1000' in entry else None,
           f'validation top-1 {entry["val_top1"]} %' if 'val_top1' in entry else None]
    accuracy = 'test top-1 ' + ', '.join(a for a in acc if a) if any(acc) else None
    recipe = entry.get('recipe')
    notes = [f'origin: {origin}' + (f' (seed {entry["seed"]})' if 'seed' in entry else '') if origin else None,
             accuracy,
             f'recipe: {recipe["note"]}' if isinstance(recipe, Mapping) and recipe.get('note') else None,
             f'initialised from {entry["initialised_from"]}' if entry.get('initialised_from') else None,
             f'windows: {entry["windows"]}' if entry.get('windows') else None,
             f'SHA-256 {entry["sha256"]} (checked on every load, {manifest or manifest_path().name})']
    out: Dict[str, Any] = {'notes': tuple(n for n in notes if n)}
    if origin or accuracy:
        out['description'] = '; '.join(x for x in (f'trained by this project ({origin})' if origin else None,
                                                    accuracy) if x)
    return out


def add_to_manifest(
        path: Union[str, os.PathLike],
        name: str,
        hf_hub_id: Optional[str] = None,
        hf_hub_filename: Optional[str] = None,
        manifest: Optional[Union[str, os.PathLike]] = None,
        **info: Any,
) -> Dict[str, Any]:
    """Record (or update) a weight file's SHA-256 and size in the manifest; returns the entry."""
    path = Path(path)
    mpath = Path(manifest) if manifest is not None else manifest_path()
    data = {'format': MANIFEST_FORMAT, 'version': MANIFEST_VERSION, 'weights': {}}
    if mpath.is_file():
        load_manifest(mpath)  # validates
        data = read_json(mpath, 'weights manifest')
    entry = {'file': path.name, 'sha256': sha256_file(path), 'size': path.stat().st_size}
    if hf_hub_id:
        entry['hf_hub_id'] = hf_hub_id
        entry['hf_hub_filename'] = hf_hub_filename or WEIGHTS_NAME
    entry.update(info)
    data['weights'][name] = entry
    mpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = mpath.with_name(mpath.name + '.tmp')
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + '\n')
    os.replace(tmp, mpath)
    return entry
