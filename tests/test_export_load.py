"""Exported sub-networks load back with ``lightning_oto.load`` and compute what the sub-network computes.

A tiny CNN (stem, two conv-bn branches into an add, dropout, linear head) is compressed in prune and
erase mode with random zero groups, exported, and loaded from the directory, the ``.pt2`` program and
the ``.onnx`` file. The README's "Load and predict" code runs verbatim in a fresh interpreter.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_oto
from lightning_oto import OTO
from lightning_oto.errors import DynamicShapeError
from lightning_oto.subnet.load import METADATA_FILE, OnnxModule
from lightning_oto.data.inference import inference_metadata
from lightning_oto.subnet.export import export_subnet

REPO = Path(__file__).resolve().parents[1]
README_PATH = "outputs/default/2026-01-01_12-00-00/oto"  # the placeholder path in README's example


class TinyNet(nn.Module):
    def __init__(self, in_ch: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.b2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.b1(h) + self.b2(h))
        return self.head(self.drop(h.mean((2, 3))))


def _with_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so eval and train mode differ."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def compressed(mode: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = _with_statistics(TinyNet())
    x = torch.randn(2, 1, 8, 8)
    oto = OTO(net, x, mode=mode)
    zero = oto.random_set_zero_groups(fraction=0.5, seed=0)
    sub = oto.construct_subnet().eval()
    assert zero and sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in net.parameters())
    return net, sub, x


@pytest.fixture(scope="module", params=["prune", "erase"])
def exported(request, tmp_path_factory):
    net, sub, x = compressed(request.param)
    out = tmp_path_factory.mktemp(f"export_{request.param}")
    meta = {"mean": [0.5], "std": [0.25], "class_names": [str(i) for i in range(10)]}
    paths = export_subnet(sub, x, out, metadata=meta)
    return request.param, net, sub, out, paths, meta


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("source", ["dir", "subnet.pt2", "subnet.onnx"])
def test_load_gives_the_subnetwork(exported, source):
    mode, _, sub, out, _, _ = exported
    model = lightning_oto.load(out if source == "dir" else out / source)
    assert isinstance(model, nn.Module) and not model.training
    assert isinstance(model, OnnxModule) == (source == "subnet.onnx")
    x = torch.randn(5, 1, 8, 8)  # another batch size than the example's
    assert torch.allclose(outputs(model, x), outputs(sub, x), atol=1e-5)


def test_program_switches_modes_like_the_network(exported):
    """train() is real: batch statistics and dropout, as in the network the program came from.

    The reference in train mode is the prune sub-network (the user's class) or, in erase mode, the full
    model with its zero groups (same head width, so the same dropout mask): an erased GraphModule keeps
    its dropouts in eval mode.
    """
    mode, net, sub, out, _, _ = exported
    model = lightning_oto.load(out / "subnet.pt2")
    reference = copy.deepcopy(sub if mode == "prune" else net)
    x = torch.randn(6, 1, 8, 8)
    assert model.train() is model and model.training
    reference.train()
    torch.manual_seed(1)
    y_model = model(x)
    torch.manual_seed(1)
    y_ref = reference(x)
    assert torch.allclose(y_model, y_ref, atol=1e-5)
    model.eval()
    reference.eval()
    assert not torch.allclose(outputs(model, x), y_model.detach(), atol=1e-3)  # the mode switch is real
    assert torch.allclose(outputs(model, x), outputs(reference, x), atol=1e-5)  # running statistics updated alike
    model.train()
    model(x).square().mean().backward()  # trainable
    assert all(p.grad is not None for p in model.parameters())
    assert model.to("cpu") is model and model.to(torch.float64)(x.double()).dtype == torch.float64


def test_onnx_module_accepts_module_calls(exported):
    _, _, sub, out, _, _ = exported
    model = lightning_oto.load(out / "subnet.onnx")
    assert model.train() is model and model.eval() is model and model.to("cpu") is model
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(outputs(model, x), outputs(sub, x), atol=1e-5)


def test_state_dict_has_an_architecture_to_load_into(exported):
    mode, net, sub, out, _, _ = exported
    x = torch.randn(4, 1, 8, 8)
    state = torch.load(out / "subnet_state_dict.pt", weights_only=True)
    if mode == "prune":  # the user's class, shrunk to the saved shapes
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        model = lightning_oto.load(out / "subnet_state_dict.pt", model=net)
        assert type(model) is TinyNet and model is not net
        assert {k: v.shape for k, v in net.state_dict().items()} == shapes  # the passed model is untouched
        assert lightning_oto.load(out, model=net).state_dict().keys() == state.keys()
    else:  # erase: the keys are those of the module load(dir) returns
        model = lightning_oto.load(out)
        model.load_state_dict(state, strict=True)
    model.eval()
    assert torch.allclose(outputs(model, x), outputs(sub, x), atol=1e-5)


def test_onnx_is_one_file(exported):
    _, _, sub, out, paths, _ = exported
    import onnx

    assert not list(out.glob("*.data"))
    proto = onnx.load(str(out / "subnet.onnx"), load_external_data=False)
    assert all(not init.external_data for init in proto.graph.initializer)
    onnx.checker.check_model(proto)
    weight_bytes = sum(p.numel() * p.element_size() for p in sub.parameters())
    assert (out / "subnet.onnx").stat().st_size > weight_bytes
    assert float(paths["onnx_check_error"]) <= 1e-4 and float(paths["program_check_error"]) <= 1e-4


def test_metadata_round_trip(exported, tmp_path):
    _, _, sub, out, _, meta = exported
    # the dynamic batch is null; example_shape is the example's, a shape that runs (README "Load and predict")
    expected_inputs = [{"name": "input_0", "shape": [None, 1, 8, 8], "example_shape": [2, 1, 8, 8],
                        "dtype": "float32"}]
    assert meta == {"mean": [0.5], "std": [0.25], "class_names": [str(i) for i in range(10)]}  # not modified
    for name in ("subnet.pt2", "subnet.onnx"):  # a file copied on its own keeps its metadata
        shutil.copy(out / name, tmp_path / name)
        got = lightning_oto.load(tmp_path / name).oto_metadata
        assert {k: got[k] for k in meta} == meta and got["inputs"] == expected_inputs
        assert got["call"] == "positional"
    assert not (tmp_path / METADATA_FILE).exists()
    on_disk = json.loads((out / METADATA_FILE).read_text())
    assert on_disk == lightning_oto.load(out).oto_metadata
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert set(manifest["files"]) == {"subnet.pt2", "subnet.onnx", "subnet_state_dict.pt", "metadata.json",
                                      "export_manifest.json"}


def test_bad_metadata_and_paths_give_clear_errors(tmp_path):
    _, sub, x = compressed("prune")
    with pytest.raises(ValueError, match="reserved"):
        export_subnet(sub, x, tmp_path / "a", metadata={"inputs": [1]})
    with pytest.raises(ValueError, match="JSON"):
        export_subnet(sub, x, tmp_path / "b", metadata={"mean": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lightning_oto.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no subnet.pt2 or subnet.onnx"):
        lightning_oto.load(tmp_path)
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(ValueError, match=r"cannot load a \.txt file"):
        lightning_oto.load(tmp_path / "model.txt")
    torch.save(sub.state_dict(), tmp_path / "subnet_state_dict.pt")
    with pytest.raises(FileNotFoundError, match="model=YourNet"):
        lightning_oto.load(tmp_path)
    with pytest.raises(ValueError, match="weights only"):
        lightning_oto.load(tmp_path / "subnet_state_dict.pt")
    with pytest.raises(ValueError, match="same architecture"):
        lightning_oto.load(tmp_path / "subnet_state_dict.pt", model=TinyNet(num_classes=3))


def test_reexport_drops_stale_files(tmp_path):
    _, sub, x = compressed("erase")
    (tmp_path / "subnet.onnx.data").write_bytes(b"old weights")
    export_subnet(sub, x, tmp_path, formats=("torch", "onnx"))
    assert not (tmp_path / "subnet.onnx.data").exists()
    export_subnet(sub, x, tmp_path, formats=("onnx",))
    assert not (tmp_path / "subnet.pt2").exists() and isinstance(lightning_oto.load(tmp_path), OnnxModule)


class FlatHead(nn.Module):
    """Flatten into a linear layer: the image size is fixed by the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_dynamic_shapes_are_passed_to_torch_export(tmp_path):
    _, sub, x = compressed("prune")
    auto = torch.export.Dim.AUTO
    export_subnet(sub, x, tmp_path, dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    assert lightning_oto.load(tmp_path).oto_metadata["inputs"][0]["shape"] == [None, 1, None, None]
    big = torch.randn(3, 1, 12, 10)  # another image size than the example's
    for name in ("subnet.pt2", "subnet.onnx"):
        assert torch.allclose(outputs(lightning_oto.load(tmp_path / name), big), outputs(sub, big), atol=1e-5)
    export_subnet(sub, x, tmp_path / "auto", dynamic_shapes="auto")  # every dimension the model lets vary
    assert lightning_oto.load(tmp_path / "auto").oto_metadata["inputs"][0]["shape"] == [None, 1, None, None]
    with pytest.raises(DynamicShapeError, match="dynamic_shapes"):
        export_subnet(FlatHead(), torch.randn(2, 1, 8, 8), tmp_path / "flat",
                      dynamic_shapes=({2: torch.export.Dim("height", min=4, max=64)},))


# ---- README "Load and predict", run verbatim in a fresh interpreter ---------------------------------
def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- load-and-predict -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its 'Load and predict' example (marker <!-- load-and-predict -->)"
    return m.group(1)


def _train(model: nn.Module, loader, epochs: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()


def test_readme_load_and_predict_reproduces_test_accuracy(tmp_path):
    """Train on real digits, compress, export with the datamodule's metadata; the README's code, fed the raw
    test images, must predict what the in-process sub-network predicts on the datamodule's test split."""
    import numpy as np
    from sklearn.datasets import load_digits

    from lightning_oto.data import build_datamodule, split_indices

    torch.manual_seed(0)
    dm = build_datamodule("digits", batch_size=64, seed=0)
    dm.setup()
    net = TinyNet(in_ch=1, num_classes=10, width=12)
    _train(net, dm.train_dataloader(), epochs=4)
    oto = OTO(net, torch.randn(2, 1, 8, 8), mode="prune")
    assert oto.random_set_zero_groups(fraction=0.3, seed=0)
    sub = oto.construct_subnet()
    _train(sub, dm.train_dataloader(), epochs=2)  # recover from the random removal
    sub.eval()
    xs, ys = zip(*dm.test_dataloader())
    expected = torch.cat([outputs(sub, xb).argmax(1) for xb in xs])
    labels = torch.cat(ys)
    accuracy = float((expected == labels).float().mean())
    assert accuracy > 0.6, accuracy  # a real classifier, so matching predictions means something
    export_subnet(sub, torch.randn(2, 1, 8, 8), tmp_path / "oto", metadata=inference_metadata(dm))

    # the raw test images (floats in [0, 1], as the README asks), in the datamodule's split order
    d = load_digits()
    _, _, test_idx = split_indices(len(d.target), [1 - dm.val_fraction - dm.test_fraction, dm.val_fraction], dm.seed)
    raw = torch.from_numpy((d.images[test_idx.numpy(), None] / 16.0).astype(np.float32))
    assert torch.equal(torch.from_numpy(d.target[test_idx.numpy()]), labels)
    torch.save(raw, tmp_path / "raw.pt")

    code = readme_example()
    assert README_PATH in code and "images = " in code
    code = code.replace(README_PATH, str(tmp_path / "oto"))
    code = re.sub(r"^images = .*$", f"images = torch.load({str(tmp_path / 'raw.pt')!r})", code, count=1, flags=re.M)
    code += "\nimport json; print('PRED', json.dumps(pred.tolist()))\n"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("PRED "))
    got = torch.tensor(json.loads(line[5:]))
    assert torch.equal(got, expected)
    assert float((got == labels).float().mean()) == accuracy
