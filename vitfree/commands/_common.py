"""Small helpers shared by the sub-commands: argument parsing, model names, images, output paths.

Nothing here imports torch at module level: ``vitfree --help`` builds every sub-command's parser.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

_logger = logging.getLogger('vitfree.cli')


class CommandError(ValueError):
    """An expected failure of a command: the CLI prints ``error: <message>`` and exits with status 2."""


# ---- arguments ---------------------------------------------------------------------------------
def key_value(text: str) -> Tuple[str, Any]:
    """``key=value`` with the value read as a Python literal (``img_size=(32, 32)``, ``lr=1e-3``), else as
    YAML (``class_token=false``, ``pretrained_cfg_overlay={file: w.safetensors}``), else as a string."""
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r}')
    k, v = text.split('=', 1)
    if not k.strip():
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r} (no key)')
    try:
        return k.strip(), ast.literal_eval(v)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    from ..windows import WindowSpecError, parse_yaml
    try:
        return k.strip(), parse_yaml(v, f'--model-kwargs {k.strip()}')
    except WindowSpecError:  # not YAML either (or YAML with aliases): the plain string
        return k.strip(), v


def add_common_flags(parser: argparse.ArgumentParser, images: bool = False) -> None:
    """``--debug`` on every command (a full traceback instead of one ``error:`` line); ``--strict`` on
    commands that read image files (refuse unreadable ones instead of skipping them)."""
    parser.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                        help='show the full traceback of an error')
    if images:
        parser.add_argument('--strict', action='store_true',
                            help='refuse to run when an image file cannot be read (default: skip it with a warning '
                                 'that lists every such file)')


# ---- models ------------------------------------------------------------------------------------
def check_model_name(name: str) -> None:
    """Raise :class:`CommandError` for a model name timm cannot build, with close matches from
    ``timm.list_models``; ``local-dir:`` folders must hold an exported ``config.json``."""
    import timm

    from .. import models  # noqa: F401  (the winft_* models are registered)
    if name.startswith('hf-hub:'):
        if '/' not in name[len('hf-hub:'):]:
            raise CommandError(f'model {name!r}: a Hub model is named hf-hub:ORG/NAME')
        return
    if name.startswith('local-dir:'):
        from ..hub import check_config
        folder = Path(name[len('local-dir:'):]).expanduser()
        if not folder.is_dir():
            raise CommandError(f'model {name!r}: {folder} is not a folder; local-dir: takes a folder written by '
                               f'vitfree.hub.save_pretrained or `vitfree finetune` (its model/ sub-folder)')
        check_config(folder / 'config.json')
        return
    arch, _, tag = name.partition('.')
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        family = timm.list_models(arch.split('_')[0] + '_*') if '_' in arch else []
        hint = (f'; did you mean {", ".join(close)}?' if close else
                f'; {len(family)} models start with {arch.split("_")[0] + "_"!r}, e.g. {", ".join(family[:5])}'
                if family else '')
        raise CommandError(f'unknown model {name!r}{hint} (every timm model name is accepted, see '
                           f'timm.list_models(); also local-dir:PATH and hf-hub:ORG/NAME)')
    if tag:
        tags = sorted(t.partition('.')[2] for t in timm.list_pretrained(f'{arch}.*'))
        if tag not in tags:
            raise CommandError(f'model {name!r}: {arch} has no pretrained tag {tag!r}; its tags: '
                               f'{", ".join(tags) or "(none)"}')


# ---- the model flags every model command shares -------------------------------------------------
MODEL_FLAGS = ('pretrained', 'checkpoint', 'model_kwargs', 'batch_size', 'device')


def add_model_flags(parser: Any, flags: Sequence[str] = MODEL_FLAGS, batch_size: int = 8,
                    device: Optional[str] = 'cpu', groups: Optional[Mapping[str, Any]] = None,
                    texts: Optional[Mapping[str, str]] = None) -> None:
    """The model flags of a command (``--pretrained --checkpoint --model-kwargs --batch-size --device``,
    or those of them in ``flags``), in one form everywhere: ``groups`` puts a flag in an argument
    group, ``texts`` replaces flags' help texts."""
    helps = {
        'pretrained': "load the model's pretrained weights: from the Hub or its local cache, or the weights saved "
                      "in a local-dir: folder (off by default: random initialisation)",
        'checkpoint': 'a .safetensors/.pth state dict to load into the model (strictly; only the classifier may '
                      'differ)',
        'model_kwargs': 'extra timm.create_model arguments, e.g. img_size=64 depth=2',
        'batch_size': 'images per forward (an integer >= 1; default %(default)s)',
        'device': 'torch device: cpu, cuda, cuda:N or mps (default: %(default)s)',
    }
    helps.update(texts or {})
    for name in flags:
        target = (groups or {}).get(name, parser)
        if name == 'pretrained':
            target.add_argument('--pretrained', action='store_true', help=helps[name])
        elif name == 'checkpoint':
            target.add_argument('--checkpoint', default=None, metavar='FILE', help=helps[name])
        elif name == 'model_kwargs':
            target.add_argument('--model-kwargs', nargs='*', type=key_value, default=[], metavar='KEY=VALUE',
                                help=helps[name])
        elif name == 'batch_size':
            target.add_argument('-b', '--batch-size', type=int, default=batch_size, help=helps[name])
        elif name == 'device':
            target.add_argument('--device', default=device, help=helps[name])
        else:
            raise ValueError(f'unknown model flag {name!r}; choose from {MODEL_FLAGS}')


