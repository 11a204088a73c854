"""The one-learner lease on a real Redis, with real processes as holders."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from worker.lease import Lease, LeaseTaken, gone, process_identity


def test_one_process_holds_it_renews_it_and_releases_it(client, prefix):
    key = f"{prefix}:lease"
    first = Lease(client, key, "w", ttl_s=30)
    first.take()
    first.take()  # renewing is fine
    assert 29_000 < client.pttl(key) <= 30_000
    first.release()
    assert not client.exists(key)


def test_a_live_process_with_the_same_consumer_name_is_refused(client, prefix):
    key = f"{prefix}:lease"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    holder = process_identity("w", other.pid)
    client.set(key, holder, px=30_000)  # a running twin holds it
    try:
        assert not gone(holder)
        with pytest.raises(LeaseTaken, match=f"'w' \\(pid {other.pid} on"):
            Lease(client, key, "w", ttl_s=30).take()
        other.kill()  # SIGKILL, not yet reaped: a zombie is gone too
        deadline = time.monotonic() + 5
        while not gone(holder):
            assert time.monotonic() < deadline, "a killed process still looks alive"
            time.sleep(0.05)
        Lease(client, key, "w", ttl_s=30).take()  # taken over at once, no TTL wait
    finally:
        other.kill()
        other.wait()


def test_a_holder_on_another_host_waits_for_its_ttl(client, prefix):
    key = f"{prefix}:lease"
    client.set(key, "w|elsewhere|1|123", px=300)
    with pytest.raises(LeaseTaken, match="on elsewhere"):
        Lease(client, key, "w", ttl_s=30).take()
    assert not gone("w|elsewhere|1|123")
    client.delete(key)  # its TTL ran out
    Lease(client, key, "w", ttl_s=30).take()
