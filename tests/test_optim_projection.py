"""Half-space projection of DHSPG / H2SPG: zeroing before the deadline, processed directions,
candidate filters, bit-identical resume with the cost-saving intervals, and a step path that never
waits for the device."""
from __future__ import annotations

import contextlib
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_oto.optim import DHSPG, H2SPG, HESSO
from lightning_oto.space.groups import Group, ParamSlice


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- fixtures
class TinyCNN(nn.Module):
    def __init__(self, c1: int = 16, c2: int = 32) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.c2, self.b2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def cnn_groups(c1: int = 16, c2: int = 32) -> list[Group]:
    """One group per output channel (conv row + bias + BN affine), as the prune-mode search space builds."""
    gs = []
    for conv, bn, n in (("c1", "b1", c1), ("c2", "b2", c2)):
        for i in range(n):
            gs.append(Group(len(gs), f"{conv}[{i}]", [
                ParamSlice(f"{conv}.weight", 0, (i,)), ParamSlice(f"{conv}.bias", 0, (i,)),
                ParamSlice(f"{bn}.weight", 0, (i,)), ParamSlice(f"{bn}.bias", 0, (i,))]))
    return gs


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's real 8x8 digits, normalised, split 1400 train / 397 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
          seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_stats: bool) -> float:
    m = copy.deepcopy(model).train(batch_stats)
    return float((m(x).argmax(1) == y).float().mean())


def conv_batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def train_batches(model: nn.Module, opt: torch.optim.Optimizer, batches, start: int, stop: int) -> None:
    for x, y in batches[start:stop]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------------------- the acceptance test
@pytest.mark.parametrize("variant,lr", [("sgd", 0.1), ("adam", 3e-3)])
def test_default_settings_zero_by_half_space_before_deadline(variant, lr) -> None:
    """Real digits, tiny CNN, default projection settings: the half-space test does the zeroing.

    At least 80% of the redundant groups become exactly zero through the half-space test before the
    deadline (the deadline forces the rest), and the network does not collapse at the end of the
    projection, neither with batch statistics nor with the BatchNorm running statistics (before
    the fix, Adam's redundant groups stepped on the raw gradient and accuracy fell to about half).
    The second conv's channels are the candidates (the first, 16 channels of a 1-channel image, is
    kept, as pruning setups usually keep the stem).
    """
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(0)
    model = TinyCNN()
    W, P = 100, 200
    groups = [g for g in cnn_groups() if g.name.startswith("c2")]
    opt = DHSPG(model.named_parameters(), groups, lr=lr, variant=variant, warmup_steps=W,
                projection_steps=P, target_group_sparsity=0.5)
    train(model, opt, xtr, ytr, W)
    acc_warm = accuracy(model, xte, yte, batch_stats=False)
    K = len(opt.redundant_group_ids)
    assert K == 16
    train(model, opt, xtr, ytr, P, seed=1)
    assert opt.phase == "hybrid"
    assert opt.zero_group_ids() == opt.redundant_group_ids
    assert opt.zeroed_by_half_space + opt.forced_at_deadline == K
    assert opt.zeroed_by_half_space >= 0.8 * K, (opt.zeroed_by_half_space, opt.forced_at_deadline)
    early = [s for s in opt.zero_steps.values() if s < W + P]
    assert len(early) == opt.zeroed_by_half_space
    assert accuracy(model, xte, yte, batch_stats=True) >= 0.9
    assert accuracy(model, xte, yte, batch_stats=False) >= min(0.85, acc_warm - 0.05)
    sd = opt.state_dict()["oto"]
    assert (sd["zeroed_by_half_space"], sd["forced_at_deadline"]) == (opt.zeroed_by_half_space, opt.forced_at_deadline)


def test_hesso_keeps_its_shrink_schedule() -> None:
    """HESSO: no half-space test; every redundant group reaches zero exactly at its deadline."""
    torch.manual_seed(0)
    model = TinyCNN(4, 6)
    opt = HESSO(model.named_parameters(), cnn_groups(4, 6), lr=0.05, warmup_steps=3, projection_steps=10,
                target_group_sparsity=0.5)
    batches = conv_batches(16)
    train_batches(model, opt, batches, 0, 8)
    red = opt.index.mask_from_ids(opt.redundant_group_ids)
    assert opt.zero_group_ids() == [] and (opt.index.norms()[red] > 0).all()
    train_batches(model, opt, batches, 8, 16)
    assert opt.zero_group_ids() == opt.redundant_group_ids
    assert (opt.zeroed_by_half_space, opt.forced_at_deadline) == (0, 5)
    assert set(opt.zero_steps.values()) == {13}


