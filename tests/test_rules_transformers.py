"""Prune mode on real model definitions from ``transformers`` (tiny configs, every parameter perturbed):
GPT-2 and MobileNetV2 get prunable groups, attention heads are prunable and exact in BERT, Llama and ViT,
and the slimmed copy runs the model's unchanged forward with its head counts updated."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_oto import OTO
from lightning_oto.space.groups import zero_group

hf = pytest.importorskip("transformers")

TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


class Output(nn.Module):
    """One field of a transformers ModelOutput as a plain tensor, as user code reads it."""

    def __init__(self, model: nn.Module, field: str = "last_hidden_state") -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(x), self.field)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Zero-initialised biases and unit norms would hide construction errors."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.02 * torch.randn(p.shape, generator=g))
    for m in model.modules():
        if isinstance(getattr(m, "running_var", None), torch.Tensor):
            m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def groups_with(oto: OTO, fragment: str, prunable: bool = True):
    return [g for g in oto.groups if g.prunable == prunable and any(fragment in s.name for s in g.slices)]


def rows(group, fragment: str, dependents: bool = False) -> int:
    return sum(len(s.indices) for s in (group.dependents if dependents else group.slices) if fragment in s.name)


def check_exact(oto: OTO, sub: nn.Module, other: torch.Tensor) -> None:
    """Equal on the example (construct verified it) and on an input of another batch / length; smaller."""
    assert sub.oto_verification_error <= 1e-4
    with torch.no_grad():
        assert (oto.model(other) - sub(other)).abs().max() <= 1e-4
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in oto.model.parameters())


def test_gpt2_conv1d_and_heads():
    torch.manual_seed(0)
    cfg = hf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    oto = OTO(perturb(Output(hf.GPT2Model(cfg))), ids(2, 16))
    heads = groups_with(oto, "h.0.attn.c_attn")
    assert len(heads) == 4  # one per head: its q, k, v columns of c_attn (addmm with a (in, out) weight)
    assert all(rows(g, "c_attn.weight") == 24 and rows(g, "attn.c_proj.weight", True) == 8 for g in heads)
    assert len(groups_with(oto, "h.0.mlp.c_fc")) == 128
    params = dict(oto.model.named_parameters())
    zero_group(heads[1], params)
    for g in groups_with(oto, "h.1.mlp.c_fc")[:40]:
        zero_group(g, params)
    sub = oto.construct_subnet()
    attn = sub.model.h[0].attn
    assert attn.split_size == 24 and attn.c_attn.nf == 72 and attn.c_attn.weight.shape == (32, 72)
    assert sub.model.h[1].mlp.c_fc.nf == 88
    check_exact(oto, sub, ids(3, 11, seed=2))


def test_mobilenetv2_pads_do_not_block_pruning():
    """TF-style padding is aten.pad(x, p, 'constant', 0.0): zero padding keeps channels zero-invariant."""
    torch.manual_seed(0)
    cfg = hf.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.35, num_labels=10)
    model = perturb(Output(hf.MobileNetV2ForImageClassification(cfg), "logits"))
    oto = OTO(model, torch.randn(2, 3, 32, 32))
    assert any(n.op == "pad" for n in oto.graph.nodes)
    assert len(oto.prunable_groups) > 0.9 * len(oto.groups)
    oto.random_set_zero_groups(0.5, seed=0)
    check_exact(oto, oto.construct_subnet(), torch.randn(3, 3, 40, 40))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_heads(attn):
    torch.manual_seed(0)
    oto = OTO(perturb(Output(hf.BertModel(hf.BertConfig(**TEXT, attn_implementation=attn)))), ids(2, 16))
    heads = groups_with(oto, "layer.0.attention.self.query")
    assert len(heads) == 4
    for g in heads:
        assert rows(g, "self.query.weight") == rows(g, "self.key.weight") == rows(g, "self.value.weight") == 8
        assert rows(g, "attention.output.dense.weight", dependents=True) == 8
    params = dict(oto.model.named_parameters())
    zero_group(heads[2], params)
    sub = oto.construct_subnet()
    self_attn = sub.model.encoder.layer[0].attention.self
    assert self_attn.query.out_features == 24
    assert self_attn.num_attention_heads == 3 and self_attn.all_head_size == 24
    assert sub.model.encoder.layer[1].attention.self.num_attention_heads == 4
    check_exact(oto, sub, ids(3, 11, seed=2))


def test_llama_grouped_query_heads():
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(**TEXT, num_key_value_heads=2, use_cache=False, attn_implementation="sdpa")
    oto = OTO(perturb(Output(hf.LlamaModel(cfg))), ids(2, 16))
    heads = groups_with(oto, "layers.0.self_attn.k_proj")
    assert len(heads) == 2  # a key/value head goes with its two query heads
    for g in heads:
        assert rows(g, "q_proj.weight") == 16 and rows(g, "k_proj.weight") == rows(g, "v_proj.weight") == 8
        assert rows(g, "o_proj.weight", dependents=True) == 16
    zero_group(heads[0], dict(oto.model.named_parameters()))
    sub = oto.construct_subnet()
    layer = sub.model.layers[0].self_attn
    assert layer.q_proj.out_features == 16 and layer.k_proj.out_features == 8
    assert layer.config.num_attention_heads == 2 and layer.config.num_key_value_heads == 1
    assert sub.model.layers[1].self_attn.config.num_key_value_heads == 2  # other layers keep theirs
    check_exact(oto, sub, ids(3, 11, seed=2))
    oto.random_set_zero_groups(0.5, seed=1)
    check_exact(oto, oto.construct_subnet(), ids(1, 7, seed=3))


def test_vit_heads():
    torch.manual_seed(0)
    cfg = hf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=10, attn_implementation="eager")
    oto = OTO(perturb(Output(hf.ViTForImageClassification(cfg), "logits")), torch.randn(2, 3, 32, 32))
    heads = groups_with(oto, "layers.0.attention.q_proj")
    assert len(heads) == 4
    assert all(rows(g, "q_proj.weight") == rows(g, "v_proj.weight") == 8 and rows(g, "o_proj.weight", True) == 8
               for g in heads)
    oto.random_set_zero_groups(0.5, seed=0)
    sub = oto.construct_subnet()
    attns = [layer.attention for layer in sub.model.vit.layers]
    assert [a.num_attention_heads for a in attns] == [a.q_proj.out_features // 8 for a in attns]
    assert sum(a.num_attention_heads for a in attns) < 8
    check_exact(oto, sub, torch.randn(3, 3, 32, 32))
