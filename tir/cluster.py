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
        ray.init(num_cpus=ray_cfg.num_cpus, dashboard_host=ray_cfg.dashboard_host, log_to_driver=False)


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
