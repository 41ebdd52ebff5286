"""A single-node run opens no listener on the network: while the real Serve pool serves a call and
a gloo worker group has just all-reduced, every listening socket of the Ray processes (GCS,
raylet, dashboard and its agents, the pool's replicas, the workers) is on loopback."""

import asyncio
import ipaddress
import os

import numpy as np
import psutil
import pytest

from tool_pool.tools import tools_for_subtask
from workers.group import Dispatch, Worker, WorkerGroup, dispatch


class ReduceWorker(Worker):
    @dispatch(Dispatch.ONE_TO_ALL)
    def all_reduce(self, value):
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value)])
        dist.all_reduce(tensor)
        return tensor.item()


def ray_processes() -> list[psutil.Process]:
    """This test process and everything it started (Ray's servers are its children, Ray's
    workers the raylet's)."""
    me = psutil.Process(os.getpid())
    return [me, *me.children(recursive=True)]


def listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.NoSuchProcess:
                continue
            found.append((conn.laddr.ip, conn.laddr.port, name))
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # "::ffff:127.0.0.1": an IPv6 socket on loopback
    return (mapped or address).is_loopback


@pytest.mark.slow
def test_a_local_pool_run_listens_on_loopback_only(serve_pool):
    group = WorkerGroup(ReduceWorker, num_workers=2, name="loopback", resources={"CPU": 1})
    try:
        assert group.all_reduce(1) == [2.0, 2.0]  # the gloo rendezvous and pair sockets are up
        image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        out = asyncio.run(serve_pool.run(tools_for_subtask("denoising")[0].name, image))
        assert out.shape == image.shape  # a call went through a replica
        processes = ray_processes()
        names = {p.name() for p in processes if p.is_running()}
        assert {"gcs_server", "raylet"} <= names, names  # the cluster really is this run's own
        found = listeners({p.pid for p in processes})
        assert found, "no listening socket found: psutil cannot see this run's sockets"
        exposed = [entry for entry in found if not is_loopback(entry[0])]
        assert not exposed, f"listeners on a non-loopback address: {exposed}"
    finally:
        group.shutdown()
