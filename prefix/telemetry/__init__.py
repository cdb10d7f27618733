"""Logs, metrics and experiment trackers: what a run tells people while it trains (docs/metrics.md,
docs/tracking.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefix.telemetry.logs import Progress, setup_logging
from prefix.telemetry.metrics import Metrics
from prefix.telemetry.trackers import RunInfo, Tracker

if TYPE_CHECKING:
    from prefix.config import TelemetryConfig

__all__ = ["Metrics", "Progress", "RunInfo", "Tracker", "setup_logging", "trackers_for"]


def trackers_for(cfg: TelemetryConfig, tb_folder: Path) -> list[Tracker]:
    """The trackers `cfg` turns on; each library is imported only when its tracker is."""
    from prefix.telemetry import tensorboard

    found: list[Tracker] = []
    writer_class = tensorboard.summary_writer() if cfg.tensorboard else None
    if writer_class is not None:
        found.append(tensorboard.TensorBoard(tb_folder, writer_class))
    if cfg.wandb.project:
        from prefix.telemetry.wandb_run import WandbTracker

        found.append(WandbTracker(cfg.wandb))
    if cfg.mlflow.tracking_uri:
        from prefix.telemetry.mlflow_run import MlflowTracker

        found.append(MlflowTracker(cfg.mlflow))
    return found
