"""What the training loop keeps about itself: its position, where step time went, source weights.

``LoopState`` and ``SourceWeights`` are JSON-able: with the parameters, they are
all a checkpoint needs to continue a run (``Trainer.state_dict``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoopState:
    """Where the main loop stands: with the parameters, all a resumed run needs (JSON-able)."""

    step: int = 0  # main-phase steps done; pre-training is done once step > 0
    best_metric: float = -math.inf
    best_step: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    stale: int = 0  # validations since the best
    stopped: bool = False  # early stopping fired
    history: list[dict[str, Any]] = field(default_factory=list)
    pending_losses: list[float] = field(default_factory=list)  # since the last validation
    seconds: float = 0.0  # training time spent before this process started

    def record_validation(self, entry: dict[str, Any], metric: float, patience: int, first: bool) -> bool:
        """Add a validation to the history and decide on early stopping; True if it is the new best.

        ``first``: no model selected yet, so this one is taken even with a NaN metric (and any
        number beats a NaN best).
        """
        self.history.append(entry)
        if first or metric > self.best_metric or (math.isnan(self.best_metric) and not math.isnan(metric)):
            self.best_metric, self.best_step, self.best_valid, self.stale = metric, entry["step"], entry["valid"], 0
            return True
        self.stale += 1
        self.stopped = self.stale >= patience
        return False


@dataclass
class StepTime:
    """Where this process's main-step wall time went (since it started; for per-worker results)."""

    steps: int = 0
    total: float = 0.0
    in_collectives: float = 0.0  # gathers and reductions, waiting for the slower worker included
    in_encoder_engine: float = 0.0  # the DeepSpeed engine's backward and step, its collectives included

    def per_step_ms(self) -> dict[str, float]:
        per = 1000.0 / max(self.steps, 1)
        return {"total": self.total * per, "in_collectives": self.in_collectives * per,
                "in_encoder_engine": self.in_encoder_engine * per}


@dataclass
class SourceWeights:
    """Per-source weight bookkeeping: which sources the target listens to."""

    total_relative: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    times_sampled: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, step: int, sources: list[str], similarities: list[float], weights: list[float]) -> None:
        for source, weight in zip(sources, weights):
            self.total_relative[source] += weight * len(sources)  # 1.0 = a uniform share
            self.times_sampled[source] += 1
        self.history.append({"step": step, "sources": sources, "similarities": similarities, "weights": weights})

    def to_json(self) -> dict[str, Any]:
        return {"total_relative": dict(self.total_relative), "times_sampled": dict(self.times_sampled),
                "history": self.history}

    def load_json(self, values: dict[str, Any]) -> None:
        self.total_relative.clear()
        self.total_relative.update(values["total_relative"])
        self.times_sampled.clear()
        self.times_sampled.update(values["times_sampled"])
        self.history[:] = values["history"]

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            source: {
                "mean_relative_weight": self.total_relative[source] / self.times_sampled[source],
                "times_sampled": self.times_sampled[source],
            }
            for source in sorted(self.times_sampled)
        }
