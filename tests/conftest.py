"""Shared, expensive fixtures: started once per test session."""

import os
from pathlib import Path

import pytest

import tir  # noqa: F401  - applies the environment shims before anything imports torchvision

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (dashboard on loopback), shared by every test that needs one."""
    import ray

    ray.init(
        num_cpus=8,  # logical CPUs: lets the pool and several small groups share this 2-core machine
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        # Workers import test modules (worker classes defined in tests) and the package.
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_pool(ray_cluster):
    """The model-call pool on real Ray Serve (2 replicas, so that one can be killed), once."""
    from tir.config import load_recipe
    from tool_pool.serve_app import start_pool, stop_pool

    cfg = load_recipe(
        "tiny_cpu",
        [
            "pool.name=test_pool",
            "pool.tools=[]",
            "pool.num_replicas=2",
            "pool.num_cpus_per_replica=0.5",
            "pool.max_batch_size=8",
            "pool.batch_wait_timeout_s=0.05",
            "pool.call_timeout_s=120",
        ],
    )
    pool = start_pool(cfg.pool)
    yield pool
    stop_pool(cfg.pool.name)
