"""A worker-like process owning a DecodePool, for the SIGKILL test in test_decoding.py.

Run as ``python -m tests.worker.decode_owner``: it starts a pool, decodes once in every process,
prints "ready" and waits to be killed.
"""

from __future__ import annotations

import time

from worker.core.media import MediaConfig
from worker.decoding import DecodePool


def main() -> None:
    pool = DecodePool(2, MediaConfig(audio_frames=128, num_frames=2, frame_size=32))
    for pending in [pool.submit(None) for _ in range(4)]:
        pool.result(pending)
    print("ready", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
