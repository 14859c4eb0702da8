"""Stop requests from the outside (a cluster preempting the job with SIGTERM, Ctrl-C) as a flag.

The handler only records the request; the trainer finishes the step in flight, writes a
checkpoint and returns. A second Ctrl-C raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """Context manager: while active, SIGTERM and SIGINT set ``requested`` instead of ending the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: finishing this step, saving a checkpoint, then stopping "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
