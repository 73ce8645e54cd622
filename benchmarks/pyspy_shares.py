"""Shares of one loop's samples in a py-spy raw profile: by function (self and inclusive) and by line.

    py-spy record --nonblocking --subprocesses --threads --format raw --rate 100 -o spy.txt -- charon-bench ...
    python benchmarks/pyspy_shares.py spy.txt --root BatchServer.serve_forever

Only stacks that pass through ``--root`` count (e.g. ``BatchServer.serve_forever``: every
front end's socket loop; ``_drive``: the load generator's main threads), from that frame down.
Without ``--native``, time in C code (ZeroMQ, numpy, numba's dispatcher) is charged to the
Python line that called it, which is what the per-line table is for.
"""

from __future__ import annotations

import argparse
import collections
import re

_LINE = re.compile(r"^process \d+:\".*?\";(.*) (\d+)$", re.S)
_LINENO = re.compile(r":\d+\)$")


def shares(path: str, root: str):
    """(samples, self by function, inclusive by function, self by line) for stacks through ``root``."""
    total, own, incl, by_line = 0, collections.Counter(), collections.Counter(), collections.Counter()
    with open(path, errors="replace") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            frames = m.group(1).split(";")[1:]  # the first is the thread (--threads)
            start = next((i for i, fr in enumerate(frames) if fr.startswith(root + " ")), None)
            if start is None:
                continue
            frames, n = frames[start:], int(m.group(2))
            total += n
            by_line[frames[-1]] += n
            funcs = [_LINENO.sub(")", fr) for fr in frames]
            own[funcs[-1]] += n
            for fn in set(funcs):
                incl[fn] += n
    return total, own, incl, by_line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", help="py-spy record --format raw output")
    ap.add_argument("--root", default="BatchServer.serve_forever", help="function whose stacks count")
    ap.add_argument("--top", type=int, default=20, help="rows per table")
    a = ap.parse_args(argv)
    total, own, incl, by_line = shares(a.profile, a.root)
    print(f"{a.root}: {total} samples")
    for title, counter in (("self", own), ("inclusive", incl), ("self, by line", by_line)):
        print(f"\n{title}:")
        for name, n in counter.most_common(a.top):
            print(f"  {100 * n / max(total, 1):5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
