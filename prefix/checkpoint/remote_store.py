"""One run's folder in object storage, `<checkpoint.remote>/<run name>/`, through mosaicml-streaming's storage.

`Store` puts a staged local file under a name relative to that folder, lists the names under it, gets one
into a local file and deletes some. Uploads and listings go through streaming's `CloudUploader` (its
credentials, `S3_ENDPOINT_URL`, `S3_CANNED_ACL`), downloads through its `CloudDownloader`. streaming 0.13
lists only s3://, gs://, oci:// and local paths (what `prefix.config.checks` accepts: a start must list the
remote to find its checkpoints), and deletes nothing: retention deletes with the client streaming made.

One departure, for the 30 s a preempted pod has: a boto3 upload (s3://, gs:// with HMAC keys) runs without
a thread pool, in the caller's thread. streaming's would start pool threads that the interpreter joins at
exit, holding the exit until the transfer ends; a daemon thread is simply left behind.

Every call can raise whatever the object store raises; `Missing` means the object does not exist.

Layout, under `<checkpoint.remote>/<run name>/`: one folder per uploaded step, `step-<step:08d>-e<epoch>/`,
holding each file under its name in a checkpoints folder (`latest.pt`, `latest_rank<r>.pt`,
`sharded-<step>-<token>/…`), a `done-rank<r>.json` from every other rank once its files are up, and
`manifest.json` (`Copy`: every file's checksum, the world size, the epoch, the step that epoch resumed
from), uploaded last by rank 0: a folder is complete when it has a manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefix.checkpoint.files import FORMAT_VERSION, FileSum

FOLDER = re.compile(r"^step-(\d+)-e(\d+)$")
MANIFEST = "manifest.json"
ROLE = re.compile(r"^(global|rank\d+|sharded-\d+-[0-9a-f]+/[A-Za-z0-9_.]+)$")
"""A manifest's file roles (checkpoint/files.py): a manifest naming anything else is not used (no "../")."""


class Missing(Exception):
    """The object does not exist."""


def missing(error: BaseException) -> bool:
    """Whether a store's error says the object is not there (each store words it its own way)."""
    if isinstance(error, FileNotFoundError | Missing):
        return True
    code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey") or type(error).__name__ == "NotFound" \
        or getattr(error, "status", None) == 404


class Store:
    """The run's folder `url` on the remote; uploads read their files from `staging` (relative names)."""

    def __init__(self, url: str, staging: Path):
        self.scheme = urlparse(url).scheme
        self.url = url.rstrip("/") if self.scheme else os.path.abspath(url)
        self.staging = staging
        self._uploader: Any = None
        self._downloader: Any = None

    def reset(self) -> None:
        """Drop the clients (after an error: the next call makes new ones)."""
        self._uploader = self._downloader = None

    def _up(self) -> Any:
        if self._uploader is None:
            from prefix.data.compat import streaming  # slow to import: only when a remote is used

            with tempfile.TemporaryDirectory() as empty:  # streaming wants its local folder empty (a writer's)
                uploader = streaming.base.storage.CloudUploader.get((empty, self.url), keep_local=True,
                                                                    exist_ok=True, retry=1)
            uploader.local = str(self.staging)
            self._uploader = uploader
        return self._uploader

    def _boto(self) -> Any:
        """The boto3 client of an S3 API uploader, else None."""
        up = self._up()
        if self.scheme == "s3":
            return up.s3
        if self.scheme == "gs" and getattr(getattr(up, "authentication", None), "name", "") == "HMAC":
            return up.gcs_client
        return None

    def _where(self, name: str) -> tuple[str, str]:
        """(bucket, key) of `name` in an object store."""
        obj = urlparse(f"{self.url}/{name}")
        return obj.netloc.split("@")[0], obj.path.lstrip("/")

    def put(self, name: str) -> None:
        """Upload `staging/name` to `url/name`."""
        client = self._boto()
        if client is not None:
            from boto3.s3.transfer import TransferConfig

            acl = os.environ.get("S3_CANNED_ACL")
            client.upload_file(str(self.staging / name), *self._where(name), ExtraArgs={"ACL": acl} if acl else {},
                               Config=TransferConfig(use_threads=False))
            return
        if not self.scheme:
            Path(self.url, name).parent.mkdir(parents=True, exist_ok=True)
        self._up().upload_file(name)

    def names(self) -> list[str]:
        """Every object's name under `url`, relative to it."""
        if not self.scheme:
            root = Path(self.url)
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        base = urlparse(self.url).path.strip("/")
        base = f"{base}/" if base else ""
        return sorted(key[len(base):] for key in self._up().list_objects("") or [] if key.startswith(base))

    def get(self, name: str, dest: Path, timeout_s: float = 60) -> None:
        """Download `url/name` to `dest` (replaced); raises Missing when there is no such object."""
        if self._downloader is None:
            from prefix.data.compat import streaming

            self._downloader = streaming.base.storage.CloudDownloader.get(self.url if self.scheme else None)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)  # streaming skips a download whose destination exists
        try:
            self._downloader.download(f"{self.url}/{name}", str(dest), timeout_s)
        except Exception as e:
            if missing(e):
                raise Missing(name) from None
            raise

    def delete(self, names: list[str]) -> None:
        """Remove these objects (an absent one is no error)."""
        if not self.scheme:
            for name in names:
                Path(self.url, name).unlink(missing_ok=True)
            folders = {Path(self.url, n).parent for n in names} - {Path(self.url)}
            for folder in sorted(folders, key=lambda p: -len(p.parts)):  # inner first; each only once empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
            return
        up, client = self._up(), self._boto()
        for name in names:
            bucket, key = self._where(name)
            try:
                if client is not None:
                    client.delete_object(Bucket=bucket, Key=key)
                elif self.scheme == "gs":
                    up.gcs_client.bucket(bucket).blob(key).delete()
                else:  # oci
                    up.client.delete_object(up.namespace, bucket, key)
            except Exception as e:
                if not missing(e):
                    raise


