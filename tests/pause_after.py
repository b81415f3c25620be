"""Run the dorakit command line so that it pauses after writing the metrics of step N until it is sent
SIGTERM or SIGINT: the tests' interruption point, whatever the load of the machine.

    python -m tests.pause_after N train ARGS...      (also under torchrun: -m tests.pause_after ...)

Without it, a test that signals a run "after its third step" races the run: a 40-step run of a tiny model
takes about 2 s, so a test process held up that long sees it finish before the signal lands.
"""

from __future__ import annotations

import sys
import time

from dorakit.cli import main
from dorakit.train import loop, report


def pause_after(step: int, timeout: float = 300.0) -> None:
    signalled = []
    handle, write = loop.StopSignal._handle, report.MetricsLog.write

    def on_signal(self, signum, frame):
        signalled.append(signum)
        return handle(self, signum, frame)

    def write_then_wait(self, record):
        write(self, record)
        end = time.monotonic() + timeout
        while record["step"] >= step and not signalled and time.monotonic() < end:
            time.sleep(0.01)  # a signal interrupts the sleep and runs on_signal

    loop.StopSignal._handle = on_signal
    report.MetricsLog.write = write_then_wait


if __name__ == "__main__":
    pause_after(int(sys.argv[1]))
    main(sys.argv[2:])
