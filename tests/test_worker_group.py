import time

import numpy as np
import pytest

from tir.protocol import Batch
from workers.group import Dispatch, Worker, WorkerCallError, WorkerDiedError, WorkerGroup, dispatch


class SumWorker(Worker):
    @dispatch(Dispatch.ONE_TO_ALL)
    def all_reduce(self, value):
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value + self.rank)])
        dist.all_reduce(tensor)
        return tensor.item()

    @dispatch(Dispatch.DP_SPLIT)
    def tag_rows(self, batch):
        return batch.with_column("rank", [self.rank] * len(batch))

    @dispatch(Dispatch.RANK_ZERO)
    def whoami(self):
        return self.rank

    def fail(self):
        raise ValueError("bad input on purpose")

    def sleep(self, seconds):
        time.sleep(seconds)
        return self.rank


@pytest.fixture(scope="module")
def group(ray_cluster):
    group = WorkerGroup(SumWorker, num_workers=2, name="sum", resources={"CPU": 1})
    yield group
    group.shutdown()


def test_all_reduce_over_gloo_sums_every_rank(group):
    # rank 0 contributes 10, rank 1 contributes 11
    assert group.all_reduce(10) == [21.0, 21.0]


def test_dp_split_runs_each_chunk_on_its_rank_and_keeps_row_order(group):
    batch = Batch.from_pydict({"row": list(range(7)), "image": [np.full((4, 4, 3), i, np.uint8) for i in range(7)]})
    out = group.tag_rows(batch)
    assert out.column("row") == list(range(7))
    assert out.column("rank") == [0, 0, 0, 0, 1, 1, 1]
    assert [int(im[0, 0, 0]) for im in out.column("image")] == list(range(7))


def test_rank_zero_and_futures(group):
    assert group.whoami() == 0
    future = group.sleep.future(0.2)
    assert future.get(timeout=60) == [0, 1]


def test_await_a_group_future(group):
    import asyncio

    async def main():
        return await group.sleep.future(0.1)

    assert asyncio.run(main()) == [0, 1]


def test_exception_in_a_live_worker_names_group_rank_and_method(group):
    with pytest.raises(WorkerCallError, match=r"'sum': rank \d raised in fail\(\).*bad input on purpose"):
        group.fail()
    assert group.whoami() == 0  # the worker survived


def test_unknown_method_fails_before_dispatch(group):
    with pytest.raises(AttributeError, match="no method 'forward_logprob'"):
        _ = group.forward_logprob


def test_killed_worker_raises_a_clear_error_not_a_hang(ray_cluster):
    import ray

    group = WorkerGroup(SumWorker, num_workers=2, name="doomed", resources={"CPU": 1})
    try:
        future = group.sleep.future(60)  # rank 0 keeps sleeping; rank 1 is killed mid-call
        time.sleep(1)
        ray.kill(group.workers[1], no_restart=True)
        with pytest.raises(WorkerDiedError, match=r"'doomed': rank 1 died during sleep\(\)"):
            future.get(timeout=50)
        with pytest.raises(WorkerDiedError, match="rank 1"):
            group.all_reduce(1)
    finally:
        group.shutdown()


def test_unplaceable_group_reports_resources(ray_cluster):
    with pytest.raises(RuntimeError, match="could not be placed"):
        WorkerGroup(SumWorker, num_workers=1, name="huge", resources={"CPU": 64}, pg_timeout_s=2)