def done_marker(rank: int) -> str:
    return f"done-rank{rank}.json"


@dataclass(frozen=True, order=True)
class Step:
    """A step folder on the remote: ordered by step, then epoch."""

    step: int
    epoch: int

    @property
    def name(self) -> str:
        return f"step-{self.step:08d}-e{self.epoch}"


def catalog(names: Iterable[str]) -> dict[Step, set[str]]:
    """The step folders among the remote's object names, with the names inside each."""
    found: dict[Step, set[str]] = {}
    for name in names:
        head, _, rest = name.partition("/")
        if (m := FOLDER.match(head)) and rest:
            found.setdefault(Step(int(m.group(1)), int(m.group(2))), set()).add(rest)
    return found


@dataclass(frozen=True)
class Copy:
    """A remote step's manifest."""

    step: int
    epoch: int
    world_size: int
    resumed_step: int
    """The step the start that uploaded it resumed from (0: a fresh start)."""
    files: dict[str, FileSum]

    @property
    def where(self) -> Step:
        return Step(self.step, self.epoch)

    def dumps(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, "step": self.step, "epoch": self.epoch,
                           "world_size": self.world_size, "resumed_step": self.resumed_step,
                           "files": {role: s.to_json() for role, s in self.files.items()}}, indent=1)

    @classmethod
    def loads(cls, text: str, where: Step) -> Copy:
        """Raises ValueError for anything but a manifest of the folder `where` it was read from."""
        try:
            body = json.loads(text)
            copy = cls(int(body["step"]), int(body["epoch"]), int(body["world_size"]), int(body["resumed_step"]),
                       {role: FileSum.from_json(s) for role, s in body["files"].items()})
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a manifest ({type(e).__name__}: {e})") from None
        if copy.where != where or "global" not in copy.files or not all(map(ROLE.match, copy.files)):
            raise ValueError(f"not the manifest of {where.name}")
        return copy


def read_copy(store: Store, where: Step, dest: Path) -> Copy:
    """The manifest of a complete folder; Missing, ValueError when there is none to use."""
    store.get(f"{where.name}/{MANIFEST}", dest)
    try:
        return Copy.loads(dest.read_text(), where)
    finally:
        dest.unlink(missing_ok=True)


def usable(copies: Iterable[Copy]) -> tuple[list[Copy], list[tuple[Copy, str]]]:
    """Newest first, the copies a resume may use, and those a fenced start wrote (with why).

    As `prefix.runs.lease.ceilings` on the volume: an epoch's steps past the step a later epoch resumed
    from were written by a start that had been taken over."""
    from prefix.runs.lease import limits_of

    copies = sorted(copies, key=lambda c: c.where, reverse=True)
    limits = limits_of({c.epoch: c.resumed_step for c in copies})
    fenced = [(c, f"epoch {c.epoch} wrote it past step {limits[c.epoch]}, where a later start resumed: a "
                  "fenced start's") for c in copies if c.step > limits.get(c.epoch, c.step)]
    return [c for c in copies if c.step <= limits.get(c.epoch, c.step)], fenced
