"""Multi-node through Ray jobs: a recipe places each worker group and the pool by node (Ray custom
resources, ``*.resources``), and ``tir train rl`` runs as a Ray job on a running cluster.

The first tests check the plumbing from recipe to bundles and actor options (no cluster). The
last starts a real two-node cluster on this machine with ``ray start`` (a head advertising
``head_node``, a worker advertising ``worker_node``: its own Ray, never the session's
``ray_cluster`` fixture), submits the tiny recipe through the Jobs API with the actor group and
the rollout replica on the worker and the pool on the head, checks the outputs and
``placement.json`` against the cluster's nodes, then resumes the run with a second job. Only
processes this test started are stopped (their process groups, and anything naming its temp
dir or output dir): never ``ray stop``, which would stop every Ray on the machine.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tir.config import RecipeError, load_recipe

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")  # the venv's: daemons and workers run this Python
TOOLS = ["brighten_shift", "dehaze_dcp", "denoise_tv", "derain_median", "sharpen_unsharp"]


# ---------------------------------------------------------------- recipe -> placement (no cluster)


def placed(*overrides):
    return load_recipe(
        "tiny_cpu",
        [
            "actor.resources={worker_node: 1}",
            "rollout.resources={worker_node: 0.5}",
            "pool.resources={head_node: 1}",
            *overrides,
        ],
    )


def test_recipe_resources_reach_every_bundle_and_replica():
    from tool_pool.serve_app import build_app, replica_options
    from workers.actor import worker_bundle
    from workers.rollout.group import replica_bundle

    cfg = placed("actor.num_gpus_per_worker=1")
    assert worker_bundle(cfg.actor) == {"CPU": 0.5, "GPU": 1.0, "worker_node": 1.0}  # each actor and reference rank
    assert replica_bundle(cfg.rollout) == {"CPU": 0.5, "worker_node": 0.5}
    assert replica_options(cfg.pool) == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"head_node": 1.0}}
    assert build_app(cfg.pool)._bound_deployment.ray_actor_options == replica_options(cfg.pool)  # what Serve gets

    plain = load_recipe("tiny_cpu")  # no placement: the bundles and options are what they were
    assert worker_bundle(plain.actor) == {"CPU": 0.5} and replica_bundle(plain.rollout) == {"CPU": 0.5}
    assert replica_options(plain.pool) == {"num_cpus": 0.5, "num_gpus": 0.0}


def test_cpus_and_gpus_are_not_custom_resources():
    from workers.actor import worker_bundle

    with pytest.raises(RecipeError, match=r"\['GPU'\] are not custom resources; use num_cpus_per_\* / num_gpus_per_\*"):
        worker_bundle(load_recipe("tiny_cpu", ["actor.resources={GPU: 1}"]).actor)


def test_a_placed_hf_engine_runs_as_a_replica_not_in_the_driver(monkeypatch):
    from tir.trainer import rl_setup
    from workers.rollout import group

    monkeypatch.setattr(group, "rollout_group", lambda cfg, model_path: ("rollout group", cfg.rollout.resources))
    engine = rl_setup.start_rollout_engine(placed("rollout.engine=hf", "rollout.num_replicas=1"), "unused")
    assert engine == ("rollout group", {"worker_node": 0.5})


# ---------------------------------------------------------------- a two-node cluster of our own


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict:
    """This process's environment without a pointer to any other cluster (the session fixture's).
    Token authentication off, explicitly: Ray 2.60's `ray start --head` turns it on when it finds
    a token (~/.ray/auth_token, left by any local ``ray.init``), while `ray start --address` only
    uses it when RAY_AUTH_MODE=token says so; the worker would then fail to join. The cluster
    listens on loopback only."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID")}
    return {**env, "RAY_AUTH_MODE": "disabled"}


