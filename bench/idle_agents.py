"""Many idle agents in one process, to measure what each costs the bridge.

Real ``rproxy_core.Agent`` objects (one WebSocket to the bridge each, with its heartbeat), all
in this one process: 200 agent processes would need gigabytes and minutes to start, and only the
bridge's side is measured. Run with the project's interpreter (``.venv/bin/python``); the token
comes from ``$RPROXY_TOKEN`` so that it shows in no process list.

``python bench/idle_agents.py BRIDGE_URL TARGET`` then commands on stdin, one JSON line
answered each: ``add N`` connects N more agents (tunnels ``idle0``, ``idle1``, ...), ``quit``
stops them all.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from procs import raise_nofile

from rproxy_core import Agent, AgentConfig

#: Agents connecting at once: below the bridge's default --max-pending-handshakes (64).
BATCH = 32


async def connect(agents: list[Agent], bridge: str, token: str, target: str, count: int) -> dict[str, object]:
    start = time.perf_counter()
    failed = 0
    first = len(agents)
    for batch_start in range(first, first + count, BATCH):
        batch = []
        for index in range(batch_start, min(batch_start + BATCH, first + count)):
            agent = Agent(
                AgentConfig(
                    bridge=bridge,
                    token=token,
                    target=target,
                    name=f"idle{index}",
                    agent_id=f"bench-idle-{index}",
                    backoff_initial=0.2,
                    backoff_max=1.0,
                )
            )
            await agent.start()
            agents.append(agent)
            batch.append(agent)
        results = await asyncio.gather(*(a.wait_connected(timeout=30) for a in batch), return_exceptions=True)
        failed += sum(isinstance(r, BaseException) for r in results)
    return {"agents": len(agents), "failed": failed, "seconds": round(time.perf_counter() - start, 2)}


async def serve(bridge: str, target: str) -> None:
    token = os.environ["RPROXY_TOKEN"]
    loop = asyncio.get_running_loop()
    agents: list[Agent] = []
    try:
        while True:
            words = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not words or words[0] == "quit":
                break
            if words[0] == "add":
                answer = await connect(agents, bridge, token, target, int(words[1]))
            else:
                answer = {"error": f"unknown command {words[0]!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)


def main() -> None:
    raise_nofile()
    asyncio.run(serve(sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    main()
