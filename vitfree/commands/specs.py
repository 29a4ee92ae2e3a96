"""``vitfree specs [NAME|FILE]``: list shipped window specs or summarise one."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser('specs', help='list shipped window specs, or summarise one spec per block')
    p.add_argument('spec', nargs='?', help='a shipped spec name or a .yaml/.json file')
    p.set_defaults(func=run)


def run(args) -> int:
    from ..windows import list_specs, resolve_spec
    if not args.spec:
        for name in list_specs():
            print(name)
        return 0
    spec = resolve_spec(args.spec)
    print(f'{args.spec}: grid {spec.grid[0]}x{spec.grid[1]}, {spec.depth} blocks, provenance {spec.provenance.get("kind")}')
    print(format_summary(spec))
    return 0


def format_summary(spec) -> str:
    n = spec.grid[0] * spec.grid[1]
    lines = [f'{"block":>5}  {"window":>8}  {"mean area":>9}  {"min":>4}  {"max":>4}  {"of grid":>7}']
    for row in spec.summary():
        kind = 'global' if row['global'] else 'local'
        lines.append(f'{row["block"]:>5}  {kind:>8}  {row["mean_area"]:>9.1f}  {row["min_area"]:>4}  '
                     f'{row["max_area"]:>4}  {100 * row["fraction"]:>6.1f}%')
    lines.append(f'(grid has {n} patches)')
    return '\n'.join(lines)
