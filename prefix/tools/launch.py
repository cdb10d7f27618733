"""Run torchrun as a pod's PID 1 and exit with a code the Job can act on.

    prefix launch [torchrun arguments...]    e.g. prefix launch --nproc-per-node=8 -m prefix.train --config C

torchrun exits 1 whenever a worker exits non-zero, so a bad config would look like a crash and be
retried. This runs `python -m torch.distributed.run ARGUMENTS` as its child with $PREFIX_EXIT_DIR set
to a private folder, where every prefix worker records its exit code, and exits with the first row
that holds (one line on stderr says which and why):

  0    torchrun exited 0                          the run finished (or had finished)
  2    a worker recorded 2                        a problem the user can fix: a retry fails alike
  3    a worker recorded 3                        another start took the run over; this one wrote nothing
  124  a worker recorded 124                      a hang (watchdog, collective timeout); retryable
  143  every worker that recorded one, 143        stopped by a signal after the final checkpoint
  N    otherwise, torchrun's own code (1)         a crash or a killed worker; retryable
                                                  (2: torchrun refused its arguments)

torchrun left running LINGER_S after every worker of its node ended (stuck waiting on a frozen peer's
rendezvous store) is killed, and the workers' codes decide. SIGTERM, SIGINT, SIGHUP and SIGQUIT (torchrun's $TORCHELASTIC_SIGNALS_TO_HANDLE) go to torchrun as
they arrive, which passes them to the workers; the launcher adds no delay. As PID 1 it also reaps
the orphans a container leaves to it. Kubernetes podFailurePolicy rules: docs/cluster.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import psutil

from prefix.errors import EXIT_DIR, EXIT_FENCED, EXIT_USER, UserError
from prefix.preemption import EXIT_PREEMPTED
from prefix.watchdog import EXIT_HUNG

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
"""torch's default for TORCHELASTIC_SIGNALS_TO_HANDLE: another signal's default action would end
torchrun without stopping its workers, so the launcher forwards only these."""
MEANING = {EXIT_USER: "a problem the user can fix; a retry would fail the same way",
           EXIT_FENCED: "another start took the run over and this one wrote nothing",
           EXIT_HUNG: "a hang (watchdog or collective timeout; stacks in the run's logs/); retryable"}
"""The recorded codes that decide the launcher's exit on their own, in the order they are looked for."""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("torchrun_args", nargs=argparse.REMAINDER, metavar="TORCHRUN_ARGUMENTS",
                   help="passed to torchrun unchanged (only a first -h/--help is this command's)")
    p.set_defaults(verbatim="torchrun_args")  # prefix.cli.parse: no option parsing after `launch`


def outcome(torchrun: int, recorded: dict[int, int]) -> tuple[int, str]:
    """The launcher's exit code and why, from torchrun's exit code and what each rank recorded."""
    if torchrun == 0:
        return 0, "every worker exited 0"
    for code, meaning in MEANING.items():
        ranks = [r for r, c in recorded.items() if c == code]
        if ranks:
            return code, f"{_ranks(ranks)} exited {code}: {meaning}"
    if recorded and set(recorded.values()) == {EXIT_PREEMPTED}:
        return EXIT_PREEMPTED, (f"{_ranks(recorded)} stopped by a signal after the final checkpoint; "
                                "a restart continues")
    if torchrun == EXIT_USER and not recorded:
        return EXIT_USER, "torchrun refused its arguments (its usage is above)"
    seen = (", ".join(f"rank {r} exited {c}" for r, c in sorted(recorded.items()))
            or "no worker recorded an exit")
    if torchrun < 0:  # killed by signal N: 128 + N, as a shell says (137: the OOM killer's SIGKILL)
        return 128 - torchrun, f"torchrun was killed by {signal.Signals(-torchrun).name} ({seen}); retryable"
    return torchrun, f"torchrun exited {torchrun} ({seen}): a crash or a killed worker; retryable"


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def read_records(folder: Path) -> dict[int, int]:
    """rank → the exit code its worker recorded (`prefix.errors.record_exit`); a torn file is none."""
    records = {}
    for path in folder.glob("rank*"):
        rank, code = path.name[4:], path.read_text().strip()
        if rank.isdigit() and code.lstrip("-").isdigit():
            records[int(rank)] = int(code)
    return records


