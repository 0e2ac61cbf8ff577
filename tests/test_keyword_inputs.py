"""Keyword (dict) inputs end to end, the usual Hugging Face style: ``OTO(model, {"input_ids": ids,
"attention_mask": mask})`` means ``model(**inputs)``. Trace, construction in both modes verified on another
batch size and sequence length, export (.pt2 + ONNX named after the keys), ``lightning_oto.load`` in a fresh
process with the same keywords, and a Lightning fit on a dict-batch datamodule without ``example_input_array``."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_oto
from lightning_oto import OTO, OTOCallback
from lightning_oto.errors import DynamicShapeError
from lightning_oto.lightning.checkpointing import apply_subnet_payload, subnet_payload
from lightning_oto.subnet.recalibrate import batch_inputs
from lightning_oto.subnet.verify import tensor_leaves

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 100
CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
              max_position_embeddings=64)


def tokens(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """A batch as a tokenizer gives it: ids and a padding mask (the last sample padded)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=g), "attention_mask": mask}


def tiny_bert(cls: type | None = None, **extra) -> nn.Module:
    torch.manual_seed(0)
    model = (cls or transformers.BertModel)(transformers.BertConfig(**CONFIG, **extra), )
    with torch.no_grad():  # perturbed: untrained norms and biases would hide wrong slicing
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def leaves(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return tensor_leaves(model(**inputs))


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-4) -> None:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    assert max(float((x - y).abs().max()) for x, y in zip(a, b)) <= atol


EXAMPLE, OTHER = tokens(2, 8, seed=1), tokens(3, 5, seed=2)  # OTHER: another batch size and sequence length


_COMPRESSED: dict[str, tuple] = {}


def compress(mode: str) -> tuple:
    """(mode, model, oto, sub): tiny BERT on keyword inputs, half its groups removed; built once per mode."""
    if mode not in _COMPRESSED:
        model = tiny_bert()
        oto = OTO(model, EXAMPLE, mode=mode)
        assert oto.dynamic_dims == [[0, 1], [0, 1]]  # batch and sequence length of both keyword inputs
        assert oto.random_set_zero_groups(fraction=0.5, seed=0)
        sub = oto.construct_subnet(verify_inputs=[OTHER]).eval()
        _COMPRESSED[mode] = (mode, model, oto, sub)
    return _COMPRESSED[mode]


@pytest.fixture(params=["prune", "erase"])
def compressed(request):
    return compress(request.param)


def test_subnetwork_equals_full_model_on_keyword_inputs(compressed):
    mode, model, oto, sub = compressed
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    for inputs in (EXAMPLE, OTHER):
        assert_same(leaves(sub, inputs), leaves(model, inputs))
    rep = oto.compression_report(sub)  # FLOPs counted with model(**inputs)
    assert rep["flops_sub"] < rep["flops_full"]


def test_checkpoint_payload_rebuilds_the_erased_network_from_keyword_shapes(compressed):
    mode, model, oto, sub = compressed
    if mode != "erase":
        pytest.skip("prune checkpoints record a removal plan, not inputs")
    payload = json.loads(json.dumps(subnet_payload(oto, oto.zero_group_ids(), "net", sub)))  # as a checkpoint has it
    assert payload["example_inputs"] == {"input_ids": [[2, 8], "int64"], "attention_mask": [[2, 8], "int64"]}
    holder = nn.Module()
    holder.net = tiny_bert()
    assert apply_subnet_payload(holder, payload)
    rebuilt = {k: tuple(v.shape) for k, v in holder.net.state_dict().items()}
    assert rebuilt == {k: tuple(v.shape) for k, v in sub.state_dict().items()}


#: loads every file of an export in a fresh Python process and calls it with the same keywords
LOAD_IN_FRESH_PROCESS = """
import json, sys, torch, lightning_oto
out, inputs = sys.argv[1], torch.load(sys.argv[2])
result = {}
for name in sys.argv[3:]:
    model = lightning_oto.load(out + "/" + name)
    with torch.no_grad():
        y = model(**inputs)
    y = list(y.values()) if isinstance(y, dict) else list(y) if isinstance(y, (tuple, list)) else [y]
    result[name] = {"outputs": [t.tolist() for t in y], "inputs": model.oto_metadata["inputs"],
                    "call": model.oto_metadata["call"]}
print(json.dumps(result))
"""


