"""The order in which a backup hands its blocks to read tasks (pipelines/backup.py `_spread`)."""
from __future__ import annotations

import numpy as np

from pipelines.backup import _spread


def test_spread_is_a_permutation_of_whole_task_pieces():
    todo = np.flatnonzero(np.random.default_rng(3).random(5000) < 0.7)  # a disk with holes
    per = 128
    out = _spread(todo, per)
    assert sorted(out.tolist()) == todo.tolist()
    pieces = [out[i:i + per] for i in range(0, len(out), per)]
    starts = {int(p[0]) for p in pieces}
    for p in pieces:  # each task-sized piece is one piece of `todo`, in disk order
        at = int(np.searchsorted(todo, p[0]))
        assert p.tolist() == todo[at:at + len(p)].tolist()
    assert pieces[-1].tolist() == todo[len(todo) // per * per:].tolist() or len(todo) % per == 0
    assert len(starts) == len(pieces)
    assert out.tolist() != todo.tolist()  # not disk order


def test_a_cluster_of_new_data_is_spread_over_the_run():
    # 26 tasks, the last 6 regions hold the day's new data (as the 2 GiB day-later bench image):
    # in disk order they run back to back at the end; spread, no two of them are next to each
    # other, and they are not all in the last third of the run
    per, n = 64, 26
    todo = np.arange(n * per)
    out = _spread(todo, per)
    order = [int(out[i]) // per for i in range(0, len(out), per)]
    assert sorted(order) == list(range(n))
    heavy = [i for i, r in enumerate(order) if r >= 20]
    assert all(b - a > 1 for a, b in zip(heavy, heavy[1:])), order
    assert min(heavy) < n // 3, order


def test_few_tasks_keep_disk_order():
    todo = np.arange(300)
    assert _spread(todo, 128).tolist() == todo.tolist()
