"""One writer per run: a lease on the run directory, with an epoch that only grows, and the fence.

A start takes the run before it touches anything in it: rank 0 creates `lease/epoch-<N>.json`
exclusively (holder host, pid, start id, its renewal promise) for the next epoch N, and renews it
by bumping that file's mtime from a thread of its own. A start that finds the newest epoch held
waits: for a release (`epoch-<N>.released`, written by a holder on its way out), for the lease to
lapse (not renewed for `run.lease_timeout_s`), or, on the same host, for the holder's process to
be gone. A holder still renewing after the timeout plus half of it is a second live start: the
waiter is refused (exit 2) — unless the holder said it is stopping (SIGTERM, final checkpoint),
which is waited for as long as it renews.

Fencing: every write that matters (checkpoint write and commit, metrics, meta/) first calls
`Lease.check()`. It is free while this start renewed (or, on other ranks, looked) within half the
timeout; after a longer gap — the process was frozen, or cut off — it renews and looks again, and
if a newer epoch exists it exits at once with EXIT_FENCED, writing nothing. A taker waits a whole
timeout of no renewal, so a holder that wrote within half of it cannot have been taken over.

Liveness is judged from the waiter's own monotonic clock watching the file change, never by
comparing two hosts' clocks. What it relies on (docs/lease.md): exclusive create (`O_EXCL`, NFSv3
and later), atomic rename, close-to-open consistency, and attribute caches shorter than the timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from prefix.errors import EXIT_FENCED, UserError, record_exit
from prefix.runs.layout import write_atomically

FOLDER = "lease"
CLAIM = re.compile(r"^epoch-(\d+)\.json$")
KEEP_EPOCHS = 16
"""Claims of older epochs are pruned: a checkpoint that old is long rotated away."""
MARGIN = 0.5
"""A holder still renewing after (1 + MARGIN) × timeout is a second live start."""


def claim_name(epoch: int) -> str:
    return f"epoch-{epoch:012d}.json"


def _marker(epoch: int, kind: str) -> str:
    return f"epoch-{epoch:012d}.{kind}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def identity(timeout_s: float, start_id: str) -> dict[str, Any]:
    """Who holds the lease: enough to tell, on the same host, whether that process still lives."""
    me = psutil.Process()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": me.pid, "pid_start": me.create_time(),
            "start_id": start_id, "timeout_s": timeout_s, "taken": time.time()}


def claims(folder: Path) -> dict[int, Path]:
    """Epoch → claim file, every epoch on disk."""
    found = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if m := CLAIM.match(entry.name):
                found[int(m.group(1))] = Path(entry.path)
    return found


def read_claim(path: Path) -> dict[str, Any]:
    """The holder's record; {} while it is being written or if it is damaged (the lease can still lapse)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def holder_gone(record: dict[str, Any]) -> bool:
    """True only when the holder ran on this host (and boot) and its process no longer exists."""
    if not record or record.get("host") != socket.gethostname() or record.get("boot_id") != _boot_id():
        return False
    try:
        return abs(psutil.Process(int(record["pid"])).create_time() - float(record["pid_start"])) > 0.01
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def describe(record: dict[str, Any], epoch: int) -> str:
    if not record:
        return f"epoch {epoch} (holder record unreadable)"
    return f"host {record.get('host')} pid {record.get('pid')} (start {record.get('start_id')}, epoch {epoch})"


def ceilings(run: Path) -> dict[int, int]:
    """Epoch → the last step its checkpoints may have: a later epoch resumed from that step, so what an
    older epoch committed past it was written by a start already taken over (a fenced zombie)."""
    folder = run / FOLDER
    if not folder.is_dir():
        return {}
    return limits_of({e: read_claim(p).get("resumed_step") for e, p in claims(folder).items()})


def limits_of(resumed: dict[int, int | None]) -> dict[int, int]:
    """Epoch → ceiling, from the step each epoch resumed from (None: unknown): the lowest resume point
    of any later epoch (the volume's claims here; a remote's manifests in checkpoint.remote_store)."""
    limits, lowest = {}, None
    for epoch in sorted(resumed, reverse=True):
        if lowest is not None:
            limits[epoch] = lowest
        if isinstance(resumed[epoch], int):
            lowest = resumed[epoch] if lowest is None else min(lowest, resumed[epoch])
    return limits


