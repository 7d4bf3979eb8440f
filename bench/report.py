"""Medians over rounds, ratios, the issue's goals, and the text table printed at the end of a run."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

#: (key, label, higher is better) of each headline metric, in table order.
METRICS: list[tuple[str, str, bool]] = [
    ("rps_c64", "req/s, 64 conns, 1 KiB", True),
    ("p50_c64_ms", "p50 ms, 64 conns", False),
    ("p99_c64_ms", "p99 ms, 64 conns", False),
    ("rps_c1", "req/s, 1 conn", True),
    ("p50_c1_ms", "p50 ms, 1 conn", False),
    ("p99_c1_ms", "p99 ms, 1 conn", False),
    ("download_mb_s", "download MB/s", True),
    ("upload_mb_s", "upload MB/s", True),
    ("ws_rtt_per_s", "WebSocket round trips/s", True),
    ("ws_p50_ms", "WebSocket p50 ms", False),
    ("relay_cpu_s_per_gb_download", "relay CPU s per GB down", False),
    ("relay_cpu_s_per_gb_upload", "relay CPU s per GB up", False),
    ("relay_peak_rss_mib", "relay peak RSS MiB", False),
]

LOADS = ("c64", "c1", "download", "upload", "ws")


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(
    raw: dict[str, dict[str, list[dict[str, Any]]]], roles: dict[str, list[str]]
) -> dict[str, dict[str, Any]]:
    """Medians per configuration from the rounds in ``raw`` (configuration → load → one dict per round).

    A failed transfer counts as missing, so one bad round cannot pass for a slow one; CPU per GB
    adds up the relay's processes (``roles``) and divides by the bytes that load moved.
    """
    summary: dict[str, dict[str, Any]] = {}
    for config, loads in raw.items():
        s: dict[str, Any] = {}
        for load, prefix in (("c64", "_c64"), ("c1", "_c1")):
            rounds = loads.get(load, [])
            s["rps" + prefix] = median(r.get("rps") for r in rounds)
            s["p50" + prefix + "_ms"] = median(r.get("p50_ms") for r in rounds)
            s["p99" + prefix + "_ms"] = median(r.get("p99_ms") for r in rounds)
            s["errors" + prefix] = sum(r.get("errors", 0) for r in rounds)
        for load in ("download", "upload"):
            rounds = loads.get(load, [])
            s[f"{load}_mb_s"] = median(r["mb_per_s"] if r.get("ok") else None for r in rounds)
            s[f"{load}_failed"] = sum(not r.get("ok") for r in rounds)
            if roles[config]:
                s[f"relay_cpu_s_per_gb_{load}"] = median(
                    sum(r["resources"][role]["cpu_s"] for role in roles[config]) / (r["bytes"] / 1e9)
                    if r.get("ok")
                    else None
                    for r in rounds
                )
        if loads.get("ws"):
            s["ws_rtt_per_s"] = median(r.get("per_s") for r in loads["ws"])
            s["ws_p50_ms"] = median(r.get("p50_ms") for r in loads["ws"])
        # CPU per small request, per relay process, from /proc: where the time of a request goes.
        per_request: dict[str, dict[str, float | None]] = {}
        for load in ("c64", "c1"):
            for role in roles[config]:
                value = median(
                    r["resources"][role]["cpu_s"] * 1e6 / r["requests"]
                    for r in loads.get(load, [])
                    if r.get("requests") and r.get("resources", {}).get(role, {}).get("cpu_s") is not None
                )
                per_request.setdefault(load, {})[role] = round(value, 1) if value is not None else None
        if per_request:
            s["cpu_us_per_request"] = per_request
        resources: dict[str, dict[str, dict[str, float | None]]] = {}
        for load, rounds in loads.items():
            for role in [*roles[config], "backend"]:
                resources.setdefault(load, {})[role] = {
                    key: median(r["resources"][role][key] for r in rounds if role in r.get("resources", {}))
                    for key in ("cpu_s", "peak_rss_kib")
                }
            resources[load]["machine_busy"] = {"share": median(r.get("machine_busy") for r in rounds)}
        s["resources"] = resources
        if roles[config]:
            peaks = [sum(resources[load][role]["peak_rss_kib"] or 0 for role in roles[config]) for load in loads]
            s["relay_peak_rss_mib"] = round(max(peaks) / 1024, 1) if peaks else None
        summary[config] = s
    return summary


def goals(summary: dict[str, dict[str, Any]], memory: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for rproxy (issue 7), each with the measured figure and whether it is met."""
    rp, sn, direct = summary.get("rproxy"), summary.get("snitun"), summary.get("direct")
    found: list[dict[str, Any]] = []
    if rp is None and not memory:
        return found

    def add(goal: str, measured: float | None, target: float | None, higher_is_better: bool, unit: str) -> None:
        met = (
            None
            if measured is None or target is None
            else (measured >= target if higher_is_better else measured <= target)
        )
        found.append({"goal": goal, "measured": measured, "target": target, "unit": unit, "met": met})

    if rp and sn:
        add("req/s at 64 conns >= snitun's", rp.get("rps_c64"), sn.get("rps_c64"), True, "req/s")
        for load in ("download", "upload"):
            target = sn.get(f"{load}_mb_s")
            add(f"{load} >= 3x snitun's", rp.get(f"{load}_mb_s"), 3 * target if target else None, True, "MB/s")
        if direct and direct.get("p50_c1_ms") is not None:
            added = [s.get("p50_c1_ms") for s in (rp, sn)]
            if None not in added:
                add(
                    "p50 added at 1 conn <= snitun's",
                    round(added[0] - direct["p50_c1_ms"], 4),
                    round(added[1] - direct["p50_c1_ms"], 4),
                    False,
                    "ms",
                )
    if rp and direct and direct.get("ws_rtt_per_s"):
        add(
            "WebSocket round trips/s within 2x of direct",
            rp.get("ws_rtt_per_s"),
            direct["ws_rtt_per_s"] / 2,
            True,
            "/s",
        )
    agents = memory.get("idle_agents", {})
    add("bridge memory per idle agent < 64 KiB", agents.get("per_agent_kib"), 64, False, "KiB")
    visitors = memory.get("idle_visitor_ws", {})
    add("bridge memory per idle visitor WebSocket < 16 KiB", visitors.get("per_ws_kib_bridge"), 16, False, "KiB")
    many = memory.get("concurrent_ws", {})
    if many:
        errors = many.get("errors", 0) + many.get("echo_failed", 0)
        add(f"{many.get('attempted', 0):,} concurrent visitor WebSockets without errors", errors, 0, False, "errors")
    return found


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "n/a"
    if key.endswith("_ms"):
        return f"{value:.3f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(result: dict[str, Any]) -> str:
    """The run's figures as plain text: metrics by configuration, relay processes, memory, goals."""
    summary: dict[str, dict[str, Any]] = result["summary"]
    configs = list(summary)
    direct = summary.get("direct", {})
    refs = [c for c in ("nginx", "snitun") if c in summary and "rproxy" in summary]
    header = ["metric", *configs, *(f"rproxy/{r}" for r in refs)]
    rows = [header]
    for key, label, _ in METRICS:
        if all(summary[c].get(key) is None for c in configs):
            continue
        row = [label]
        for config in configs:
            value = summary[config].get(key)
            cell = _fmt(value, key)
            base = direct.get(key)
            if config != "direct" and value is not None and base and not key.startswith("relay_"):
                cell += f" ({value / base:.2f}x)"
            row.append(cell)
        for ref in refs:
            a, b = summary["rproxy"].get(key), summary[ref].get(key)
            row.append(f"{a / b:.2f}x" if a is not None and b else "n/a")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    settings = result["settings"]
    lines.append(
        f"medians of {settings['rounds']} interleaved rounds; (x) = ratio to direct (latency, CPU: lower is "
        f"better); wrk -t1 -d{settings['seconds']}s; bulk = one curl of {settings['bulk_bytes'] / 2**20:,.0f} MiB "
        "each way; snitun relays TLS (to nginx's TLS port), the others plain HTTP"
    )
    raw = result.get("raw", {})
    if result["settings"]["rounds"] > 1:
        spreads = []
        for load, key, label in (
            ("c64", "rps", "req/s 64 conns"),
            ("c1", "p50_ms", "p50 ms 1 conn"),
            ("download", "mb_per_s", "download MB/s"),
        ):
            cells = [
                f"{c} {_number(min(v))}-{_number(max(v))}"
                for c in configs
                if (v := [r[key] for r in raw.get(c, {}).get(load, []) if r.get(key)])
            ]
            spreads.append(f"  {label}: " + ", ".join(cells))
        lines += ["min-max over rounds (a wide spread means a disturbed run):", *spreads]
    errors = {
        c: (summary[c]["errors_c64"], summary[c]["errors_c1"])
        for c in configs
        if summary[c]["errors_c64"] or summary[c]["errors_c1"]
    }
    if errors:
        lines.append("wrk errors (64 conns, 1 conn): " + ", ".join(f"{c} {a}/{b}" for c, (a, b) in errors.items()))
    lines += ["", "relay processes, CPU seconds / peak RSS MiB per load, and CPU per small request (medians):"]
    for config in configs:
        for role in result["roles"][config]:
            cells = []
            for load in LOADS:
                usage = summary[config]["resources"].get(load, {}).get(role)
                if usage and usage["cpu_s"] is not None:
                    cells.append(f"{load} {usage['cpu_s']:.2f}s/{(usage['peak_rss_kib'] or 0) / 1024:.0f}")
            per_request = summary[config].get("cpu_us_per_request", {})
            for load in ("c64", "c1"):
                value = per_request.get(load, {}).get(role)
                if value is not None:
                    cells.append(f"{load} {value:.0f} µs/request")
            lines.append(f"  {config:7s} {role:15s} " + "  ".join(cells))
    memory = result.get("memory", {})
    if memory:
        lines += ["", "rproxy bridge memory:"]
        agents = memory.get("idle_agents")
        if agents:
            lines.append(
                f"  idle agents: {agents['count']} connected ({agents['failed']} failed), "
                f"{agents['per_agent_kib']:.1f} KiB each at the bridge"
            )
        visitors = memory.get("idle_visitor_ws")
        if visitors:
            lines.append(
                f"  idle visitor WebSockets: {visitors['count']} open, {visitors['per_ws_kib_bridge']:.1f} KiB "
                f"each at the bridge, {visitors['per_ws_kib_agent']:.1f} KiB at the agent"
            )
        many = memory.get("concurrent_ws")
        if many:
            kinds = ", ".join(f"{k}: {v}" for k, v in {**many["error_kinds"], **many["echo_error_kinds"]}.items())
            lines.append(
                f"  concurrent visitor WebSockets: {many['open']:,} of {many['attempted']:,} open in "
                f"{many['open_seconds']:.1f}s, {many['errors']:,} failed to open, echo ok on "
                f"{many['echo_ok']:,} ({many['echo_failed']} failed){'; ' + kinds if kinds else ''}; "
                f"bridge {many['bridge_rss_kib'] / 1024:.0f} MiB, agent {many['agent_rss_kib'] / 1024:.0f} MiB"
            )
    if result.get("goals"):
        lines += ["", "issue 7 goals for rproxy:"]
        for goal in result["goals"]:
            verdict = {True: "met", False: "NOT met", None: "n/a"}[goal["met"]]
            measured, target = (_number(goal[key]) for key in ("measured", "target"))
            lines.append(f"  {verdict:7s}  {goal['goal']}: {measured} (target {target} {goal['unit']})")
    if result.get("skipped"):
        lines += ["", "skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items())]
    if result.get("failures"):
        lines += ["", "FAILURES:", *(f"  {f}" for f in result["failures"])]
    return "\n".join(lines)
