"""What a person sees: a progress bar on a terminal, structured lines only in a pod (no terminal)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

from helpers import REPO, read_jsonl, run, train_cmd


def on_a_terminal(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `cmd` with stderr on a pseudo-terminal, as `torchrun` typed into a shell would be."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=slave,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout), out.decode(errors="replace")


def test_a_terminal_gets_a_progress_bar_and_a_pod_gets_log_lines(tmp_path: Path) -> None:
    settings = ("trainer.max_steps=30", "trainer.log_every=10", "trainer.eval_every=30", "trainer.sample_tokens=0")
    code, terminal = on_a_terminal(train_cmd(0, "tty", tmp_path, *settings))
    assert code == 0, terminal[-3000:]
    assert "30/30" in terminal and "step/s" in terminal and "loss=" in terminal, terminal[-3000:]
    assert "[info     ] step " not in terminal, "step lines are the bar's on a terminal"
    assert "[info     ] eval " in terminal and "training finished" in terminal, "other lines still show"
    logged = [e for e in read_jsonl(tmp_path / "tty" / "logs" / "rank0.jsonl") if e["event"] == "step"]
    assert [e["step"] for e in logged] == [10, 20, 30], "the JSON log keeps every step line"

    pod = run(train_cmd(0, "pod", tmp_path, *settings))
    assert pod.returncode == 0, pod.stderr[-3000:]
    assert pod.stderr.count("[info     ] step ") == 3 and "step/s" not in pod.stderr

    forced = run(train_cmd(0, "forced", tmp_path, *settings, "telemetry.progress=always"))
    assert forced.returncode == 0 and "30/30" in forced.stderr and "[info     ] step " not in forced.stderr
