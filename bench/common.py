"""What the bench scripts share."""
from __future__ import annotations

import os

# a bench measures what it says: a command that is not sent to a server with --server runs in a
# process of its own, also when an `alike server` runs at this host's default socket
os.environ.setdefault("ALIKE_SERVER", "off")
os.environ.setdefault("ALIKE_SERVER_AUTOSTART", "0")


def put_section(path: str, section: str, begin: str, end: str) -> None:
    """Replace one bench's section of latest.md (between its markers `begin` and `end`), or
    append it; the rest of the file stays as it is."""
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        i, j = text.index(begin), text.index(end) + len(end)
        text = text[:i] + section.rstrip("\n") + text[j:]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    with open(path + ".tmp", "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(path + ".tmp", path)


class LoadSampler:
    """The 1-minute load average, sampled every `every` seconds in a thread while the bench runs,
    each sample under the label set last (e.g. the run): how shared the machine was.

        with LoadSampler() as load:
            load.label = "run 1"
            ...
        load.summary()   # {"all": {min, median, max, samples}, "run 1": {...}, ...}
    """

    def __init__(self, every: float = 10.0):
        import threading

        self.every, self.label, self.samples = every, "", []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while True:
            self.samples.append((self.label, os.getloadavg()[0]))
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        import statistics

        def s(xs):
            return dict(min=round(min(xs), 2), median=round(statistics.median(xs), 2), max=round(max(xs), 2),
                        samples=len(xs)) if xs else None

        out = {"all": s([v for _, v in self.samples]), "every": self.every}
        for lab in dict.fromkeys(lab for lab, _ in self.samples if lab and lab not in ("all", "every")):
            out[lab] = s([v for x, v in self.samples if x == lab])
        return out

    @staticmethod
    def text(summary: dict | None) -> str:
        """'load average (1 min) 2.4-12.2 on N CPUs, median 6.2; run 1: 2.4-4.9 (3.1), ...'"""
        if not summary or not summary.get("all"):
            return ""
        a = summary["all"]
        parts = [f"{k}: {v['min']:.1f}-{v['max']:.1f} (median {v['median']:.1f})"
                 for k, v in summary.items() if k not in ("all", "every") and v]
        return (f"load average (1 min, sampled every {summary.get('every', 10):g} s) {a['min']:.1f}-{a['max']:.1f} on "
                f"{os.cpu_count()} CPUs, median {a['median']:.1f}" + (f"; {', '.join(parts)}" if parts else ""))
