"""The lock that keeps `alone` tests alone under make test's two pytest-xdist workers (tests/xdist_locks.py).

Threads stand in for the workers: flock(2) locks belong to open file descriptions, so two
descriptions in one process conflict exactly as two processes do.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest

from tests.xdist_locks import exclusive_or_shared


class Holder(threading.Thread):
    """Takes one side of the lock, says when it has it, holds it until released."""

    def __init__(self, directory, *, exclusive: bool, log: list[str], name: str):
        super().__init__(daemon=True, name=name)
        self.directory, self.exclusive, self.log = directory, exclusive, log
        self.holding, self.release = threading.Event(), threading.Event()

    def run(self) -> None:
        with exclusive_or_shared(self.directory, exclusive=self.exclusive, timeout=30):
            self.log.append(f"{self.name} in")
            self.holding.set()
            assert self.release.wait(30)
            self.log.append(f"{self.name} out")


def _gate_is_held(directory) -> bool:
    fd = os.open(directory / "gate", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_waiting_alone_test_runs_before_any_test_that_asks_after_it(tmp_path):
    log: list[str] = []
    running = Holder(tmp_path, exclusive=False, log=log, name="running")
    running.start()
    assert running.holding.wait(10)

    alone = Holder(tmp_path, exclusive=True, log=log, name="alone")
    alone.start()
    deadline = time.monotonic() + 10
    while not _gate_is_held(tmp_path):  # the alone test is now waiting, holding the gate
        assert time.monotonic() < deadline, "the exclusive side never took the gate"
        time.sleep(0.01)
    assert not alone.holding.wait(0.5), "an exclusive holder got in beside a shared one"

    # The other worker's next test: with plain flock it would join the running one's shared lock.
    later = Holder(tmp_path, exclusive=False, log=log, name="later")
    later.start()
    assert not later.holding.wait(1.0), "a test that asked after a waiting alone test started first"

    running.release.set()
    assert alone.holding.wait(10)
    assert not later.holding.wait(0.5), "a shared holder got in beside the alone test"
    alone.release.set()
    assert later.holding.wait(10)
    later.release.set()
    for thread in (running, alone, later):
        thread.join(10)
        assert not thread.is_alive()
    assert log == ["running in", "running out", "alone in", "alone out", "later in", "later out"]


def test_two_shared_holders_overlap_and_a_stuck_holder_bounds_the_wait(tmp_path):
    log: list[str] = []
    first = Holder(tmp_path, exclusive=False, log=log, name="first")
    second = Holder(tmp_path, exclusive=False, log=log, name="second")
    first.start()
    second.start()
    assert first.holding.wait(10) and second.holding.wait(10)  # both at once: ordinary tests overlap

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="waited 1 s for the exclusive lock of the other pytest worker"):
        with exclusive_or_shared(tmp_path, exclusive=True, timeout=1.0):
            pass
    assert time.monotonic() - started < 10
    assert not _gate_is_held(tmp_path), "a timed-out waiter kept the gate"
    first.release.set()
    second.release.set()
    first.join(10)
    second.join(10)


def test_heavy_tests_take_turns_but_each_overlaps_an_ordinary_test(tmp_path):
    log: list[str] = []

    class HeavyHolder(Holder):
        def run(self) -> None:
            with exclusive_or_shared(self.directory, exclusive=False, heavy=True, timeout=30):
                self.log.append(f"{self.name} in")
                self.holding.set()
                assert self.release.wait(30)
                self.log.append(f"{self.name} out")

    fleet = HeavyHolder(tmp_path, exclusive=False, log=log, name="fleet")
    fleet.start()
    assert fleet.holding.wait(10)
    ordinary = Holder(tmp_path, exclusive=False, log=log, name="ordinary")
    ordinary.start()
    assert ordinary.holding.wait(10), "an ordinary test waited for a heavy one"
    burst = HeavyHolder(tmp_path, exclusive=False, log=log, name="burst")
    burst.start()
    assert not burst.holding.wait(1.0), "two heavy tests ran at once"
    fleet.release.set()
    assert burst.holding.wait(10)
    for thread in (burst, ordinary):
        thread.release.set()
    for thread in (fleet, ordinary, burst):
        thread.join(10)
        assert not thread.is_alive()
    assert log.index("fleet out") < log.index("burst in")