# timm ViT arguments that --model-kwargs commonly sets, and the values they take
def _kwarg_ranges() -> dict:
    from ..train.options import Range
    rate = Range(float, 0.0, 1.0, high_open=True)
    return {'depth': Range(int, 1), 'num_heads': Range(int, 1), 'embed_dim': Range(int, 1),
            'num_classes': Range(int, 0), 'in_chans': Range(int, 1), 'mlp_ratio': Range(float, 0.0, low_open=True),
            'reg_tokens': Range(int, 0), 'drop_rate': rate, 'drop_path_rate': rate, 'attn_drop_rate': rate,
            'proj_drop_rate': rate, 'pos_drop_rate': rate, 'patch_drop_rate': rate}


def _sizes(value: Any) -> Optional[Tuple[int, int]]:
    """An image or patch size (an int, or a pair of ints) as a pair, else None."""
    pair = value if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        return None
    return int(pair[0]), int(pair[1])


def patch_size_of(model: str, kwargs: Mapping[str, Any]) -> Optional[Tuple[int, int]]:
    """The patch size a model will have: ``patch_size`` in ``kwargs``, else the ``patchN`` in a timm name."""
    if 'patch_size' in kwargs:
        return _sizes(kwargs['patch_size'])
    found = re.search(r'patch(\d+)', model.split(':')[-1])
    return (int(found.group(1)),) * 2 if found else None


def check_model_kwargs(model: str, kwargs: Mapping[str, Any], img_size: Any = None,
                       img_flag: str = '--model-kwargs img_size') -> None:
    """:class:`CommandError` for a ``--model-kwargs`` value of the wrong type or range (``depth=abc``,
    ``embed_dim=100 num_heads=3``), and for an image smaller than one patch, before the model is built."""
    for name, rng in _kwarg_ranges().items():
        if name in kwargs and rng.problem(kwargs[name]) is not None:
            raise CommandError(f'--model-kwargs {name}={kwargs[name]!r}: {name} must be {rng.describe()}')
    for name in ('img_size', 'patch_size'):
        if name in kwargs and _sizes(kwargs[name]) is None:
            raise CommandError(f'--model-kwargs {name}={kwargs[name]!r}: {name} must be an integer >= 1 or a pair '
                               f'of them, e.g. {name}=32 or {name}=(32, 48)')
    dim, heads = kwargs.get('embed_dim'), kwargs.get('num_heads')
    if dim is not None and heads is not None and dim % heads:
        raise CommandError(f'--model-kwargs embed_dim={dim} num_heads={heads}: embed_dim must be divisible by '
                           f'num_heads (each head gets embed_dim / num_heads channels)')
    img = img_size if img_size is not None else kwargs.get('img_size')
    size, patch = (_sizes(img) if img is not None else None), patch_size_of(model, kwargs)
    if size is not None and patch is not None and (size[0] < patch[0] or size[1] < patch[1]):
        raise CommandError(f'{img_flag} {img!r}: the image is smaller than one patch ({patch[0]}x{patch[1]} pixels '
                           f'for {model}); give an image size of at least {max(patch)} pixels, or a smaller '
                           f'patch_size')


