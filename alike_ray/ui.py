"""What every command shares for talking to people and scripts: stdout guarded for --json,
progress bars, sizes, the Ray connection. In a module of its own so that command modules
(alike_ray/commands/) share the one guarded stdout even when cli.py runs as __main__."""
from __future__ import annotations

import json
import os
import sys
import time

EPILOG = """exit codes: 0 ok, 1 a backup failed, 2 bad input, 3 damaged data, 4 no space left,
5 source unreadable, 130 interrupted. --store defaults to $ALIKE_STORE; Ray is joined at
--address or $RAY_ADDRESS, else a local instance is started."""


_OUT = None


def out(*a, **kw) -> None:
    """Write to the real standard output. While a command runs, file descriptor 1 points at
    stderr, so that whatever Ray or a library prints cannot break our one JSON object."""
    kw.setdefault("file", _OUT or sys.stdout)
    print(*a, **kw)
    kw["file"].flush()


def _guard_stdout() -> None:
    global _OUT
    if _OUT is None:
        sys.stdout.flush()
        _OUT = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)


class Progress:
    """A progress bar (bytes, rate, ETA) on a terminal; silent otherwise."""

    def __init__(self, desc: str, unit: str = "B", enabled: bool | None = None):
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            # a terminal that reports 0 columns (some ptys) would get an empty bar: fall back to 100
            cols, rows = terminal_size()
            self.bar = tqdm(desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                            file=sys.stderr, ncols=cols, nrows=rows, leave=False, mininterval=0.2)

    def __bool__(self) -> bool:
        return self.bar is not None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = max(total, done)
            self.bar.n = done
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def terminal_size() -> tuple[int, int]:
    """(columns, lines) of the user's terminal: in `alike server`, the client's."""
    size = getattr(sys.stderr, "client_terminal_size", lambda: None)()
    if not size:
        import shutil

        size = shutil.get_terminal_size((100, 20))
    return (size[0] or 100, size[1] or 20)


# -- the time a user waited ----------------------------------------------------------------------
# args.started_at: when the user's `alike` process started (cli.main; in `alike server`, the
# client's, sent with the request); args.work_started: when the command's work began (after
# Ray is joined, or the server took the command). Start-up is the difference.

def work_starts(args) -> None:
    """The command's own work begins now: what came before is its start-up."""
    if getattr(args, "work_started", None) is None:
        args.work_started = time.time()


def times(args) -> dict:
    """{"wall_seconds": since the process started, "startup_seconds": until the work began}."""
    now = time.time()
    t0 = getattr(args, "started_at", None) or now
    work = getattr(args, "work_started", None) or t0
    return {"wall_seconds": round(now - t0, 3), "startup_seconds": round(max(0.0, work - t0), 3)}


def took(args, extra: str = "") -> str:
    """'in 5.6s (start-up 3.1s)'; extra: more to say in the parentheses ('9.6 MB/s')."""
    t = times(args)
    return f"in {t['wall_seconds']:.1f}s (start-up {t['startup_seconds']:.1f}s{'; ' + extra if extra else ''})"


def with_times(args, obj: dict) -> dict:
    """obj (a command's JSON) with wall_seconds and startup_seconds next to its seconds."""
    if "seconds" not in obj:
        return obj
    out = {}
    for k, v in obj.items():
        out[k] = v
        if k == "seconds":
            out.update(times(args))
    return out


def _emit(args, obj: dict, text: str) -> None:
    if args.json:
        out(json.dumps(obj, default=str))
    else:
        out(text)


def _h(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _connect(args) -> None:
    from pipelines.cluster import connect, forwarded_env

    env = forwarded_env()
    connect(getattr(args, "address", None), env or None, terminal=True)  # Ray's own lines kept off the user's terminal
    work_starts(args)
