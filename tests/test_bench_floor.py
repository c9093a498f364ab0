"""bench/floor.py, the least work of a step that the bench compares every tool with: its
restore writes back exactly the image that its first step stored, and each step does the
work it claims (all non-zero blocks read and hashed; a block stored once is not stored again, and
the day-later step stores only what the first step did not)."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import floor  # noqa: E402


def _image(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(24 << 20)
        f.write(os.urandom(3 << 20))
        f.write(bytes(1 << 20))            # a zero block inside an allocated range
        f.write(b"alike" * (300 << 10))    # compressible
        f.seek(16 << 20)
        f.write(os.urandom((1 << 20) + 4097))  # a ragged end of an extent


def test_floor_restore_writes_back_what_its_first_step_stored(tmp_path):
    img = str(tmp_path / "img.raw")
    _image(img)
    out = str(tmp_path / "out")
    os.makedirs(out)
    ctx = mp.get_context("spawn")
    _, first = floor._run(ctx, floor.work, [(img, k, 2, out, "first", None) for k in range(2)])
    target = str(tmp_path / "restored.raw")
    with open(target, "wb") as f:
        f.truncate(os.path.getsize(img))
    _, back = floor._run(ctx, floor.restore_work, [(target, k, out) for k in range(2)])
    with open(img, "rb") as a, open(target, "rb") as b:
        assert a.read() == b.read()
    assert sum(r["blocks"] for r in back) == sum(r["blocks"] for r in first) > 0


def test_floor_steps_measure_the_work_of_each(tmp_path):
    img = str(tmp_path / "img.raw")
    _image(img)
    res = floor.measure_steps(img, 2, str(tmp_path / "out"), disk=True)
    assert set(res) == {"first", "day2", "restore"}
    nonzero = 3 * 2 + 3 + 3  # 512 KiB blocks: random, "alike"s (1.5 MiB), the ragged extent
    assert res["first"]["blocks"] == res["day2"]["blocks"] == res["restore"]["blocks"] == nonzero
    assert res["first"]["new_blocks"] == nonzero
    assert 0 < res["first"]["stored_bytes"] < res["first"]["read_bytes"]
    assert res["day2"]["stored_bytes"] == res["day2"]["new_blocks"] == 0  # the same image: all known
    assert res["restore"]["written_bytes"] >= nonzero * floor.BS - floor.BS
    for r in res.values():
        assert 0 < r["work_seconds"] <= r["seconds"]
    assert res["day2"]["disk_seconds"] > 0 and res["day2"]["disk_threads"] in floor.DISK_THREADS
    assert not os.path.exists(tmp_path / "out")  # removes what it wrote


def test_floor_day2_stores_only_the_new_blocks(tmp_path):
    img, day2 = str(tmp_path / "img.raw"), str(tmp_path / "day2.raw")
    _image(img)
    with open(img, "rb") as f, open(day2, "wb") as g:
        g.write(f.read())
        x, y = os.urandom(floor.BS), os.urandom(floor.BS)
        g.seek(3 << 20)
        g.write(x)  # one block changed (the zero block's place)
        g.seek(20 << 20)
        g.write(x + y)  # the same block again, and one more, in a hole before (all in process 0's share)
    res = floor.measure_steps(img, 2, str(tmp_path / "out"), day2=day2, steps=("day2",))
    assert set(res) == {"day2"}
    assert res["day2"]["new_blocks"] == 2  # x once, y
    assert res["day2"]["blocks"] == 12 + 1 + 2  # the zero block became x; x and y where a hole was
    assert 2 * floor.BS < res["day2"]["stored_bytes"] < 2 * floor.BS + 4096  # random bytes: no gain
