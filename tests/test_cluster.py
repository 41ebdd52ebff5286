"""``init_ray`` picks the cluster to attach to (no cluster is started here: ``ray.init`` is
recorded, not run, so that the choice itself is what is tested)."""

import os
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")
from ray._private import services  # noqa: E402

from tir import cluster  # noqa: E402


@pytest.fixture
def calls(monkeypatch):
    made = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: made.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    return made


def cfg(address=None):
    return SimpleNamespace(address=address, num_cpus=3, dashboard_host="127.0.0.1")


def test_without_a_cluster_a_local_one_starts_on_loopback(calls, monkeypatch):
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    cluster.init_ray(cfg())
    assert calls == [{"num_cpus": 3, "dashboard_host": "127.0.0.1", "log_to_driver": False}]
    assert services.get_node_ip_address() == "127.0.0.1"  # what every Ray server of the node binds to
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # a `ray start` from here still works


def test_a_job_driver_attaches_to_its_cluster(calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what `ray job submit` sets for the entrypoint
    cluster.init_ray(cfg())
    assert calls == [{"address": "10.0.0.1:6379", "log_to_driver": False}]


def test_the_recipe_address_wins(calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    cluster.init_ray(cfg("10.0.0.2:6379"))
    assert calls == [{"address": "10.0.0.2:6379", "log_to_driver": False}]


def test_a_cluster_started_with_ray_start_on_this_node_is_attached(calls, monkeypatch):
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: "10.0.0.3:6379")
    cluster.init_ray(cfg())
    assert calls == [{"address": "10.0.0.3:6379", "log_to_driver": False}]


def test_an_initialised_driver_is_left_alone(calls, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    cluster.init_ray(cfg("10.0.0.2:6379"))
    assert calls == []
