"""What a command costs outside its work: the read tasks' split (the cores finish together) and
the thin client of `alike server` (it imports neither numpy nor Ray)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from pipelines.backup import _batches


def test_batches_cover_the_blocks_in_order_and_shrink_at_the_end():
    todo = np.arange(100, 2700, dtype=np.int64)
    got = list(_batches(todo, 128, 2))
    assert np.array_equal(np.concatenate(got), todo)  # every block once, in disk order
    sizes = [len(b) for b in got]
    assert max(sizes) == 128 and sizes[0] == 128
    # the last tasks are smaller (never below a quarter, but for the very last one)
    assert all(s >= 32 for s in sizes[:-1])
    assert sizes[-3] < 128 and sizes[-2] < sizes[-6]
    assert sizes == sorted(sizes, reverse=True)
    # more cores: the shrinking starts earlier
    assert sum(s < 128 for s in _sizes(todo, 8)) > sum(s < 128 for s in sizes)
    assert list(_batches(np.zeros(0, np.int64), 128, 2)) == []
    assert [len(b) for b in _batches(np.arange(5), 128, 2)] == [5]


def _sizes(todo, cpus):
    return [len(b) for b in _batches(todo, 128, cpus)]


def test_a_served_backup_client_imports_no_numpy_or_ray(tmp_path):
    code = (
        "import json, sys\n"
        "from alike_ray import cli\n"
        "from alike_ray.commands import backup\n"
        "args = cli.build_parser().parse_args(['backup', '--store', 'ads', 'image:a.raw,b.raw', 'image:/abs/c.raw'])\n"
        "d = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}\n"
        "backup.SERVED['backup'].client_args(d)\n"
        "print(json.dumps({'sources': d['sources'], 'store': d['store'],\n"
        "                  'heavy': sorted(m for m in ('numpy', 'ray', 'pyarrow') if m in sys.modules)}))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    base = os.path.realpath(tmp_path)
    assert out["sources"] == [f"image:{base}/a.raw,{base}/b.raw", "image:/abs/c.raw"]
    assert out["store"] == os.path.join(base, "ads")
    assert out["heavy"] == []


def test_restore_reads_start_small_then_double():
    from pipelines.restore import GAP, SPAN, _spans

    n = 400  # 400 blocks of 200 KiB back to back in one pack, then 10 in another
    lens = np.full(n + 10, 200 << 10, np.int64)
    offs = np.concatenate([np.arange(n) * (200 << 10), np.arange(10) * (200 << 10)])
    packs = np.array(["a"] * n + ["b"] * 10)
    spans = _spans(packs, offs, lens, 1 << 20)
    sizes = [end - start for _, _, start, end in spans]
    assert sizes[0] <= 1 << 20 and sizes[1] <= 2 << 20 and sizes[2] <= 4 << 20
    assert max(sizes) <= SPAN and SPAN - max(sizes) < (200 << 10)  # grown to SPAN
    assert sizes[:5] == sorted(sizes[:5])
    # every row read once, in order, a span never crossing packs
    assert [(i, j) for i, j, _, _ in spans] == list(zip([0] + [s[1] for s in spans[:-1]], [s[1] for s in spans]))
    assert spans[-1][1] == n + 10 and all(len(set(packs[i:j])) == 1 for i, j, _, _ in spans)
    # the default (deltas, the S3 floor): whole spans from the start
    _, _, start, end = _spans(packs, offs, lens)[0]
    assert end - start > SPAN - (200 << 10) - GAP
