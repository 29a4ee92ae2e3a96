"""``vitfree`` command line: thin argument parsing over library functions.

Each sub-command lives in ``vitfree/commands/<name>.py`` with ``add_parser(subparsers)``;
the parser's ``func`` default runs it.  Heavy imports happen inside the commands.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = ['demo', 'erf', 'analyze', 'finetune', 'bench', 'push', 'specs']


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__
    parser = argparse.ArgumentParser(prog='vitfree', description='Window-free Vision Transformers for timm.')
    parser.add_argument('--version', action='version', version=f'vitfree {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f'vitfree.commands.{name}')
        except ModuleNotFoundError as e:
            if e.name == f'vitfree.commands.{name}':
                continue  # command not available in this build
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