class TwoNodes:
    """A head (``head_node``) and a worker (``worker_node``) started with ``ray start`` on this
    machine, each in its own process group; every port explicit, so that nothing meets the
    session's cluster or another test run's."""

    def __init__(self, temp_dir: Path):
        self.temp_dir, self.gcs_port, self.dashboard_port = temp_dir, free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.starters: list[int] = []  # pids of the `ray start` commands = their daemons' process groups

    def start(self, cpus: int = 4) -> None:
        common = [
            "--num-cpus",
            str(cpus),
            "--node-ip-address",
            "127.0.0.1",
            "--object-store-memory",
            str(200 * 2**20),
            "--dashboard-agent-listen-port",
            None,
            "--disable-usage-stats",
        ]
        self._start(
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--resources",
                json.dumps({"head_node": 100}),
                "--temp-dir",
                str(self.temp_dir / "h"),
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--ray-client-server-port",
                str(free_port()),
                *common,
            ]
        )
        # A temp dir of the worker's own (Ray 2.60 takes one per node; without it the worker uses
        # the head's): each node unpacks the job's working_dir under its temp dir and cleans it
        # up on its own, which in one shared folder pulls the files from under the other node.
        self._start(
            [
                "--address",
                self.address,
                "--resources",
                json.dumps({"worker_node": 100}),
                "--temp-dir",
                str(self.temp_dir / "w"),
                *common,
            ]
        )

    def _start(self, args: list) -> None:
        args = [str(free_port()) if a is None else a for a in args]  # each node its own agent port
        proc = subprocess.Popen(
            [str(RAY), "start", *args],
            env=clean_env(),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.starters.append(proc.pid)
        out, _ = proc.communicate(timeout=120)
        if proc.returncode:
            raise RuntimeError(f"`ray start {' '.join(args)}` failed:\n{out[-3000:]}")

    def nodes(self) -> dict[str, str]:
        """{"head" | "worker": node id} of the live nodes, from the cluster's state API."""
        from ray.util.state import list_nodes

        found = {}
        for node in list_nodes(address=self.dashboard, detail=True, timeout=30):
            if node.state == "ALIVE":
                kind = (
                    "head"
                    if "head_node" in node.resources_total
                    else "worker"
                    if "worker_node" in node.resources_total
                    else "?"
                )
                found[kind] = node.node_id
        return found

    def ours(self, markers: list[str]) -> list:
        """Live processes this cluster owns: the daemons (in the starters' process groups, or
        naming our temp dir), everything they started (workers rename themselves ``ray::...``:
        found by descent), and anything naming a marker (the job's output dir)."""
        import psutil

        mine = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
                if os.getpgid(proc.pid) in self.starters or any(m in cmdline for m in [str(self.temp_dir), *markers]):
                    mine.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
            except (ProcessLookupError, psutil.Error):
                continue
        alive = []
        for proc in mine.values():
            try:
                if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        return alive

    def stop(self, markers: list[str]) -> list[str]:
        """SIGTERM, then SIGKILL, to every process of ours; what is still alive after (empty)."""
        import psutil

        for sig in (signal.SIGTERM, signal.SIGKILL):
            procs = self.ours(markers)  # before signalling: orphans lose their parent
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=5)
        return [" ".join(p.cmdline())[:200] for p in self.ours(markers)]


