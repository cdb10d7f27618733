"""checkpoint.remote against a real S3-compatible server: moto's, on a free port of 127.0.0.1, started and
stopped here. Real 2-rank torchrun runs find it as in a pod, through S3_ENDPOINT_URL and the AWS_* variables
(mosaicml-streaming reads them); this module sets them for the processes it starts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import (
    Launch,
    assert_clean_exit_2,
    assert_same_weights,
    checkpoint,
    free_port,
    losses,
    read_jsonl,
    run,
    train_cmd,
    uninterrupted,
)

from prefix.checkpoint import checksums, files
from prefix.checkpoint.remote import STAGING
from prefix.checkpoint.remote_store import MANIFEST, Copy, Step, catalog, done_marker

boto3 = pytest.importorskip("boto3")
server = pytest.importorskip("moto.server", reason="moto[server]: the S3 server these tests run against")

STEPS = 60
SETTINGS = (f"trainer.max_steps={STEPS}", "checkpoint.every_steps=10", "trainer.eval_every=0")
BUCKET = "ckpts"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3:
    """moto's S3 server in this process, with one bucket."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        self.server = server.ThreadedMotoServer(ip_address="127.0.0.1", port=int(self.endpoint.rsplit(":", 1)[1]),
                                                verbose=False)
        self.server.start()
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                                   aws_secret_access_key="testing", region_name="us-east-1")
        self.client.create_bucket(Bucket=BUCKET)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def steps(self, prefix: str) -> dict[Step, set[str]]:
        return catalog(k[len(prefix):] for k in self.keys(prefix))

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def s3():
    store = S3()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**CREDENTIALS, "S3_ENDPOINT_URL": store.endpoint}.items():
            env.setenv(key, value)
        yield store
    store.stop()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, s3) -> Path:
    """The same run without a remote, never interrupted."""
    return uninterrupted(tmp_path_factory.mktemp("baseline"), "base", *SETTINGS)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, s3) -> SimpleNamespace:
    """A run with s3://ckpts/ckpt, stopped by SIGTERM once its first checkpoint is on the remote. Its remote
    folder is copied to s3://ckpts/spare/ at once (the resume below uploads into, and retires from, the first)."""
    root = tmp_path_factory.mktemp("stopped")
    launch = Launch(train_cmd(2, "r", root, *SETTINGS, f"checkpoint.remote=s3://{BUCKET}/ckpt"), root / "log")
    launch.wait_for_step(root / "r", 12)
    deadline = time.monotonic() + 120
    while MANIFEST not in s3.steps("ckpt/r/").get(Step(10, 1), ()):
        assert time.monotonic() < deadline and launch.proc.poll() is None, (root / "log").read_text()[-3000:]
        time.sleep(0.02)
    launch.sigterm()
    assert launch.wait() != 0
    for key in s3.keys("ckpt/r/"):
        s3.client.copy_object(Bucket=BUCKET, Key=f"spare/{key[len('ckpt/'):]}", CopySource={"Bucket": BUCKET, "Key": key})
    steps = sorted(s3.steps("ckpt/r/"))
    return SimpleNamespace(root=root, run=root / "r", step=max(losses(root / "r")), steps=steps)


def test_every_commit_is_uploaded_with_its_manifest_last(s3, stopped) -> None:
    events = read_jsonl(stopped.run / "logs" / "rank0.jsonl")
    uploaded = [e["step"] for e in events if e["event"] == "checkpoint uploaded"]
    assert uploaded[0] == 10 and uploaded[-1] == stopped.step, "the first save, ..., the final one at SIGTERM"
    assert [s.step for s in stopped.steps] == uploaded[-2:] and {s.epoch for s in stopped.steps} == {1}, \
        "the newest two are kept"
    for where, names in s3.steps("ckpt/r/").items():
        assert {MANIFEST, done_marker(1), "latest.pt", "latest_rank0.pt", "latest_rank1.pt"} == names, where
    newest = stopped.steps[-1]
    manifest = Copy.loads(s3.read(f"ckpt/r/{newest.name}/{MANIFEST}").decode(), newest)
    assert manifest.world_size == 2 and set(manifest.files) == {"global", "rank0", "rank1"}
    for role, checksum in manifest.files.items():
        name = files.latest_file(role)
        assert checksums.file_sum(stopped.run / "checkpoints" / name) == checksum, f"{name}: the committed file"
        body = s3.read(f"ckpt/r/{newest.name}/{name}")
        assert checksums.digest(body, checksum.algorithm) == checksum.digest, f"{name}: the object"
    assert "checkpoint.remote: no checkpoint in s3://ckpts/ckpt/r yet; starting from the beginning" \
        in (stopped.root / "log").read_text()
    assert not [p for p in (stopped.run / "checkpoints" / STAGING).rglob("*") if p.is_file()], "staging cleaned up"


