"""bench/goodput.py runs: its quick mode exits 0 and writes its figures (never asserting their values)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO

FIGURES = {"period_s", "save_cost_s", "restart_cost_s", "goodput_at_30_min_sigkill_share",
           "goodput_at_30_min_sigterm_share", "goodput_share", "predicted_goodput_share", "between_restarts_share"}


def test_quick_mode_writes_measured_and_predicted_goodput(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "goodput.py"), "--quick", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    body = json.loads((tmp_path / "goodput.json").read_text())
    assert body["benchmark"] == "goodput" and body["quick"] is True
    assert FIGURES <= body["figures"].keys(), sorted(body["figures"])
    assert set(body["figures"]["goodput_share"]) == {"1 s", "auto"}
    assert all(0 <= g <= 1 for g in body["figures"]["goodput_share"].values())
    assert [c["unit"] for c in body["checks"]].count("×") == 1, "a ratio measured side by side"
