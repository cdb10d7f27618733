"""`checkpoint.checksum`: xxh3 (default) or sha256, named per file in the manifest; old SHA-256 manifests verify.

A manifest written before the choice existed has entries `{"sha256": …, "bytes": …}` and no algorithm field of
its own: those files must resume, fall back and be read by the tools exactly as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from prefix.checkpoint import Checkpointer, NoUsableCheckpoint, choose, files
from prefix.checkpoint.checksums import FileSum, HashingWriter, digest, file_sum, second_thread
from prefix.checkpoint.remote_store import Copy, Step
from prefix.config import CheckpointConfig, ConfigError, load
from prefix.distributed import World
from prefix.state import read_verified

STATE = {"model": {"w": torch.ones(50_000)}, "optimizer": {}, "scheduler": {}, "tokens_seen": 0, "config": {}}
"""What `TrainState` needs (the tools read it), mostly tensor bytes: a flipped byte lands in tensor data."""


def save(ck: Checkpointer, step: int, checksum: str = "xxh3") -> None:
    ck.cfg = CheckpointConfig(checksum=checksum)
    assert ck.save(step, lambda: STATE, {"rng": step}).error is None


def checkpointer(folder: Path) -> Checkpointer:
    return Checkpointer(folder, World(), CheckpointConfig())


def manifest_of(folder: Path, step: int) -> dict:
    (path,) = folder.glob(f"manifest-{step}-*.json")
    return json.loads(path.read_text())


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("checksum", ["xxh3", "sha256"])
def test_each_manifest_entry_names_its_algorithm_and_verifies(tmp_path, checksum):
    save(checkpointer(tmp_path), 10, checksum)
    entries = manifest_of(tmp_path, 10)["files"]
    assert set(entries) == {"global", "rank0"}
    for role, entry in entries.items():
        assert set(entry) == {checksum, "bytes"}, entry
        path = tmp_path / files.latest_file(role)
        assert entry[checksum] == digest(path.read_bytes(), checksum) and entry["bytes"] == path.stat().st_size
    assert choose(tmp_path, 1)[0].step == 10


@pytest.mark.parametrize(("checksum", "name"), [("xxh3", "XXH3-128"), ("sha256", "SHA-256")])
def test_a_flipped_byte_is_caught_and_the_previous_step_resumed(tmp_path, checksum, name):
    ck = checkpointer(tmp_path)
    save(ck, 10, checksum)
    save(ck, 20, checksum)
    flip_a_byte(tmp_path / "latest.pt")
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 20  # still loads: only the sum knows
    choice, findings = choose(tmp_path, 1)
    assert (choice.step, choice.global_slot) == (10, "prev")
    (finding,) = [f for f in findings if f.unusable]
    assert finding.file == "latest.pt" and f"its {name} does not match manifest-20-" in finding.reason


def write_as_before(folder: Path, step: int) -> None:
    """A save as prefix wrote it before `checkpoint.checksum`: plain torch.save (zip CRC-32 and all), SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for role, name, state in [("global", "latest.pt", {**STATE, "world_size": 1}), ("rank0", "latest_rank0.pt",
                                                                                       {"rng": step})]:
        torch.save({**state, "step": step, "format_version": files.FORMAT_VERSION}, folder / name)
        body = (folder / name).read_bytes()
        entries[role] = {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    (folder / f"manifest-{step}-0123abcd.json").write_text(json.dumps(
        {"format_version": 2, "step": step, "world_size": 1, "epoch": 0, "files": entries}, indent=1))


def test_an_old_sha256_manifest_without_an_algorithm_field_still_verifies(tmp_path):
    write_as_before(tmp_path, 30)
    choice, findings = choose(tmp_path, 1)
    assert choice.step == 30 and not findings
    assert read_verified(tmp_path)[0].step == 30
    flip_a_byte(tmp_path / "latest.pt")
    with pytest.raises(NoUsableCheckpoint, match="latest.pt: damaged: its SHA-256 does not match manifest-30-0123abcd"):
        choose(tmp_path, 1)


def test_a_run_resumed_from_an_old_checkpoint_goes_on_with_xxh3_and_keeps_the_old_one_as_fallback(tmp_path):
    write_as_before(tmp_path, 30)
    ck = checkpointer(tmp_path)
    choice, _ = ck.find()
    ck.load(choice)
    assert ck.save(31, lambda: STATE, {"rng": 31}).error is None
    assert set(manifest_of(tmp_path, 31)["files"]["global"]) == {"xxh3", "bytes"}
    assert set(manifest_of(tmp_path, 30)["files"]["global"]) == {"sha256", "bytes"}
    assert choose(tmp_path, 1)[0].step == 31
    assert read_verified(tmp_path, "prev")[0].step == 30, "prev is checked with its own manifest's algorithm"
    flip_a_byte(tmp_path / "latest.pt")
    assert choose(tmp_path, 1)[0].step == 30, "the old checkpoint is still a verified fallback"


def test_changing_the_checksum_between_saves_keeps_both_verifiable(tmp_path):
    ck = checkpointer(tmp_path)
    save(ck, 10, "sha256")
    save(ck, 20, "xxh3")
    assert choose(tmp_path, 1)[0].step == 20
    (tmp_path / "latest.pt").unlink()
    assert choose(tmp_path, 1)[0].step == 10


def test_a_manifest_entry_without_a_known_algorithm_makes_the_manifest_unreadable(tmp_path):
    save(checkpointer(tmp_path), 10)
    (path,) = tmp_path.glob("manifest-10-*.json")
    body = json.loads(path.read_text())
    body["files"]["global"] = {"md5": "0" * 32, "bytes": 1}
    path.write_text(json.dumps(body))
    manifests, unreadable = files.read_manifests(tmp_path)
    assert not manifests and unreadable == [path.name]


def test_filesum_round_trips_and_old_remote_manifests_load():
    for s in (FileSum("ab" * 16, 7, "xxh3"), FileSum("cd" * 32, 9, "sha256")):
        assert FileSum.from_json(json.loads(json.dumps(s.to_json()))) == s
    old = {"format_version": 2, "step": 20, "epoch": 1, "world_size": 1, "resumed_step": 0,
           "files": {"global": {"sha256": "ef" * 32, "bytes": 5}}}
    copy = Copy.loads(json.dumps(old), Step(20, 1))
    assert copy.files["global"] == FileSum("ef" * 32, 5, "sha256")
    assert Copy.loads(copy.dumps(), Step(20, 1)) == copy


@pytest.mark.parametrize("checksum", ["xxh3", "sha256"])
def test_the_streaming_hash_equals_the_files_hash(tmp_path, checksum):
    path = tmp_path / "f.bin"
    chunks = [b"a" * 10, bytes(range(256)) * 8192, b"z"]  # one chunk above HashingWriter.PARALLEL
    with open(path, "wb") as f, second_thread(checksum) as hasher:
        out = HashingWriter(f, checksum, hasher)
        for chunk in chunks:
            out.write(memoryview(chunk))
    assert out.sum() == file_sum(path, checksum) == FileSum(digest(b"".join(chunks), checksum), path.stat().st_size,
                                                            checksum)


def test_files_load_without_the_zip_crc(tmp_path):
    """The zip's CRC-32 is not computed (the checksum covers every byte); torch.load, mmap or not, is fine."""
    files.write_durably(STATE, tmp_path / "x.pt")
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "x.pt", weights_only=True, mmap=mmap)
        assert torch.equal(loaded["model"]["w"], STATE["model"]["w"])


def test_an_unknown_checksum_is_refused():
    with pytest.raises(ConfigError, match="checkpoint.checksum: must be xxh3 or sha256"):
        load(None, ["checkpoint.checksum=md5"])
