"""checkpoint.remote in one process, against a local folder as the remote (streaming's LocalUploader and
LocalDownloader do the transport): uploads after commits, retention, skip-to-newest, the restore into an
empty volume, its fallback past a damaged object, and the ceilings that pass over a fenced start's step.
The same code against a real S3 server, with torchrun: tests/integration/test_remote_checkpoints.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prefix import config
from prefix.checkpoint import Checkpointer, checksums, choose, files
from prefix.checkpoint.remote import RESTORING, STAGING, Remote, restore
from prefix.checkpoint.remote_store import MANIFEST, Copy, Missing, Step, Store, catalog, usable
from prefix.checkpoint.remote_upload import Uploads
from prefix.config import CheckpointConfig, ConfigError
from prefix.config.checks import REMOTE_SCHEMES, UNLISTED_SCHEMES
from prefix.distributed import World
from prefix.errors import UserError


class Log:
    """What was logged: (level, event) pairs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str):
        return lambda event, **_: self.lines.append((level, event))


class Recording(Store):
    """The real local-path store, recording each write and held at its first put until `release` is set."""

    def __init__(self, url: str, staging: Path, events: list[str]):
        super().__init__(url, staging)
        self.events, self.release, self.entered = events, threading.Event(), threading.Event()
        self.release.set()

    def put(self, name: str) -> None:
        self.entered.set()
        self.release.wait(30)
        self.events.append(f"put {name}")
        super().put(name)

    def delete(self, names: list[str]) -> None:
        self.events.extend(f"delete {n}" for n in names)
        super().delete(names)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def state(step: int) -> dict:
    return {"weights": torch.full((8,), float(step))}


def training(folder: Path, url: str, keep_every: int = 0, events: list[str] | None = None):
    """A checkpointer of one rank whose commits go to `url` (epoch 1); returns it and its uploader."""
    events = [] if events is None else events
    ck = Checkpointer(folder, World(), CheckpointConfig())
    ck.uploads = Uploads(Recording(url, folder / STAGING / "e1-rank0", events), folder, World(), 1, 0,
                         lambda: events.append("guard"), keep_every, 5, Log())
    return ck, ck.uploads


def save(ck: Checkpointer, step: int, wait: bool = True) -> None:
    ck.save(step, lambda: state(step), {"rng": step})
    if wait:
        wait_for(lambda: step in ck.uploads.uploaded, f"step {step} uploaded")


def test_config_accepts_exactly_the_schemes_streaming_can_list():
    from prefix.data.compat import streaming

    upload = streaming.base.storage.upload
    lists = {scheme for scheme, name in upload.UPLOADERS.items()
             if getattr(upload, name).list_objects is not upload.CloudUploader.list_objects}
    assert set(REMOTE_SCHEMES) | {"", "alipan"} == lists, "alipan lists, but nothing here deletes from it"
    assert set(REMOTE_SCHEMES) | set(UNLISTED_SCHEMES) >= {s.split(":")[0] for s in upload.UPLOADERS if s}
    for ok in ("s3://bucket/ckpt", "gs://b/p", "/mnt/copies"):
        assert config.load(None, [f"checkpoint.remote={ok}"]).checkpoint.remote == ok
    for bad, fragment in (("hf://datasets/x", "cannot list hf://"), ("ftp://x/y", "does not know ftp://")):
        with pytest.raises(ConfigError, match=f"checkpoint.remote: mosaicml-streaming.*{fragment}"):
            config.load(None, [f"checkpoint.remote={bad}"])
    with pytest.raises(ConfigError, match="checkpoint.remote_timeout_s: must be positive and at most half"):
        config.load(None, ["checkpoint.remote=/mnt/copies", "checkpoint.remote_timeout_s=1000"])
    # without a remote the timeout is never used, so a short distributed.timeout_s is not refused for it
    assert config.load(None, ["distributed.timeout_s=20", "run.lease_timeout_s=5"]).distributed.timeout_s == 20


