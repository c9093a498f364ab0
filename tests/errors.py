"""What every expected failure of the alike command must look like: exit `code`, exactly one
`alike: error:` line holding each of `words`, and no traceback (Ray's included)."""
from __future__ import annotations


def refused(p, code: int, *words: str) -> str:
    """Check the finished process `p` (subprocess.CompletedProcess); -> its error line."""
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("alike: error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]