# ---------------------------------------------------------------------------- size at the cut
@pytest.mark.parametrize("variant,lr", [("sgd", 0.1), ("adam", 1e-2), ("adamw", 1e-2)])
def test_redundant_groups_are_small_when_cut(variant, lr) -> None:
    """Issue 18: under SGD, Adam and AdamW every redundant group has faded when it is cut.

    The recorded ``|x_g| before the cut / |x_g| at selection`` has median <= 1e-2 and max <= 0.1
    (before the geometric schedule the half-space test cut groups at about a quarter of their size,
    and under AdamW the deadline forced most of them at full size), and the record resumes.
    """
    torch.manual_seed(0)
    model = TinyCNN(6, 8)
    kw = dict(lr=lr, variant=variant, weight_decay=1e-2 if variant == "adamw" else 0.0, warmup_steps=5,
              projection_steps=40, target_group_sparsity=0.5)
    opt = DHSPG(model.named_parameters(), cnn_groups(6, 8), **kw)
    batches = conv_batches(50)
    train_batches(model, opt, batches, 0, 50)
    ratios = opt.cut_norm_ratios()
    assert sorted(ratios) == opt.redundant_group_ids == opt.zero_group_ids() and len(ratios) == 7
    values = sorted(ratios.values())
    assert values[len(values) // 2] <= 1e-2 and values[-1] <= 0.1, values
    summary = opt.cut_norm_summary()
    assert summary["cut"] == 7 and summary["max"] == values[-1] and summary["above_0.1"] == 0
    assert summary["zeroed_by_half_space"] + summary["forced_at_deadline"] == 7
    twin = DHSPG(TinyCNN(6, 8).named_parameters(), cnn_groups(6, 8), **kw)
    twin.load_state_dict(opt.state_dict())
    assert twin.cut_norm_ratios() == ratios


def test_cut_ratio_records_what_was_cut() -> None:
    """The record is the truth, not the goal: a push too weak to shrink anything is recorded as
    groups forced at full size (ratio ~1), and HESSO's linear shrink over 10 steps as 1/10."""
    torch.manual_seed(0)
    model = TinyCNN(4, 6)
    opt = DHSPG(model.named_parameters(), cnn_groups(4, 6), lr=1e-6, lambda_scale=1e-9, warmup_steps=3,
                projection_steps=10, target_group_sparsity=0.5)
    train_batches(model, opt, conv_batches(14), 0, 14)
    assert opt.forced_at_deadline == 5 and opt.zeroed_by_half_space == 0
    assert all(abs(r - 1.0) < 1e-3 for r in opt.cut_norm_ratios().values())
    assert opt.cut_norm_summary()["above_0.1"] == 5
    model = TinyCNN(4, 6)
    opt = HESSO(model.named_parameters(), cnn_groups(4, 6), lr=1e-6, warmup_steps=3, projection_steps=10,
                target_group_sparsity=0.5)
    train_batches(model, opt, conv_batches(14), 0, 14)
    assert len(opt.cut_norm_ratios()) == 5
    assert all(abs(r - 0.1) < 1e-3 for r in opt.cut_norm_ratios().values()), opt.cut_norm_ratios()


# ---------------------------------------------------------------------------- processed direction
@pytest.mark.parametrize("variant,ref", [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3)),
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=1e-3)),
])
def test_redundant_groups_move_along_the_variants_direction(variant, ref) -> None:
    """A redundant row moves like the torch optimizer's step, damped by the row's norm relative to its
    norm at selection, plus the push along -x/|x|."""
    torch.manual_seed(0)
    model = TinyCNN(4, 6)
    twin = copy.deepcopy(model)
    lr = 0.05 if variant == "sgd" else 0.01
    opt = DHSPG(model.named_parameters(), cnn_groups(4, 6), lr=lr, variant=variant, weight_decay=1e-3,
                warmup_steps=3, projection_steps=400, target_group_sparsity=0.5, projection_interval=1)
    ref_opt = ref(twin.parameters())

    def vec(m: nn.Module, i: int) -> torch.Tensor:  # the variables of group 4 + i (second conv, channel i)
        return torch.cat([m.c2.weight[i].flatten(), m.c2.bias[i:i + 1], m.b2.weight[i:i + 1], m.b2.bias[i:i + 1]]).detach()

    selected = {}  # norm of each channel at the selection (after the third step)
    for step, (x, y) in enumerate(conv_batches(6)):
        before = [vec(model, i) for i in range(6)]
        if step == 3:
            selected = {i: float(before[i].norm()) for i in range(6)}
        for m, o in ((model, opt), (twin, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        red = {g - 4 for g in opt.redundant_group_ids if g >= 4}
        for i in range(6):
            d = (before[i] - vec(twin, i)) / lr  # the variant's processed step per unit lr
            want = before[i] - lr * d
            if i in red and step >= 3:  # adamw: d already holds the decoupled decay, as DHSPG's y does
                damp = min(1.0, float(before[i].norm()) / selected[i])  # the step fades with the group
                want = before[i] - lr * damp * d - lr * opt.lambdas[4 + i] * before[i] / before[i].norm()
            assert torch.allclose(vec(model, i), want, atol=1e-6), (variant, step, i)
        assert step < 3 or (red and (opt.lambdas[[4 + i for i in red]] > 0).all())
        twin.load_state_dict(model.state_dict())  # follow the projected iterate


# ---------------------------------------------------------------------------- candidate filter
def fixed(scores: list[float]):
    return lambda st: torch.tensor(scores, dtype=torch.float32)


def test_candidate_filter_is_greedy_by_saliency_and_warns_once() -> None:
    torch.manual_seed(0)
    model = TinyCNN(4, 6)
    calls: list[tuple[frozenset, int]] = []

    def at_most_one_from_first_layer(accepted: frozenset, cand: int) -> bool:
        calls.append((accepted, cand))
        return cand >= 4 or not any(a < 4 for a in accepted)

    scores = [0.1, 0.2, 0.3, 0.9, 0.15, 0.8, 0.25, 0.7, 0.6, 0.5]  # ascending: 0, 4, 1, 6, 2, 9, 8, ...
    opt = DHSPG(model.named_parameters(), cnn_groups(4, 6), lr=0.05, warmup_steps=2, projection_steps=4,
                target_group_sparsity=0.4, saliency=fixed(scores), candidate_filter=at_most_one_from_first_layer)
    train_batches(model, opt, conv_batches(2), 0, 2)
    assert opt.redundant_group_ids == [0, 4, 6, 9]  # 1 and 2 rejected (layer cap), greedily skipped
    assert calls[:3] == [(frozenset(), 0), (frozenset({0}), 4), (frozenset({0, 4}), 1)]
    # fewer than K acceptable: take what passes and warn once, over every selection period
    model = TinyCNN(4, 6)
    opt = DHSPG(model.named_parameters(), cnn_groups(4, 6), lr=0.05, warmup_steps=2, projection_steps=4,
                pruning_periods=2, target_group_sparsity=0.6, saliency=fixed(scores),
                candidate_filter=lambda acc, c: c in (2, 3))
    with pytest.warns(UserWarning, match="only 2 of the requested 3") as rec:
        train_batches(model, opt, conv_batches(8), 0, 8)
    assert len([w for w in rec if "requested" in str(w.message)]) == 1
    assert opt.redundant_group_ids == [2, 3] and opt.zero_group_ids() == [2, 3]


def test_h2spg_combines_hierarchy_check_and_candidate_filter() -> None:
    torch.manual_seed(0)
    model = TinyCNN(4, 6)
    scores = [0.1, 0.2, 0.3, 0.9, 0.15, 0.8, 0.25, 0.7, 0.6, 0.5]
    opt = H2SPG(model.named_parameters(), cnn_groups(4, 6), hierarchy_check=lambda acc, c: c != 4,
                candidate_filter=lambda acc, c: c != 0, lr=0.05, warmup_steps=2, projection_steps=4,
                target_group_sparsity=0.3, saliency=fixed(scores))
    train_batches(model, opt, conv_batches(2), 0, 2)
    assert opt.redundant_group_ids == [1, 2, 6]  # 0 (filter) and 4 (hierarchy) skipped
    with pytest.raises(ValueError, match="candidate_filter must be callable"):
        DHSPG(TinyCNN().named_parameters(), cnn_groups(), candidate_filter=3)


# ---------------------------------------------------------------------------- resume
def _build(cls, variant: str, seed: int, **kw):
    torch.manual_seed(seed)
    model = TinyCNN(4, 6)
    args = dict(lr=0.05 if variant == "sgd" else 0.01, variant=variant, warmup_steps=7, projection_steps=14,
                target_group_sparsity=0.5, weight_decay=1e-3, projection_interval=3, saliency_interval=2)
    args.update(kw)
    return model, cls(model.named_parameters(), cnn_groups(4, 6), **args)


@pytest.mark.parametrize("cls,variant", [(DHSPG, "sgd"), (H2SPG, "adam"), (DHSPG, "adamw"), (HESSO, "sgd")])
@pytest.mark.parametrize("split", [4, 7, 9, 11, 20, 22])
def test_resume_is_bit_identical_between_evaluations(cls, variant, split) -> None:
    """Splits inside the saliency / projection intervals, on selection and deadline steps: same bits."""
    total = 27
    batches = conv_batches(total, seed=1)
    ref_model, ref_opt = _build(cls, variant, 0)
    train_batches(ref_model, ref_opt, batches, 0, total)
    model, opt = _build(cls, variant, 0)
    train_batches(model, opt, batches, 0, split)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2, opt2 = _build(cls, variant, 123)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train_batches(model2, opt2, batches, split, total)
    for (n, p), q in zip(ref_model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n
    for a, b in ((ref_opt, opt2),):
        assert a.zero_steps == b.zero_steps and a.redundant_group_ids == b.redundant_group_ids
        assert (a.zeroed_by_half_space, a.forced_at_deadline) == (b.zeroed_by_half_space, b.forced_at_deadline)
        assert torch.equal(a.lambdas, b.lambdas) and torch.equal(a.saliency_scores, b.saliency_scores)
    assert ref_opt.zeroed_by_half_space + ref_opt.forced_at_deadline == 5


def test_state_dict_keeps_every_search_quantity() -> None:
    model, opt = _build(DHSPG, "sgd", 0)
    train_batches(model, opt, conv_batches(12), 0, 12)
    oto = opt.state_dict()["oto"]
    for key in ("num_steps", "selections_done", "saliency_ema", "redundant", "frozen", "deadline", "target",
                "lambdas", "push", "zero_how", "zero_step", "zeroed_by_half_space", "forced_at_deadline",
                "warned_short", "schedule"):
        assert key in oto, key
    assert isinstance(oto["zeroed_by_half_space"], int) and isinstance(oto["forced_at_deadline"], int)
    # a version-1 checkpoint (before the counters) still loads: its zero groups count as forced
    old = copy.deepcopy(opt.state_dict())
    for key in ("target", "push", "zero_how", "zero_step", "zeroed_by_half_space", "forced_at_deadline"):
        old["oto"].pop(key)
    old["oto"]["version"] = 1
    _, opt2 = _build(DHSPG, "sgd", 1)
    opt2.load_state_dict(old)
    assert opt2.forced_at_deadline == len(opt.index.ids_from_mask(opt._frozen))


# ---------------------------------------------------------------------------- no host synchronisation
_SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def no_host_sync():
    """Make every tensor -> host read raise (what would stall a CUDA stream)."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCS}

    def fail(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host synchronisation in the step path: Tensor.{name}")
        return f

    try:
        for name in _SYNCS:
            setattr(torch.Tensor, name, fail(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("cls,variant", [(DHSPG, "sgd"), (H2SPG, "adamw"), (HESSO, "adam")])
def test_step_path_never_waits_for_the_device(cls, variant) -> None:
    """Only the steps that change the redundant set (selection, deadline) may read device values."""
    torch.manual_seed(0)
    model = TinyCNN(4, 6)
    W, P = 6, 12
    kw = dict(hierarchy_check=lambda acc, c: True) if cls is H2SPG else {}
    opt = cls(model.named_parameters(), cnn_groups(4, 6), lr=0.05, variant=variant, warmup_steps=W,
              projection_steps=P, target_group_sparsity=0.5, projection_interval=2, saliency_interval=2, **kw)
    batches = conv_batches(W + P + 6)
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        ctx = contextlib.nullcontext() if t in (W - 1, W + P - 1) else no_host_sync()
        with ctx:
            opt.step()
    assert opt.phase == "hybrid" and len(opt.zero_group_ids()) == 5
    if cls is not HESSO:
        assert opt.zeroed_by_half_space + opt.forced_at_deadline == 5


def test_quiet_and_clear_errors() -> None:
    with pytest.raises(ValueError, match="schedule_fraction"):
        DHSPG(TinyCNN().named_parameters(), cnn_groups(), schedule_fraction=0.0)
    with pytest.raises(ValueError, match="lambda_max"):
        DHSPG(TinyCNN().named_parameters(), cnn_groups(), lambda_max=0.5)
    with pytest.raises(ValueError, match="projection_interval"):
        DHSPG(TinyCNN().named_parameters(), cnn_groups(), projection_interval=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = TinyCNN(4, 6)
        opt = DHSPG(model.named_parameters(), cnn_groups(4, 6), lr=0.05, warmup_steps=2, projection_steps=4)
        train_batches(model, opt, conv_batches(8), 0, 8)


# ---------------------------------------------------------------------------- GroupIndex building blocks
def test_products_and_row_factors_match_a_loop() -> None:
    """Row products over a subset of entries (fast path, dim-1 slices, float64, 0-d) and per-row factors."""
    from lightning_oto.optim.group_index import GroupIndex, RowFactors

    torch.manual_seed(0)
    params = {"a": torch.randn(5, 4, 3), "b": torch.randn(5), "c": torch.randn(3, 7).double(),
              "s": torch.randn(()), "u": torch.randn(2, 2)}
    groups = [
        Group(10, "g0", [ParamSlice("a", 0, (0, 2)), ParamSlice("b", 0, (0, 2)), ParamSlice("c", 1, (1,))]),
        Group(11, "g1", [ParamSlice("a", 0, (4,)), ParamSlice("c", 1, (0, 6)), ParamSlice("s", 0, None)]),
        Group(12, "g2", [ParamSlice("u", 0, None)]),
    ]
    idx = GroupIndex(params, groups)
    names = [e.name for e in idx.entries]
    sub = [i for i, n in enumerate(names) if n != "u"]  # g2 is left out: its sums must be zero
    d = {n: torch.randn_like(t) for n, t in params.items()}
    g = {n: torch.randn_like(t) for n, t in params.items()}
    got = idx.products({"d": [d[names[i]] for i in sub], "g": [g[names[i]] for i in sub]},
                       (("x", "x"), ("d", "x"), ("g", "d")), sub)

    def pick(t: torch.Tensor, s: ParamSlice) -> torch.Tensor:
        t = t.reshape(1) if t.dim() == 0 else t
        return (t if s.indices is None else t.index_select(s.dim, torch.tensor(s.indices))).flatten().double()

    for pos, grp in enumerate(groups[:2]):
        x = torch.cat([pick(params[s.name], s) for s in grp.slices])
        dd = torch.cat([pick(d[s.name], s) for s in grp.slices])
        gg = torch.cat([pick(g[s.name], s) for s in grp.slices])
        want = torch.stack([(x * x).sum(), (dd * x).sum(), (gg * dd).sum()]).float()
        assert torch.allclose(got[:, pos], want, rtol=1e-5, atol=1e-5), grp.name
    assert (got[:, 2] == 0).all()
    rows = RowFactors(idx, sub)
    rows.fill(torch.tensor([2.0, 3.0, 5.0]), default=7.0)
    by_name = dict(zip([names[i] for i in sub], rows.views))
    assert by_name["c"].dtype == torch.float64 and by_name["c"].shape == (1, 7)
    assert by_name["c"].flatten().tolist() == [3.0, 2.0, 7.0, 7.0, 7.0, 7.0, 3.0]
    assert by_name["a"].flatten().tolist() == [2.0, 7.0, 2.0, 7.0, 3.0]
    assert by_name["s"].shape == () and float(by_name["s"]) == 3.0
    params["s"].mul_(by_name["s"])  # 0-d parameters take their factor in place
