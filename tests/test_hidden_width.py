"""A transformer's hidden size is pruned exactly through its LayerNorms.

A hidden channel whose every producer is zero is zero at each ``nn.LayerNorm`` / ``nn.RMSNorm`` input; it adds
nothing to the sums, so the other channels keep their statistics as long as these still divide by the full
width.  The slimmed copy swaps such a norm for ``PrunedLayerNorm`` / ``PrunedRMSNorm`` (same maths on the kept
channels), and the width goes with the embedding columns and every norm's entries.  A forward that derives a
size from the width (``b, n, c = x.shape``) is caught by a trial construction and keeps it.  ``transformers``'
own RMSNorm classes (``LlamaRMSNorm`` and its copies, decomposed in the trace) are matched as one module call;
an LM head tied to the embedding is the same tensor, so its width goes too.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_oto
from lightning_oto import OTO
from lightning_oto.space.groups import zero_group
from lightning_oto.subnet.slim import PrunedLayerNorm, PrunedRMSNorm, PrunedVarianceRMSNorm

hf = pytest.importorskip("transformers")

TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Unit LayerNorm weights and zero biases would hide a wrong statistic."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


class Classifier(nn.Module):
    """BERT for sequence classification as a user calls it: keywords in, the logits out."""

    def __init__(self, attn: str) -> None:
        super().__init__()
        self.bert = hf.BertForSequenceClassification(hf.BertConfig(**TEXT, attn_implementation=attn))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


def batch(b: int, s: int, seed: int = 1) -> dict[str, torch.Tensor]:
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s // 2:] = 0  # padding in the first sequence
    return {"input_ids": ids(b, s, seed), "attention_mask": mask}


def width_groups(oto: OTO) -> list:
    return [g for g in oto.groups if any(s.name.endswith("word_embeddings.weight") for s in g.slices)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_hidden_size_is_pruned_exactly(attn):
    torch.manual_seed(0)
    oto = OTO(perturb(Classifier(attn)), batch(2, 16))
    width = width_groups(oto)
    assert len(width) == 32 and all(g.prunable for g in width)
    names = {s.name for s in width[5].slices}
    norms = {n for n in names if "LayerNorm" in n}
    assert len(norms) == 10  # weight and bias of the embedding norm and of the 2 x 2 encoder norms
    assert {"bert.bert.embeddings.position_embeddings.weight", "bert.bert.embeddings.token_type_embeddings.weight",
            "bert.bert.encoder.layer.1.output.dense.weight"} <= names
    assert "bert.bert.pooler.dense.weight" in {s.name for s in width[5].dependents}
    params = dict(oto.model.named_parameters())
    for g in width[:12]:
        zero_group(g, params)
    heads = [g for g in oto.prunable_groups if any("layer.0.attention.self.query" in s.name for s in g.slices)]
    zero_group(heads[1], params)
    sub = oto.construct_subnet()
    ln = sub.bert.bert.encoder.layer[1].output.LayerNorm
    assert type(ln) is PrunedLayerNorm and ln.full_width == 32 and ln.normalized_shape == (20,)
    assert sub.bert.bert.embeddings.word_embeddings.weight.shape == (100, 20)
    assert sub.bert.bert.encoder.layer[0].attention.self.query.weight.shape == (24, 20)
    assert sub.oto_verification_error <= 1e-5
    with torch.no_grad():
        other = batch(3, 11, seed=2)
        assert (oto.model(**other) - sub(**other)).abs().max() <= 1e-5
    assert sum(p.numel() for p in sub.parameters()) < 0.7 * sum(p.numel() for p in oto.model.parameters())


def test_hidden_pruned_bert_exports_and_loads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    oto = OTO(perturb(Classifier("sdpa")), batch(2, 16))
    params = dict(oto.model.named_parameters())
    for g in width_groups(oto)[::3]:
        zero_group(g, params)
    sub = oto.construct_subnet()
    oto.export(sub, tmp_path / "out", formats=("torch",))
    other = batch(3, 11, seed=2)
    torch.save({"x": other, "y": sub(**other).detach()}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch, lightning_oto
        io = torch.load({str(tmp_path / 'io.pt')!r})
        model = lightning_oto.load({str(tmp_path / 'out')!r})
        err = (model(**io["x"]) - io["y"]).abs().max().item()
        assert err <= 1e-5, err
        print("ok", err)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]
    # the weights alone load into a fresh instance of the user's class, norms swapped and widths kept
    fresh = perturb(Classifier("sdpa"))
    model = lightning_oto.load(tmp_path / "out" / "subnet_state_dict.pt", model=fresh).eval()
    assert type(model.bert.bert.embeddings.LayerNorm) is PrunedLayerNorm
    assert model.bert.bert.embeddings.LayerNorm.full_width == 32
    with torch.no_grad():
        assert (model(**other) - sub(**other)).abs().max() <= 1e-5


class TimmStyle(nn.Module):
    """timm's attention reads the width from the input's shape (``b, n, c = x.shape``): the trace records it as
    a number, so the width must stay (a trial construction finds out); the MLP hidden channels still go."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Linear(8, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, n, c = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return self.head(h.mean(1))


