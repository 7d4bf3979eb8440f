"""The PNG chart of a run: each configuration as a ratio to direct, per metric, and relay CPU per GB.

``python bench/chart.py RESULTS.json OUT.png`` redraws the chart of a saved run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

#: (key, label, higher is better): what the ratio panel shows; latencies are inverted so taller is better.
PANEL: list[tuple[str, str, bool]] = [
    ("rps_c64", "req/s\n64 conns", True),
    ("rps_c1", "req/s\n1 conn", True),
    ("p50_c1_ms", "p50 latency\n1 conn\n(inverted)", False),
    ("p99_c64_ms", "p99 latency\n64 conns\n(inverted)", False),
    ("download_mb_s", "download\nMB/s", True),
    ("upload_mb_s", "upload\nMB/s", True),
    ("ws_rtt_per_s", "WebSocket\nround trips/s", True),
]
COLOURS = {"nginx": "#4c72b0", "snitun": "#dd8452", "rproxy": "#55a868"}


def draw(result: dict[str, Any], out: Path) -> None:
    """Write the chart of ``result`` (the JSON a run saves) to ``out``."""
    summary: dict[str, dict[str, Any]] = result["summary"]
    direct = summary["direct"]
    relays = [c for c in summary if c != "direct"]
    fig, (ratios, cpu) = plt.subplots(1, 2, figsize=(15, 6.2), gridspec_kw={"width_ratios": [3, 1.2]})
    width = 0.8 / max(1, len(relays))
    for index, config in enumerate(relays):
        heights, xs = [], []
        for position, (key, _, higher) in enumerate(PANEL):
            value, base = summary[config].get(key), direct.get(key)
            if value and base:
                heights.append(value / base if higher else base / value)
                xs.append(position + (index - (len(relays) - 1) / 2) * width)
        bars = ratios.bar(xs, heights, width, label=config, color=COLOURS.get(config))
        ratios.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ratios.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ratios.text(-0.45, 1.02, "direct = 1", ha="left", va="bottom", fontsize=8)
    ratios.set_xticks(range(len(PANEL)), [label for _, label, _ in PANEL], fontsize=9)
    ratios.set_ylabel("relative to direct (higher is better)")
    ratios.set_title("Through one relay hop, as a share of direct to the backend")
    ratios.set_ylim(0, max(1.15, ratios.get_ylim()[1] * 1.05))

    loads = ["download", "upload"]
    with_cpu = [c for c in relays if summary[c].get("relay_cpu_s_per_gb_download") is not None]
    width = 0.8 / max(1, len(with_cpu))
    for index, config in enumerate(with_cpu):
        values = [summary[config].get(f"relay_cpu_s_per_gb_{load}") or 0 for load in loads]
        xs = [position + (index - (len(with_cpu) - 1) / 2) * width for position in range(len(loads))]
        bars = cpu.bar(xs, values, width, label=config, color=COLOURS.get(config))
        cpu.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    cpu.set_xticks(range(len(loads)), loads)
    cpu.set_ylabel("relay CPU seconds per GB (lower is better)")
    cpu.set_title("Relay processes' CPU per GB moved")
    cpu.set_ylim(0, cpu.get_ylim()[1] * 1.1)
    handles, labels = ratios.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, 0.06))

    machine = result.get("machine", {})
    settings = result.get("settings", {})
    rounds = settings.get("rounds", "?")
    fig.suptitle(
        f"rproxy benchmark, loopback, {machine.get('cores', '?')} cores ({machine.get('cpu_model', '?')}), "
        f"{result.get('date', '')[:16]}; medians of {rounds} round{'' if rounds == 1 else 's'} — "
        "compare ratios, not absolute figures",
        fontsize=10,
    )
    fig.text(0.5, 0.015, memory_line(result.get("memory", {})), ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def memory_line(memory: dict[str, Any]) -> str:
    """The bridge's memory figures in one line, under the chart."""
    parts = []
    if memory.get("idle_agents"):
        parts.append(f"{memory['idle_agents']['per_agent_kib']:.1f} KiB per idle agent (goal < 64)")
    if memory.get("idle_visitor_ws"):
        parts.append(f"{memory['idle_visitor_ws']['per_ws_kib_bridge']:.1f} KiB per idle visitor WebSocket (goal < 16)")
    many = memory.get("concurrent_ws")
    if many:
        parts.append(
            f"{many['open']:,} of {many['attempted']:,} concurrent visitor WebSockets open, "
            f"{many['errors'] + many['echo_failed']:,} errors"
        )
    return "rproxy bridge memory: " + "; ".join(parts) if parts else ""


def main() -> None:
    draw(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
