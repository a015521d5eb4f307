"""Signal handlers a long job sets for a while and then puts back (the training loop, `npgpt bench`).

    with handling(("SIGINT", "SIGTERM"), handler):    # handler(signum, frame)
        ...

sets `handler` for each named signal this platform has, from the main thread only (Python allows no
other; elsewhere nothing is set), and leaves alone a signal the process ignores (SIG_IGN: nohup's SIGHUP,
a launcher's choice). On the way out it puts back what it replaced; a handler set outside Python, which
cannot be read back, is replaced by Python's own (KeyboardInterrupt for SIGINT, the default otherwise).
"""
from __future__ import annotations

import contextlib
import signal
import threading


def exit_status(name: str) -> int:
    """128 + the signal's number: what a shell reports for a process the signal ended (130 SIGINT, 143 SIGTERM)."""
    return 128 + getattr(signal, name)


@contextlib.contextmanager
def handling(names, handler):
    replaced = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for name in names:
                sig = getattr(signal, name, None)
                if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                    replaced[sig] = signal.signal(sig, handler)
        yield list(replaced)
    finally:
        for sig, old in replaced.items():
            if old is None:
                old = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, old)
