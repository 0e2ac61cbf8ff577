"""A per-head attention bias passed as the SDPA mask (T5 with its default attention, issue 19 defect 3).

Under SDPA, Hugging Face builds T5's mask as ``where(mask, position_bias, min)`` and hands it to
``scaled_dot_product_attention``: the bias has one slice per head, made from a parameter.  Pruning a
head must slice the bias with it (or keep the head); both are checked here the central way: the
sub-network equals the full model on two inputs, and what was zeroed is gone.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from torch import nn

from lightning_oto import OTO
from lightning_oto.space.groups import zero_group

T5 = dict(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          use_cache=False)


class T5Encoder(nn.Module):
    def __init__(self, attn: str | None) -> None:
        super().__init__()
        cfg = hf.T5Config(**T5) if attn is None else hf.T5Config(**T5, attn_implementation=attn)
        self.t5 = hf.T5EncoderModel(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.t5(ids).last_hidden_state


class BiasedAttention(nn.Module):
    """Self-attention with a learned per-head bias as the SDPA mask, masked with where() like HF does."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 6, bias_as: str = "table") -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_as = bias_as
        if bias_as == "table":  # T5's way: a (positions, heads) table looked up per (query, key) pair
            self.table = nn.Embedding(2 * tokens - 1, heads)
            pos = torch.arange(tokens)
            self.register_buffer("relative", pos[None, :] - pos[:, None] + tokens - 1)
        else:  # a fixed per-head buffer: nothing prunes it, so its heads must stay
            self.register_buffer("bias", 0.5 * torch.randn(heads, tokens, tokens))

    def per_head_bias(self) -> torch.Tensor:
        return self.table(self.relative).permute(2, 0, 1) if self.bias_as == "table" else self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        keep = torch.ones(b, 1, n, n, dtype=torch.bool).tril()
        mask = torch.where(keep, self.per_head_bias()[None], torch.finfo(x.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


def _perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _head_groups(oto: OTO, weight: str) -> list:
    return [g for g in oto.prunable_groups if any(s.name == weight for s in g.slices)]


@pytest.mark.parametrize("attn", [None, "eager"])  # None: the default, SDPA
def test_t5_prunes_heads_with_their_position_bias(attn: str | None) -> None:
    torch.manual_seed(0)
    model = _perturbed(T5Encoder(attn))
    ids, other = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (3, 11))
    oto = OTO(model, ids, mode="prune")
    bias = "t5.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    heads = _head_groups(oto, "t5.encoder.block.0.layer.0.SelfAttention.q.weight")
    assert len(heads) == 4
    assert all(any(s.name == bias and s.dim == 1 for s in g.slices) for g in heads)
    params = dict(model.named_parameters())
    zero_group(heads[1], params)
    zero_group(heads[3], params)
    sub = oto.construct_subnet(verify_inputs=[(other,)])
    assert dict(sub.named_parameters())[bias].shape == (8, 2)
    for block in (0, 1):
        q = sub.t5.encoder.block[block].layer[0].SelfAttention.q
        assert q.weight.shape == (16, 32)
    with torch.no_grad():
        assert torch.allclose(sub(other), model(other), atol=1e-5)


@pytest.mark.parametrize("mode", ["prune", "erase"])
def test_full_t5_model_with_sdpa_is_exact(mode: str) -> None:
    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t5 = hf.T5Model(hf.T5Config(**{**T5, "num_layers": 1}, attn_implementation="sdpa"))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.t5(input_ids=ids, decoder_input_ids=ids).last_hidden_state

    torch.manual_seed(0)
    model = _perturbed(Seq2Seq())
    oto = OTO(model, torch.randint(0, 50, (2, 8)), mode=mode)
    oto.random_set_zero_groups(0.5, seed=0)
    sub = oto.construct_subnet(verify_inputs=[(torch.randint(0, 50, (3, 5)),)])
    assert sub.oto_verification_error <= 1e-4
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())


def test_learned_bias_mask_is_sliced_with_its_heads() -> None:
    torch.manual_seed(0)
    model = _perturbed(BiasedAttention())
    oto = OTO(model, torch.randn(2, 6, 16), mode="prune")
    heads = _head_groups(oto, "qkv.weight")
    assert len(heads) == 4 and all(any(s.name == "table.weight" and s.dim == 1 for s in g.slices) for g in heads)
    zero_group(heads[2], dict(model.named_parameters()))
    sub = oto.construct_subnet(verify_inputs=[(torch.randn(3, 6, 16),)])
    assert sub.table.weight.shape == (11, 3) and sub.qkv.weight.shape == (36, 16)


def test_fixed_per_head_mask_keeps_its_heads_and_says_why() -> None:
    torch.manual_seed(0)
    model = _perturbed(BiasedAttention(bias_as="buffer"))
    oto = OTO(model, torch.randn(2, 6, 16), mode="prune")
    heads = [g for g in oto.groups if any(s.name == "qkv.weight" and s.dim == 0 for s in g.slices)]
    assert heads and not any(g.prunable for g in heads)
    assert all("one entry per head" in g.reason for g in heads)
