"""Connecting the driver to Ray: attach to the cluster it finds, else start a local one."""
from __future__ import annotations

import os


def init_ray(ray_cfg) -> None:
    """``ray.address`` (or RAY_ADDRESS, as set by ``ray job submit``) attaches to a running
    cluster; without either, a local cluster starts with the dashboard on ``dashboard_host``."""
    import ray

    if ray.is_initialized():
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=ray_cfg.num_cpus, dashboard_host=ray_cfg.dashboard_host, log_to_driver=False)
