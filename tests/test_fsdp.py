"""The half-space optimizers and OTOCallback on FSDP2 shards (2 CPU processes, gloo): the same search as one process,
in prune mode (a tiny MLP) and in erase mode (a tiny Llama-style decoder).

One spawn of two workers serves the whole file (imports dominate its cost on a shared CI machine)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fsdp_runs as runs
from run_once import run_once

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """What each of the two FSDP2 ranks saw (trained on its half of every batch)."""
    def spawn(out: Path) -> Path:
        mp.spawn(runs.sharded_worker, args=(2, _free_port(), str(out)), nprocs=2)
        return out

    out = run_once(tmp_path_factory, "fsdp_spawn", spawn)  # once, even when both xdist workers need it
    recs = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in recs:
        r["out_dir"] = out
    return recs


@pytest.fixture(scope="module")
def single():
    return runs.single_process()


@pytest.fixture(scope="module")
def sharded_fit(sharded, tmp_path_factory):
    """OTOCallback under ModelParallelStrategy, per rank (the same spawn as ``sharded``)."""
    return [torch.load(sharded[0]["out_dir"] / f"lit{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def single_fit(tmp_path_factory):
    return runs.callback_single(str(tmp_path_factory.mktemp("single_fit")))


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


def test_callback_under_model_parallel_strategy_equals_single_process(sharded_fit, single_fit):
    """Prune mode under ModelParallelStrategy(data_parallel_size=2): traced before configure_model sharded the
    network, searched on the shards, gathered once at fit end; the same zero groups and the same sub-network as a
    single-process run of the same seed, swapped in on every rank, and its outputs equal the full model's."""
    assert single_fit["zero"] and single_fit["zero"] == single_fit["redundant"]
    for r in sharded_fit:
        assert r["zero"] == r["redundant"] == single_fit["zero"]
        assert r["sub_type"] == "TinyMLP" and r["full_sharded_type"].startswith("FSDP")  # swapped on every rank
        assert set(r["sub_state"]) == set(single_fit["sub_state"])
        for name, t in single_fit["sub_state"].items():
            assert r["sub_state"][name].shape == t.shape  # the same channels were removed
            torch.testing.assert_close(r["sub_state"][name], t, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r["sub_out"], r["full_out"], atol=1e-6, rtol=0)
    both = zip(single_fit["losses"], sharded_fit[0]["losses"], sharded_fit[1]["losses"])
    assert [(a + b) / 2 for _, a, b in both] == pytest.approx(single_fit["losses"], abs=1e-5)


def test_resume_from_a_distributed_checkpoint_continues_the_search(sharded_fit, single_fit):
    """A distributed checkpoint at step 7 (mid-projection; the search state rides in the callback's state, torch's
    sharded optimizer state dict has no room for it) resumes to the same zero groups, sub-network and losses as
    the same resume single-process."""
    ref = single_fit["resumed"]
    assert ref["checkpoint"].startswith("epoch=0-step=7") and ref["num_steps"] == runs.STEPS
    assert ref["zero"] == single_fit["zero"]
    for r in sharded_fit:
        res = r["resumed"]
        assert res["checkpoint"] == ref["checkpoint"] and res["num_steps"] == runs.STEPS
        assert res["zero"] == ref["zero"]
        for name, t in ref["sub_state"].items():
            torch.testing.assert_close(res["sub_state"][name], t, atol=1e-5, rtol=1e-4)
    both = zip(sharded_fit[0]["resumed"]["losses"], sharded_fit[1]["resumed"]["losses"])
    assert [(a + b) / 2 for a, b in both] == pytest.approx(ref["losses"], abs=1e-5)


def test_a_resumed_fsdp2_run_reproduces_the_uninterrupted_one(sharded_fit):
    """Resumed from the end of epoch 0 (step 7, mid-projection), each rank's losses for steps 8-14, its zero groups
    and its sub-network equal those of the uninterrupted FSDP2 run (the run stops by max_epochs, see fsdp_runs.fit)."""
    for r in sharded_fit:
        res = r["resumed"]
        assert len(r["losses"]) == runs.STEPS and len(res["losses"]) == runs.STEPS - 7
        assert res["losses"] == pytest.approx(r["losses"][7:], abs=1e-6)
        assert res["zero"] == r["zero"]
        for name, t in r["sub_state"].items():
            torch.testing.assert_close(res["sub_state"][name], t, atol=1e-6, rtol=1e-5)


