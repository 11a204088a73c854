"""Change points in a monitored series: the Page-Hinkley test for a rise of its mean.

A threshold on the drift statistic answers "is the recent window unlike the reference *now*";
Page-Hinkley answers "*when* did the series step up". It keeps the cumulative excess of the
values over their running mean (less a tolerated change ``delta``),

    m_t = sum_{i <= t} (x_i - mean_t - delta),    M_t = min_{i <= t} m_i,

and signals a change when m_t - M_t > ``threshold`` (lambda), then starts afresh from the next
value, so a series that settles at a new level is not signalled again until it moves again.
Under a step of size s > delta the excess grows by about s - delta per value: the delay is
about lambda / (s - delta) values. A stationary series only drifts m_t down (by delta per
value), so its excursions above the minimum stay bounded in expectation.

Why our own ~40 lines rather than a library (river's ``PageHinkley`` or ``ADWIN``): the state
must go into the worker's checkpoint as plain numbers (``state_dict``), it runs once per batch
on one float per series, and ADWIN's guarantee (i.i.d. values) does not hold for a drift
series whose consecutive values share most of their window: Page-Hinkley's lambda is tuned
on that series instead (tests/worker/core/test_changepoint.py states the figures).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PageHinkleyConfig:
    """The test's two knobs, in the units of the series it watches."""

    delta: float = 1.0  # a rise of the mean smaller than this is tolerated
    threshold: float = 40.0  # lambda: cumulative excess over the minimum that signals
    min_values: int = 8  # no signal before this many values since the start or the last one

    def __post_init__(self) -> None:
        if self.delta < 0 or self.threshold <= 0 or self.min_values < 1:
            raise ValueError(f"need delta >= 0, threshold > 0, min_values >= 1: {self}")


class PageHinkley:
    """Page-Hinkley test for an increase of the mean of one series (module docstring)."""

    def __init__(self, cfg: PageHinkleyConfig | None = None) -> None:
        self.cfg = cfg or PageHinkleyConfig()
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.cumulative = 0.0  # m_t
        self.minimum = 0.0  # M_t

    @property
    def statistic(self) -> float:
        """m_t - M_t: the excess a signal needs to take past ``threshold``."""
        return self.cumulative - self.minimum

    def update(self, value: float) -> bool:
        """Take one value; True when it completes a change (the test then starts afresh)."""
        if not math.isfinite(value):
            return False  # a missing or undefined value says nothing about the mean
        self.count += 1
        self.mean += (value - self.mean) / self.count
        self.cumulative += value - self.mean - self.cfg.delta
        self.minimum = min(self.minimum, self.cumulative)
        if self.count >= self.cfg.min_values and self.statistic > self.cfg.threshold:
            self.reset()
            return True
        return False

    def state_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "mean": self.mean,
            "cumulative": self.cumulative,
            "minimum": self.minimum,
        }

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.cumulative = float(state["cumulative"])
        self.minimum = float(state["minimum"])


@dataclass(frozen=True)
class ChangePoint:
    """One signalled change of a named series, with where the caller's clock and counters were."""

    series: str  # e.g. the modality whose drift stepped up
    step: int  # the learner's update count when it was signalled
    version: str  # the model version then
    at: float  # unix time
    value: float  # the value that completed the signal


class ChangeDetector:
    """One Page-Hinkley test per named series, the change points each signalled (counts and
    the last ``keep``), and their state for a checkpoint."""

    def __init__(self, cfg: PageHinkleyConfig | None = None, keep: int = 20) -> None:
        self.cfg = cfg or PageHinkleyConfig()
        self.keep = keep
        self.tests: dict[str, PageHinkley] = {}
        self.counts: dict[str, int] = {}
        self.recent: list[ChangePoint] = []  # oldest first, at most ``keep``

    def update(
        self, values: Mapping[str, float], step: int, version: str, at: float
    ) -> list[ChangePoint]:
        """Feed one value per series; the change points completed by these values."""
        found = []
        for name, value in values.items():
            if self.tests.setdefault(name, PageHinkley(self.cfg)).update(value):
                found.append(ChangePoint(name, step, version, at, value))
                self.counts[name] = self.counts.get(name, 0) + 1
        self.recent = (self.recent + found)[-self.keep :]
        return found

    def restart(self) -> None:
        """Forget every series' history (the series changed meaning, e.g. a new reference);
        the change points found so far are kept."""
        for test in self.tests.values():
            test.reset()

    def last(self) -> dict[str, ChangePoint]:
        """The newest change point of each series that has one."""
        return {cp.series: cp for cp in self.recent}

    def state_dict(self) -> dict:
        """Plain numbers and strings: {"tests": {name: state}, "counts", "recent": [dict]}."""
        return {
            "tests": {name: t.state_dict() for name, t in self.tests.items()},
            "counts": dict(self.counts),
            "recent": [asdict(cp) for cp in self.recent],
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.tests = {}
        for name, saved in state["tests"].items():
            self.tests[name] = PageHinkley(self.cfg)
            self.tests[name].load_state_dict(saved)
        self.counts = {name: int(c) for name, c in state["counts"].items()}
        self.recent = [ChangePoint(**cp) for cp in state["recent"]][-self.keep :]
