"""Safe weight sources: where pretrained weights come from, and that they are what they claim to be.

Below :mod:`vitfree.models` (the WinfT factories call :func:`prepare_factory_kwargs`) and above
:mod:`vitfree.windows`; :mod:`vitfree.hub`, :mod:`vitfree.train` and the CLI build on it.

Weights from the network (Hub, URL) load only from safetensors files, and pickle files are
refused; ``.pth`` / ``.bin`` load only from local paths, with ``torch.load(weights_only=True)``.
Weight files the project ships are listed with their SHA-256 in ``weights/manifest.json`` and
checked before they load (:func:`verify_weights`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from .windows import WindowSpec, WindowSpecError

__all__ = [
    'WeightsError', 'UnsafeWeightsError', 'WeightsIntegrityError', 'prepare_factory_kwargs', 'secure_pretrained_cfg',
    'load_manifest', 'verify_weights', 'add_to_manifest', 'manifest_path', 'shipped_weights_file', 'sha256_file',
    'parse_windows', 'CONFIG_NAME', 'WEIGHTS_NAME', 'PICKLE_SUFFIXES',
]

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
MANIFEST_FORMAT = 'vitfree.weights_manifest'
MANIFEST_VERSION = 1
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pth.tar', '.ckpt', '.pkl')


class WeightsError(RuntimeError):
    """Weights cannot be loaded safely."""


class UnsafeWeightsError(WeightsError):
    """A pickle weight file was requested from the network."""


class WeightsIntegrityError(WeightsError):
    """A shipped weight file does not match its SHA-256 in the manifest."""


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def parse_windows(windows: Any, where: str) -> Optional[WindowSpec]:
    """The :class:`WindowSpec` in a ``config.json`` field (``None`` for names, paths and specs, which
    the model resolves itself); errors name ``where``."""
    if windows is None or isinstance(windows, (WindowSpec, str)):
        return None
    if not isinstance(windows, Mapping):
        raise WindowSpecError(f'{where}: expected a window spec object (format, version, grid, provenance, '
                              f'blocks), got {type(windows).__name__}')
    return WindowSpec.from_dict(windows, source=where)


# ---- what the WinfT factories call before building ------------------------------------------------
def prepare_factory_kwargs(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Check a spec that came from a ``config.json`` and make the pretrained source safe.

    Called by the WinfT entry points with their keyword arguments; returns the arguments to build
    with.  A malformed ``model_args.windows`` raises :class:`WindowSpecError` naming the
    config file and the field; with ``pretrained=True`` the weight source is resolved by
    :func:`secure_pretrained_cfg`.
    """
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


def secure_pretrained_cfg(
        variant: str,
        pretrained_cfg: Optional[Union[str, Mapping[str, Any]]] = None,
        pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> Dict[str, Any]:
    """Resolve timm's pretrained config for ``variant`` to a weight source that is safe to load.

    * Hub (``hf-hub:`` or a registry ``hf_hub_id``): the safetensors file is downloaded here
      (``model.safetensors`` unless ``hf_hub_filename`` names another ``.safetensors``); pickle
      files are refused with :class:`UnsafeWeightsError`.
    * URL: only ``.safetensors`` URLs.
    * local file / folder: any format timm reads; pickles load with ``weights_only=True``.
    * Files listed in ``weights/manifest.json`` (by shipped file or Hub id) are SHA-256 checked.

    Returns a pretrained_cfg dict whose ``file`` points at the checked local weights.
    """
    from timm.models._builder import resolve_pretrained_cfg

    if isinstance(pretrained_cfg, Mapping):
        pretrained_cfg = dict(pretrained_cfg)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=dict(pretrained_cfg_overlay or {})).to_dict()
    source = cfg.get('source')
    if source == 'local-dir':
        return cfg
    if cfg.get('state_dict') is not None and source != 'hf-hub':
        return cfg
    if source == 'hf-hub' or (not cfg.get('file') and cfg.get('hf_hub_id')):
        repo = cfg['hf_hub_id']
        filename = cfg.get('hf_hub_filename') or WEIGHTS_NAME
        path = _download_safetensors(repo, filename, cache_dir)
        verify_weights(path, hub=f'{_strip_revision(repo)}/{filename}', required=False)
        cfg.update(file=path, source='file')
        return cfg
    if cfg.get('file'):
        path = Path(cfg['file'])
        if _is_shipped(path):
            verify_weights(path, required=True)
        else:
            verify_weights(path, required=False)
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
        cfg.update(file=path, source='file')
        return cfg
    raise WeightsError(f'{variant}: no pretrained weights are registered for this configuration '
                       f'(tag {cfg.get("tag")!r}); use pretrained=False, local-dir:PATH or hf-hub:ORG/NAME')


