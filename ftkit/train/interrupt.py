"""Stopping a run cleanly on a signal: SIGTERM (a preempted pod, `docker stop`, Slurm's time limit), SIGINT
(Ctrl-C) and SIGUSR1 (a scheduler's warning, e.g. Slurm's `--signal=USR1@120`; or "checkpoint and restart").

The first signal is only noted. The loop finishes the optimizer step it is in, writes a checkpoint, the
metrics log and the trackers are closed, and `ftkit train` exits with EXIT_RESUME: 75, EX_TEMPFAIL ("try
again"), which deploy/runpod/start.sh reads as "resume me": `ftkit train --resume auto` goes on from that
checkpoint to exactly the adapter of an unbroken run. A second signal exits at once, killed by it as if no
handler were there; the newest complete checkpoint is whole either way (checkpoints are written atomically).

A repeat within REPEAT_GRACE seconds of the first counts as the same request, not a second one: Ctrl-C
reaches every process of the terminal's process group, and a launcher (torchrun, start.sh) forwards the
signal it got to the same processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_RESUME = 75  # os.EX_TEMPFAIL
REPEAT_GRACE = 1.0
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
# Set by `ftkit launch` for its workers: the file where a worker that stopped on a signal leaves EXIT_RESUME,
# since accelerate's launcher turns any worker's non-zero exit into its own exit 1.
STATUS_ENV = "FTKIT_LAUNCH_STATUS"


class StopSignals:
    """While entered (in the main thread), the signals above set `name` instead of ending the process."""

    def __init__(self, say: Callable[[str], None] = lambda _: None):
        self.say = say
        self.name: str | None = None  # the first signal's name, once one came
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers there only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.name is not None

    def _handle(self, signum: int, frame: Any) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.name is None:
            self.name, self._at = name, now
            self.say(f"[yellow]{name}[/]: finishing this step, then a checkpoint and exit {EXIT_RESUME} "
                     "(--resume auto goes on from it); send it again to exit at once")
        elif now - self._at > REPEAT_GRACE:
            os.write(2, f"\n{name} again: exiting now, without a checkpoint of this step\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class Interrupted(SystemExit):
    """A run stopped by a signal with a checkpoint written: the process exits with EXIT_RESUME."""

    def __init__(self, message: str):
        super().__init__(EXIT_RESUME)
        self.message = message


def tell_launcher() -> None:
    """In a worker of `ftkit launch`: leave word that the run stopped on a signal with its checkpoint written."""
    path = os.environ.get(STATUS_ENV)
    if path:
        Path(path).write_text(str(EXIT_RESUME))


def run_forwarding(cmd: Sequence[str], status: Path) -> int:
    """Run a launcher (`accelerate launch ...`) in a process group of its own and pass each signal this process
    gets to that whole group, so that every worker hears it once and together they write one checkpoint
    (a terminal's Ctrl-C then reaches the workers only through here: no worker counts it twice). The exit
    code is EXIT_RESUME when the workers stopped on a signal with their checkpoint (a signal sent here, or to
    one worker alone), else the launcher's."""
    status.unlink(missing_ok=True)
    child = subprocess.Popen(list(cmd), env={**os.environ, STATUS_ENV: str(status)}, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS} if threading.current_thread() is threading.main_thread() else {}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        told = status.read_text().strip() == str(EXIT_RESUME)
        status.unlink()
    except OSError:
        told = False
    return EXIT_RESUME if told and code != 0 else code
