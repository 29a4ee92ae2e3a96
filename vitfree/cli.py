"""``vitfree`` command line: thin argument parsing over library functions, and one error path.

Each sub-command lives in ``vitfree/commands/<name>.py`` with ``add_parser(subparsers)``;
the parser's ``func`` default runs it.  Heavy imports happen inside the commands, so
``vitfree --help`` never loads torch.

Errors: an expected failure (a bad value, a missing or unreadable file, weights that do not fit,
a broken checkpoint ...) is printed as one line, ``error: <what is wrong and what would be
accepted>``, and the exit status is 2; a failure nobody expected prints one line too and exits
with 1.  ``--debug`` shows the full traceback instead.  Warnings a user must see (a resized
window spec, a warm-up longer than training, skipped images) print as ``warning: ...`` lines.
Output paths a command declares are checked before it starts, and when it fails, what it
created is removed again.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import warnings
from typing import List, Optional, Tuple

COMMANDS = ['demo', 'erf', 'analyze', 'finetune', 'bench', 'push', 'specs', 'calibrate']
IMAGE_COMMANDS = ('erf', 'analyze')  # commands that read image files (finetune declares its own --strict)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error that points at ``--help``."""

    def error(self, message: str):
        self.exit(2, f'error: {message} (see `{self.prog} --help`)\n')


def build_parser() -> argparse.ArgumentParser:
    from .commands._common import add_common_flags
    from .version import __version__
    parser = _Parser(prog='vitfree', description='Window-free Vision Transformers for timm.')
    parser.add_argument('--version', action='version', version=f'vitfree {__version__}')
    parser.add_argument('--debug', action='store_true', default=False,
                        help='show the full traceback of an error instead of one line')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f'vitfree.commands.{name}')
        except ModuleNotFoundError as e:
            if e.name == f'vitfree.commands.{name}':
                continue  # command not available in this build
            raise
        mod.add_parser(sub)
        p = sub.choices[name]
        if not any('--debug' in a.option_strings for a in p._actions):
            add_common_flags(p, images=name in IMAGE_COMMANDS)
    return parser


# ---- what users see ------------------------------------------------------------------------------
class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return f'{record.levelname.lower()}: {msg}' if record.levelno >= logging.WARNING else msg


@contextlib.contextmanager
def _user_output():
    """While a command runs: INFO and above from vitfree, WARNING and above from everything else, to
    stderr, one line each (``warning: ...``); Python warnings the same way.  Restored afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    root, ours = logging.getLogger(), logging.getLogger('vitfree')
    saved = (ours.level, warnings.showwarning)
    root.addHandler(handler)
    ours.setLevel(logging.INFO)

    def show(message, category, filename, lineno, file=None, line=None):
        print(f'warning: {message}', file=sys.stderr if file is None else file)

    warnings.showwarning = show
    try:
        yield
    finally:
        root.removeHandler(handler)
        ours.setLevel(saved[0])
        warnings.showwarning = saved[1]


def _expected_errors() -> Tuple[type, ...]:
    """Failures that mean "bad input", not "bug"; only classes of modules already loaded can match."""
    from .commands._common import CommandError
    kinds: List[type] = [CommandError, ValueError, OSError, MemoryError, FloatingPointError, ImportError]
    for module, name in (('vitfree.weights', 'WeightsError'), ('vitfree.train.checkpoint', 'CheckpointError'),
                         ('safetensors', 'SafetensorError')):
        if module in sys.modules and hasattr(sys.modules[module], name):
            kinds.append(getattr(sys.modules[module], name))
    return tuple(kinds)


def describe_error(e: BaseException) -> str:
    """One line (or a short list) saying what went wrong, for ``error: ...``."""
    if isinstance(e, OSError) and getattr(e, 'filename', None) and e.strerror:
        where = f'{e.filename}' + (f' -> {e.filename2}' if getattr(e, 'filename2', None) else '')
        return f'{where}: {e.strerror}'
    if isinstance(e, ModuleNotFoundError) and e.name:
        return (f'this needs the Python package {e.name!r}, which is not installed (pip install '
                f'"vitfree[analysis]" installs the optional ones)')
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        text = f'KeyError: {text}'
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, 'debug', False))
    from .commands._common import Outputs, checked_image_sources
    try:
        with _user_output(), Outputs(args):  # output paths checked before any work
            for dest in getattr(args, 'image_inputs', None) or ():  # unreadable images: skipped, or --strict
                setattr(args, dest, checked_image_sources(getattr(args, dest), strict=getattr(args, 'strict', False)))
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    except SystemExit as e:  # a command's own `raise SystemExit('error: ...')`
        if isinstance(e.code, str):
            print(e.code if e.code.startswith('error:') else f'error: {e.code}', file=sys.stderr)
            return 2
        raise
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into a line
        if debug:
            raise
        if isinstance(e, _expected_errors()):
            print(f'error: {describe_error(e)}', file=sys.stderr)
            return 2
        print(f'error: {type(e).__name__}: {describe_error(e)} (unexpected; run again with --debug for the full '
              f'traceback, and please report it)', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
