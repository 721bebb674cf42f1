"""One training run = one child process: its wall time and the peak resident memory of its process tree.

Peak memory is the larger of two readings: the kernel's high-water mark of the child (and any of its
own children it waited for), from `os.wait4`, which catches a peak however short; and the sum of the
resident sets of the child and all its descendants, sampled every 200 ms with psutil, which counts
helper processes that run at the same time (data workers, compile workers).

A run can be given a memory cap: the sampler kills the whole tree when its resident memory passes it, so
that a scaling run that will not fit stops itself instead of waking the kernel's OOM killer on a machine
shared with other work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

SAMPLE_S = 0.2  # 50 ms cost the harness ~4% of a core (psutil walks /proc for the children); the kernel mark catches short peaks


@dataclass
class Measured:
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    stdout: str
    stderr: str
    over_memory_cap: bool = False
    started_at: float = 0.0  # time.time() just before the child started

    def tail(self, n: int = 3000) -> str:
        return (self.stdout + "\n" + self.stderr)[-n:]


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (/proc/loadavg; os.getloadavg elsewhere), printed beside every timing."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


def exit_on_sigterm() -> None:
    """SIGTERM ends the benchmark like Ctrl-C does, so that `run` takes the running child's tree with it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def run(cmd: list[str], *, env: dict, cwd: Path, log_prefix: Path, timeout_s: float, max_rss_bytes: int | None = None) -> Measured:
    """Run `cmd` to the end (killed with its whole group after `timeout_s`, or once its tree holds more
    than `max_rss_bytes`); stdout and stderr are kept in `log_prefix`.out / .err as well as returned."""
    out_path, err_path = log_prefix.with_suffix(".out"), log_prefix.with_suffix(".err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0, started_at = time.perf_counter(), time.time()
        child = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True)
        peak_sampled, done, capped = 0, threading.Event(), threading.Event()

        def sample() -> None:
            nonlocal peak_sampled
            try:
                proc = psutil.Process(child.pid)
            except psutil.NoSuchProcess:
                return
            while not done.is_set():
                peak_sampled = max(peak_sampled, _tree_rss(proc))
                if max_rss_bytes is not None and peak_sampled > max_rss_bytes and not capped.is_set():
                    capped.set()
                    kill()
                done.wait(SAMPLE_S)

        def kill() -> None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM turned into SystemExit): the child's tree goes too
            kill()
            os.wait4(child.pid, 0)
            raise
        finally:
            timer.cancel()
            done.set()
            sampler.join()
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    # ru_maxrss is KiB on Linux, bytes on macOS
    kernel_peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return Measured(child.returncode, wall, max(kernel_peak, peak_sampled),
                    out_path.read_text(errors="replace"), err_path.read_text(errors="replace"), capped.is_set(), started_at)
