"""rproxy's benchmark: direct, nginx one-hop, snitun and rproxy side by side on loopback (issue 7).

Run it with ``scripts/bench`` (which installs wrk, nginx and the Python packages first) or, once
installed, ``.venv-bench/bin/python bench/run.py [--smoke] [...]``. See bench/README.md.

Every configuration serves the same backends (nginx for the static files, an aiohttp process
for the WebSocket echo and the upload sink); the loads run in interleaved rounds and the table
shows medians. Everything binds and connects to 127.0.0.1 only. Every process started is
stopped at the end, also after a failure, Ctrl-C, SIGTERM or the time budget running out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import select
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import loads
import report
from procs import (
    Child,
    ResourceMeter,
    Supervisor,
    free_port,
    http_json,
    http_status,
    log,
    port_open,
    raise_nofile,
    rss_kib,
    settled_rss_kib,
    signals_raise,
    wait_for,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
CONFIGS = ("direct", "nginx", "snitun", "rproxy")
#: Host of the aiohttp backend as a service of the rproxy tunnel (``<service>.<tunnel>``).
APP_HOST = "app.home"


class UsageError(Exception):
    """A bad flag: one line, exit code 2."""


class OutOfTime(Exception):
    """The run's time budget ran out (not an OSError, so that no load's error handling swallows it)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass
class Settings:
    """What to run, from the flags (see :func:`parse_args`)."""

    smoke: bool
    rounds: int
    seconds: float
    bulk_bytes: int
    idle_agents: int
    idle_ws: int
    concurrent_ws: int
    configs: list[str]
    budget: float
    work: Path
    out: Path
    rproxy: Path
    warmup: bool = field(default=True)


def parse_args(argv: list[str]) -> Settings:
    parser = Parser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        default=os.environ.get("BENCH_SMOKE") == "1",
        help="a quick check that everything works: 1 round of 1 s loads, 64 MiB bulk, few "
        "agents and WebSockets; the defaults below shrink accordingly ($BENCH_SMOKE=1)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; smoke 1)")
    parser.add_argument("--seconds", type=int, help="length of each wrk and WebSocket load (default 8; smoke 1)")
    parser.add_argument("--bulk-mib", type=int, help="size of the download and upload (default 1024; smoke 64)")
    parser.add_argument("--agents", type=int, help="idle agents for the memory per agent (default 200; smoke 5)")
    parser.add_argument(
        "--idle-ws", type=int, help="idle visitor WebSockets for the memory per WebSocket (default 2000; smoke 50)"
    )
    parser.add_argument(
        "--concurrent-ws", type=int, help="concurrent visitor WebSockets through one agent (default 10000; smoke 200)"
    )
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(CONFIGS) + " (direct is always run)")
    parser.add_argument("--no-snitun", action="store_true", help="leave snitun out")
    parser.add_argument("--budget", type=int, help="stop everything after this many seconds (default 840; smoke 50)")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("BENCH_WORK", "/tmp/rproxy-bench")),
        help="scratch directory: files served, logs, nginx state ($BENCH_WORK, default /tmp/rproxy-bench)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where latest.json and latest.png go")
    parser.add_argument(
        "--rproxy",
        type=Path,
        default=ROOT / ".venv" / "bin" / "rproxy",
        help="the rproxy command to measure (default .venv/bin/rproxy)",
    )
    args = parser.parse_args(argv)
    smoke = bool(args.smoke)

    def pick(value: int | None, full: int, quick: int, flag: str, least: int) -> int:
        chosen = value if value is not None else (quick if smoke else full)
        if chosen < least:
            raise UsageError(f"{flag} must be at least {least}, not {chosen}")
        return chosen

    configs = list(CONFIGS)
    if args.only:
        wanted = {c.strip() for c in args.only.split(",") if c.strip()}
        unknown = wanted - set(CONFIGS)
        if unknown:
            raise UsageError(
                f"--only: unknown configuration(s) {', '.join(sorted(unknown))}; known: {', '.join(CONFIGS)}"
            )
        configs = [c for c in CONFIGS if c in wanted or c == "direct"]
    if args.no_snitun and "snitun" in configs:
        configs.remove("snitun")
    if not args.rproxy.is_file() or not os.access(args.rproxy, os.X_OK):
        raise UsageError(f"--rproxy: {args.rproxy} is not an executable file (scripts/bench installs .venv)")
    return Settings(
        smoke=smoke,
        rounds=pick(args.rounds, 3, 1, "--rounds", 1),
        seconds=pick(args.seconds, 8, 1, "--seconds", 1),
        bulk_bytes=pick(args.bulk_mib, 1024, 64, "--bulk-mib", 1) << 20,
        idle_agents=pick(args.agents, 200, 5, "--agents", 1),
        idle_ws=pick(args.idle_ws, 2000, 50, "--idle-ws", 1),
        concurrent_ws=pick(args.concurrent_ws, 10000, 200, "--concurrent-ws", 1),
        configs=configs,
        budget=pick(args.budget, 840, 50, "--budget", 10),
        work=args.work.resolve(),
        out=args.out.resolve(),
        rproxy=args.rproxy,
        warmup=not smoke,
    )


