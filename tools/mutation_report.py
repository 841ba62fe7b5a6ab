"""Kill rate per module from a mutmut run (``make mutation``); lists the mutants that lived.

Reads the ``mutants/**/*.meta`` files mutmut 3 leaves in the working directory. A mutant counts
as *detected* when a test failed on it (killed) or it ran past mutmut's time limit (timeout);
*missed* when every test passed (survived) or no selected test runs its code (no tests). The
kill rate is detected / (detected + missed); mutants not run yet are shown apart.

Example:
    .venv/bin/python tools/mutation_report.py --survivors
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

DETECTED = {"killed", "timeout", "caught by type check", "segfault"}
MISSED = {"survived", "no tests"}


def status(exit_code: int | None) -> str:
    try:
        from mutmut.stats import status_by_exit_code
    except ImportError:  # the same table, for reading results without mutmut installed
        table = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
                 34: "skipped", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
                 255: "timeout", 37: "caught by type check", -11: "segfault", -9: "segfault",
                 None: "not checked"}  # fmt: skip
        return table.get(exit_code, "suspicious")
    return status_by_exit_code[exit_code]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="mutants", help="mutmut's working folder")
    parser.add_argument("--survivors", action="store_true", help="list the missed mutants")
    args = parser.parse_args(argv)
    metas = sorted(Path(args.root).rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {args.root}/: run `make mutation` first", file=sys.stderr)
        return 1
    print(f"{'module':<40} {'mutants':>7} {'killed':>6} {'timeout':>7} {'survived':>8} "
          f"{'no tests':>8} {'not run':>7} {'kill rate':>9}")  # fmt: skip
    missed_names = []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        counts = Counter(status(c) for c in codes.values())
        detected = sum(counts[s] for s in DETECTED)
        missed = sum(counts[s] for s in MISSED)
        rate = f"{100 * detected / (detected + missed):.1f} %" if detected + missed else "-"
        module = str(meta.relative_to(args.root))[: -len(".py.meta")].removeprefix("src/")
        print(f"{module.replace('/', '.'):<40} {len(codes):>7} {counts['killed']:>6} "
              f"{counts['timeout']:>7} {counts['survived']:>8} {counts['no tests']:>8} "
              f"{counts['not checked']:>7} {rate:>9}")  # fmt: skip
        missed_names += [(n, status(c)) for n, c in codes.items() if status(c) in MISSED]
    if args.survivors and missed_names:
        print("\nmissed mutants (`mutmut show NAME` prints the change):")
        for name, why in missed_names:
            print(f"  {name}  [{why}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
