"""Processes the benchmark starts, and what it reads about them from /proc.

Every process is started through :class:`Supervisor`, which remembers it and stops it (by PID,
then by process group) when the run ends however it ends: normally, on an error, on Ctrl-C or
on SIGTERM. Each child also gets SIGTERM from the kernel should the benchmark itself die
without cleaning up (PR_SET_PDEATHSIG), so no relay outlives a killed run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
# Looked up once here: between fork and exec the child should only call, not load libraries.
try:
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def log(message: str) -> None:
    """One progress line, with the time since the run started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


_T0 = time.monotonic()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; return the new soft limit.

    10,000 WebSockets need about that many descriptors in the client, the bridge, the agent
    and the backend alike; Debian's default soft limit is 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _child_setup() -> None:
    # Runs in the child between fork and exec: its own raised limit, and SIGTERM when the
    # benchmark dies (the only thing that can stop it then).
    raise_nofile()
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """A started process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM
    log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """This process and its descendants (nginx workers, a snitun worker)."""
        return [self.pid, *descendants(self.pid)]

    def tail(self, lines: int = 15) -> str:
        """The end of the process's log, for an error message."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Supervisor:
    """Starts processes, checks they are alive, and stops all of them exactly once."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
        stdin: int | None = subprocess.DEVNULL,
        stdout_pipe: bool = False,
    ) -> Child:
        """Start ``argv`` as ``name``; its stderr (and stdout, unless piped) go to ``<log_dir>/<name>.log``."""
        if name in self.children and self.children[name].popen.poll() is None:
            raise RuntimeError(f"{name} is already running")
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("wb")
        popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE if stdout_pipe else log_file,
            stderr=log_file,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_child_setup,
        )
        child = Child(name, popen, log_path, stop_signal, log_file)
        self.children[name] = child
        return child

    def check_alive(self) -> None:
        """Raise if a process that should be running has exited."""
        for child in self.children.values():
            code = child.popen.poll()
            if code is not None:
                raise RuntimeError(f"{child.name} exited (code {code}); its log:\n{child.tail()}")

    def stop(self, name: str, timeout: float = 10.0) -> None:
        """Stop one process: its stop signal, then SIGKILL to its whole group after ``timeout``."""
        child = self.children.pop(name, None)
        if child is None:
            return
        if child.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, child.stop_signal)
            try:
                child.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.popen.wait(5)
        # The group may hold workers that outlived their master.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        for stream in (child.popen.stdin, child.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if child.log_file is not None:
            child.log_file.close()

    def stop_all(self) -> None:
        """Stop every process still known, newest first (relays before the backends they use)."""
        for name in reversed(list(self.children)):
            try:
                self.stop(name)
            except Exception as err:  # one stubborn process must not keep the others running
                print(f"could not stop {name}: {err}", flush=True)


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``, from /proc/PID/task/*/children."""
    found: list[int] = []
    for children_file in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(x) for x in children_file.read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` so far, in seconds (vanished processes count 0)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (``VmRSS``, ``VmHWM``), 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pids: list[int]) -> int:
    """Resident memory of ``pids`` together, in KiB."""
    return sum(status_kib(pid, "VmRSS") for pid in pids)


def _reset_peak(pid: int) -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so VmHWM read
    # afterwards is the peak of this load alone rather than since the process started.
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def settled_rss_kib(pids: list[int], timeout: float = 5.0, interval: float = 0.25) -> int:
    """RSS once it stops moving (two readings ``interval`` apart within 0.5%), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    previous = rss_kib(pids)
    while time.monotonic() < deadline:
        time.sleep(interval)
        current = rss_kib(pids)
        if abs(current - previous) <= previous * 0.005:
            return current
        previous = current
    return previous


class ResourceMeter:
    """CPU seconds and peak RSS of named groups of processes over one load.

    Used as a context manager; ``result`` then maps each group to ``{"cpu_s", "peak_rss_kib"}``,
    and ``machine_busy`` is the share of all cores that was busy (1.0 = every core, all the time).
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.result: dict[str, dict[str, float]] = {}
        self.machine_busy = 0.0
        self.seconds = 0.0
        self._pids: dict[str, list[int]] = {}
        self._cpu0: dict[str, float] = {}
        self._sampled: dict[str, int] = {}
        self._reset_ok = True
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> ResourceMeter:
        self._pids = {name: pids() for name, pids in self.groups.items()}
        for pids in self._pids.values():
            for pid in pids:
                self._reset_ok = _reset_peak(pid) and self._reset_ok
        if not self._reset_ok:  # not allowed to reset: sample RSS instead
            self._sampled = {name: rss_kib(pids) for name, pids in self._pids.items()}
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self._cpu0 = {name: cpu_seconds(pids) for name, pids in self._pids.items()}
        self._busy0 = _machine_ticks()
        self._t0 = time.monotonic()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for name, pids in self._pids.items():
                self._sampled[name] = max(self._sampled[name], rss_kib(pids))

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.monotonic() - self._t0
        busy1 = _machine_ticks()
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        for name, pids in self._pids.items():
            peak = sum(status_kib(pid, "VmHWM") for pid in pids) if self._reset_ok else self._sampled[name]
            self.result[name] = {"cpu_s": round(cpu_seconds(pids) - self._cpu0[name], 3), "peak_rss_kib": peak}
        busy = busy1[0] - self._busy0[0]
        total = busy1[1] - self._busy0[1]
        self.machine_busy = round(busy / total, 3) if total else 0.0


def _machine_ticks() -> tuple[int, int]:
    # Busy and total jiffies of all cores, from the first line of /proc/stat.
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def wait_for(what: str, condition: Callable[[], bool], timeout: float, alive: Callable[[], None] | None = None) -> None:
    """Poll ``condition`` until it holds; raise naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_status(url: str, host: str | None = None, timeout: float = 2.0) -> int:
    """Status of a GET (0 when no answer); ``host`` overrides the Host header."""
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (OSError, ValueError):
        return 0


def http_json(url: str, timeout: float = 2.0) -> Any:
    """The JSON body of a GET, or None."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run through ``finally`` blocks, so cleanup runs.

    SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then never
    turns it into KeyboardInterrupt.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
