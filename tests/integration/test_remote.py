"""A folder standing in for object storage as `data.remote`, with `data.local` as the cache.

streaming's downloaders treat a plain path like any other remote: each shard is copied into the
cache on first use, so download, reuse, eviction and hash validation all run for real.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from helpers import Launch, assert_clean_exit_2, assert_same_weights, checkpoint, losses, run, train_cmd
from mds import dataset, shards

STEPS = 40
SETTINGS = (f"trainer.max_steps={STEPS}", "checkpoint.every_steps=10", "trainer.eval_every=20")


def remote_settings(remote: Path, cache: Path, *more: str) -> tuple[str, ...]:
    return (f"data.remote={remote}", f"data.local={cache}", *more)


def version(remote: Path) -> str:
    return json.loads((remote / "manifest.json").read_text())["content_hash"]


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Path:
    """200 training samples in 4 KiB shards (~30 samples each)."""
    return dataset(tmp_path_factory.mktemp("bucket") / "ds", train=200, size_limit=1 << 12)


def test_resume_with_the_cache_deleted_is_bitwise_identical(remote: Path, tmp_path: Path) -> None:
    """A pod rescheduled to a node with an empty disk: the cache is gone, the run goes on unchanged."""
    base = Launch(train_cmd(2, "base", tmp_path, *SETTINGS, *remote_settings(remote, tmp_path / "cache0")),
                  tmp_path / "log0")
    assert base.wait() == 0, (tmp_path / "log0").read_text()[-3000:]

    cache, run_dir = tmp_path / "cache", tmp_path / "r"
    first = Launch(train_cmd(2, "r", tmp_path, *SETTINGS, *remote_settings(remote, cache)), tmp_path / "log1")
    first.wait_for_step(run_dir, random.randint(8, 25))
    first.sigterm()
    first.wait()
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS
    assert shards(cache / version(remote)), "the first start downloaded into the versioned cache"
    shutil.rmtree(cache)

    second = Launch(train_cmd(2, "r", tmp_path, *SETTINGS, *remote_settings(remote, cache)), tmp_path / "log2")
    assert second.wait() == 0, (tmp_path / "log2").read_text()[-3000:]
    assert shards(cache / version(remote)), "the restart downloaded again"
    assert losses(run_dir) == losses(tmp_path / "base")
    assert_same_weights(checkpoint(run_dir).model, checkpoint(tmp_path / "base").model)


def test_cache_is_reused_and_a_rewritten_remote_gets_a_new_one(tmp_path: Path) -> None:
    bucket, cache = tmp_path / "bucket", tmp_path / "cache"
    dataset(bucket, train=64, size_limit=1 << 12, seed=1)
    quick = ("trainer.max_steps=8", "trainer.eval_every=0", *remote_settings(bucket, cache))
    assert run(train_cmd(0, "a", tmp_path / "runs", *quick)).returncode == 0
    old = version(bucket)
    cached = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards(cache / old)}
    assert cached

    result = run(train_cmd(0, "b", tmp_path / "runs", *quick))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards(cache / old)} == cached, \
        "a restart reuses the cached shards instead of downloading them again"

    shutil.rmtree(bucket)
    dataset(bucket, train=64, size_limit=1 << 12, seed=2)  # same layout, other content
    assert version(bucket) != old
    resumed = run(train_cmd(0, "a", tmp_path / "runs", *quick, "trainer.max_steps=12"))
    assert_clean_exit_2(resumed, "data.remote: the dataset changed since the checkpoint of step 8")
    assert run(train_cmd(0, "c", tmp_path / "runs", *quick)).returncode == 0
    assert shards(cache / version(bucket)), "the new version is downloaded into a cache of its own"
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards(cache / old)} == cached


def test_cache_limit_evicts_shards(remote: Path, tmp_path: Path) -> None:
    """Five shards' worth of cache for a dataset of eight: streaming evicts as it goes.

    Before the download-ahead bound (loader._bound_lookahead) this setting hung streaming in 4 of 20
    runs. A cache too small for the node's readers is refused up front.
    """
    shard_bytes = max(p.stat().st_size for p in shards(remote / "train"))
    limit = 5 * shard_bytes + sum(p.stat().st_size for p in remote.glob("*/index.json"))
    cache = tmp_path / "cache"
    result = run(train_cmd(0, "r", tmp_path / "runs", "trainer.max_steps=30", "trainer.eval_every=0",
                           *remote_settings(remote, cache, f"data.cache_limit={limit}")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(shards(remote / "train")) >= 8, "the dataset must be bigger than the cache for this to mean anything"
    kept = shards(cache / version(remote) / "train")
    assert 0 < len(kept) < len(shards(remote / "train"))
    assert sum(p.stat().st_size for p in kept) <= limit

    crowded = run(train_cmd(0, "crowded", tmp_path / "runs", "data.num_workers=4",
                            *remote_settings(remote, cache, f"data.cache_limit={limit}")))
    assert_clean_exit_2(crowded, "holds 5 shard(s) of data.local (train), too few for 4 reader(s)")


def test_corrupt_shard_stops_the_run_and_leaves_the_cache(tmp_path: Path) -> None:
    """A shard damaged in storage fails validate_hash: exit 2 naming it, and it is not kept in the cache."""
    bucket, cache = tmp_path / "bucket", tmp_path / "cache"
    dataset(bucket, train=64, size_limit=1 << 12)
    victim = shards(bucket / "train")[1]
    good = victim.read_bytes()
    victim.write_bytes(good[:-8] + bytes(8))  # same size, other bytes
    settings = ("trainer.max_steps=10", "trainer.eval_every=0", "data.validate_hash=xxh64",
                *remote_settings(bucket, cache))
    result = run(train_cmd(0, "r", tmp_path / "runs", *settings))
    assert_clean_exit_2(result, "failed data.validate_hash=xxh64")
    assert victim.name in result.stderr
    assert not (cache / version(bucket) / "train" / victim.name).exists()

    victim.write_bytes(good)  # the storage is repaired: the restart downloads it again
    result = run(train_cmd(0, "r", tmp_path / "runs", *settings))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(("extra", "fragment"), [
    (("data.cache_limit=1kb",), "data.cache_limit: 1kb is too small"),
    (("data.validate_hash=md5",), "data.validate_hash: md5 is not recorded"),
    (("data.remote=/nonexistent/bucket",), "data.remote: no MDS dataset at /nonexistent/bucket/train"),
])
def test_bad_remote_settings_are_one_line_exit_2(remote: Path, tmp_path: Path, extra: tuple, fragment: str) -> None:
    result = run(train_cmd(0, "r", tmp_path / "runs", *remote_settings(remote, tmp_path / "cache"), *extra))
    assert_clean_exit_2(result, fragment)
    assert not (tmp_path / "runs" / "r").exists()
