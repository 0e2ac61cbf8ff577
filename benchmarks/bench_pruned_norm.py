"""What exactness costs a hidden-pruned transformer: ``PrunedLayerNorm`` against a fused ``nn.LayerNorm``.

A sub-network whose hidden size was pruned normalises its kept channels with the full width's statistics
(``lightning_oto.subnet.slim.PrunedLayerNorm``); torch has no fused kernel for that.  Timed here in context: a
BERT encoder (``transformers``, hidden 256, 4 layers, 4 heads, FFN 1024, sequence 128) whose hidden size is cut
by a quarter and by a half, as constructed (exact), against the same sub-network with every ``PrunedLayerNorm``
put back to a plain ``nn.LayerNorm`` of the kept width (what slicing the norms would give: faster, not exact),
and against the dense model, in interleaved rounds (median of per-round ratios).

    python benchmarks/bench_pruned_norm.py [--threads 1] [--batch 8] [--rounds 15]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

from lightning_oto import OTO
from lightning_oto.space.groups import zero_group
from lightning_oto.subnet.slim import PrunedLayerNorm


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import transformers as hf

        cfg = hf.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, max_position_embeddings=256, attn_implementation="sdpa")
        self.bert = hf.BertForSequenceClassification(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).logits


def fused_copy(sub: nn.Module) -> nn.Module:
    """The same sub-network with plain LayerNorms of the kept width (not exact: they divide by the kept width)."""
    out = copy.deepcopy(sub)
    for m in out.modules():
        if isinstance(m, PrunedLayerNorm):
            m.__class__ = nn.LayerNorm
    return out


def per_call(model: nn.Module, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        model(x)
    return (time.perf_counter() - start) / calls


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randint(0, 1000, (args.batch, 128))
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch} x 128 tokens, {args.rounds} "
          f"rounds of {args.calls} calls; time per batch as a ratio, median over rounds")
    print(f"{'hidden kept':>12s} {'exact / dense':>14s} {'fused / dense':>14s} {'exact / fused':>14s}")
    for cut in (64, 128):
        oto = OTO(Encoder().eval(), x[:2])
        params = dict(oto.model.named_parameters())
        width = [g for g in oto.prunable_groups if any(s.name.endswith("word_embeddings.weight") for s in g.slices)]
        for g in width[:cut]:
            zero_group(g, params)
        exact = oto.construct_subnet().eval()
        fused = fused_copy(exact)
        dense = copy.deepcopy(oto.model)  # its zero entries make no difference to these dense kernels' speed
        for m in (dense, exact, fused):
            per_call(m, x, 2)
        r_exact, r_fused = [], []
        for _ in range(args.rounds):
            t_dense = per_call(dense, x, args.calls)
            r_exact.append(per_call(exact, x, args.calls) / t_dense)
            r_fused.append(per_call(fused, x, args.calls) / t_dense)
        e, f = statistics.median(r_exact), statistics.median(r_fused)
        print(f"{256 - cut:5d} of 256 {e:14.3f} {f:14.3f} {e / f:14.3f}", flush=True)


if __name__ == "__main__":
    main()