def _strip_revision(repo: str) -> str:
    return repo.split('@')[0]


def _download_safetensors(repo: str, filename: str, cache_dir=None) -> str:
    if not filename.endswith('.safetensors'):
        raise UnsafeWeightsError(f'refusing to load {filename!r} from hf-hub:{repo}: vitfree loads weights from the '
                                 f'Hub only as .safetensors (a pickle can run code when loaded). Convert it locally '
                                 f'and load it with local-dir:PATH, or upload a model.safetensors')
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError
    try:
        from huggingface_hub.utils import LocalEntryNotFoundError  # offline / not cached: not a missing file
    except ImportError:  # pragma: no cover - very old huggingface_hub
        LocalEntryNotFoundError = ()

    repo_id, _, revision = repo.partition('@')
    try:
        return hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache_dir,
                               library_name='vitfree')
    except LocalEntryNotFoundError as e:
        raise WeightsError(f'cannot get {filename} of hf-hub:{repo}: it is not in the local cache and the Hub '
                           f'cannot be reached ({type(e).__name__}); go online, or load a local export with '
                           f'local-dir:PATH') from None
    except EntryNotFoundError:
        raise UnsafeWeightsError(f'hf-hub:{repo} has no {filename}; vitfree loads weights from the Hub only as '
                                 f'safetensors and will not fall back to pytorch_model.bin or other pickles') from None


# ---- manifest of shipped weights --------------------------------------------------------------------
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
    """Entries of the weights manifest: ``{name: {file?, hf_hub_id?, hf_hub_filename?, sha256, size?}}``."""
    path = Path(path) if path is not None else manifest_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise WeightsError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(data, dict) or data.get('format') != MANIFEST_FORMAT:
        raise WeightsError(f'{path}: expected {{"format": "{MANIFEST_FORMAT}", "version": 1, "weights": {{...}}}}')
    entries = data.get('weights', {})
    if not isinstance(entries, dict):
        raise WeightsError(f'{path}: "weights" must be an object of name -> entry')
    for name, e in entries.items():
        sha = e.get('sha256') if isinstance(e, dict) else None
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in '0123456789abcdef' for c in sha)):
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
    """Check a weight file against its SHA-256 in the manifest.

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
    if not path.is_file():
        raise WeightsError(f'weight file not found: {path}')
    entries = load_manifest(manifest)
    key, entry = _find_entry(entries, path, name, hub)
    if entry is None:
        if required:
            raise WeightsIntegrityError(f'{path} is shipped with vitfree but not listed in '
                                        f'{manifest or manifest_path()}; add it with vitfree.weights.add_to_manifest')
        return None
    size = entry.get('size')
    if size is not None and path.stat().st_size != size:
        raise WeightsIntegrityError(f'{path} has {path.stat().st_size} bytes but the manifest entry {key!r} says '
                                    f'{size}: the file is truncated or not the released one; delete it and '
                                    f'download again')
    digest = sha256_file(path)
    if digest != entry['sha256']:
        raise WeightsIntegrityError(f'{path} has SHA-256 {digest} but the manifest entry {key!r} expects '
                                    f'{entry["sha256"]}: the file is corrupt or not the released one; '
                                    f'delete it and download again')
    return key


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
        data = json.loads(mpath.read_text())
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
