"""Where the API processes of ``flava serve --workers N`` keep their Prometheus values.

prometheus_client's multiprocess mode is chosen by ``PROMETHEUS_MULTIPROC_DIR`` when it is
imported, so the directory is set (and emptied) before any API process imports it. This module
imports no prometheus_client for that reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def metrics_dir(workers: int) -> Iterator[str | None]:
    """The directory for the API processes' metric files, set in the environment they inherit.

    ``PROMETHEUS_MULTIPROC_DIR`` when given (a Kubernetes emptyDir, say): created if missing and
    emptied of the files of an earlier run (a restarted container reuses its pids, and the
    files of pids that no longer run would be added to the sums). Otherwise, for more than one
    worker, a fresh temporary directory removed on exit; for one worker, none (the process's
    own registry, as before)."""
    given = os.environ.get(VARIABLE)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        yield given
        return
    if workers <= 1:
        yield None
        return
    made = tempfile.mkdtemp(prefix="flava-metrics-")
    os.environ[VARIABLE] = made
    try:
        yield made
    finally:
        os.environ.pop(VARIABLE, None)
        shutil.rmtree(made, ignore_errors=True)
