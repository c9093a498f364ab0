"""Fault injection for the crash tests: `ALIKE_CRASH_AT=point[:n]` kills the process (SIGKILL,
as a power cut or OOM kill would) the n-th time (default 1st) it reaches `point`. With
`ALIKE_CRASH_FLAG=path` it kills only once across processes: the flag file is created just
before, and its presence disarms the point (so a retried Ray task then succeeds). Unset in
production, where `crash_point` is one dictionary lookup.

`ALIKE_CRASH_AT=point:n:pause` (with ALIKE_CRASH_FLAG) holds the process there instead, once: it
creates the flag file and sleeps until the file is removed, so that a test can act (send a Ctrl-C, start a
second run) while a run is known to be at that point, with no timing involved."""
from __future__ import annotations

import os
import signal
import time

_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("ALIKE_CRASH_AT")
    if not spec:
        return
    point, _, rest = spec.partition(":")
    nth, _, how = rest.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] < int(nth or 1):
        return
    pause = how == "pause"
    if pause and _seen[name] > int(nth or 1):
        return  # held once: the run then goes on
    flag = os.environ.get("ALIKE_CRASH_FLAG")
    if flag:
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if pause and flag:
        while os.path.exists(flag):
            time.sleep(0.05)
        return
    os.kill(os.getpid(), signal.SIGKILL)
