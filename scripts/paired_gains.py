"""Paired gains of runs over a baseline, attack by attack, on the same test images.

    python scripts/paired_gains.py BASELINE_JSON RUN_JSON [RUN_JSON ...]

For every attack both evaluations ran, prints the run's accuracy minus the baseline's and two standard errors of
that difference (`robal.evaluate.report.paired_gains`). Refuses evaluations of different images.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from robal.evaluate.report import paired_gains


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    baseline = json.loads(Path(argv[0]).read_text())
    for path in argv[1:]:
        try:
            gains = paired_gains(json.loads(Path(path).read_text()), baseline)
        except ValueError as err:
            raise SystemExit(f"{path} vs {argv[0]}: {err}") from None
        print(f"{path} vs {argv[0]}: " + "; ".join(f"{a} {g:+.2f} (two SE {n:.2f})" for a, (g, n) in gains.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