def _model_error(model: str, kwargs: Mapping[str, Any], e: BaseException) -> CommandError:
    shown = ' '.join(f'{k}={v!r}' for k, v in kwargs.items())
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if 'divisible by num_heads' in text:
        text = 'embed_dim must be divisible by num_heads; choose a num_heads that divides the embedding width'
    return CommandError(f'--model-kwargs {shown}: {model} cannot be built with them ({text})')


def create_model(args):
    """The model named by ``args.model`` (seeded with ``args.seed``, extra ``args.model_kwargs``,
    ``args.pretrained``), on ``args.device``, with ``args.checkpoint`` loaded strictly when given (SHA-256
    checked when the file is shipped or exported; only the classifier may differ).  Bad flags are a
    :class:`CommandError` before anything is built."""
    import timm
    import torch

    from ..train.distributed import check_device
    from ..weights import load_weights, prefetch_pretrained
    check_model_name(args.model)
    kwargs = dict(args.model_kwargs)
    check_model_kwargs(args.model, kwargs)
    if getattr(args, 'batch_size', 1) < 1:
        raise CommandError(f'--batch-size must be an integer >= 1, got {args.batch_size}')
    try:
        device = check_device(args.device)
    except ValueError as e:
        raise CommandError(f'--device: {e}') from None
    if args.pretrained:  # an unreachable Hub fails here at once, naming the model, repo and file
        prefetch_pretrained(args.model, kwargs)
    torch.manual_seed(args.seed)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except TypeError as e:
        if 'argument' not in str(e) and not kwargs:
            raise
        raise _model_error(args.model, kwargs, e) from None
    except AssertionError as e:  # timm checks its arguments with assert
        raise _model_error(args.model, kwargs, e) from None
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    return model.to(device)


# ---- images --------------------------------------------------------------------------------------
def checked_image_sources(sources: Union[str, Sequence[str]], strict: bool = False) -> Union[str, List[str]]:
    """Open every image file named (or found under a named folder) once, before the work starts.

    Returns ``sources`` unchanged when all open; otherwise warns with the list of unreadable files
    and returns the sources with those files left out (folders expanded to their readable files),
    or raises :class:`CommandError` when ``strict``.  Names that are not files or folders (built-in
    data sets) pass through untouched."""
    from ..data import IMG_EXTENSIONS, find_unreadable_images, list_image_files

    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    expanded: List[Tuple[str, List[Path]]] = []
    for s in items:
        p = Path(s).expanduser()
        if p.is_dir():
            expanded.append((str(s), list_image_files(p, required=False)))
        elif p.is_file() and p.suffix.lower() in IMG_EXTENSIONS:
            expanded.append((str(s), [p]))
        else:
            expanded.append((str(s), []))
    bad = find_unreadable_images([f for _, files in expanded for f in files])
    if not bad:
        return sources
    items = [f'{path} ({why})' for path, why in bad.items()]
    listing = '; '.join(items) if len(items) <= 3 else '\n    ' + '\n    '.join(items)
    if strict:
        raise CommandError(f'{len(bad)} image file(s) cannot be read (--strict; without it they are skipped): '
                           f'{listing}')
    _logger.warning(f'skipping {len(bad)} unreadable image file(s) (--strict refuses them instead): {listing}')
    kept: List[str] = []
    for s, files in expanded:
        if not files:
            kept.append(s)
        else:
            kept += [str(f) for f in files if str(f) not in bad]
    if not kept:
        raise CommandError(f'no readable image left in {", ".join(map(str, items))}')
    return kept


