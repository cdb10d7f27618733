"""The benchmarks run: each script's --quick mode exits 0 and writes its JSON with the expected keys.

Times are never asserted (they depend on the machine); `make bench` measures them for real. The
existing bench/data_throughput.py is left out: its quick mode alone takes about a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

EXPECTED = {
    "train_vs_bare": {"prefix_tokens_per_s", "bare_streaming_tokens_per_s", "bare_preloaded_tokens_per_s",
                      "steps", "same_loss"},
    "model_step": {"demo_ratio", "demo_prefix_ms_per_step", "demo_gpt2_ms_per_step", "demo_params_prefix",
                   "demo_params_gpt2"},
    "checkpoint_stall": {"plain_save_s", "sync_stall_s", "async_stall_s", "async_available", "state_bytes",
                         "sync_loop_lost_s", "async_loop_lost_s"},
    "checkpoint_every_step": {"off_tokens_per_s", "every_tokens_per_s", "saves_committed", "saves_skipped",
                              "stall_s", "write_s", "same_loss"},
    "sigterm_exit": {"plain_save_s", "sigterm_to_saved_s", "sigterm_to_exit_s", "state_bytes"},
    "resume_latency": {"fresh_launch_to_first_step_s", "resume_launch_to_first_step_s",
                       "resume_launch_to_starting_s", "fresh_launch_to_model_s"},
    "startup": {"imports_s", "launch_to_starting_s", "launch_to_model_s", "launch_to_first_step_s",
                "import_cumulative_s", "import_self_s"},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def runs(results: Path) -> dict[str, tuple[int, str]]:
    """Every quick mode at once (they are mostly start-up, one core each): exit code and output by name."""
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--out",
                                     str(results)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for name in EXPECTED}
    done = {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        done[name] = (proc.returncode, output)
    return done


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quick_mode_writes_its_results(name: str, results: Path, runs: dict[str, tuple[int, str]]) -> None:
    code, output = runs[name]
    assert code == 0, output[-4000:]
    body = json.loads((results / f"{name}.json").read_text())
    assert body["benchmark"] == name and body["quick"] is True
    assert EXPECTED[name] <= body["figures"].keys(), sorted(body["figures"])
    assert body["checks"], "no ratio"
    for check in body["checks"]:
        assert {"what", "value", "unit", "goal", "passed"} <= check.keys()
    ratios = [c for c in body["checks"] if c["unit"] == "×" and c["value"] is not None]
    assert ratios, "every benchmark reports at least one measured ratio"


def test_run_all_renders_the_results(results: Path, tmp_path: Path) -> None:
    """After the quick runs above: docs rendered from their JSON files, a table per benchmark, the machine."""
    if not all((results / f"{name}.json").is_file() for name in EXPECTED):
        pytest.skip("needs the quick runs above")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("old generated text\n<!-- hand-written -->\nkept by hand\n")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--render-only", "--out", str(results),
                          "--docs", str(docs)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    text = docs.read_text()
    for name in EXPECTED:
        assert f"## {name} (`bench/{name}.py`)" in text
    assert "## Machine" in text and "make bench" in text and "| check | measured | goal | result |" in text
    assert "old generated text" not in text and text.endswith("<!-- hand-written -->\nkept by hand\n")
