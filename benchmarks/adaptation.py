"""Domain adaptation against the baselines: one seed of :mod:`benchmarks.federation`.

Kept so the recorded command (``benchmarks/results/README.md``) still runs::

    python -m benchmarks.adaptation --data ../shared/data/retina --rounds 6 --local-steps 20

It takes the options of ``python -m benchmarks.federation``, with one seed and
``runs/bench-adaptation/`` as defaults, and writes that command's files there.
"""

from __future__ import annotations

import sys

from benchmarks import federation


def main(argv: list[str] | None = None) -> int:
    """Run every method with one seed (the options given after these defaults win)."""
    args = sys.argv[1:] if argv is None else argv
    return federation.main(["--seeds", "1", "--output", "runs/bench-adaptation", *args])


if __name__ == "__main__":
    raise SystemExit(main())
