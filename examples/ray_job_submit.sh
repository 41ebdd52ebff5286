#!/usr/bin/env bash
# Submit an RL run to a Ray cluster that is already running.
#
#   examples/ray_job_submit.sh                                   # the defaults below
#   RECIPE=recipes/qwen25vl_3b_1node.yaml examples/ray_job_submit.sh model.path=/shared/models/sft trainer.total_steps=200
#   RAY_ADDRESS=http://10.0.0.1:8265 examples/ray_job_submit.sh trainer.resume=auto
#
# Arguments after the script name are recipe overrides (key=value), passed on to `tir train rl`.
#
# ---- Starting the cluster (once, by hand or by your scheduler) --------------------------------
# On every node, the same install (scripts/install.sh) at the same path, and the same shared
# storage mounted (TIR_RUNS in examples/runtime_env.yaml). Then:
#
#   head node:    source .venv/bin/activate && ray start --head --port=6379 --dashboard-host=0.0.0.0
#   each worker:  source .venv/bin/activate && ray start --address=HEAD_IP:6379
#
# (from the activated venv: the job's entrypoint `tir` and every actor's Python are found on the
# PATH that `ray start` had)
# Ray 2.60: a head that finds a token (~/.ray/auth_token, which any local `ray.init()` leaves)
# turns token authentication on; then start each worker with RAY_AUTH_MODE=token and the same
# token (that file, or RAY_AUTH_TOKEN), or the worker cannot join. RAY_AUTH_MODE=disabled on
# every node turns it off (trusted networks only).
# Ray detects each node's GPUs and CPUs itself; pass --num-gpus / --num-cpus only to hold some
# back. The recipe decides what the run takes, in GPUs (recipes/qwen25vl_7b_2nodes.yaml):
# actor 4 (FSDP2) + reference 4 + rollout 3 replicas x 2 (vLLM, tensor parallel 2) + tool pool 2
# = 16, i.e. two nodes of 8; `ray status` on the head shows what the cluster has. Each worker
# group is one placement group, so a rollout replica's 2 GPUs land on one node.
# Port 6379 (GCS) and the dashboard's 8265 must be reachable from the workers and from wherever
# you submit; the nodes also talk to each other on Ray's worker ports and on NCCL's.
#
# ---- Placing worker groups on nodes (optional) -------------------------------------------------
# Without placement keys Ray puts each group wherever its GPUs fit. To choose, give nodes a custom
# resource when starting them and name it in the recipe (or on the command line):
#
#   head node:    ray start --head ... --resources='{"pool_node": 100}'
#   worker nodes: ray start --address=HEAD_IP:6379 --resources='{"train_node": 100}'
#   examples/ray_job_submit.sh 'actor.resources={train_node: 1}' 'rollout.resources={train_node: 1}' \
#       'pool.resources={pool_node: 1}'
#
# Each actor/reference rank (actor.resources), rollout replica (rollout.resources) and pool
# replica (pool.resources) takes that much of the resource, so it can only run on a node that
# advertises it; advertise more than will ever be asked (100 above). Quote the overrides (braces).
# CPUs and GPUs keep their own keys (num_cpus_per_*, num_gpus_per_*). A placed rollout.engine=hf
# runs as a Ray actor where asked, not inside the driver. The driver writes where everything
# landed to <run.output_dir>/rl/placement.json (node ids, with each node's IP and custom
# resources); tests/test_ray_job.py runs this on a two-node cluster on one machine.
#
# ---- What happens on submit --------------------------------------------------------------------
# `ray job submit` uploads this checkout (runtime_env.yaml: working_dir, excludes), then runs the
# entrypoint `tir train rl ...` as the job's driver on the head node, with RAY_ADDRESS set to the
# cluster: tir.cluster.init_ray attaches to it (it starts a local cluster only when it finds none).
# The driver itself takes no GPU (--entrypoint-num-gpus 0): all GPUs go to the worker groups.
# Logs stream here; Ctrl-C stops following, not the job (`ray job stop ID` does). With
# --no-wait the command returns at once: follow with `ray job logs -f ID`.
set -euo pipefail
cd "$(dirname "$0")/.."

RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}   # the head's dashboard (Jobs API), not the GCS port
RECIPE=${RECIPE:-recipes/qwen25vl_7b_2nodes.yaml}
SUBMISSION_ID=${SUBMISSION_ID:-tir-rl-$(date +%Y%m%d-%H%M%S)}

exec ray job submit \
    --address "$RAY_ADDRESS" \
    --submission-id "$SUBMISSION_ID" \
    --runtime-env examples/runtime_env.yaml \
    --entrypoint-num-cpus 1 \
    --entrypoint-num-gpus 0 \
    -- tir train rl "recipe=$RECIPE" "$@"
