"""bench/gpu_check.sh --dry-run: the GPU check's plumbing, proven on the CPU.

It prints the GPU plan, then runs a tiny CPU version of every step (configs/tiny.yaml, a few steps,
compile off), and writes the summary JSON every step fills in; a failed check would exit non-zero.
"""

from __future__ import annotations

import json
import os
import subprocess

from helpers import REPO

STEPS = {"env", "throughput", "resume", "checkpoint_stall", "fsdp"}


def test_dry_run_exits_zero_with_every_step_in_the_summary(tmp_path) -> None:
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                            capture_output=True, text=True, timeout=180, env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "trainer.device=cuda" in result.stdout and "configs/gpt2-124m.yaml" in result.stdout, "no GPU plan"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is True and summary["mode"] == "dry"
    assert summary["steps"].keys() == STEPS
    assert summary["steps"]["resume"]["figures"]["resume_bitwise"] is True
    assert summary["steps"]["fsdp"]["figures"]["status"] == "ran", "trainer.parallelism=fsdp ran in one process"
    assert {"compile", "eager"} <= summary["steps"]["throughput"]["figures"].keys()
    assert (tmp_path / "runs.tar.gz").is_file() and (tmp_path / "gpu_check.log").is_file()