def test_an_empty_volume_resumes_from_the_remote_bitwise(s3, stopped, baseline, tmp_path: Path) -> None:
    """A new cluster, or a lost volume: the same run name under an empty runs root."""
    log = tmp_path / "log"
    launch = Launch(train_cmd(2, "r", tmp_path, *SETTINGS, f"checkpoint.remote=s3://{BUCKET}/ckpt"), log)
    assert launch.wait() == 0, log.read_text()[-3000:]
    assert f"resuming from remote s3://ckpts/ckpt/r step {stopped.step}" in log.read_text()
    assert [s["start_step"] for s in read_jsonl(tmp_path / "r" / "meta" / "starts.jsonl")] == [stopped.step]
    assert losses(tmp_path / "r") == {s: v for s, v in losses(baseline).items() if s > stopped.step}
    assert_same_weights(checkpoint(tmp_path / "r").model, checkpoint(baseline).model)
    now = s3.steps("ckpt/r/")
    assert len(now) == 2 and Step(STEPS, 2) in now and {s.epoch for s in now} == {2}, \
        "the new volume's uploads (epoch 2: above every epoch on the remote) outrank the old ones, now retired"


def test_a_damaged_remote_object_falls_back_to_the_previous_step(s3, stopped, tmp_path: Path) -> None:
    newest, previous = stopped.steps[-1], stopped.steps[-2]
    body = bytearray(s3.read(f"spare/r/{newest.name}/latest_rank1.pt"))
    body[len(body) // 2] ^= 1
    s3.client.put_object(Bucket=BUCKET, Key=f"spare/r/{newest.name}/latest_rank1.pt", Body=bytes(body))

    # trainer.max_steps: the restored step is the end, so the start stops right after the restore
    result = run(train_cmd(2, "r", tmp_path, *SETTINGS, f"checkpoint.remote=s3://{BUCKET}/spare",
                           f"trainer.max_steps={previous.step}"))
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert f"checkpoint.remote: step {newest.step} is unusable (latest_rank1.pt is damaged: its XXH3-128 does not " \
           "match the manifest); trying an older one" in said
    assert f"resuming from remote s3://ckpts/spare/r step {previous.step}" in said
    assert checkpoint(tmp_path / "r").step == previous.step
    for name in ("latest.pt", "latest_rank0.pt", "latest_rank1.pt"):
        assert (tmp_path / "r" / "checkpoints" / name).read_bytes() == s3.read(f"spare/r/{previous.name}/{name}")


def test_a_remote_that_goes_down_never_holds_training(baseline, tmp_path: Path, monkeypatch) -> None:
    down = S3()
    monkeypatch.setenv("S3_ENDPOINT_URL", down.endpoint)
    launch = Launch(train_cmd(2, "d", tmp_path, *SETTINGS, f"checkpoint.remote=s3://{BUCKET}/ckpt"), tmp_path / "log")
    deadline = time.monotonic() + 180
    while MANIFEST not in down.steps("ckpt/d/").get(Step(10, 1), ()):
        assert time.monotonic() < deadline and launch.proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.05)
    down.stop()
    assert launch.proc.poll() is None, "the server must go down while the run trains"
    assert launch.wait() == 0, (tmp_path / "log").read_text()[-3000:]
    assert losses(tmp_path / "d") == losses(baseline)
    assert_same_weights(checkpoint(tmp_path / "d").model, checkpoint(baseline).model)
    for rank in (0, 1):
        warned = [e for e in read_jsonl(tmp_path / "d" / "logs" / f"rank{rank}.jsonl") if e["level"] == "warning"
                  and e["event"].startswith("checkpoint.remote")]
        assert [e["event"] for e in warned] == ["checkpoint.remote: upload failed; training goes on and the upload "
                                                "is retried in the background"], warned


def test_a_start_that_cannot_reach_its_remote_exits_2(tmp_path: Path) -> None:
    """With nothing on the volume, an unreachable remote may hold the run's checkpoints: never start afresh."""
    result = run(train_cmd(0, "e", tmp_path, *SETTINGS, f"checkpoint.remote=s3://{BUCKET}/ckpt",
                           "checkpoint.remote_timeout_s=2"),
                 env={**CREDENTIALS, "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    assert_clean_exit_2(result, "checkpoint.remote: cannot list s3://ckpts/ckpt/e for 2 s (EndpointConnectionError")
    assert "unset checkpoint.remote" in result.stderr
    assert not (tmp_path / "e").exists(), "nothing was written: the next start tries the remote again"