def test_a_width_read_from_the_shape_is_kept_by_the_trial():
    torch.manual_seed(0)
    oto = OTO(perturb(TimmStyle()), torch.randn(2, 6, 8))
    width = [g for g in oto.groups if any(s.name == "emb.weight" for s in g.slices)]
    assert len(width) == 16 and not any(g.prunable for g in width)
    assert all("trial construction" in g.reason and "norm1" in g.reason for g in width)
    assert any(s.name == "fc1.weight" for g in oto.prunable_groups for s in g.slices)
    oto.random_set_zero_groups(0.5, seed=0)
    sub = oto.construct_subnet()
    assert sub.oto_verification_error <= 1e-5 and sub.fc1.out_features < 32


class FunctionalNorm(nn.Module):
    """``F.layer_norm`` in the forward: no module whose slimmed copy could keep the full width's statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.w, self.fc = nn.Linear(8, 16), nn.Parameter(torch.ones(16)), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.layer_norm(self.emb(x), (16,), self.w))


class RMSNet(nn.Module):
    """A pre-norm residual MLP with ``nn.RMSNorm`` (no bias: a zero weight entry zeroes the channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm, self.norm_out = nn.Linear(8, 16), nn.RMSNorm(16, eps=1e-6), nn.RMSNorm(16)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.fc2(F.silu(self.fc1(self.norm(h))))
        return self.head(self.norm_out(h))


def test_functional_layer_norm_keeps_the_width_and_rms_norm_prunes_it():
    torch.manual_seed(0)
    oto = OTO(perturb(FunctionalNorm()), torch.randn(3, 8))
    width = [g for g in oto.groups if any(s.name == "emb.weight" for s in g.slices)]
    assert len(width) == 16 and all(not g.prunable and "normalizes over the channel" in g.reason for g in width)

    oto = OTO(perturb(RMSNet()), torch.randn(3, 5, 8))
    width = [g for g in oto.groups if any(s.name == "emb.weight" for s in g.slices)]
    assert len(width) == 16 and all(g.prunable for g in width)
    assert all({"norm.weight", "norm_out.weight"} <= {s.name for s in g.slices} for g in width)
    oto.random_set_zero_groups(0.5, seed=1)
    sub = oto.construct_subnet()
    assert type(sub.norm) is PrunedRMSNorm and sub.norm.full_width == 16 and sub.emb.out_features < 16
    assert sub.oto_verification_error <= 1e-5
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        assert (oto.model(x) - sub(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_layer_norm_matches_the_full_norm_on_zero_channels(dtype):
    torch.manual_seed(0)
    full = nn.LayerNorm(12).to(dtype)
    with torch.no_grad():
        full.weight.normal_()
        full.bias.normal_()
    x = (torch.randn(4, 5, 12) + 3.0).to(dtype)  # a large mean: the removed channels' share of the variance
    gone = [1, 4, 5, 10]
    kept = [i for i in range(12) if i not in gone]
    x[..., gone] = 0
    small = nn.LayerNorm(8).to(dtype)
    small.__class__, small.full_width = PrunedLayerNorm, 12
    with torch.no_grad():
        small.weight.copy_(full.weight[kept])
        small.bias.copy_(full.bias[kept])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (small(x[..., kept]).float() - full(x)[..., kept].float()).abs().max() <= tol
    # dividing by the kept width instead (a plain LayerNorm of the smaller size) is wrong by far more
    plain = F.layer_norm(x[..., kept].float(), (8,), small.weight.float(), small.bias.float(), full.eps)
    assert (plain - full(x)[..., kept].float()).abs().max() > 0.1


class CausalLM(nn.Module):
    """A decoder LM as a user calls it: token ids in, the logits out."""

    def __init__(self, name: str, attn: str = "sdpa", tie: bool = False) -> None:
        super().__init__()
        cls, cfg_cls = {"llama": (hf.LlamaForCausalLM, hf.LlamaConfig), "qwen2": (hf.Qwen2ForCausalLM, hf.Qwen2Config),
                        "gemma": (hf.GemmaForCausalLM, hf.GemmaConfig)}[name]
        cfg = cfg_cls(**TEXT, num_key_value_heads=2, head_dim=8, use_cache=False, tie_word_embeddings=tie,
                      attn_implementation=attn)
        self.lm = cls(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids).logits


def decoder_width(oto: OTO) -> list:
    """The hidden-size groups: those holding a column (dim 1) of the token embedding."""
    return [g for g in oto.groups if any(s.name.endswith("embed_tokens.weight") and s.dim == 1 for s in g.slices)]


@pytest.mark.parametrize("name,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_decoder_rms_norm_width_is_pruned_exactly(name, attn):
    """``LlamaRMSNorm`` and its copies are decomposed in the trace; matched as one module call, the hidden size
    goes with their weight entries and the slimmed copy keeps the full width's mean square."""
    torch.manual_seed(0)
    oto = OTO(perturb(CausalLM(name, attn)), ids(2, 16))
    width = decoder_width(oto)
    assert len(width) == 32 and all(g.prunable for g in width)
    assert sum(n.endswith("layernorm.weight") or n.endswith("model.norm.weight")
               for n in {s.name for s in width[0].slices}) == 5  # 2 per layer and the final norm
    oto.random_set_zero_groups(0.5, seed=1)
    sub = oto.construct_subnet()
    norm = sub.lm.model.norm
    assert type(norm) is PrunedVarianceRMSNorm and norm.full_width == 32 and norm.weight.shape[0] < 32
    assert sub.oto_verification_error <= 1e-5
    other = ids(3, 11, seed=2)
    with torch.no_grad():
        assert (oto.model(other) - sub(other)).abs().max() <= 1e-5


def test_gemma_rms_norm_is_not_matched_and_keeps_the_width():
    """Gemma's RMSNorm scales by ``1 + weight`` and calls its epsilon ``eps``: not matched, so its ``mean`` over the
    channels keeps the width."""
    torch.manual_seed(0)
    gemma = OTO(perturb(CausalLM("gemma")), ids(2, 16))
    width = decoder_width(gemma)
    assert len(width) == 32 and all(not g.prunable and "reduces over the channels" in g.reason for g in width)


def test_tied_embeddings_are_one_parameter_and_the_width_is_pruned():
    """An LM head tied to the token embedding reaches the program as a second placeholder; named as
    ``named_parameters()`` names it, the hidden channel is one column of the one tensor (the embedding's output,
    the head's input), trained with a budget and cut with the tie kept."""
    torch.manual_seed(0)
    oto = OTO(perturb(CausalLM("llama", tie=True)), ids(2, 16))
    width = decoder_width(oto)
    assert len(width) == 32 and all(g.prunable for g in width)
    assert not any("lm_head" in s.name for g in oto.groups for s in list(g.slices) + list(g.dependents))
    opt = oto.dhspg(lr=1e-3, variant="adamw", budget={"flops": 0.5}, warmup_steps=2, projection_steps=4)
    x = ids(4, 16)
    for _ in range(8):
        loss = oto.model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sub = oto.construct_subnet()
    lm = sub.lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and lm.lm_head.weight.shape[1] < 32
    assert sub.oto_verification_error <= 1e-5
    other = ids(3, 11, seed=2)
    with torch.no_grad():
        assert (oto.model(other) - sub(other)).abs().max() <= 1e-5
