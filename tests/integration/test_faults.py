"""End to end under real faults: a damaged checkpoint, a full disk, a crafted pickle, config drift,
a loss that turns NaN. Each start is a real `torchrun` (2 ranks) or `python -m prefix.train`."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from helpers import (
    RunsCode,
    assert_clean_exit_2,
    assert_same_weights,
    assert_workers_exit_2,
    checkpoint,
    read_jsonl,
    run,
    train_cmd,
)


def events(run_dir, name: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "logs" / "rank0.jsonl") if e["event"].startswith(name)]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupted_latest_falls_back_to_prev_and_ends_bit_identical(tmp_path):
    cmd = train_cmd(2, "flip", tmp_path)
    assert run(cmd).returncode == 0
    run_dir = tmp_path / "flip"
    finished = checkpoint(run_dir).model
    latest = run_dir / "checkpoints" / "latest.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, in tensor data: the file still loads
    latest.write_bytes(bytes(data))

    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    (unusable,) = events(run_dir, "checkpoint unusable")
    assert unusable["file"] == "latest.pt" and "XXH3-128 does not match" in unusable["reason"]
    assert events(run_dir, "falling back to step 30 in prev.pt")
    assert events(run_dir, "resumed from step 30")
    assert_same_weights(checkpoint(run_dir).model, finished)


def test_full_disk_keeps_training_then_exits_2_naming_the_resume_step(tmp_path, tmpfs):
    baseline = tmp_path / "roomy"
    assert run(train_cmd(2, "roomy", tmp_path)).returncode == 0
    folder = baseline / "checkpoints"
    one_save = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(("latest", "manifest-40")))
    # Room for two checkpoints (latest + prev) but not a third while it is written.
    checkpoints = tmp_path / "full" / "checkpoints"
    tmpfs(checkpoints, int(2.5 * one_save / 1024) + 16)

    cmd = train_cmd(2, "full", tmp_path)
    first = run(cmd)
    assert_workers_exit_2(first, "error: checkpoint: the final save at step 40 failed")
    assert "No space left on device" in first.stderr
    assert "a restart resumes from step 20 (latest.pt)" in first.stderr
    failed = events(tmp_path / "full", "checkpoint failed")
    assert [e["step"] for e in failed] == [30] and failed[0]["restart_resumes_from"] == "step 20 (latest.pt)"
    assert checkpoint(tmp_path / "full").step == 20
    assert not list(checkpoints.glob("*.tmp"))

    tmpfs(checkpoints, 16 * 1024)  # the volume is grown; the restart picks up at step 20
    second = run(cmd)
    assert second.returncode == 0, second.stderr[-3000:]
    assert events(tmp_path / "full", "resumed from step 20")
    assert_same_weights(checkpoint(tmp_path / "full").model, checkpoint(baseline).model)


def test_malicious_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    from prefix.checkpoint import files

    cmd = train_cmd(0, "evil", tmp_path, "trainer.max_steps=10")
    assert run(cmd).returncode == 0
    folder = tmp_path / "evil" / "checkpoints"
    marker = tmp_path / "pwned"
    state = torch.load(folder / "latest.pt", weights_only=True)
    checksum = files.write_durably({**state, "payload": RunsCode(marker)}, folder / "latest.pt")
    (manifest,) = folder.glob("manifest-10-*.json")  # a forged manifest too: only weights_only stops it
    body = json.loads(manifest.read_text())
    body["files"]["global"] = checksum.to_json()
    manifest.write_text(json.dumps(body))

    assert_clean_exit_2(run(cmd), "latest.pt: refused: loading it would run code")
    assert not marker.exists()


def test_config_drift_is_refused_with_a_diff_unless_allowed_and_harmless_changes_are_recorded(tmp_path):
    base = train_cmd(0, "drift", tmp_path, "trainer.max_steps=10")
    assert run(base).returncode == 0
    run_dir = tmp_path / "drift"
    before = sha(run_dir / "checkpoints" / "latest.pt")

    refused = run([*base, "model.d_model=32", "run.seed=7", "trainer.max_steps=20"])
    assert_clean_exit_2(refused, "run.seed 1337 → 7, model.d_model 64 → 32 would corrupt the run")
    assert "--allow-config-change" in refused.stderr
    assert sha(run_dir / "checkpoints" / "latest.pt") == before and len(read_jsonl(run_dir / "meta" / "starts.jsonl")) == 1

    harmless = run([*base, "trainer.max_steps=20", "trainer.eval_every=5", "checkpoint.every_steps=5"])
    assert harmless.returncode == 0, harmless.stderr[-3000:]
    last = read_jsonl(run_dir / "meta" / "starts.jsonl")[-1]
    assert last["config_changes"] == {"trainer.max_steps": [10, 20], "trainer.eval_every": [20, 5],
                                      "checkpoint.every_steps": [10, 5]}

    allowed = run([*base, "trainer.max_steps=30", "run.seed=7", "--allow-config-change"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert read_jsonl(run_dir / "meta" / "starts.jsonl")[-1]["config_changes"]["run.seed"] == [1337, 7]


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_loss_skips_then_stops_keeping_the_last_good_checkpoint(tmp_path, policy):
    base = train_cmd(0, "nan", tmp_path, "trainer.max_steps=10")
    assert run(base).returncode == 0
    run_dir = tmp_path / "nan"
    good = sha(run_dir / "checkpoints" / "latest.pt")
    # lr 1e30: step 11 blows the weights up, every later gradient is NaN.
    result = run([*base, "trainer.max_steps=40", "trainer.lr=1e30", "trainer.min_lr=0",
                  f"trainer.on_nonfinite={policy}", "trainer.max_consecutive_skips=3"])
    stop_step = 15 if policy == "skip" else 12
    assert_clean_exit_2(result, f"error: trainer: the loss or gradient was not finite at step {stop_step}")
    assert "a restart resumes from step 10 (latest.pt)" in result.stderr
    assert sha(run_dir / "checkpoints" / "latest.pt") == good
    skipped = [e["step"] for e in events(run_dir, "non-finite loss or gradient; update skipped")]
    assert skipped == ([12, 13, 14] if policy == "skip" else [])
    shutil.rmtree(run_dir)
