"""A full volume for logs/ and metrics/ costs log lines, never the run: real torchrun, real full tmpfs."""

from __future__ import annotations

import os
import time

from helpers import Launch, checkpoint, read_jsonl, train_cmd

WARNINGS = {  # sink → its one warning (rank 0 samples system metrics and beats; each rank has a log file)
    "logs": "logs: a write failed",
    "metrics": "] metrics: a write failed",
    "system metrics": "system metrics: a write failed",
    "heartbeat": "heartbeat not written",
}
EXPECTED = {"logs": 2, "metrics": 1, "system metrics": 1, "heartbeat": 1}


def test_a_full_volume_for_logs_and_metrics_does_not_stop_training(tmp_path, tmpfs):
    run_dir = tmp_path / "full"
    fillers = []
    for folder in (run_dir / "logs", run_dir / "metrics"):  # what prefix would create: the volume's mount points
        tmpfs(folder, 1024)
        free = os.statvfs(folder)
        with open(folder / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, free.f_bavail * free.f_frsize)
        fillers.append(folder / "filler")
    out = tmp_path / "out.log"
    launch = Launch(train_cmd(2, "full", tmp_path, "trainer.max_steps=100", "trainer.eval_every=50",
                              "checkpoint.every_steps=25", "telemetry.system_every_s=0.2"), out)

    def warned() -> dict[str, int]:
        text = out.read_text()
        return {sink: text.count(warning) for sink, warning in WARNINGS.items()}

    deadline = time.monotonic() + 120
    while any(n < EXPECTED[sink] for sink, n in warned().items()):  # every sink met the full volume...
        assert launch.proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(0.05)
    for filler in fillers:  # ...then space comes back mid-run
        filler.unlink()
    assert launch.wait(180) == 0, out.read_text()[-3000:]

    assert warned() == EXPECTED, out.read_text()[-5000:]
    assert checkpoint(run_dir).step == 100  # latest.pt of the final step, loaded with weights_only
    # Nothing was lost (the backlog holds 10 000 lines): every line landed, in order, none twice.
    assert [r["step"] for r in read_jsonl(run_dir / "metrics" / "train.jsonl")] == list(range(1, 101))
    assert [r["step"] for r in read_jsonl(run_dir / "metrics" / "checkpoint.jsonl")] == [25, 50, 75, 100]
    assert read_jsonl(run_dir / "metrics" / "system.jsonl")
    for rank in (0, 1):
        events = [e["event"] for e in read_jsonl(run_dir / "logs" / f"rank{rank}.jsonl")]
        assert events.count("logs: writing again") == 1 and events.index("logs: writing again") > 1
        assert sum(e.startswith("logs: a write failed") for e in events) == 1
    events = read_jsonl(run_dir / "logs" / "rank0.jsonl")
    again = {e["event"]: e for e in events if e["event"].endswith("writing again")}
    assert set(again) == {"logs: writing again", "metrics: writing again", "system metrics: writing again"}
    assert all(e["late"] > 0 and e["lost"] == 0 for e in again.values())
    assert {"heartbeat written again", "training finished"} <= {e["event"] for e in events}
