"""Erase whole decoder sub-blocks of a small Llama-style causal LM trained under FSDP2 (2 CPU processes, gloo).

Depth pruning as ShortGPT / Minitron do it by hand: erase mode's groups on a decoder stack are each layer's
attention and each layer's MLP (a residual branch each); H2SPG removes the least salient ones while the
network stays connected. A decoder block whose attention and MLP are both erased is gone entirely.

The network is built in ``__init__`` from a ``LlamaConfig`` (random weights, no download) and sharded in
``configure_model`` with ``fully_shard`` per decoder layer; OTOCallback traces it before that, searches on the
shards, gathers the full state once at fit end and exports the sub-network (rank 0).

    python examples/fsdp_llama_erase.py                 # 4 layers, 2 processes, writes fsdp_llama_erase/
    python examples/fsdp_llama_erase.py --layers 6 --sparsity 0.5
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_oto import OTOCallback

VOCAB, SEQ = 64, 16


class CausalLM(nn.Module):
    """``LlamaForCausalLM`` returning plain logits (what OTO traces and the export returns)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                          use_cache=False, attn_implementation="sdpa")
        self.lm = LlamaForCausalLM(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids).logits


class LitLM(L.LightningModule):
    def __init__(self, layers: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = CausalLM(layers)
        self.example_input_array = torch.randint(0, VOCAB, (2, SEQ))

    def configure_model(self) -> None:
        if self.device_mesh is None or getattr(self, "_sharded_for_fit", False):
            return
        from torch.distributed.fsdp import fully_shard

        self._sharded_for_fit = True
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.lm.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        logits = self.net(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.0)


def token_data(n: int = 512) -> TensorDataset:
    """A tiny learnable language: each sequence counts up from a random start with a random stride."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return TensorDataset((start + stride * torch.arange(SEQ + 1)) % VOCAB)


def removed_blocks(report: dict, layers: int) -> dict[str, list[int]]:
    """Which decoder layers lost their attention, their MLP, or both (from the report's removed group names)."""
    out: dict[str, set[int]] = {"self_attn": set(), "mlp": set()}
    for g in report["removed_groups"]:
        for part in out:
            for m in re.finditer(r"layers\.(\d+)\.(self_attn|mlp)", g["name"]):
                if m.group(2) == part:
                    out[part].add(int(m.group(1)))
    both = out["self_attn"] & out["mlp"]
    return {"attention_removed": sorted(out["self_attn"]), "mlp_removed": sorted(out["mlp"]),
            "whole_blocks_removed": sorted(both), "layers": list(range(layers))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="fsdp_llama_erase")
    args = ap.parse_args()
    cb = OTOCallback(mode="erase", target_group_sparsity=args.sparsity, warmup_steps=args.steps // 4,
                     projection_steps=args.steps // 4, network_attr="net", export_dir=args.out,
                     export_formats=("torch",), bn_recalibration_batches=0, verbose=1)
    trainer = L.Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        accelerator="cpu", devices=2, max_steps=args.steps, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=args.out)
    trainer.fit(LitLM(args.layers), DataLoader(token_data(), batch_size=16, shuffle=True))
    if trainer.is_global_zero and cb.report is not None:
        blocks = removed_blocks(cb.report, args.layers)
        summary = {"removed_groups": [g["name"] for g in cb.report["removed_groups"]], **blocks,
                   "params_full": cb.report["params_full"], "params_sub": cb.report["params_sub"],
                   "verification_max_abs_error": cb.report["verification_max_abs_error"],
                   "final_train_loss": float(trainer.callback_metrics.get("train_loss", float("nan")))}
        Path(args.out, "llama_blocks.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
