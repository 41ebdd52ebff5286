"""Shared, expensive fixtures: started once per test session."""

import json
import os
from pathlib import Path

import pytest

import tir  # noqa: F401  - applies the environment shims before anything imports torchvision

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# A test that uses one of these fixtures, directly or through another fixture, gets the marker
# (pytest.ini): new tests are marked without thought. Others are marked where they are.
FIXTURE_MARKERS = {"ray_cluster": "ray"}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """``tiny_policy_dir(tools, seed=0)``: the folder of the tiny random policy checkpoint
    (tir.agent.tiny_policy.build_tiny_policy) for these tools (names or schemas). Its tokenizer and
    weights depend on the tools and the seed, so each module asks for its own toolbox; a toolbox
    asked for again (by any module) is built once per session. Tests only read it."""
    from tir.agent import tiny_policy

    built = {}

    def build(tools, seed: int = 0) -> Path:
        key = (json.dumps(list(tools), sort_keys=True), seed)
        if key not in built:
            built[key] = tiny_policy.build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", tools, seed=seed)
        return built[key]

    return build


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (all listeners on loopback), shared by every test that needs one."""
    import ray

    from tir.cluster import start_local_ray

    start_local_ray(  # every listener on loopback, as for any single-node run
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
            "pool.torch_threads=2",  # not Ray's OMP_NUM_THREADS for 0.5 CPUs (1): shows the knob reaches replicas
        ],
    )
    pool = start_pool(cfg.pool)
    yield pool
    stop_pool(cfg.pool.name)


@pytest.fixture
def forget_registered_tools():
    """Tools registered by a test are removed after it (the tool registry is process-wide); a
    module opts in with ``pytestmark = pytest.mark.usefixtures("forget_registered_tools")``."""
    from tool_pool.tools import TOOLS

    before = set(TOOLS.names())
    yield
    for name in set(TOOLS.names()) - before:
        del TOOLS._items[name]
