"""Fixed representative subsets of the big matrices for CI; the whole of each with
ALIKE_FULL_MATRIX=1 (tests/conftest.py leaves `full_matrix` cases out otherwise).

`cases(rows, ci, ids)` -> pytest params: a row whose id is in `ci` always runs, every other is
marked full_matrix. The CI subsets are chosen by hand to keep one case of each phase of an
operation (start, middle of the data, each commit step, the end, a resumed run), so CI still
crosses every kind of boundary; the full matrix also crosses every n-th pack and shard."""
from __future__ import annotations

import pytest


def cases(rows, ci, ids=None):
    ids = ids or [r if isinstance(r, str) else r[0] for r in rows]
    unknown = set(ci) - set(ids)
    assert not unknown, f"CI subset names cases that are not in the matrix: {sorted(unknown)}"
    out = []
    for row, id_ in zip(rows, ids):
        values = row if isinstance(row, tuple) else (row,)
        out.append(pytest.param(*values, id=id_, marks=() if id_ in ci else (pytest.mark.full_matrix,)))
    return out
