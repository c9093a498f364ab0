"""A read task keeps its CPU while it waits for the index shards (pipelines/backup.py
`_off_main`), on the test session's real Ray instance.

Ray hands a task's CPU back to the raylet while the task blocks in `ray.get` on its main thread,
and the raylet then starts another worker process for a queued read task: an interpreter start
on a loaded core, to idle once the claim's answer has come. The read task waits for its claims
from another thread, which Ray does not count as blocking. The first test is the control: it
shows that this test can see a CPU handed back at all."""
from __future__ import annotations

import time

import pytest
import ray

from pipelines.backup import _off_main


@ray.remote(num_cpus=0, max_concurrency=4)
class _Hold:
    def __init__(self):
        self.entered = 0

    def hold(self, seconds: float) -> int:
        self.entered += 1
        time.sleep(seconds)
        return 7

    def count(self) -> int:
        return self.entered


@ray.remote(num_cpus=1)
def _waits(hold, off_main: bool, seconds: float) -> int:
    get = lambda: ray.get(hold.hold.remote(seconds))  # noqa: E731
    return _off_main(get) if off_main else get()


def _cpus_free_while_held(off_main: bool) -> tuple[float, float]:
    """(CPUs free before the task, the most CPUs free while it waits in the actor's hold)."""
    def free():
        return ray.available_resources().get("CPU", 0.0)

    deadline = time.monotonic() + 10
    while free() < ray.cluster_resources().get("CPU", 0.0) and time.monotonic() < deadline:
        time.sleep(0.05)  # what earlier tests left running has ended
    before = free()
    hold = _Hold.remote()
    ref = _waits.remote(hold, off_main, 3.0)
    while ray.get(hold.count.remote()) == 0:
        time.sleep(0.02)
    most, end = 0.0, time.monotonic() + 2.0
    while time.monotonic() < end:
        most = max(most, free())
        time.sleep(0.05)
    assert ray.get(ref) == 7
    ray.kill(hold)
    return before, most


@pytest.mark.parametrize("off_main", [False, True], ids=["ray.get on the main thread (control)", "_off_main"])
def test_a_task_waiting_for_an_actor_gives_its_cpu_back_only_from_its_main_thread(ray_address, off_main):
    before, most = _cpus_free_while_held(off_main)
    assert before >= 1
    if off_main:
        assert most <= before - 1, f"the waiting task gave its CPU back: {most} of {before} CPUs free"
    else:
        assert most >= before, f"Ray no longer hands a blocked task's CPU back ({most} of {before} free): " \
                               "_off_main's reason is gone"