def test_rank0_exports_once_and_the_export_loads(sharded_fit):
    from lightning_oto import load

    rep0, rep1 = (r["report"] for r in sharded_fit)
    assert rep1 is None  # only rank 0 reports and writes
    assert rep0["world_size"] == 2 and rep0["verification_max_abs_error"] <= 1e-5
    assert sorted(g["id"] for g in rep0["removed_groups"]) == sharded_fit[0]["zero"]
    assert rep0["params_sub"] < rep0["params_full"]
    sub = load(rep0["export_dir"])
    with torch.no_grad():
        torch.testing.assert_close(sub(runs.probe()), sharded_fit[0]["full_out"], atol=1e-5, rtol=1e-5)


def test_construction_failure_on_rank0_raises_on_every_rank_and_swaps_nothing(sharded):
    recs = [torch.load(sharded[0]["out_dir"] / f"fail{r}.pt", weights_only=False) for r in (0, 1)]
    assert "simulated construction failure on rank 0" in recs[0]["raised"]
    assert recs[1]["raised"].startswith("SubnetMismatchError") and "another rank" in recs[1]["raised"]
    assert "simulated construction failure on rank 0" in recs[1]["raised"]
    assert all(r["net_type"].startswith("FSDP") for r in recs)  # still the sharded network: nothing swapped


@pytest.fixture(scope="module")
def sharded_erase(sharded):
    """Erase mode on the tiny decoder under ModelParallelStrategy, per rank (the same spawn as ``sharded``)."""
    return [torch.load(sharded[0]["out_dir"] / f"erase{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def single_erase(tmp_path_factory):
    return runs.erase_single(str(tmp_path_factory.mktemp("single_erase")))


def test_erase_mode_under_model_parallel_strategy_removes_the_same_decoder_blocks(sharded_erase, single_erase):
    """H2SPG on a 4-layer Llama-style decoder sharded per layer: the same saliency, the same erased branches and
    whole decoder blocks as one process of the same seed, listed in rank 0's report; the gathered sub-network has
    no parameter of what was erased, equals the single-process one, and its outputs equal the full model's."""
    ref = single_erase
    erased = runs.erased_layers(ref["report"])
    assert len(ref["zero"]) == 6 and ref["zero"] == ref["redundant"]
    assert erased["blocks"] and erased["blocks"] != erased["attention"]  # whole blocks, and a lone attention
    rep0, rep1 = (r["report"] for r in sharded_erase)
    assert rep1 is None and rep0["world_size"] == 2  # only rank 0 reports
    assert runs.erased_layers(rep0) == erased
    assert rep0["params_sub"] == ref["report"]["params_sub"] < rep0["params_full"]
    for r in sharded_erase:
        assert r["zero"] == r["redundant"] == ref["zero"]
        assert r["saliency"] == pytest.approx(ref["saliency"], rel=1e-4, abs=1e-7)
    both = zip(sharded_erase[0]["losses"], sharded_erase[1]["losses"])
    assert [(a + b) / 2 for a, b in both] == pytest.approx(ref["losses"], abs=1e-5)
    sub = sharded_erase[0]["sub_state"]
    gone = [f"layers.{i}.self_attn." for i in erased["attention"]] + [f"layers.{i}.mlp." for i in erased["mlp"]]
    assert not [k for k in sub if any(g in k for g in gone)]
    assert set(sub) == set(ref["sub_state"])
    for name, t in ref["sub_state"].items():
        torch.testing.assert_close(sub[name], t, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sharded_erase[0]["sub_out"], sharded_erase[0]["full_out"], atol=1e-5, rtol=0)


def test_fsdp1_and_tensor_parallelism_are_refused_by_name():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_oto.lightning.sharded import check_strategy

    with pytest.raises(ValueError, match="FSDPStrategy.*ModelParallelStrategy"):
        check_strategy(FSDPStrategy(), "OTOCallback")

    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return type("Sub", (), {"size": lambda self: 2 if name == "tensor_parallel" else 1})()

    class TP(ModelParallelStrategy):
        device_mesh = Mesh()

    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        check_strategy(TP(data_parallel_size=1, tensor_parallel_size=2), "OTOCallback")


def test_configure_model_that_renames_parameters_is_refused():
    from torch import nn

    from lightning_oto.lightning.sharded import check_names, parameter_shapes

    traced = parameter_shapes(runs.TinyMLP())
    renamed = nn.Sequential(runs.TinyMLP())  # e.g. a wrapper added in configure_model
    with pytest.raises(ValueError, match=r"configure_model changed.*missing \['l1.bias'"):
        check_names(traced, renamed, "OTOCallback")
    check_names(traced, runs.TinyMLP(), "OTOCallback")  # same names and shapes: fine


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
