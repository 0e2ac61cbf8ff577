"""Tiny random-initialised versions of the models people actually compress.

Hugging Face ``transformers`` models are built from small configs (no weights are downloaded);
torchvision / timm patterns that ``transformers`` does not have are written out by hand below
(torchvision does not import here).  Every model is perturbed after init: zero-initialised biases,
residual gammas and layer scales would otherwise make wrong sub-networks look exact.

Each :class:`Entry` carries two inputs: the example the engine traces, and a second one with another
batch size and, where the model allows it, another sequence length or image size.  The attention
implementation of every transformer is chosen on purpose ("eager" traces into matmul/softmax,
"sdpa" into ``scaled_dot_product_attention``) and recorded in ``Entry.attention``; every attention model
is in the zoo with both (:func:`both_kernels`), except the few :data:`ONE_KERNEL` names with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import transformers as hf
from torch import nn
from torch.export import Dim

VOCAB = 100
SEQ, SEQ2 = 16, 11  # example and second sequence length
BATCH, BATCH2 = 2, 3
# Only the batch stays dynamic in the trace (a torch.export spec for one image input): see ``swin``.
BATCH_ONLY = ({0: Dim.AUTO},)


@dataclass(frozen=True)
class Entry:
    """One zoo model: how to build it and the two inputs it is checked on."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, tuple]]  # (example, second)
    attention: str | None = None  # "eager" / "sdpa" for transformers, None otherwise
    slow: bool = False
    note: str = ""
    family: str = ""  # the architecture, where several entries build it ("" = the name)
    opt_in: str = ""  # why the tests run it only with LOTO_SOAK set (too slow for CI); the table always runs it
    dynamic_shapes: Any = "auto"  # what OTO(...) gets: the default, unless the model makes its trace too slow for CI

    @property
    def architecture(self) -> str:
        return self.family or self.name

    def make(self) -> tuple[nn.Module, tuple, tuple]:
        """A fresh perturbed model and its (example, second) inputs, all seeded by the name."""
        seed = sum(map(ord, self.name))
        torch.manual_seed(seed)
        model = self.build()
        perturb(model, seed)
        example, second = self.inputs()
        return model, example, second


@torch.no_grad()
def perturb(model: nn.Module, seed: int, scale: float = 0.02) -> None:
    """Nudge every parameter and every norm statistic so no structure is trivially zero or one."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.is_floating_point():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for m in model.modules():
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
            mean.add_(0.1 * torch.randn(mean.shape, generator=g))
            var.copy_(0.5 + torch.rand(var.shape, generator=g))


# ------------------------------------------------------------------ inputs
def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _img(batch: int, size: int, seed: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def text_inputs() -> tuple[tuple, tuple]:
    """Token ids: the second input changes batch and sequence length."""
    return (_ids(BATCH, SEQ, 1),), (_ids(BATCH2, SEQ2, 2),)


def image_inputs(size: int = 32, other_size: int | None = None) -> Callable[[], tuple[tuple, tuple]]:
    """Images; ``other_size`` for fully convolutional models (the second input changes the image size too)."""
    def make() -> tuple[tuple, tuple]:
        return (_img(BATCH, size, 1),), (_img(BATCH2, other_size or size, 2),)
    return make


def vector_inputs(features: int) -> Callable[[], tuple[tuple, tuple]]:
    """Feature vectors; the second input changes the batch."""
    def make() -> tuple[tuple, tuple]:
        g = torch.Generator().manual_seed(1)
        return (torch.randn(BATCH, features, generator=g),), (torch.randn(BATCH2, features, generator=g),)
    return make


def token_features() -> tuple[tuple, tuple]:
    """(batch, tokens, features) activations: the second input changes batch and sequence length."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 6, 8, generator=g),), (torch.randn(BATCH2, 9, 8, generator=g),)


def small_ids() -> tuple[tuple, tuple]:
    return (torch.randint(0, 20, (BATCH, 6), generator=torch.Generator().manual_seed(1)),), \
        (torch.randint(0, 20, (BATCH2, 9), generator=torch.Generator().manual_seed(2)),)


