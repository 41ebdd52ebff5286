"""Connecting the driver to Ray: attach to the cluster it finds, else start a local one."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def ray_session(ray_cfg):
    """``init_ray`` for a driver's whole run; Ray is shut down at the end only if this run
    started it (a cluster we attached to outlives the run)."""
    import ray

    was_running = ray.is_initialized()
    init_ray(ray_cfg)
    try:
        yield
    finally:
        if not was_running:
            ray.shutdown()


def init_ray(ray_cfg) -> None:
    """Attach to a running cluster, found in this order: ``ray.address``; RAY_ADDRESS (set by
    ``ray job submit`` for the job's driver); the cluster ``ray start`` left on this node (what a
    plain ``ray.init()`` finds). Without any, a local cluster starts with ``num_cpus`` and the
    dashboard on ``dashboard_host``."""
    import ray

    if ray.is_initialized():
        return
    # Serve's router warns on every request whose replica answers its queue-length probe in over
    # 0.1 s, which a busy 2-core machine does all the time; 1 s keeps real trouble visible.
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or started_cluster()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        start_local_ray(num_cpus=ray_cfg.num_cpus, dashboard_host=ray_cfg.dashboard_host, log_to_driver=False)


def start_local_ray(**init_kwargs) -> None:
    """``ray.init`` for a single-node run with every listener on loopback: GCS, raylet, object
    manager, workers and agents bind to the node IP, which is 127.0.0.1 here, so nothing on this
    machine is reachable from the network. A multi-node cluster (``ray start``) is unaffected."""
    import ray

    use_loopback_node_ip()
    ray.init(**init_kwargs)


def use_loopback_node_ip() -> None:
    """Make Ray pick 127.0.0.1 as this node's IP, as it does by itself on macOS and Windows (its
    constant ENABLE_RAY_CLUSTER, read when it looks up the node IP). Ray's servers and workers are
    given that IP on their command lines. Only the constant of this process changes, not the
    environment: a ``ray start`` run from here (a test's multi-node cluster) is unaffected."""
    try:
        from ray._private import ray_constants  # not public; absent -> Ray's own choice
    except ImportError:
        return
    ray_constants.ENABLE_RAY_CLUSTER = False


def started_cluster() -> str | None:
    """The address of the cluster the last ``ray start`` on this node runs (Ray's own record,
    /tmp/ray/ray_current_cluster), or None. Without this, ``ray.init(num_cpus=...)`` on a head
    node would find that cluster itself and refuse the ``num_cpus``. Clusters started by other
    drivers' ``ray.init()`` (tests running alongside) are never picked up: unlike
    ``address="auto"``, this does not fall back to any Ray process it can see."""
    try:
        from ray._private.services import (
            find_bootstrap_address,  # not public; absent -> no lookup
        )
    except ImportError:
        return None
    try:
        return find_bootstrap_address(None) or None
    except Exception:  # noqa: BLE001 - an unreadable record is no cluster
        return None


def keep_serve_replica_on_loopback() -> None:
    """Called in a Serve replica's constructor. Serve then starts an inter-deployment gRPC server
    on every interface ("[::]:0"); the pool never uses it (handles call the replica actor), so on
    a loopback node (``use_loopback_node_ip``) it binds to 127.0.0.1 instead. Elsewhere: unchanged."""
    import ray

    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    try:
        from ray.serve._private import replica  # not public; absent or renamed -> Serve's default
    except ImportError:
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "on_loopback", False):
        return

    def on_loopback(server, address: str):
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    on_loopback.on_loopback = True
    replica.add_port_to_grpc_server = on_loopback
