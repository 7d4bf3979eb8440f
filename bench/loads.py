"""The HTTP loads: wrk for small requests, curl for bulk transfers, and parsers of what they print."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def duration_ms(text: str) -> float:
    """wrk's ``812.00us`` / ``1.23ms`` / ``2.00s`` in milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests per second, p50/p99 latency (ms) and error counts from ``wrk --latency`` output.

    Raises:
        ValueError: the output has no request rate or latency distribution (wrk failed).
    """
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if not (rate and p50 and p99 and total):
        raise ValueError("wrk printed no results: " + output.strip()[-300:])
    errors = 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return {
        "rps": float(rate.group(1)),
        "p50_ms": duration_ms(p50.group(1)),
        "p99_ms": duration_ms(p99.group(1)),
        "requests": int(total.group(1)),
        "errors": errors,
    }


def wrk(url: str, connections: int, seconds: float, host: str | None = None) -> dict[str, Any]:
    """``wrk -t1`` against ``url`` for ``seconds``; see :func:`parse_wrk`."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s"]
    if host:
        argv += ["-H", f"Host: {host}"]
    result = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60)
    return parse_wrk(result.stdout + result.stderr)


def _curl_base(url: str, host: str | None, timeout: float) -> list[str]:
    argv = ["curl", "-sS", "--max-time", str(round(timeout)), "--noproxy", "*"]
    if url.startswith("https://localhost:"):
        # snitun routes by SNI: the name must be localhost, the address 127.0.0.1 and nothing else.
        port = url.split(":")[2].split("/")[0]
        argv += ["-k", "--resolve", f"localhost:{port}:127.0.0.1"]
    if host:
        argv += ["-H", f"Host: {host}"]
    return argv


def download(url: str, expected_bytes: int, timeout: float, host: str | None = None) -> dict[str, Any]:
    """GET ``url`` into /dev/null with curl; MB/s (10^6 bytes) and whether every byte arrived."""
    argv = [
        *_curl_base(url, host, timeout),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
        url,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    code, size, seconds = ([*result.stdout.split(), "0", "0", "0"])[:3]
    ok = code == "200" and int(size) == expected_bytes
    return {
        "mb_per_s": round(int(size) / float(seconds) / 1e6, 1) if ok and float(seconds) > 0 else 0.0,
        "bytes": int(size),
        "seconds": float(seconds),
        "http": int(code),
        "ok": ok,
        "error": "" if ok else (result.stderr.strip() or f"HTTP {code}, {size} bytes")[:200],
    }


def upload(url: str, path: Path, timeout: float, host: str | None = None) -> dict[str, Any]:
    """PUT the file at ``path`` with curl to a sink that answers with the byte count it read."""
    expected = path.stat().st_size
    # No "Expect: 100-continue": it would only add a round trip before the body.
    argv = [
        *_curl_base(url, host, timeout),
        "-T",
        str(path),
        "-H",
        "Expect:",
        "-w",
        "\n%{http_code} %{size_upload} %{time_total}",
        url,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    lines = result.stdout.strip().splitlines() or [""]
    body = lines[0].strip() if len(lines) > 1 else ""
    code, size, seconds = ([*lines[-1].split(), "0", "0", "0"])[:3]
    ok = code == "200" and body == str(expected) and int(size) == expected
    return {
        "mb_per_s": round(expected / float(seconds) / 1e6, 1) if ok and float(seconds) > 0 else 0.0,
        "bytes": int(size),
        "seconds": float(seconds),
        "http": int(code),
        "ok": ok,
        "error": "" if ok else (result.stderr.strip() or f"HTTP {code}, sink read {body or '?'}")[:200],
    }