def whisper_inputs() -> tuple[tuple, tuple]:
    """Log-mel features; Whisper's encoder insists on its fixed length, so only the batch changes."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 16, 32, generator=g),), (torch.randn(BATCH2, 16, 32, generator=g),)


# ------------------------------------------------------------------ transformers models
class Output(nn.Module):
    """Return one field of a transformers ModelOutput as a plain tensor (as most user code does)."""

    def __init__(self, model: nn.Module, field: str = "last_hidden_state") -> None:
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(x), self.field)


_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64)
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, use_cache=False)
_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, num_labels=10)


def bert(attn: str) -> nn.Module:
    return Output(hf.BertModel(hf.BertConfig(**_TEXT, attn_implementation=attn)))


def bert_raw() -> nn.Module:
    """BertModel as is: returns a ModelOutput (last_hidden_state, pooler_output)."""
    return hf.BertModel(hf.BertConfig(**_TEXT, attn_implementation="sdpa"))


def roberta(attn: str) -> nn.Module:
    return Output(hf.RobertaModel(hf.RobertaConfig(**_TEXT, attn_implementation=attn, pad_token_id=1)))


def albert(attn: str) -> nn.Module:
    return Output(hf.AlbertModel(hf.AlbertConfig(**_TEXT, embedding_size=16, attn_implementation=attn)))


def electra(attn: str) -> nn.Module:
    return Output(hf.ElectraModel(hf.ElectraConfig(**_TEXT, embedding_size=16, attn_implementation=attn)))


def distilbert(attn: str) -> nn.Module:
    cfg = hf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64, attn_implementation=attn)
    return Output(hf.DistilBertModel(cfg))


def t5_encoder(attn: str) -> nn.Module:
    cfg = hf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, use_cache=False, attn_implementation=attn)
    return Output(hf.T5EncoderModel(cfg))


def gpt2(attn: str) -> nn.Module:
    cfg = hf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                        bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return Output(hf.GPT2Model(cfg))


def llama(attn: str) -> nn.Module:
    return Output(hf.LlamaModel(hf.LlamaConfig(**_DECODER, num_key_value_heads=4, attn_implementation=attn)))


def mistral(attn: str) -> nn.Module:
    cfg = hf.MistralConfig(**_DECODER, num_key_value_heads=2, sliding_window=None, attn_implementation=attn)
    return Output(hf.MistralModel(cfg))


def qwen2(attn: str) -> nn.Module:
    return Output(hf.Qwen2Model(hf.Qwen2Config(**_DECODER, num_key_value_heads=2, attn_implementation=attn)))


def vit() -> nn.Module:
    return Output(hf.ViTForImageClassification(hf.ViTConfig(**_VIT, attn_implementation="eager")), "logits")


def vit_raw() -> nn.Module:
    """ViTForImageClassification as is: returns an ImageClassifierOutput."""
    return hf.ViTForImageClassification(hf.ViTConfig(**_VIT, attn_implementation="sdpa"))


def deit(attn: str) -> nn.Module:
    return Output(hf.DeiTForImageClassification(hf.DeiTConfig(**_VIT, attn_implementation=attn)), "logits")


def dinov2(attn: str) -> nn.Module:
    cfg = hf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32,
                          patch_size=8, attn_implementation=attn)
    return Output(hf.Dinov2Model(cfg), "pooler_output")


def data2vec_vision(attn: str) -> nn.Module:
    cfg = hf.Data2VecVisionConfig(**_VIT, use_mean_pooling=True, layer_scale_init_value=0.1,
                                  attn_implementation=attn)
    return Output(hf.Data2VecVisionForImageClassification(cfg), "logits")


def swin(attn: str) -> nn.Module:
    """16x16 patches in windows of 4, two blocks: the second shifts its windows (roll, with the shifted-window mask);
    a patch merging, then one block on 8x8.  Swin shifts every second block of a stage (``depths=[1, 1]`` never rolls).

    Traced with a dynamic image size (the ``"auto"`` default) torch.export spends ~100 s CPU in sympy on the
    window partition's views (floor / mod of the padded height and width) against 6 s with the batch alone
    dynamic, and a smaller image does not help (image 16: ~180 s): CI traces it with :data:`BATCH_ONLY`
    (its second input changes the batch only), ``swin_dynamic_image`` keeps the default for the soak.
    """
    cfg = hf.SwinConfig(image_size=32, patch_size=2, embed_dim=32, depths=[2, 1], num_heads=[2, 4],
                        window_size=4, mlp_ratio=2.0, num_labels=10, attn_implementation=attn)
    return Output(hf.SwinForImageClassification(cfg), "logits")


def clip_vision(attn: str) -> nn.Module:
    cfg = hf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, attn_implementation=attn)
    return Output(hf.CLIPVisionModel(cfg), "pooler_output")


def whisper_encoder(attn: str) -> nn.Module:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = hf.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                           max_source_positions=16, max_target_positions=32, use_cache=False,
                           pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
                           attn_implementation=attn)
    return Output(WhisperEncoder(cfg))


def resnet(layer_type: str) -> nn.Module:
    hidden = [16, 32] if layer_type == "basic" else [32, 64]
    cfg = hf.ResNetConfig(embedding_size=16, hidden_sizes=hidden, depths=[2, 1], layer_type=layer_type, num_labels=10)
    return Output(hf.ResNetForImageClassification(cfg), "logits")


def mobilenet_v2() -> nn.Module:
    cfg = hf.MobileNetV2Config(image_size=32, depth_multiplier=0.25, finegrained_output=False, num_labels=10)
    return Output(hf.MobileNetV2ForImageClassification(cfg), "logits")


def convnext() -> nn.Module:
    cfg = hf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=4, image_size=32, num_labels=10)
    return Output(hf.ConvNextForImageClassification(cfg), "logits")


def convnext_v2() -> nn.Module:
    cfg = hf.ConvNextV2Config(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=4, image_size=32, num_labels=10)
    return Output(hf.ConvNextV2ForImageClassification(cfg), "logits")


def poolformer() -> nn.Module:
    cfg = hf.PoolFormerConfig(hidden_sizes=[16, 32], depths=[1, 1], patch_sizes=[7, 3], strides=[4, 2],
                              padding=[2, 1], num_encoder_blocks=2, mlp_ratio=2.0, num_labels=10)
    return Output(hf.PoolFormerForImageClassification(cfg), "logits")


def regnet() -> nn.Module:
    cfg = hf.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2], groups_width=8, layer_type="y",
                          num_labels=10)
    return Output(hf.RegNetForImageClassification(cfg), "logits")


def efficientnet() -> nn.Module:
    cfg = hf.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.3, hidden_dim=320,
                                num_labels=10)
    return Output(hf.EfficientNetForImageClassification(cfg), "logits")


def mobilevit() -> nn.Module:
    cfg = hf.MobileViTConfig(image_size=32, patch_size=2, hidden_sizes=[16, 24, 32],
                             neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2, num_labels=10,
                             attn_implementation="eager")
    return Output(hf.MobileViTForImageClassification(cfg), "logits")


def levit() -> nn.Module:
    cfg = hf.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
                         key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2], num_labels=10)
    return Output(hf.LevitForImageClassification(cfg), "logits")


# ------------------------------------------------------------------ the zoo
def _hand(cls: type, *args: Any, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: cls(*args, **kwargs)


OTHER_KERNEL = {"eager": "sdpa", "sdpa": "eager"}
# attention models that exist with one kernel only, and why
ONE_KERNEL = {
    "mobilevit": "transformers has no SDPA path for MobileViT (_supports_sdpa is False)",
    "bert": "BertModel with SDPA is bert_sdpa_modeloutput",
    "bert_sdpa_modeloutput": "BertModel with eager attention is bert",
    "vit": "ViT with SDPA is vit_sdpa_modeloutput",
    "vit_sdpa_modeloutput": "ViT with eager attention is vit",
}


def both_kernels(name: str, build: Callable[[str], nn.Module], inputs: Callable[[], tuple[tuple, tuple]], attn: str,
                 note: str = "", dynamic_shapes: Any = "auto") -> list[Entry]:
    """The model with kernel ``attn`` as ``name``, and with the other kernel as ``name_<other>``.

    Eager attention traces into matmul / softmax, SDPA into ``scaled_dot_product_attention`` (masks and
    biases then travel as its ``attn_mask``): the engine meets different graphs, so both are checked.
    """
    other = OTHER_KERNEL[attn]
    return [Entry(name, lambda: build(attn), inputs, attn, note=note, dynamic_shapes=dynamic_shapes),
            Entry(f"{name}_{other}", lambda: build(other), inputs, other, note=note, family=name,
                  dynamic_shapes=dynamic_shapes)]


# The heavier half of the zoo by measured time (both modes); marked slow, still run in CI.
HEAVY = frozenset({"mobilevit", "mobilenet_v2", "levit", "efficientnet", "regnet_y", "swin", "data2vec_vision",
                   "qwen2_gqa", "whisper_encoder", "tv_resnet_bottleneck", "mistral_gqa", "albert", "tv_densenet",
                   "deit", "vit_sdpa_modeloutput", "electra", "convnext_v2", "dinov2"})


def _entries() -> list[Entry]:
    """The zoo as a table (one line per model, so it runs past a screen: it is data, not logic)."""
    from . import fixtures as fx
    from . import handwritten as hw

    conv = image_inputs(32, 48)
    tiny = image_inputs(8, 12)  # fully convolutional: the second input is also larger
    fixed = image_inputs(32)
    swin_sizes = image_inputs(32, 48)  # Swin pads to its windows: with a dynamic image size another size runs
    return [
        # text (the second input changes batch and sequence length)
        Entry("bert", lambda: bert("eager"), text_inputs, "eager"),
        Entry("bert_sdpa_modeloutput", bert_raw, text_inputs, "sdpa", note="BertModel unwrapped: returns a ModelOutput",
              family="bert"),
        *both_kernels("roberta", roberta, text_inputs, "sdpa"),
        *both_kernels("albert", albert, text_inputs, "eager", note="parameters shared across layers"),
        *both_kernels("electra", electra, text_inputs, "eager"),
        *both_kernels("distilbert", distilbert, text_inputs, "sdpa"),
        *both_kernels("t5_encoder", t5_encoder, text_inputs, "eager", note="relative position bias per head"),
        *both_kernels("gpt2", gpt2, text_inputs, "eager", note="Conv1D = addmm"),
        *both_kernels("llama", llama, text_inputs, "sdpa"),
        *both_kernels("mistral_gqa", mistral, text_inputs, "sdpa", note="2 KV heads for 4 query heads"),
        *both_kernels("qwen2_gqa", qwen2, text_inputs, "eager", note="2 KV heads for 4 query heads"),
        # audio
        *both_kernels("whisper_encoder", whisper_encoder, whisper_inputs, "sdpa"),
        # vision transformers (position embeddings fix the image size: the second input changes the batch)
        Entry("vit", vit, fixed, "eager"),
        Entry("vit_sdpa_modeloutput", vit_raw, fixed, "sdpa",
              note="ViTForImageClassification unwrapped: returns an ImageClassifierOutput", family="vit"),
        *both_kernels("deit", deit, fixed, "sdpa"),
        *both_kernels("dinov2", dinov2, fixed, "sdpa", note="layer scale"),
        *both_kernels("data2vec_vision", data2vec_vision, fixed, "eager", note="layer scale, relative position bias"),
        *both_kernels("swin", swin, fixed, "eager", note="shifted windows (roll); batch-only dynamic trace",
                      dynamic_shapes=BATCH_ONLY),
        Entry("swin_dynamic_image", lambda: swin("eager"), swin_sizes, "eager", family="swin",
              note="shifted windows (roll); the default dynamic trace (image size too)",
              opt_in="torch.export with a dynamic image size takes ~100 s CPU per mode on Swin (sympy)"),
        *both_kernels("clip_vision", clip_vision, fixed, "sdpa"),
        # their second input changes the batch only, so a batch-only trace checks the same thing, 2-3x faster
        # (torch.export with a dynamic image size: mobilevit 14 s -> 4 s, levit 12 s -> 6 s per trace)
        Entry("mobilevit", mobilevit, fixed, "eager", dynamic_shapes=BATCH_ONLY),
        Entry("levit", levit, image_inputs(64), note="BatchNorm1d attention, no attention kernel",
              dynamic_shapes=BATCH_ONLY),
        # CNNs from transformers
        Entry("resnet_basic", lambda: resnet("basic"), conv),
        Entry("resnet_bottleneck", lambda: resnet("bottleneck"), conv),
        Entry("mobilenet_v2", mobilenet_v2, fixed, note="TF 'same' padding through F.pad"),
        Entry("convnext", convnext, conv, note="layer scale * x in NHWC"),
        Entry("convnext_v2", convnext_v2, conv, note="global response norm"),
        Entry("poolformer", poolformer, conv, note="layer scale .unsqueeze(-1).unsqueeze(-1) * x"),
        Entry("regnet_y", regnet, conv, note="grouped convs + squeeze-excitation"),
        Entry("efficientnet", efficientnet, fixed, note="squeeze-excitation, depthwise"),
        # torchvision / timm idioms, hand-written
        Entry("tv_resnet_basic", _hand(hw.TVResNet, hw.BasicBlock), conv, note="out += identity, ReLU(inplace=True)"),
        Entry("tv_resnet_bottleneck", _hand(hw.TVResNet, hw.Bottleneck, (1, 1), (8, 8)), conv,
              note="out += identity, ReLU(inplace=True)"),
        Entry("tv_densenet", _hand(hw.DenseNet), conv, note="pre-activation dense blocks, cat of all earlier outputs"),
        Entry("tv_googlenet", _hand(hw.GoogLeNet), conv, note="four branches into cat"),
        Entry("mlp_mixer", _hand(hw.MLPMixer), fixed, note="token and channel MLPs with dropout"),
        Entry("timm_convnext", _hand(hw.TimmConvNeXt), conv, note="x.mul(gamma.reshape(1,-1,1,1)), x * gamma (NHWC)"),
        Entry("timm_poolformer", _hand(hw.TimmPoolFormer), conv, note="gamma.reshape(-1,1,1) * x"),
        *both_kernels("timm_cait", lambda a: hw.CaiT(fused=a == "sdpa"), fixed, "eager",
                      note="gamma * attn(x); timm Attention with fused_attn off (eager) / on (sdpa)"),
        # the smallest model of each failure class (see fixtures.py)
        Entry("fixture_cat_inplace_branches", _hand(fx.CatOfInplaceBranches), tiny),
        Entry("fixture_residual_mlp", _hand(fx.ResidualMLP, "plain"), vector_inputs(4), note="control"),
        Entry("fixture_residual_dropout", _hand(fx.ResidualMLP, "dropout"), vector_inputs(4)),
        Entry("fixture_residual_inplace_add", _hand(fx.ResidualMLP, "inplace"), vector_inputs(4)),
        Entry("fixture_inplace_residual_relu", _hand(fx.InplaceResidualRelu), tiny),
        *both_kernels("fixture_sdpa_block", lambda a: fx.SdpaBlock(fused=a == "sdpa"), token_features, "sdpa"),
        Entry("fixture_token_mlp", _hand(fx.TokenMLP), small_ids),
        Entry("fixture_preact_dense", _hand(fx.PreActDenseBlock), tiny),
        Entry("fixture_layer_scale_conv", _hand(fx.LayerScaleConv), tiny),
        Entry("fixture_pad_zero", _hand(fx.PadZero), tiny),
        Entry("fixture_addmm_mlp", _hand(fx.AddmmMLP), vector_inputs(4)),
        Entry("fixture_shape_arithmetic", _hand(fx.ShapeArithmeticBranch), vector_inputs(8)),
        Entry("fixture_channel_chunk", _hand(fx.ChannelChunkGate), tiny),
    ]


ZOO: dict[str, Entry] = {e.name: replace(e, slow=e.architecture in HEAVY) for e in _entries()}
