"""``vitfree specs [NAME|FILE]``: list shipped window specs or summarise one."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser('specs', help='list shipped window specs, or summarise one spec per block')
    p.add_argument('spec', nargs='?', help='a shipped spec name or a .yaml/.json file')
    p.set_defaults(func=run)


def run(args) -> int:
    from ..analysis.tables import format_spec
    from ..windows import list_specs, resolve_spec
    if not args.spec:
        for name in list_specs():
            print(name)
        return 0
    spec = resolve_spec(args.spec)
    print(f'{args.spec}: grid {spec.grid[0]}x{spec.grid[1]}, {spec.depth} blocks, provenance {spec.provenance.get("kind")}')
    print(format_spec(spec))
    return 0

