"""Stopping long runs: ``sigterm_interrupts`` makes SIGTERM stop one promptly (the finished work
is saved when Python gets control, and the process exits anyway if a long native MLX call keeps it
from doing so); ``StopRequest`` asks a training loop to save and stop after its current step."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

GRACE_S = 5.0  # time given to save after SIGTERM before the process exits regardless


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # `kill` saves the finished steps like Ctrl-C does


@contextlib.contextmanager
def sigterm_interrupts(grace_s: float = GRACE_S):
    """Within the block SIGTERM raises KeyboardInterrupt in the main thread; a watcher thread
    (woken through ``signal.set_wakeup_fd``, which works while MLX computes without the GIL)
    exits the process with status 143 if the block has not ended ``grace_s`` seconds later."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    done = threading.Event()

    def watch():
        while data := os.read(r, 64):
            if signal.SIGTERM in data:
                if not done.wait(grace_s):
                    print("terminated (SIGTERM)", file=sys.stderr, flush=True)
                    os._exit(143)
                return

    previous = signal.signal(signal.SIGTERM, _interrupt)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, daemon=True, name="sigterm-watch")
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGTERM, previous)
        os.close(w)
        watcher.join(1.0)
        os.close(r)


class StopRequest:
    """Signal handler: the first SIGINT / SIGTERM asks the training loop to save and stop after
    the current step; a second one stops at once (losing that step)."""

    def __init__(self):
        self.asked = False

    def handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nstopping after this step (again to stop at once)", file=sys.stderr)
