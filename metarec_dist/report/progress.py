"""The driver's view of a running job: a progress bar on a terminal, compact lines elsewhere."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


class ProgressPrinter:
    """Shows the leader's progress records (see ``metarec_dist.distributed.runner``).

    On a terminal: one tqdm bar (meta-step, steps/s and ETA from tqdm) with the
    last loss, validation metric and top sources. Elsewhere (logs, CI): one line
    per validation, so a log stays short.
    """

    def __init__(self, total_steps: int, metric: str, stream: TextIO | None = None):
        self.total = total_steps
        self.metric = metric
        stream = stream or sys.stderr  # read now, not at import: tests swap sys.stderr
        self.stream = stream
        self.bar = tqdm(total=total_steps, desc="meta-steps", file=stream) if stream.isatty() else None
        self.last_step = 0

    def __call__(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step <= self.last_step:
            self.last_step = step - 1  # a replaced worker restarted from a checkpoint
        if self.bar is not None:
            self.bar.update(step - self.last_step)
            self.bar.set_postfix_str(self._details(record), refresh=False)
        elif "valid" in record:
            rate = step / record["seconds"] if record["seconds"] > 0 else 0.0
            eta = (self.total - step) / rate if rate else float("nan")
            print(f"step {step}/{self.total}  {rate:.1f} steps/s  ETA {eta:.0f} s  {self._details(record)}",
                  file=self.stream, flush=True)
        self.last_step = step

    def _details(self, record: dict[str, Any]) -> str:
        parts = []
        if "loss" in record:
            parts.append(f"loss {record['loss']:.3f}")
        if "valid" in record:
            parts.append(f"valid {self.metric} {record['valid']:.4f}")
        if record.get("top_sources"):
            parts.append("top " + ", ".join(f"{name} {weight}" for name, weight in record["top_sources"]))
        return "  ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
