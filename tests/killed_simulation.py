"""Run a synthetic simulation and SIGKILL this process once round K is reported (test_resume).

Round K's files, its resume state included, are written before the round is reported,
so the kill lands where a coordinator crash between rounds would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from simulations.simulate import SimulationRequest, run_simulation


def main() -> None:
    output, kill_after, request = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])

    def echo(line: str) -> None:
        print(line, flush=True)
        if line.startswith(f"round {kill_after}/"):
            os.kill(os.getpid(), signal.SIGKILL)

    run_simulation(SimulationRequest(output=output, **request), echo=echo)


if __name__ == "__main__":
    main()
