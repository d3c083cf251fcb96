"""CPU time and memory of running processes, from /proc (Linux)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping

_TICK_SECONDS = 1.0 / os.sysconf("SC_CLK_TCK")
_KIB = 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of every thread of `pid` so far (/proc/<pid>/stat utime + stime)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        # The command name (field 2) may hold spaces; fields after it are counted from its closing ')'.
        fields = stat.read().rsplit(b")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) * _TICK_SECONDS


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy, all cores together (/proc/stat, everything but idle and iowait)."""
    with open("/proc/stat", "rb") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) * _TICK_SECONDS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (resident at peak) of `pid`, in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith((b"VmRSS:", b"VmHWM:")):
                name, value = line.split(b":", 1)
                values[name.decode()] = int(value.split()[0])
    return values


def reset_peak(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so that it gives the peak of what follows."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def mib(kib: float) -> float:
    return round(kib / _KIB, 1)


class CpuMeter:
    """Sums the CPU time each process, and the whole machine, spends inside the measured windows
    (`start` ... `stop`)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._pids = dict(pids)
        self.seconds = dict.fromkeys(self._pids, 0.0)
        self.machine_seconds = 0.0
        self._started: dict[str, float] | None = None
        self._machine_started = 0.0

    def start(self) -> None:
        self._started = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        self._machine_started = machine_busy_seconds()

    def stop(self) -> None:
        assert self._started is not None, "stop() without start()"
        self.machine_seconds += machine_busy_seconds() - self._machine_started
        for name, pid in self._pids.items():
            self.seconds[name] += cpu_seconds(pid) - self._started[name]
        self._started = None


class RssMonitor:
    """Samples VmRSS of each process in the background and keeps peaks: since the last checkpoint, and
    over the whole run. A checkpoint also resets the kernel's own peak (VmHWM), which then catches the
    spikes between two samples.
    """

    def __init__(self, pids: Mapping[str, int], interval: float = 0.05) -> None:
        self._pids = dict(pids)
        self._interval = interval
        self._since_kib = {name: memory_kib(pid)["VmRSS"] for name, pid in self._pids.items()}
        self._hwm_reset = {name: reset_peak(pid) for name, pid in self._pids.items()}
        self._run_peak_kib = dict(self._since_kib)
        self._task: asyncio.Task[None] | None = None

    def current_mib(self) -> dict[str, float]:
        return {name: mib(memory_kib(pid)["VmRSS"]) for name, pid in self._pids.items()}

    def checkpoint(self) -> dict[str, float]:
        """The peak RSS (MiB) of each process since the previous checkpoint; then starts a new period."""
        self._sample()
        peaks = {}
        for name, pid in self._pids.items():
            peak = self._since_kib[name]
            if self._hwm_reset[name]:
                peak = max(peak, memory_kib(pid).get("VmHWM", 0))
            self._run_peak_kib[name] = max(self._run_peak_kib[name], peak)
            peaks[name] = mib(peak)
            self._hwm_reset[name] = reset_peak(pid)
            self._since_kib[name] = memory_kib(pid)["VmRSS"]
        return peaks

    def run_peak_mib(self) -> dict[str, float]:
        """The peak RSS (MiB) of each process since this monitor was created."""
        self.checkpoint()
        return {name: mib(kib) for name, kib in self._run_peak_kib.items()}

    def _sample(self) -> None:
        for name, pid in self._pids.items():
            with contextlib.suppress(OSError):
                rss = memory_kib(pid)["VmRSS"]
                if rss > self._since_kib[name]:
                    self._since_kib[name] = rss

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