def test_export_loads_in_a_fresh_process_with_the_same_keywords(tmp_path):
    """Both modes' exports load in one fresh process (one interpreter start) and take the same keywords."""
    files, expected = [], {}
    for mode in ("prune", "erase"):
        _, model, oto, sub = compress(mode)
        formats = ("torch", "onnx") if mode == "erase" else ("torch",)  # ONNX once: it is the slow exporter
        paths = oto.export(sub, tmp_path / mode, formats=formats)
        names = [f"{mode}/subnet.pt2"] + ([f"{mode}/subnet.onnx"] if "onnx" in formats else [])
        if "onnx" in formats:
            import onnx

            proto = onnx.load(str(tmp_path / mode / "subnet.onnx"))
            assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
            assert float(paths["onnx_check_error"]) <= 1e-4
        expected.update({name: leaves(sub, OTHER) for name in names})
        assert_same(leaves(sub, OTHER), leaves(model, OTHER))
        files += names
    torch.save(OTHER, tmp_path / "other.pt")
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(tmp_path), str(tmp_path / "other.pt"),
                           *files], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(loaded) == sorted(files) and len(files) == 3
    for name in files:
        assert_same([torch.tensor(t) for t in loaded[name]["outputs"]], expected[name])
        assert loaded[name]["call"] == "keywords"
        assert [(i["name"], i["shape"], i["example_shape"], i["dtype"]) for i in loaded[name]["inputs"]] == [
            ("input_ids", [None, None], [2, 8], "int64"), ("attention_mask", [None, None], [2, 8], "int64")]


