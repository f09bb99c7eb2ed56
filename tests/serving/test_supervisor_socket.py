"""``feedrank serve``'s listening socket disables Nagle on every connection it accepts.

uvicorn's ``Config.bind_socket`` (up to 0.54) makes a socket whose ``proto`` reads 0, and asyncio only sets
``TCP_NODELAY`` on accepted sockets whose ``proto`` is ``IPPROTO_TCP``: each response (two writes,
headers then body) then waited for the client's delayed ACK, 40 ms or more a feed. The test checks
feedrank's socket whichever uvicorn is installed (0.55 sets the protocol itself).
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from feedrank.serving.supervisor import bind_socket


def _accepted_nodelay(sock: socket.socket) -> int:
    """TCP_NODELAY of the transport an asyncio server over ``sock`` makes for one connection."""

    async def run() -> int:
        seen: list[int] = []
        accepted = asyncio.Event()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                seen.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                accepted.set()
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            await asyncio.wait_for(accepted.wait(), timeout=10)
            writer.close()
        return seen[0]

    return asyncio.run(run())


def test_serve_socket_is_tcp_and_accepted_connections_have_nodelay():
    sock = bind_socket(uvicorn.Config("unused:app", host="127.0.0.1", port=0))
    assert sock.proto == socket.IPPROTO_TCP and sock.type == socket.SOCK_STREAM and sock.get_inheritable()
    assert _accepted_nodelay(sock) == 1

