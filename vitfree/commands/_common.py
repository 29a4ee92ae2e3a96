"""Small helpers shared by the sub-commands: argument parsing, model names, images, output paths.

Nothing here imports torch at module level: ``vitfree --help`` builds every sub-command's parser.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

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
    import yaml
    try:
        return k.strip(), yaml.safe_load(v)
    except yaml.YAMLError:
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


def create_model(args):
    """The model named by ``args.model`` (seeded with ``args.seed``, extra ``args.model_kwargs``,
    ``args.pretrained``), with ``args.checkpoint`` loaded strictly when given (SHA-256 checked when
    the file is shipped or exported; only the classifier may differ)."""
    import timm
    import torch

    from ..weights import load_weights, prefetch_pretrained
    check_model_name(args.model)
    torch.manual_seed(args.seed)
    kwargs = dict(args.model_kwargs)
    if args.pretrained:  # an unreachable Hub fails here at once, naming the model, repo and file
        prefetch_pretrained(args.model, kwargs)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except TypeError as e:
        if 'argument' not in str(e):
            raise
        raise CommandError(f'--model-kwargs {" ".join(f"{k}={v!r}" for k, v in kwargs.items())}: {args.model} '
                           f'does not take them ({e})') from None
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    return model


# ---- images --------------------------------------------------------------------------------------
def checked_image_sources(sources: Union[str, Sequence[str]], strict: bool = False) -> Union[str, List[str]]:
    """Open every image file named (or found under a named folder) once, before the work starts.

    Returns ``sources`` unchanged when all open; otherwise warns with the list of unreadable files
    and returns the sources with those files left out (folders expanded to their readable files),
    or raises :class:`CommandError` when ``strict``.  Names that are not files or folders (built-in
    data sets) pass through untouched."""
    from ..data import IMG_EXTENSIONS, find_unreadable_images

    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    expanded: List[Tuple[str, List[Path]]] = []
    for s in items:
        p = Path(s).expanduser()
        if p.is_dir():
            expanded.append((str(s), sorted(f for f in p.rglob('*') if f.is_file()
                                            and f.suffix.lower() in IMG_EXTENSIONS)))
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