def test_store_puts_lists_gets_and_deletes(tmp_path: Path):
    store = Store(str(tmp_path / "remote" / "run"), tmp_path / "staging")
    (tmp_path / "staging" / "step-00000010-e1" / "sharded-10-ab").mkdir(parents=True)
    for name in ("step-00000010-e1/latest.pt", "step-00000010-e1/sharded-10-ab/__0_0.distcp"):
        (tmp_path / "staging" / name).write_bytes(name.encode())
        store.put(name)
    assert store.names() == ["step-00000010-e1/latest.pt", "step-00000010-e1/sharded-10-ab/__0_0.distcp"]
    store.get("step-00000010-e1/latest.pt", tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == b"step-00000010-e1/latest.pt"
    with pytest.raises(Missing):
        store.get("step-00000010-e1/nothing.pt", tmp_path / "none")
    store.delete(store.names())
    assert store.names() == [] and not (tmp_path / "remote" / "run" / "step-00000010-e1").exists()


def test_commits_are_uploaded_with_their_checksums_and_old_steps_retired(tmp_path: Path):
    url, events = str(tmp_path / "remote" / "run"), []
    ck, uploads = training(tmp_path / "a", url, keep_every=20, events=events)
    for step in (10, 20, 30, 40):
        save(ck, step)
    uploads.close(0)
    steps = catalog(Store(url, tmp_path / "s").names())
    assert sorted(s.step for s in steps) == [20, 30, 40], "the newest two, and 20 for the history"
    assert all(MANIFEST in names for names in steps.values())
    local, _ = files.read_manifests(tmp_path / "a")
    manifest = Copy.loads((Path(url) / Step(40, 1).name / MANIFEST).read_text(), Step(40, 1))
    assert manifest.files == next(m.files for m in local if m.step == 40)
    for role, checksum in manifest.files.items():
        assert checksums.file_sum(Path(url) / Step(40, 1).name / files.latest_file(role)) == checksum
    deleted = [e for e in events if e.startswith("delete")]
    assert deleted[0] == "delete step-00000010-e1/manifest.json" and len(deleted) == 3, "the manifest first"
    assert events[events.index(deleted[0]) - 1] == "guard", "the lease's fence before deleting"
    puts = [e for e in events if e.startswith("put step-00000040-e1/")]
    assert puts[-1] == "put step-00000040-e1/manifest.json" and len(puts) == 3, "the manifest last"
    assert all(events[events.index(put) - 1] == "guard" for put in puts), "the fence before every upload"
    assert not (tmp_path / "a" / STAGING / "e1-rank0").exists(), "the staging folder is removed at close"


def test_a_commit_during_an_upload_replaces_the_waiting_step(tmp_path: Path):
    ck, uploads = training(tmp_path / "a", str(tmp_path / "remote" / "run"))
    uploads.store.release.clear()  # the upload of step 10 hangs at its first file
    save(ck, 10, wait=False)
    wait_for(uploads.store.entered.is_set, "the upload of step 10 began")
    for step in (20, 30):
        save(ck, step, wait=False)
    assert not (uploads.store.staging / Step(20, 1).name).exists(), "step 20's staging went with it"
    uploads.store.release.set()
    wait_for(lambda: 30 in uploads.uploaded, "step 30 uploaded")
    uploads.close(0)
    assert uploads.uploaded == [10, 30], "never a backlog: 20 waited, and 30 replaced it"


def test_without_hard_links_a_file_rotated_before_its_copy_drops_the_step(tmp_path: Path, monkeypatch):
    def no_links(*_):
        raise OSError("hard links are not supported here")

    monkeypatch.setattr("prefix.checkpoint.remote_upload.os.link", no_links)
    url = str(tmp_path / "remote" / "run")
    ck, uploads = training(tmp_path / "a", url)
    uploads.store.release.clear()  # step 10's upload copies latest_rank0.pt, then hangs at its upload
    save(ck, 10, wait=False)
    wait_for(uploads.store.entered.is_set, "the upload of step 10 began")
    save(ck, 20, wait=False)  # rotation: step 10's latest.pt is prev.pt now, latest.pt is step 20's
    uploads.store.release.set()
    wait_for(lambda: 20 in uploads.uploaded, "step 20 uploaded")
    uploads.close(0)
    assert uploads.uploaded == [20], "step 10's latest.pt changed under it: dropped, never uploaded wrong"
    manifest = Copy.loads((Path(url) / Step(20, 1).name / MANIFEST).read_text(), Step(20, 1))
    for role, checksum in manifest.files.items():
        assert checksums.file_sum(Path(url) / Step(20, 1).name / files.latest_file(role)) == checksum


def test_an_empty_volume_resumes_from_the_newest_verified_remote_step(tmp_path: Path):
    url = str(tmp_path / "remote" / "run")
    ck, uploads = training(tmp_path / "a", url)
    for step in (10, 20, 30):
        save(ck, step)
    uploads.close(0)
    newest = Path(url) / Step(30, 1).name / "latest.pt"
    data = bytearray(newest.read_bytes())
    data[-30] ^= 1
    newest.write_bytes(bytes(data))

    log = Log()
    empty = tmp_path / "b" / "checkpoints"
    remote = Remote(Checkpointer(empty, World(), CheckpointConfig()),
                    CheckpointConfig(remote=str(tmp_path / "remote")), "run",
                    SimpleNamespace(epoch=1, check=lambda: None, wrote=False), log)
    choice, _ = remote.find({})
    assert choice is not None and choice.step == 20
    assert ("warning", "checkpoint.remote: step 30 is unusable (latest.pt is damaged: its XXH3-128 does not match "
            "the manifest); trying an older one") in log.lines
    assert ("warning", f"resuming from remote {url} step 20") in log.lines
    assert torch.equal(torch.load(empty / "latest.pt", weights_only=True)["weights"], state(20)["weights"])
    assert remote.uploads.epoch == 2 and remote.lease.wrote, "the next uploads outrank every epoch on the remote"
    assert not (empty / RESTORING).exists()
    assert choose(empty, 1)[0].step == 20


def test_a_remote_with_steps_but_none_usable_stops_the_start(tmp_path: Path):
    url = str(tmp_path / "remote" / "run")
    ck, uploads = training(tmp_path / "a", url)
    save(ck, 10)
    uploads.close(0)
    (Path(url) / Step(10, 1).name / "latest_rank0.pt").unlink()
    with pytest.raises(UserError, match=r"checkpoint.remote: no usable checkpoint in .*step-00000010-e1: "
                                        r"latest_rank0.pt is missing\); repair the remote copies"):
        restore(Store(url, tmp_path / "b" / RESTORING), tmp_path / "b", 1, lambda: None, 5, Log())
    assert restore(Store(str(tmp_path / "elsewhere"), tmp_path / "c" / RESTORING), tmp_path / "c", 1,
                   lambda: None, 5, Log()) == (None, 0), "an empty remote: the run starts from the beginning"


def test_a_step_a_fenced_start_uploaded_late_is_passed_over():
    def copy(step: int, epoch: int, resumed: int) -> Copy:
        return Copy(step, epoch, 1, resumed, {})

    # epoch 1 went on to step 40 after epoch 2 had taken over from its step 20
    copies = [copy(10, 1, 0), copy(20, 1, 0), copy(30, 1, 0), copy(40, 1, 0), copy(30, 2, 20)]
    ordered, fenced = usable(copies)
    assert [c.where for c in ordered] == [Step(30, 2), Step(20, 1), Step(10, 1)]
    assert [c.where for c, _ in fenced] == [Step(40, 1), Step(30, 1)]
