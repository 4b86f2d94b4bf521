"""Paired gains of runs over a baseline, attack by attack, on the same test images.

    python scripts/paired_gains.py BASELINE_JSON RUN_JSON [RUN_JSON ...]

For every attack both evaluations ran, prints the run's accuracy minus the baseline's and two standard errors of
that difference (`paired_noise`: per-image correctness, so the shared images cancel). Refuses evaluations of
different images.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from robal.evaluate.checks import paired_noise, pct
from robal.evaluate.report import correct


def paired_gains(result: dict, baseline: dict) -> dict[str, tuple[float, float]]:
    if result["labels"] != baseline["labels"]:
        raise SystemExit("the two evaluations did not attack the same test images (labels differ)")
    shared = [a for a in baseline["attacks"] if a in result["attacks"]]
    return {a: (pct(correct(result, a)) - pct(correct(baseline, a)),
                paired_noise(correct(result, a), correct(baseline, a))) for a in shared}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    baseline = json.loads(Path(argv[0]).read_text())
    for path in argv[1:]:
        gains = paired_gains(json.loads(Path(path).read_text()), baseline)
        print(f"{path} vs {argv[0]}: " + "; ".join(f"{a} {g:+.2f} (two SE {n:.2f})" for a, (g, n) in gains.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