@dataclass
class Target:
    """How the loads reach the backends through one configuration."""

    name: str
    base: str  # /1k and /big
    sink: str
    ws: str | None
    host: str | None  # Host header for the sink and the WebSocket (rproxy: the tunnel's service)
    roles: list[str]  # the processes that are this relay (their CPU and memory are reported)


class Bench:
    """One run: set up, measure, report; ``close`` stops everything it started."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.run_dir = settings.work / "run"
        self.www = settings.work / "www"
        self.sup = Supervisor(self.run_dir)
        self.ports: dict[str, int] = {}
        self.targets: dict[str, Target] = {}
        self.skipped: dict[str, str] = {}
        self.failures: list[str] = []
        self.token = secrets.token_urlsafe(24)
        self.token_file = self.run_dir / "tokens"
        self.rproxy_python = str(settings.rproxy.parent / "python")
        #: Filled as the run goes, so that a run cut short still reports what it measured.
        self.raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.memory_results: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup

    def prepare_files(self) -> None:
        for directory in (self.run_dir, self.www):
            directory.mkdir(parents=True, exist_ok=True)
        small = self.www / "1k"
        if not small.is_file() or small.stat().st_size != 1024:
            small.write_bytes(os.urandom(1024))
        big = self.www / "big"
        if not big.is_file() or big.stat().st_size != self.s.bulk_bytes:
            log(f"writing a {self.s.bulk_bytes >> 20} MiB file of random bytes (kept in {self.www} for next time)")
            with big.open("wb") as handle:
                for _ in range(self.s.bulk_bytes >> 20):
                    handle.write(os.urandom(1 << 20))
        # Read once, so that every configuration's download comes from the page cache.
        with big.open("rb") as handle:
            while handle.read(8 << 20):
                pass
        self.token_file.touch(mode=0o600)
        self.token_file.write_text(self.token + "\n")
        cert, key = self.run_dir / "cert.pem", self.run_dir / "key.pem"
        if not cert.is_file():
            subprocess.run(
                [
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "30",
                    "-subj",
                    "/CN=localhost",
                    "-addext",
                    "subjectAltName=DNS:localhost",
                    "-keyout",
                    str(key),
                    "-out",
                    str(cert),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )

    def nginx_conf(self, template: str, name: str) -> Path:
        state = self.run_dir / name
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        values = {
            "RUN": str(state),
            "WWW": str(self.www),
            "CERT": str(self.run_dir / "cert.pem"),
            "KEY": str(self.run_dir / "key.pem"),
            "BACKEND_PORT": str(self.ports["backend"]),
            "BACKEND_TLS_PORT": str(self.ports["backend_tls"]),
            "APP_PORT": str(self.ports["app"]),
            "PROXY_PORT": str(self.ports["proxy"]),
            # Started as root, nginx's workers would become nobody, who cannot read a --work
            # directory inside a private one (pytest's tmp_path, /root): they stay root here.
            "USER": "user root;" if os.geteuid() == 0 else "",
        }
        text = (HERE / template).read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        leftover = re.search(r"@[A-Z_]+@", text)
        if leftover:
            raise RuntimeError(f"{template}: no value for {leftover.group()}")
        conf = state / "nginx.conf"
        conf.write_text(text)
        return conf

    def start_nginx(self, name: str, template: str) -> None:
        conf = self.nginx_conf(template, name)
        # SIGQUIT: nginx's graceful stop, in which the master also stops its workers.
        self.sup.start(
            name,
            [
                "nginx",
                "-e",
                str(self.run_dir / name / "error.log"),
                "-p",
                str(self.run_dir / name),
                "-c",
                str(conf),
                "-g",
                "daemon off;",
            ],
            stop_signal=signal.SIGQUIT,
        )

    def wait_port(self, what: str, port: int, timeout: float = 20) -> None:
        wait_for(f"{what} on port {port}", lambda: port_open(port), timeout, self.sup.check_alive)

    def start_backends(self) -> None:
        for name in ("backend", "backend_tls", "app", "proxy", "bridge", "sni", "peer"):
            self.ports[name] = free_port()
        self.sup.start("app", [PY, str(HERE / "backend.py"), str(self.ports["app"])])
        self.start_nginx("nginx-backend", "nginx-backend.conf.template")
        self.wait_port("aiohttp backend", self.ports["app"])
        self.wait_port("nginx backend", self.ports["backend"])
        base = f"http://127.0.0.1:{self.ports['backend']}"
        app = f"http://127.0.0.1:{self.ports['app']}"
        self.targets["direct"] = Target(
            "direct", base, app + "/sink", f"ws://127.0.0.1:{self.ports['app']}/ws", None, []
        )

    def start_nginx_proxy(self) -> None:
        self.start_nginx("nginx-proxy", "nginx-proxy.conf.template")
        self.wait_port("nginx proxy", self.ports["proxy"])
        base = f"http://127.0.0.1:{self.ports['proxy']}"
        self.targets["nginx"] = Target(
            "nginx", base, base + "/sink", f"ws://127.0.0.1:{self.ports['proxy']}/ws", None, ["nginx-proxy"]
        )

    def start_snitun(self) -> None:
        probe = subprocess.run([PY, "-c", "import snitun"], capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            self.skipped["snitun"] = "not installed in this interpreter (scripts/bench installs it with Python 3.13)"
            return
        keys = self.run_dir / "snitun-keys.json"
        keys.unlink(missing_ok=True)
        subprocess.run([PY, str(HERE / "snitun_peer.py"), "keys", str(keys)], check=True, timeout=60)
        script = str(HERE / "snitun_peer.py")
        self.sup.start(
            "snitun-server", [PY, script, "server", str(keys), str(self.ports["sni"]), str(self.ports["peer"])]
        )
        self.wait_port("snitun server", self.ports["peer"])
        self.sup.start(
            "snitun-client", [PY, script, "client", str(keys), str(self.ports["peer"]), str(self.ports["backend_tls"])]
        )
        base = f"https://localhost:{self.ports['sni']}"

        def through() -> bool:
            return bool(loads.download(base + "/1k", 1024, 3)["ok"])

        wait_for("snitun tunnel", through, 30, self.sup.check_alive)
        self.targets["snitun"] = Target("snitun", base, base + "/sink", None, None, ["snitun-server", "snitun-client"])

    def start_rproxy_pair(self, prefix: str, port: int, target: str, services: dict[str, str]) -> None:
        """A bridge and one agent, as real ``rproxy`` processes (uvloop, as the CLI picks it)."""
        rproxy = str(self.s.rproxy)
        self.sup.start(
            f"{prefix}bridge",
            [
                rproxy,
                "bridge",
                "--listen",
                f"127.0.0.1:{port}",
                "--token-file",
                str(self.token_file),
                "--no-access-log",
            ],
        )
        self.wait_port(f"{prefix}bridge", port)
        argv = [
            rproxy,
            "agent",
            "--bridge",
            f"ws://127.0.0.1:{port}",
            "--target",
            target,
            "--name",
            "home",
            "--agent-id",
            f"bench-{prefix}agent",
        ]
        for name, url in services.items():
            argv += ["--service", f"{name}={url}"]
        # The token goes by environment: nothing secret in any process list or log.
        self.sup.start(f"{prefix}agent", argv, env={"RPROXY_TOKEN": self.token})
        # Ready when a request crosses the tunnel to the aiohttp backend (directly or as the service).
        host = APP_HOST if services else None
        wait_for(
            f"{prefix}agent's tunnel",
            lambda: http_status(f"http://127.0.0.1:{port}/health", host) == 200,
            30,
            self.sup.check_alive,
        )

    def start_rproxy(self) -> None:
        port = self.ports["bridge"]
        self.start_rproxy_pair(
            "rproxy-",
            port,
            f"http://127.0.0.1:{self.ports['backend']}",
            {"app": f"http://127.0.0.1:{self.ports['app']}"},
        )
        wait_for(
            "rproxy tunnel to nginx",
            lambda: http_status(f"http://127.0.0.1:{port}/1k") == 200,
            30,
            self.sup.check_alive,
        )
        base = f"http://127.0.0.1:{port}"
        self.targets["rproxy"] = Target(
            "rproxy", base, base + "/sink", f"ws://127.0.0.1:{port}/ws", APP_HOST, ["rproxy-bridge", "rproxy-agent"]
        )

    def compile_rproxy(self) -> None:
        """Byte-compile the rproxy_core the measured command imports, as an installed package is.

        Compiling modules from source at start-up leaves a few MiB of freed heap in the bridge
        that the first agents and WebSockets fill without growing RSS: memory per idle agent
        then reads about 26 KiB instead of 35 (measured on issue 16's code), depending only on
        whether __pycache__ happened to exist. pip compiles on install, so users see the latter.
        """
        script = (
            "import compileall, os, rproxy_core; compileall.compile_dir(os.path.dirname(rproxy_core.__file__), quiet=1)"
        )
        # -P: the package found as the rproxy command finds it, not one in the working directory.
        subprocess.run([self.rproxy_python, "-P", "-c", script], check=True, timeout=120)

    def setup(self) -> None:
        self.prepare_files()
        if "rproxy" in self.s.configs:
            self.compile_rproxy()
        self.start_backends()
        starters = {"nginx": self.start_nginx_proxy, "snitun": self.start_snitun, "rproxy": self.start_rproxy}
        for config in self.s.configs:
            if config not in starters:
                continue
            log(f"starting {config}")
            try:
                starters[config]()
            except RuntimeError as err:
                if config != "snitun":
                    raise
                # snitun is a reference, not the subject: the run goes on without it.
                self.skipped["snitun"] = f"did not start: {err}"
                self.targets.pop("snitun", None)
                for name in ("snitun-client", "snitun-server"):
                    self.sup.stop(name)
        log("all up: " + ", ".join(self.targets))

    # ------------------------------------------------------------------ loads

    def groups(self, target: Target) -> dict[str, Any]:
        groups = {role: self.sup.children[role].pids for role in target.roles}
        groups["backend"] = lambda: self.sup.children["nginx-backend"].pids() + self.sup.children["app"].pids()
        return groups

    def measure(self, target: Target, load: str) -> dict[str, Any]:
        seconds = self.s.seconds
        bulk_timeout = max(60.0, self.s.bulk_bytes / 20e6)  # 20 MB/s is far below any relay measured here
        with ResourceMeter(self.groups(target)) as meter:
            if load == "c64":
                result = loads.wrk(target.base + "/1k", 64, seconds)
            elif load == "c1":
                result = loads.wrk(target.base + "/1k", 1, seconds)
            elif load == "download":
                result = loads.download(target.base + "/big", self.s.bulk_bytes, bulk_timeout)
            elif load == "upload":
                result = loads.upload(target.sink, self.www / "big", bulk_timeout, target.host)
            else:
                assert target.ws is not None
                argv = [PY, str(HERE / "wsload.py"), "rtt", target.ws, str(seconds)]
                if target.host:
                    argv += ["--host", target.host]
                done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
                if done.returncode != 0:
                    raise RuntimeError(f"wsload: {done.stderr.strip()[-300:]}")
                result = json.loads(done.stdout)
        result["resources"] = meter.result
        result["machine_busy"] = meter.machine_busy
        return result

    def rounds(self) -> None:
        names = list(self.targets)
        if self.s.warmup:
            for name in names:
                loads.wrk(self.targets[name].base + "/1k", 64, 2)
        raw = self.raw
        raw.update({name: {} for name in names})
        for number in range(1, self.s.rounds + 1):
            for name in names:
                target = self.targets[name]
                done: dict[str, dict[str, Any]] = {}
                for load in report.LOADS:
                    if load == "ws" and target.ws is None:
                        continue
                    try:
                        done[load] = self.measure(target, load)
                    except (RuntimeError, ValueError, OSError, subprocess.SubprocessError, json.JSONDecodeError) as err:
                        self.failures.append(f"round {number} {name} {load}: {err}")
                        log(f"FAILED round {number} {name} {load}: {err}")
                        continue
                    raw[name].setdefault(load, []).append(done[load])
                    if done[load].get("ok") is False:
                        self.failures.append(f"round {number} {name} {load}: {done[load]['error']}")
                self.sup.check_alive()
                log(
                    f"round {number}/{self.s.rounds} {name:6s} "
                    + " | ".join(_brief(load, r) for load, r in done.items())
                )

    # ------------------------------------------------------------------ memory

    def ask(self, child: Child, command: str, timeout: float) -> dict[str, Any]:
        """Send a command line to a helper and read its one-line JSON answer (bounded by ``timeout``)."""
        assert child.popen.stdin is not None and child.popen.stdout is not None
        child.popen.stdin.write(command.encode() + b"\n")
        child.popen.stdin.flush()
        ready, _, _ = select.select([child.popen.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"{child.name}: no answer to {command!r} within {timeout:.0f}s")
        line = child.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"{child.name} exited; its log:\n{child.tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def idle_agents(self) -> dict[str, Any]:
        """Bridge RSS per connected idle agent: K agents, each its own tunnel, on a fresh bridge."""
        port = free_port()
        rproxy = str(self.s.rproxy)
        bridge = self.sup.start(
            "idle-bridge",
            [
                rproxy,
                "bridge",
                "--listen",
                f"127.0.0.1:{port}",
                "--token-file",
                str(self.token_file),
                "--no-access-log",
            ],
        )
        self.wait_port("idle-bridge", port)
        helper = self.sup.start(
            "idle-agents",
            [
                self.rproxy_python,
                str(HERE / "idle_agents.py"),
                f"ws://127.0.0.1:{port}",
                f"http://127.0.0.1:{self.ports['app']}",
            ],
            env={"RPROXY_TOKEN": self.token},
            stdin=subprocess.PIPE,
            stdout_pipe=True,
        )
        try:
            warm = 8  # first connections allocate the bridge's lasting structures: not per agent
            self.ask(helper, f"add {warm}", 60)
            base = settled_rss_kib(bridge.pids())
            added = self.ask(helper, f"add {self.s.idle_agents}", 30 + self.s.idle_agents * 0.5)
            after = settled_rss_kib(bridge.pids())
            health = http_json(f"http://127.0.0.1:{port}/_rproxy/health") or {}
            tunnels = len(health.get("tunnels", {}))
            if tunnels != warm + self.s.idle_agents:
                self.failures.append(
                    f"idle agents: the bridge lists {tunnels} tunnels, not {warm + self.s.idle_agents}"
                )
            return {
                "count": self.s.idle_agents,
                "failed": added["failed"],
                "connect_seconds": added["seconds"],
                "tunnels_at_bridge": tunnels,
                "bridge_rss_base_kib": base,
                "bridge_rss_kib": after,
                "per_agent_kib": round((after - base) / self.s.idle_agents, 2),
            }
        finally:
            self.sup.stop("idle-agents")
            self.sup.stop("idle-bridge")

    def visitor_websockets(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Bridge and agent RSS per idle visitor WebSocket, then many at once through one agent."""
        port = free_port()
        self.start_rproxy_pair("ws-", port, f"http://127.0.0.1:{self.ports['app']}", {})
        bridge, agent = self.sup.children["ws-bridge"], self.sup.children["ws-agent"]
        holder = self.sup.start(
            "ws-holder",
            [PY, str(HERE / "wsload.py"), "hold", f"ws://127.0.0.1:{port}/ws"],
            stdin=subprocess.PIPE,
            stdout_pipe=True,
        )
        try:
            warm = 100 if not self.s.smoke else 20
            self.ask(holder, f"open {warm}", 60)
            bridge0, agent0 = settled_rss_kib(bridge.pids()), settled_rss_kib(agent.pids())
            idle_total = warm + self.s.idle_ws
            opened = self.ask(holder, f"open {idle_total}", 60 + self.s.idle_ws * 0.05)
            bridge1, agent1 = settled_rss_kib(bridge.pids()), settled_rss_kib(agent.pids())
            count = opened["open"] - warm
            if opened["errors"]:
                self.failures.append(
                    f"idle visitor WebSockets: {opened['errors']} failed to open {opened['error_kinds']}"
                )
            idle = {
                "count": count,
                "errors": opened["errors"],
                "bridge_rss_base_kib": bridge0,
                "bridge_rss_kib": bridge1,
                "per_ws_kib_bridge": round((bridge1 - bridge0) / max(1, count), 2),
                "per_ws_kib_agent": round((agent1 - agent0) / max(1, count), 2),
            }
            total = max(self.s.concurrent_ws, idle_total)
            many = self.ask(holder, f"open {total}", 60 + total * 0.05)
            bridge2, agent2 = settled_rss_kib(bridge.pids()), settled_rss_kib(agent.pids())
            echoed = self.ask(holder, "echo", 60 + total * 0.01)
            concurrent = {
                "attempted": many["attempts"],
                "open": many["open"],
                "errors": many["errors"],
                "error_kinds": many["error_kinds"],
                "open_seconds": many["seconds"],
                "echo_ok": echoed["echo_ok"],
                "echo_failed": echoed["echo_failed"],
                "echo_error_kinds": echoed["echo_error_kinds"],
                "bridge_rss_kib": bridge2,
                "agent_rss_kib": agent2,
                "rss_now_kib": rss_kib(bridge.pids()),
            }
            return idle, concurrent
        finally:
            self.sup.stop("ws-holder")
            self.sup.stop("ws-agent")
            self.sup.stop("ws-bridge")

    def memory(self) -> None:
        if "rproxy" not in self.targets:
            return
        log(f"memory: {self.s.idle_agents} idle agents on a fresh bridge")
        agents = self.memory_results["idle_agents"] = self.idle_agents()
        log(
            f"memory: {agents['per_agent_kib']:.1f} KiB per idle agent; now {self.s.idle_ws} idle visitor WebSockets, "
            f"then {self.s.concurrent_ws:,} at once, on a fresh bridge and agent"
        )
        idle, concurrent = self.visitor_websockets()
        self.memory_results.update(idle_visitor_ws=idle, concurrent_ws=concurrent)
        log(
            f"memory: {idle['per_ws_kib_bridge']:.1f} KiB per idle visitor WebSocket at the bridge; "
            f"{concurrent['open']:,} of {concurrent['attempted']:,} concurrent open, "
            f"echo ok on {concurrent['echo_ok']:,}"
        )

    def close(self) -> None:
        if self.sup.children:
            log(f"stopping {len(self.sup.children)} processes")
        self.sup.stop_all()


def _brief(load: str, r: dict[str, Any]) -> str:
    if load in ("c64", "c1"):
        return f"{load} {r['rps']:,.0f} req/s p50 {r['p50_ms']:.3f} ms" + (f" ERR {r['errors']}" if r["errors"] else "")
    if load in ("download", "upload"):
        return f"{load} {r['mb_per_s']:,.0f} MB/s" + ("" if r["ok"] else " FAILED")
    return f"ws {r['per_s']:,.0f}/s"


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


def machine_info(settings: Settings) -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    package_versions = (
        "import importlib.metadata as m, sys\n"
        "for p in sys.argv[1:]:\n"
        "    try: print(p, m.version(p))\n"
        "    except m.PackageNotFoundError: print(p, '-')"
    )
    rproxy_side = _version([str(settings.rproxy.parent / "python"), "-c", "import sys; print(sys.version.split()[0])"])
    packages = {}
    for python, names in (
        (str(settings.rproxy.parent / "python"), ["aiohttp", "uvloop", "websockets"]),
        (PY, ["snitun", "matplotlib"]),
    ):
        done = subprocess.run([python, "-c", package_versions, *names], capture_output=True, text=True, timeout=60)
        packages.update(dict(line.split(" ", 1) for line in done.stdout.splitlines()))
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": _os_name(),
        "memory_mib": _meminfo_mib(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python_bench": platform.python_version(),
        "python_rproxy": rproxy_side,
        "versions": {
            "rproxy": _version([str(settings.rproxy), "--version"]),
            "nginx": _version(["nginx", "-v"]),
            "wrk": _version(["wrk", "-v"]),
            "curl": _version(["curl", "-V"]),
            **packages,
        },
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _meminfo_mib() -> int:
    first = Path("/proc/meminfo").read_text().split("\n", 1)[0]
    return int(first.split()[1]) // 1024


def run(settings: Settings) -> int:
    started = datetime.now(UTC)
    raise_nofile()
    for tool in ("wrk", "nginx", "curl", "openssl"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            print(f"bench: error: {tool} is not installed (scripts/bench installs it)", file=sys.stderr)
            return 1
    bench = Bench(settings)
    machine = machine_info(settings)
    if float(machine["loadavg_at_start"][0]) > 0.5 * (os.cpu_count() or 1):
        log(
            f"note: the machine is already busy (load average {machine['loadavg_at_start'][0]}): "
            "figures may be disturbed"
        )

    def out_of_time(signum: int, frame: object) -> None:
        raise OutOfTime(f"the time budget of {settings.budget:.0f}s ran out (--budget)")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(settings.budget))
    try:
        with signals_raise():
            bench.setup()
            bench.rounds()
            bench.memory()
    except OutOfTime as err:
        bench.failures.append(str(err))
        log(f"FAILED: {err}")
    except KeyboardInterrupt as err:
        log(f"interrupted ({err or 'Ctrl-C'}): stopping")
        signal.alarm(0)
        bench.close()
        return 130
    except RuntimeError as err:
        bench.failures.append(str(err))
        log(f"FAILED: {err}")
    finally:
        signal.alarm(0)
        bench.close()
    roles = {name: target.roles for name, target in bench.targets.items()}
    raw = {name: loads_ for name, loads_ in bench.raw.items() if loads_}
    memory = bench.memory_results
    summary = report.summarise(raw, {name: roles[name] for name in raw})
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "seconds_taken": round((datetime.now(UTC) - started).total_seconds(), 1),
        "command": os.environ.get("BENCH_COMMAND") or " ".join([Path(PY).name, *sys.argv]),
        "machine": machine,
        "settings": {
            "smoke": settings.smoke,
            "rounds": settings.rounds,
            "seconds": settings.seconds,
            "bulk_bytes": settings.bulk_bytes,
            "idle_agents": settings.idle_agents,
            "idle_ws": settings.idle_ws,
            "concurrent_ws": settings.concurrent_ws,
            "configs": list(summary),
            "wrk": "wrk -t1 -cN -dS --latency on a 1 KiB file",
        },
        "configs": list(summary),
        "roles": {name: roles[name] for name in summary},
        "summary": summary,
        "memory": memory,
        "skipped": bench.skipped,
        "failures": bench.failures,
        "raw": raw,
    }
    result["goals"] = report.goals(summary, memory)
    settings.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = settings.out / "latest.json", settings.out / "latest.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + report.table(result) + "\n")
    if "direct" in summary:
        import chart  # matplotlib is slow to import: only once there is something to draw

        chart.draw(result, png_path)
        print(f"wrote {json_path} and {png_path} ({result['seconds_taken']:.0f}s in all)")
    else:
        print(f"wrote {json_path}; no chart without results")
    return 1 if bench.failures else 0


def main() -> int:
    try:
        settings = parse_args(sys.argv[1:])
    except UsageError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
