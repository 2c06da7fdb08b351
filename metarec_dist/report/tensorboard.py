"""TensorBoard event files from the progress records (``Trainer.progress_record``), as the run goes.

Written with tensorboardX (a dependency of Ray Train); read with
``tensorboard --logdir RUN_DIR/tensorboard``. Scalars: ``train/loss`` every
step, ``valid/<metric>`` at validations (``valid/NDCG_10``), ``source_weight/<source>`` (weight
relative to a uniform share, each time the source is sampled) and
``speed/steps_per_s``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardLog:
    """A progress-record consumer; ``close()`` flushes the event file."""

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        self.directory = directory
        self.writer = SummaryWriter(logdir=str(directory), flush_secs=10)

    def __call__(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if "loss" in record:
            self.writer.add_scalar("train/loss", record["loss"], step)
        for metric, value in record.get("valid_metrics", {}).items():
            if metric != "users":  # TensorBoard tags cannot hold '@': NDCG@10 is valid/NDCG_10
                self.writer.add_scalar(f"valid/{metric.replace('@', '_')}", value, step)
        for source, weight in record.get("step_weights", {}).items():
            self.writer.add_scalar(f"source_weight/{source}", weight, step)
        if record.get("seconds", 0) > 0:
            self.writer.add_scalar("speed/steps_per_s", step / record["seconds"], step)

    def close(self) -> None:
        self.writer.close()
