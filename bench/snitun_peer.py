"""snitun, the relay behind Home Assistant Cloud's remote UI, on loopback, as a benchmark reference.

snitun does not terminate TLS: its public port reads the TLS ClientHello's SNI, finds the
client (agent) registered for that name and forwards the raw bytes through the client's one
multiplexed, AES-encrypted TCP connection; the client opens a plain TCP connection per visitor
to its endpoint, here nginx's TLS port. The name is ``localhost`` so wrk and curl send that SNI.

``python bench/snitun_peer.py keys FILE``                     new Fernet key, AES key/IV and client token
``python bench/snitun_peer.py server FILE SNI_PORT PEER_PORT`` the server (dual-port asyncio SniTunServer)
``python bench/snitun_peer.py client FILE PEER_PORT TLS_PORT`` the client, forwarding to 127.0.0.1:TLS_PORT

Needs snitun (requirements/bench.txt); the standard asyncio loop, as Home Assistant runs it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

SNI_NAME = "localhost"
LOOPBACK = "127.0.0.1"


def write_keys(path: Path) -> None:
    from cryptography.fernet import Fernet
    from snitun.utils.aes import generate_aes_keyset
    from snitun.utils.server import generate_client_token

    fernet_key = Fernet.generate_key().decode()
    aes_key, aes_iv = generate_aes_keyset()
    token = generate_client_token([fernet_key], timedelta(hours=12), SNI_NAME, aes_key, aes_iv)
    path.touch(mode=0o600)
    path.write_text(
        json.dumps({"fernet": fernet_key, "aes_key": aes_key.hex(), "aes_iv": aes_iv.hex(), "token": token.decode()})
    )


async def until_stopped() -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()


async def server(keys: dict[str, Any], sni_port: int, peer_port: int) -> None:
    from snitun.server.run import SniTunServer

    relay = SniTunServer(
        [keys["fernet"]], sni_port=sni_port, sni_host=LOOPBACK, peer_port=peer_port, peer_host=LOOPBACK
    )
    await relay.start()
    await until_stopped()
    await relay.stop()


async def client(keys: dict[str, Any], peer_port: int, tls_port: int) -> None:
    from snitun.client.client_peer import ClientPeer
    from snitun.client.connector import EndpointConnector
    from snitun.utils import PROTOCOL_VERSION

    peer = ClientPeer(LOOPBACK, peer_port)
    # The newest multiplexer protocol: per-channel flow control, as current Home Assistant uses.
    await peer.start(
        EndpointConnector(LOOPBACK, tls_port),
        keys["token"].encode(),
        bytes.fromhex(keys["aes_key"]),
        bytes.fromhex(keys["aes_iv"]),
        protocol_version=PROTOCOL_VERSION,
    )
    closed = asyncio.ensure_future(peer.wait())
    stop = asyncio.ensure_future(until_stopped())
    await asyncio.wait([closed, stop], return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    server_closed = closed.done()
    if peer.is_connected:
        await peer.stop()
    if server_closed:
        sys.exit("snitun client: the server closed the connection")


def main() -> None:
    mode, key_file = sys.argv[1], Path(sys.argv[2])
    if mode == "keys":
        write_keys(key_file)
        return
    keys = json.loads(key_file.read_text())
    if mode == "server":
        asyncio.run(server(keys, int(sys.argv[3]), int(sys.argv[4])))
    elif mode == "client":
        asyncio.run(client(keys, int(sys.argv[3]), int(sys.argv[4])))
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