# ---- output paths ---------------------------------------------------------------------------------
def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, what: str) -> None:
    anchor = _first_existing(path)
    if anchor != path.absolute() and not anchor.is_dir():
        raise CommandError(f'{what} {str(path)!r}: {anchor} is a file, so nothing can be created under it')
    if not os.access(anchor if anchor.is_dir() else anchor.parent, os.W_OK | os.X_OK):
        raise CommandError(f'{what} {str(path)!r}: {anchor if anchor.is_dir() else anchor.parent} is not writable')


class Outputs:
    """The output paths of one command, checked before any work starts.  If the command then fails,
    what it created is removed again: new files, new folders, and new entries in folders that
    existed before; nothing that was there before is touched.

    Commands declare them with ``parser.set_defaults(outputs=[(dest, kind, suffixes), ...])``; the
    CLI wraps the command in this guard.  ``kind`` is ``'file'`` or ``'dir'``.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.checked: List[Tuple[Path, str]] = []
        for dest, kind, suffixes in getattr(args, 'outputs', None) or ():
            value = getattr(args, dest, None)
            if value:
                self.checked.append((self._check(Path(value), kind, suffixes, f'--{dest.replace("_", "-")}'), kind))

    @staticmethod
    def _check(path: Path, kind: str, suffixes: Optional[Iterable[str]], what: str) -> Path:
        if kind == 'file':
            if path.is_dir():
                raise CommandError(f'{what} {str(path)!r} is a folder; give a file name')
            if suffixes and path.suffix.lower() not in tuple(suffixes):
                raise CommandError(f'{what} {str(path)!r} must end in {", ".join(suffixes)}')
            if path.exists():
                if not os.access(path, os.W_OK):
                    raise CommandError(f'{what} {str(path)!r} is not writable')
            else:
                _check_creatable(path, what)
        else:
            if path.exists() and not path.is_dir():
                raise CommandError(f'{what} {str(path)!r} exists and is not a folder')
            if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
                raise CommandError(f'{what} {str(path)!r} is not writable')
            _check_creatable(path, what)
        return path

    def __enter__(self) -> 'Outputs':
        self._before = []
        for path, kind in self.checked:
            top = path if kind == 'dir' else path.parent
            created_from = _first_existing(top)
            entries = set(os.listdir(path)) if kind == 'dir' and path.is_dir() else None
            self._before.append((path, kind, path.exists(), created_from, entries))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False
        for path, kind, existed, created_from, entries in self._before:
            try:
                if kind == 'file' and not existed and path.is_file():
                    path.unlink()
                if kind == 'dir' and existed and entries is not None and path.is_dir():
                    for name in set(os.listdir(path)) - entries:
                        target = path / name
                        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
                # folders this command created (the output folder itself, or a file's parents)
                top = path if kind == 'dir' else path.parent
                if not existed or kind == 'file':
                    self._remove_created(top, created_from, whole=(kind == 'dir' and not existed))
            except OSError as e:  # cleaning up must not hide the real error
                _logger.warning(f'could not remove {path} after the failure: {e}')
        return False

    @staticmethod
    def _remove_created(top: Path, existed_above: Path, whole: bool) -> None:
        """Remove ``top`` and its parents up to (not including) ``existed_above``, which existed before:
        ``top`` with everything in it when ``whole``, parents only when empty."""
        top = top.absolute()
        if top == existed_above or not top.exists() or existed_above not in top.parents:
            return
        if whole:
            shutil.rmtree(top)
        elif not any(top.iterdir()):
            top.rmdir()
        else:
            return
        p = top.parent
        while p != existed_above and p.exists() and not any(p.iterdir()):
            p.rmdir()
            p = p.parent
