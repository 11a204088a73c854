"""Every continual method, registered by importing this module (``build_learner`` does).

- worker/core/replay.py: ``er``, ``derpp``, ``lump`` (the replay baselines);
- worker/core/flava.py: ``flava``, ``flava+``, ``flava-noimp``, ``flava-nocorr``.

``finetune`` is built into worker/core/learner.py.
"""

from __future__ import annotations

from worker.core.flava import Flava, FlavaNoCorrelation, FlavaNoImportance, FlavaPlus
from worker.core.replay import LUMP, DERPlusPlus, ExperienceReplay, ReplayLearner

__all__ = [
    "LUMP",
    "DERPlusPlus",
    "ExperienceReplay",
    "Flava",
    "FlavaNoCorrelation",
    "FlavaNoImportance",
    "FlavaPlus",
    "ReplayLearner",
]
