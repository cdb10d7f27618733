"""TensorBoard events in `tb/`: scalars, the resolved config as text, samples as text, hparams at the end.

SummaryWriter serialises an event and its own thread writes the file (flushed every 10 s and at
close). The writer opens with `purge_step` = the first step this start trains: TensorBoard then
hides a previous start's events from there on, the steps a resume redoes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from prefix.telemetry.trackers import RESTART, Record, RunInfo, Tracker, numeric


def summary_writer() -> Any:
    """torch's SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # ImportError, or a tensorboard/protobuf mismatch: no events, training goes on
        return None
    return SummaryWriter


class TensorBoard(Tracker):
    name = "tensorboard"
    keeps_files = False  # hparams and final metrics only

    def __init__(self, folder: Path, writer_class: Any):
        self.folder, self._writer_class = folder, writer_class
        self._writer: Any = None
        self._config = ""

    def open(self, run: RunInfo, saved: dict[str, Any]) -> dict[str, int]:
        self._start_step, self._config = run.start_step, yaml.safe_dump(run.config, sort_keys=False)
        self._hparams = _flat(run.config)
        self._writer, self._purge = None, True
        # Events past the resume point are purged, so this start must write its steps again.
        return {split: min(step, run.start_step) for split, step in saved.get("held", {}).items()}

    def log(self, records: list[Record]) -> None:
        try:
            writer = self._open_writer()
            self._write(writer, records)
            writer.flush()  # on disk (the OS's) before the relay counts them held: a SIGKILL keeps them
        except Exception:
            self._discard()  # a writer whose thread failed stays failed: the retry opens a new one
            raise

    def _write(self, writer: Any, records: list[Record]) -> None:
        for r in records:
            if r.split == "samples":
                writer.add_text("samples", f"**prompt** {r.values.get('prompt', '')}\n\n{r.values.get('text', '')}",
                                r.step)
            elif r.split == RESTART:
                writer.add_text("restarts", ", ".join(f"{k}: {v}" for k, v in r.values.items()), r.step)
            else:
                for name, value in numeric(r.values).items():
                    writer.add_scalar(f"{r.split}/{name}", value, r.step)

    def finish(self, summary: dict[str, float], artifacts: list[Path]) -> None:
        if summary:
            self._open_writer().add_hparams(self._hparams, {f"hparam/{k}": v for k, v in summary.items()},
                                            run_name=".")  # in tb/ itself, beside the scalars
        self._flush()

    def close(self) -> None:
        self._flush()

    def _open_writer(self) -> Any:
        if self._writer is None:
            # Only the start's first writer purges: a later one would hide this start's own events.
            purge, self._purge = self._purge, False
            self._writer = self._writer_class(str(self.folder), max_queue=1000, flush_secs=10,
                                              purge_step=self._start_step + 1 if purge else None)
            if purge:
                self._writer.add_text("config", f"```yaml\n{self._config}```", self._start_step)
        return self._writer

    def _discard(self) -> None:
        try:
            self._flush()
        except Exception:
            pass

    def _flush(self) -> None:
        """Close the writer (it raises what its thread hit: a full disk); the next call opens a new one."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`section.key` → value, as hparams take them (lists and None as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat
