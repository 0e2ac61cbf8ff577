"""Step time of DHSPG on FSDP2 shards vs plain AdamW under FSDP2, per phase, and per-rank memory.

Two processes (gloo on CPU; NCCL with ``--device cuda`` and one GPU per process), an MLP of ``--layers``
Linear(width, width) + ReLU blocks, each block one ``fully_shard`` unit.  Both optimizers see the same model,
data and number of steps; the step time is measured around ``optimizer.step()`` only (forward and backward
are the same for both) and, separately, for the whole iteration.  Memory per rank: bytes of the local
parameter shards and of the optimizer state (Adam moments, plus the search state for DHSPG).

    python benchmarks/bench_fsdp.py                      # CPU, 2 processes, prints a table and writes JSON
    python benchmarks/bench_fsdp.py --width 512 --layers 8 --steps 120
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


def mlp(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


def _bytes(tensors: Any) -> int:
    from lightning_oto.optim.shards import local_view

    return sum(local_view(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    per_param = sum(_bytes(st.values()) for st in opt.state.values())
    search = 0
    for name in ("_ema", "_redundant", "_frozen", "_deadline", "_target", "_lambdas", "_push", "_zero_how",
                 "_zero_step"):
        t = getattr(opt, name, None)
        search += _bytes([t]) if t is not None else 0
    index = getattr(opt, "_index", None)
    if index is not None:
        search += _bytes([e.owner for e in index.entries]) + _bytes([index.numel])
    return per_param + search


def run(name: str, args: argparse.Namespace, rank: int, device: torch.device) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    from lightning_oto import OTO

    model = mlp(args.width, args.layers).to(device)
    oto = OTO(model, torch.randn(2, args.width, device=device), mode="prune") if name == "dhspg" else None
    for block in list(model)[:-1]:
        fully_shard(block)
    fully_shard(model)
    W, P = args.steps // 4, args.steps // 4
    if oto is not None:
        opt = oto.dhspg(lr=1e-3, variant="adamw", target_group_sparsity=0.5, warmup_steps=W, projection_steps=P)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randn(args.batch, args.width, generator=g).to(device) for _ in range(8)]
    ys = [torch.randint(0, 10, (args.batch,), generator=g).to(device) for _ in range(8)]
    step_t, iter_t = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(xs[i % 8]), ys[i % 8])
        opt.zero_grad()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        step_t.append(t2 - t1)
        iter_t.append(t2 - t0)
    phases = {"warmup": range(2, W), "projection": range(W, W + P), "hybrid": range(W + P, args.steps)}
    med = {ph: statistics.median(step_t[i] for i in r) * 1e3 for ph, r in phases.items()}
    med_iter = {ph: statistics.median(iter_t[i] for i in r) * 1e3 for ph, r in phases.items()}
    return {"step_ms": med, "iteration_ms": med_iter, "param_bytes": _bytes(model.parameters()),
            "optimizer_state_bytes": _state_bytes(opt),
            "zero_groups": len(opt.zero_group_ids()) if oto is not None else None}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        res = {name: run(name, args, rank, device) for name in ("adamw", "dhspg")}
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default="docs/results/bench_fsdp.json")
    args = ap.parse_args()
    world = 2
    out_dir = Path(tempfile.mkdtemp(prefix="bench_fsdp_"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, args, str(out_dir)), nprocs=world)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    full = mlp(args.width, args.layers)
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    result = {"setup": {**vars(args), "world": world, "threads_per_rank": 1,
                        "model": f"MLP {args.layers}x Linear({args.width},{args.width}) + Linear({args.width},10)"},
              "single_process_param_bytes": full_bytes, "ranks": ranks}
    print(f"per optimizer.step() (median ms, rank 0; {args.device}, 2 processes, batch {args.batch} per rank)")
    print(f"{'phase':<11}{'AdamW':>9}{'DHSPG':>9}{'ratio':>8}   whole iteration ratio")
    for ph in ("warmup", "projection", "hybrid"):
        a, d = ranks[0]["adamw"]["step_ms"][ph], ranks[0]["dhspg"]["step_ms"][ph]
        ia, idh = ranks[0]["adamw"]["iteration_ms"][ph], ranks[0]["dhspg"]["iteration_ms"][ph]
        print(f"{ph:<11}{a:>9.3f}{d:>9.3f}{d / a:>8.2f}   {idh / ia:.2f}")
    for r, rec in enumerate(ranks):
        print(f"rank {r}: params {rec['dhspg']['param_bytes']} B of {full_bytes} B single-process; optimizer state "
              f"AdamW {rec['adamw']['optimizer_state_bytes']} B, DHSPG {rec['dhspg']['optimizer_state_bytes']} B")
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