class DictBatchNet(nn.Module):
    """``forward(self, batch)`` taking one dict: given as ``OTO(model, (batch,))``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 3))

    def forward(self, batch: dict) -> torch.Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1)
        return self.mlp(pooled)


def test_forward_taking_a_dict_is_a_positional_dict(tmp_path):
    torch.manual_seed(0)
    net = DictBatchNet().eval()
    oto = OTO(net, (EXAMPLE,), mode="prune")
    assert oto.dynamic_dims == [[0, 1], [0, 1]]
    assert oto.random_set_zero_groups(fraction=0.5, seed=0)
    sub = oto.construct_subnet(verify_inputs=[(OTHER,)])
    assert sub.mlp[0].out_features < 24
    oto.export(sub, tmp_path, formats=("torch",))
    loaded = lightning_oto.load(tmp_path)
    assert [i["name"] for i in loaded.oto_metadata["inputs"]] == ["input_ids", "attention_mask"]
    reordered = {"attention_mask": OTHER["attention_mask"], "input_ids": OTHER["input_ids"]}
    with torch.no_grad():
        assert torch.allclose(sub(OTHER), net(OTHER), atol=1e-5)
        assert torch.allclose(loaded(reordered), net(OTHER), atol=1e-5)


class FlatKeywords(nn.Module):
    """Keyword inputs whose sequence length a linear over the flattened tokens pins."""

    def __init__(self, length: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)
        self.head = nn.Linear(4 * length, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(x.flatten(1))


def test_dynamic_shapes_by_input_name():
    net = FlatKeywords().eval()
    auto = torch.export.Dim.AUTO
    oto = OTO(net, EXAMPLE, dynamic_shapes={"input_ids": {0: auto}, "attention_mask": {0: auto}})
    assert oto.dynamic_dims == [[0], [0]]
    assert OTO(net, EXAMPLE).dynamic_dims == [[0], [0]]  # "auto": the pinned length quietly stays static
    with pytest.raises(DynamicShapeError, match="input 'input_ids' dimension 1 is fixed to 8"):
        seq = torch.export.Dim("seq", min=2, max=32)
        OTO(net, EXAMPLE, dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})


@pytest.mark.parametrize("value, kind", [(None, "NoneType"), (True, "bool"), (3, "int")])
def test_a_constant_in_the_dict_is_a_clear_error(value, kind):
    model = tiny_bert()
    with pytest.raises(TypeError, match=rf"example_inputs\['output_attentions'\] is a {kind}.*constant argument"):
        OTO(model, {**EXAMPLE, "output_attentions": value})


def test_bad_dicts_are_clear_errors():
    model = tiny_bert()
    with pytest.raises(ValueError, match="empty dict"):
        OTO(model, {})
    with pytest.raises(TypeError, match="name of a keyword argument"):
        OTO(model, {0: EXAMPLE["input_ids"]})


def test_verify_inputs_must_have_the_example_form(compressed):
    _, _, oto, sub = compressed
    with pytest.raises(ValueError, match="verify_inputs\\[0\\] must have the example input's form"):
        oto.construct_subnet(verify_inputs=[{"input_ids": OTHER["input_ids"]}])  # a key missing
    with pytest.raises(ValueError, match="must have the example input's form"):
        oto.verify(sub, (OTHER["input_ids"],))


def test_dict_batches_resolve_by_the_forward_signature():
    batch = {**tokens(4, 6, seed=3), "labels": torch.zeros(4, dtype=torch.long)}
    hf = tiny_bert(transformers.BertForSequenceClassification, num_labels=2)
    inputs = batch_inputs(batch, hf)  # keywords the forward takes; labels are a training target, not an input
    assert isinstance(inputs, dict) and list(inputs) == ["input_ids", "attention_mask"]
    inputs = batch_inputs(batch, DictBatchNet())  # forward(self, batch): the dict as one argument
    assert isinstance(inputs, tuple) and len(inputs) == 1 and list(inputs[0]) == ["input_ids", "attention_mask"]

    class TwoArgs(nn.Module):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return ids * mask

    with pytest.raises(TypeError, match="give the example input explicitly"):
        batch_inputs(batch, TwoArgs())
    with pytest.raises(TypeError, match=r"keys \['row_id'\], which FlatKeywords.forward"):
        batch_inputs({**batch, "row_id": torch.arange(4)}, FlatKeywords())  # one key the forward does not take


# ---------------------------------------------------------------------------------------------- Lightning
class TokenData(Dataset):
    """Tokenised sentences as dicts (a collated batch is a dict with labels, as a Hugging Face collator gives)."""

    def __init__(self, n: int = 32, length: int = 8) -> None:
        data = tokens(n, length, seed=4)
        self.items = [{k: v[i] for k, v in data.items()} for i in range(n)]
        for i, item in enumerate(self.items):
            item["labels"] = torch.tensor(int(item["input_ids"][:4].sum()) % 2)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class TokenDataModule(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TokenData(), batch_size=8)


class LitClassifier(L.LightningModule):
    """``self.model(**batch)``, no ``example_input_array``: the callback takes the example from a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert(transformers.BertForSequenceClassification, num_labels=2).train()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_lightning_fit_on_dict_batches_compresses(tmp_path):
    cb = OTOCallback(mode="prune", network_attr="model", target_group_sparsity=0.5, warmup_steps=2,
                     projection_steps=4, export_formats=("torch",), export_dir=tmp_path / "oto")
    trainer = L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_steps=8, callbacks=[cb],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(LitClassifier(), datamodule=TokenDataModule())
    inputs = cb.oto.example_inputs
    assert isinstance(inputs, dict) and list(inputs) == ["input_ids", "attention_mask"]  # labels left out
    assert inputs["input_ids"].shape == (2, 8)
    assert cb.oto.zero_group_ids()
    full, sub = cb.network.eval(), cb.subnet.eval()
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in full.parameters())
    assert_same(leaves(sub, OTHER), leaves(full, OTHER))
    meta = json.loads((tmp_path / "oto" / "metadata.json").read_text())
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"] and meta["call"] == "keywords"