@pytest.fixture
def two_nodes(tmp_path):
    # a short temp dir of its own: Ray's unix sockets live under it (paths of at most 107 bytes)
    cluster = TwoNodes(Path(tempfile.mkdtemp(prefix="tirjob_", dir="/tmp")))
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop([str(tmp_path)])
        assert not left, f"processes of the test's cluster still running: {left}"
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def submit(client, entrypoint_args: list[str], timeout_s: float = 360) -> tuple[str, str]:
    """Run ``tir train rl`` as a Ray job, shipping this checkout as examples/runtime_env.yaml
    does; wait for it; its id and logs."""
    from ray.job_submission import JobStatus

    example = yaml.safe_load((REPO / "examples" / "runtime_env.yaml").read_text())
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": example["excludes"],
        "env_vars": {"TOKENIZERS_PARALLELISM": "false"},
    }
    entrypoint = shlex.join([sys.executable, "-m", "tir.cli", "train", "rl", *entrypoint_args])
    job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, entrypoint_num_cpus=0)
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(
                f"job {job} still {status} after {timeout_s}s; its log ends:\n{client.get_job_logs(job)[-4000:]}"
            )
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"job {job} {status}; its log ends:\n{logs[-4000:]}"
    print(
        f"job {job}: {status} in {timeout_s - (deadline - time.monotonic()):.0f}s\n"
        + "\n".join(line for line in logs.splitlines() if line.startswith("[rl]"))
    )
    return job, logs


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_on_two_nodes_runs_where_the_recipe_places_it_and_resumes(two_nodes, tiny_policy_dir, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from tir.data.synth import synthesize
    from tir.dumps.reader import list_dumps
    from tir.trainer.checkpoint import latest_checkpoint
    from tir.trainer.run_log import read_records
    from tool_pool.tools import tool_schemas

    # a random tiny policy and two photos x two degradations: the job has to run, not learn
    policy = tiny_policy_dir(tool_schemas(TOOLS))
    samples = synthesize("builtin", "dark,noise", per_image=1, seed=0, crop=96, progress=False)
    samples.take(
        [i for i, name in enumerate(samples.column("image_id")) if name in ("astronaut", "coffee")]
    ).to_parquet(tmp_path / "train.parquet")
    out = tmp_path / "job"
    args = [
        "recipe=tiny_cpu",
        f"run.output_dir={out}",
        f"model.path={policy}",
        f"data.train_path={tmp_path / 'train.parquet'}",
        "actor.resources={worker_node: 1}",
        "rollout.resources={worker_node: 1}",
        "pool.resources={head_node: 1}",
        "pool.name=job_pool",
        "pool.num_replicas=1",
        f"pool.tools=[{','.join(TOOLS)}]",
        "rollout.engine=hf",
        "rollout.n=2",
        "rollout.max_turns=2",
        "rollout.max_new_tokens=16",
        "actor.num_workers=1",
        "actor.micro_batch_size=4",
        "algo.kl_coef=0",
        "trainer.batch_size=2",
        "trainer.save_every=1",
    ]

    deadline = time.monotonic() + 60
    while set(nodes := two_nodes.nodes()) != {"head", "worker"} and time.monotonic() < deadline:
        time.sleep(1)
    assert set(nodes) == {"head", "worker"}, nodes
    while True:  # the dashboard may still be starting when `ray start` returns
        try:
            client = JobSubmissionClient(two_nodes.dashboard)
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)

    started = time.monotonic()
    _, logs = submit(client, args + ["trainer.total_steps=2", "trainer.resume=never"])
    first_s = time.monotonic() - started
    rl = out / "rl"
    assert [r["step"] for r in read_records(rl / "metrics.jsonl")] == [1, 2], logs[-3000:]
    assert list(list_dumps(rl / "dumps")) == [1, 2]
    assert latest_checkpoint(rl).name == "step_000002"
    assert (rl / "hf" / "config.json").is_file() and (rl / "summary.json").is_file()

    # placed as asked: the actor and the rollout replica on the worker, the pool on the head,
    # the driver (the job's entrypoint) on the head
    placement = json.loads((rl / "placement.json").read_text())
    print(f"first job {first_s:.0f}s; nodes {nodes}; placement {json.dumps(placement)}")
    assert placement["actor"] == [nodes["worker"]] and placement["rollout"] == [nodes["worker"]]
    assert placement["pool"] == [nodes["head"]] and placement["driver"] == nodes["head"]
    assert "reference" not in placement  # algo.kl_coef=0: no reference group
    assert set(placement["nodes"]) == set(nodes.values())
    assert placement["nodes"][nodes["head"]]["head"] and placement["nodes"][nodes["head"]]["resources"] == {
        "head_node": 100.0
    }
    assert placement["nodes"][nodes["worker"]]["resources"] == {"worker_node": 100.0}

    # a second job continues the run: step 3 only (steps 1 and 2 are not rerun: their records stay)
    first = read_records(rl / "metrics.jsonl")
    _, logs = submit(client, args + ["trainer.total_steps=3", "trainer.resume=auto"])
    assert "2 step(s) done, continuing at step 3" in logs, logs[-3000:]
    records = read_records(rl / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and records[:2] == first
    assert list(list_dumps(rl / "dumps")) == [1, 2, 3]
    assert latest_checkpoint(rl).name == "step_000003"
    assert json.loads((rl / "placement.json").read_text())["actor"] == [nodes["worker"]]