def status(run: Path, now: float) -> dict[str, Any] | None:
    """The newest epoch, who holds it, and whether it was released (for `prefix status`; the renewal's age
    compares the file's mtime with this host's clock, so it is only as good as the clocks agree)."""
    folder = run / FOLDER
    held = claims(folder) if folder.is_dir() else {}
    if not held:
        return None
    epoch = max(held)
    try:
        renewed = now - held[epoch].stat().st_mtime
    except OSError:
        renewed = None
    return {"epoch": epoch, "holder": describe(read_claim(held[epoch]), epoch), "renewed_age_s": renewed,
            "released": (folder / _marker(epoch, "released")).exists(),
            "stopping": (folder / _marker(epoch, "stopping")).exists()}


class LeaseRefused(UserError):
    same_on_every_rank = True


class Lease:
    """This start's hold on the run: rank 0 holds and renews it, the other ranks only check the fence."""

    def __init__(self, run: Path, epoch: int, timeout_s: float, log: Any, holder: bool, waited_s: float = 0.0,
                 created: bool = False):
        self.folder, self.epoch, self.timeout_s, self.log, self.holder = run / FOLDER, epoch, timeout_s, log, holder
        self.waited_s, self._created_run = waited_s, created
        self.wrote = False
        """Set once the start wrote into the run; until then a release leaves no trace (see `release`)."""
        self._verified = time.monotonic()  # a holder: when its last renewal began; others: when they last looked
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unrenewed = False  # warned once that renewing failed

    @property
    def claim(self) -> Path:
        return self.folder / claim_name(self.epoch)

    # -- taking ---------------------------------------------------------------------------
    @classmethod
    def take(cls, run: Path, timeout_s: float, log: Any, start_id: str | None = None) -> Lease:
        """Wait until the run is free (released, lapsed, or its holder gone), then claim the next epoch."""
        created = not run.exists()
        folder = run / FOLDER
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{folder}: cannot create the run's lease ({e.strerror}); choose a writable "
                            "--runs-root or PREFIX_RUNS_ROOT") from None
        me = identity(timeout_s, start_id or secrets.token_hex(4))
        began = time.monotonic()
        watched: tuple[int, Any] | None = None  # (epoch, signature) of the claim being watched
        changed = began
        said = None
        while True:
            held = claims(folder)
            top = max(held, default=0)
            now = time.monotonic()
            if top:
                record = read_claim(held[top])
                timeout = max(timeout_s, float(record.get("timeout_s") or 0))
                who = describe(record, top)
                if (folder / _marker(top, "released")).exists():
                    reason = None
                elif holder_gone(record):
                    reason = f"its holder, {who}, is gone"
                else:
                    signature = _signature(held[top])
                    if watched != (top, signature):
                        watched, changed = (top, signature), now
                    quiet = now - changed
                    if quiet >= timeout:
                        reason = f"{who} did not renew it for {quiet:.0f} s"
                    elif not (folder / _marker(top, "stopping")).exists() and now - began >= timeout * (1 + MARGIN):
                        raise LeaseRefused(
                            f"run {run.name} is held by another live start, {who}, whose lease was renewed "
                            f"{quiet:.1f} s ago; stop that start first (or wait for it), or choose another --run-name")
                    else:
                        if said != top:
                            said = top
                            log.warning("waiting for the run's lease", holder=who, timeout_s=timeout,
                                        stopping=(folder / _marker(top, "stopping")).exists())
                        time.sleep(min(0.5, timeout / 10))
                        continue
                if reason:
                    log.warning(f"taking the run's lease over: {reason}", epoch=top + 1)
            if _create(folder / claim_name(top + 1), me):
                lease = cls(run, top + 1, timeout_s, log, True, time.monotonic() - began, created)
                lease._prune(held)
                return lease
            # another start claimed that epoch first: watch it like any holder

    def _prune(self, held: dict[int, Path]) -> None:
        for epoch, path in held.items():
            if epoch <= self.epoch - KEEP_EPOCHS:
                for name in (path.name, _marker(epoch, "released"), _marker(epoch, "stopping")):
                    (self.folder / name).unlink(missing_ok=True)

    # -- holding --------------------------------------------------------------------------
    def renew_in_background(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Every sixth of the timeout, from a thread of its own: rank 0 renews (so no long write, evaluation
        or download lets the lease lapse) and every rank looks for a newer epoch, which keeps `check` free."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._renewing, args=(stopping,), name="prefix-lease",
                                            daemon=True)
            self._thread.start()

    def _renewing(self, stopping: Callable[[], bool]) -> None:
        said_stopping = False
        while not self._stop.wait(self.timeout_s / 6):
            if self.holder and stopping() and not said_stopping:
                said_stopping = True
                _touch(self.folder / _marker(self.epoch, "stopping"))
            self.verify()

    def check(self) -> None:
        """Before a write that matters: returns at once while the lease is surely ours; else looks again,
        and exits with EXIT_FENCED if another start took the run over."""
        if time.monotonic() - self._verified >= self.timeout_s / 2:
            self.verify()

    def verify(self) -> None:
        """Renew (rank 0) and look for a newer epoch; exits the process when there is one."""
        with self._lock:
            began = time.monotonic()
            paused = began - self._verified >= self.timeout_s / 2
            if self.holder:
                try:
                    now = time.time_ns()
                    os.utime(self.claim, ns=(now, now))
                except FileNotFoundError:
                    self._fenced("its claim was removed")
                except OSError as e:  # the file system is away: the lease lapses, and the next look decides
                    if not self._unrenewed:
                        self._unrenewed = True
                        self.log.warning("lease not renewed; retried every renewal", error=str(e))
                    return
            if paused:  # a takeover decided while we were away may land just now: give it time to show
                time.sleep(min(1.0, self.timeout_s / 10))
            newer = [e for e in claims(self.folder) if e > self.epoch]
            if newer:
                self._fenced(describe(read_claim(self.folder / claim_name(min(newer))), min(newer)))
            self._verified = began

    def _fenced(self, by: str) -> None:
        self.log.error(f"fenced: another start took the run over ({by}); this start (epoch {self.epoch}) "
                       "stops without writing", epoch=self.epoch, exit_code=EXIT_FENCED)
        print(f"error: fenced: the run's lease was taken over by {by} while this start (epoch {self.epoch}) "
              f"was frozen or cut off; it stops without writing (exit {EXIT_FENCED})", file=sys.stderr, flush=True)
        record_exit(EXIT_FENCED)
        for child in psutil.Process().children(recursive=True):  # data workers: they would outlive an _exit
            with contextlib.suppress(psutil.Error):
                child.kill()
        os._exit(EXIT_FENCED)

    def note_resume(self, step: int) -> None:
        """Record the step this epoch resumed from: older epochs' checkpoints past it are a zombie's."""
        if self.holder:
            write_atomically(self.claim, json.dumps({**read_claim(self.claim), "resumed_step": step}))

    def release(self) -> None:
        """A clean exit: the next start need not wait. A start that wrote nothing into the run (refused, or
        the run had finished) leaves no trace: its claim goes, and so do the lease folder and the run
        directory if it made them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.holder:
            return
        try:
            if not self.wrote:  # nothing of this epoch exists anywhere: the next start may claim it again
                (self.folder / _marker(self.epoch, "stopping")).unlink(missing_ok=True)
                self.claim.unlink()
                with contextlib.suppress(OSError):  # not empty: earlier starts' epochs stay
                    self.folder.rmdir()
                    if self._created_run:
                        self.folder.parent.rmdir()
                return
            _touch(self.folder / _marker(self.epoch, "released"))
        except OSError as e:  # it lapses instead
            self.log.warning("lease not released; the next start waits for it to lapse", error=str(e))


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the holder renews (mtime) or rewrites (inode) its claim; opened first, so an
    NFS client revalidates its cached attributes (close-to-open)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
        return st.st_mtime_ns, st.st_ino, st.st_size
    except OSError:
        return None


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Exclusively create `path` with `record`; False if it exists (another start claimed it first)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _touch(path: Path) -> None:
    with open(path, "a"):
        pass
