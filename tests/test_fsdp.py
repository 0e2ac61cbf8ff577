"""The half-space optimizers and OTOCallback on FSDP2 shards (2 CPU processes, gloo): the same search as one process.

One spawn of two workers serves the whole file (imports dominate its cost on a shared CI machine)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fsdp_runs as runs

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """What each of the two FSDP2 ranks saw (trained on its half of every batch)."""
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(runs.sharded_worker, args=(2, _free_port(), str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def single():
    return runs.single_process()


def test_shards_are_uneven_and_local(sharded):
    """FSDP2 split the hidden widths 10 / 7 / 3 as 5+5, 4+3, 2+1 rows: the search really ran on shards."""
    rows = [[r["local_rows"][n][0] for n in ("l1.weight", "l2.weight", "l3.weight")] for r in sharded]
    assert rows == [[5, 4, 2], [5, 3, 1]]


def test_sharded_search_equals_single_process(sharded, single):
    ref, ref_state = single
    assert ref["redundant"] and ref["zero"] == ref["redundant"]
    for r in sharded:
        assert r["redundant"] == ref["redundant"]  # the same saliency order on every rank
        assert r["zero"] == ref["zero"]  # zero_group_ids adds the ranks' non-zero counts
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert r["saliency"] == pytest.approx(ref["saliency"], rel=1e-4, abs=1e-7)
    state = sharded[0]["state"]  # gathered once on rank 0
    assert set(state) == set(ref_state)
    for name, t in ref_state.items():
        torch.testing.assert_close(state[name], t, atol=1e-5, rtol=1e-4)


def test_unsupported_placement_names_tensor_parallelism(tmp_path):
    """A parameter sharded on dim 1 (what tensor parallelism does to a row-parallel linear) is refused by name."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_oto.optim.group_index import GroupIndex
    from lightning_oto.space.groups import Group, ParamSlice

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
        group = Group(id=0, name="row0", slices=[ParamSlice("w", 0, (0,))])
        with pytest.raises(ValueError, match=r"'w'.*dim 0 only.*[Tt]ensor parallelism"):
            GroupIndex({"w": w}, [group])
    finally:
        dist.destroy_process_group()
