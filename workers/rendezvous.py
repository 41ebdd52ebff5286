"""The torch.distributed rendezvous of a worker group or a weight-broadcast group, bound to the
address the others connect to and to nothing else.

torch's TCPStore binds its server to every interface, and gloo binds each pair's socket to the
interface of the machine's host name. On a single-node run the host is 127.0.0.1 (tir.cluster),
so both stay on loopback here; on a cluster they bind to the node IP the others dial.
"""

from __future__ import annotations

import datetime
import os
import socket

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def free_port(host: str) -> int:
    """A port free on ``host`` now (rank 0 binds it again a moment later, as torch's own launchers do)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def open_store(host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta):
    """Rank 0 hosts the store on ``host:port`` only; the other ranks connect to it. The listening
    socket is returned with the store: it must live as long as the store does."""
    from torch.distributed import TCPStore

    if rank != 0:
        return TCPStore(host, port, world_size, is_master=False, timeout=timeout), None
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    store = TCPStore(
        host,
        port,
        world_size,
        is_master=True,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=listener.fileno(),
    )
    return store, listener


def keep_gloo_on_loopback(host: str) -> None:
    """gloo's pair sockets follow GLOO_SOCKET_IFNAME; point it at loopback when the rendezvous is
    there (a value the user set wins)."""
    if host in LOOPBACK_HOSTS:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"