class Forwarder:
    """Passes the signals torchrun handles to it the moment they arrive, also any that came before it ran."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pending: list[int] = []
        self.received: list[str] = []
        names = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", TORCHRUN_SIGNALS).split(",")
        for name in names:
            if isinstance(sig := getattr(signal, name.strip(), None), signal.Signals):
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.received.append(signal.Signals(signum).name)
        if self.pid is None:
            self.pending.append(signum)
        else:
            os.kill(self.pid, signum)

    def started(self, pid: int) -> None:
        self.pid = pid
        while self.pending:
            os.kill(pid, self.pending.pop(0))


LINGER_S = 15.0
"""torchrun still alive this long after every worker of this node ended (each with a recorded code) is stuck
on a lost peer (a frozen node's rendezvous store, which it waits on for minutes): it is killed, and the
workers' codes decide the exit."""


class Workers:
    """torchrun's worker processes, to tell when every one of them has ended."""

    def __init__(self, torchrun: int):
        self.torchrun, self.seen, self.ended_at = torchrun, {}, None

    def all_ended_for(self) -> float:
        """Seconds since the last worker ended (0 while one runs, or before any started)."""
        with suppress(psutil.Error):
            for p in psutil.Process(self.torchrun).children():
                if "resource_tracker" not in " ".join(p.cmdline()):
                    self.seen.setdefault(p.pid, p)
        if not self.seen or any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in self.seen.values()):
            self.ended_at = None
            return 0.0
        self.ended_at = self.ended_at or time.monotonic()
        return time.monotonic() - self.ended_at


def supervise(cmd: list[str], env: dict[str, str], records: Path) -> tuple[int, list[str], bool]:
    """Run `cmd` to its end, forwarding signals and reaping any other child (orphans, as PID 1).

    Returns its exit code (-N if signal N killed it), the names of the signals forwarded, and whether it
    was killed for lingering after its workers (LINGER_S)."""
    forwarder = Forwarder()
    # A session of its own: a terminal's Ctrl-C reaches torchrun once, through the launcher, not twice.
    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    forwarder.started(child.pid)
    workers, killed, next_look = Workers(child.pid), False, 0.0
    while True:
        pid, status = os.waitpid(-1, os.WNOHANG)  # an orphan's pid is reaped and passed over
        if pid == child.pid:
            forwarder.pid = None
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode, forwarder.received, killed
        if pid == 0:
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + 1.0
                if not killed and workers.all_ended_for() > LINGER_S and read_records(records):
                    print(f"prefix launch: torchrun still runs {LINGER_S:g} s after its workers ended (stuck on a "
                          "lost peer); killing it", file=sys.stderr, flush=True)
                    killed = True
                    with suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
            time.sleep(0.05)


def run(args: argparse.Namespace) -> int:
    if not args.torchrun_args:
        raise UserError("give torchrun's arguments, e.g. `prefix launch --standalone --nproc-per-node=8 "
                        "-m prefix.train --config FILE --run-name NAME`")
    folder = tempfile.mkdtemp(prefix="prefix-exit-")  # mode 0700: only this user's workers write there
    try:
        torchrun, received, killed = supervise([*TORCHRUN, *args.torchrun_args], {**os.environ, EXIT_DIR: folder},
                                               Path(folder))
        code, why = outcome(1 if killed else torchrun, read_records(Path(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    after = f" (after {', '.join(dict.fromkeys(received))})" if received else ""
    print(f"prefix launch: exit {code}{after}: {why}", file=sys.stderr, flush=True)
    return code
