"""One rule for this process's rank: torchrun's environment outside a process group, in loader workers too."""

from __future__ import annotations

import pytest
import torch.utils.data

from realfake.distributed import process_rank


@pytest.mark.parametrize(("env", "expected"), [
    ({}, (0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
    ({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1)),
    ({"WORLD_SIZE": "4"}, (0, 1)),  # not a torchrun launch: torchrun sets both
    ({"RANK": "2"}, (0, 1)),
], ids=["none", "torchrun", "one-process", "world-without-rank", "rank-without-world"])
def test_process_rank_reads_torchrun_environment_outside_a_group(monkeypatch, env, expected):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert not torch.distributed.is_initialized()
    assert process_rank() == expected


class _RankInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.tensor(process_rank())


def test_a_spawned_loader_worker_sees_the_rank_of_its_process(monkeypatch):
    """A spawned DataLoader worker has no process group, only the environment it inherits: the same answer."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = torch.utils.data.DataLoader(_RankInWorker(), batch_size=None, num_workers=1,
                                         multiprocessing_context="spawn")
    assert [tuple(t.tolist()) for t in loader] == [(1, 2)]
