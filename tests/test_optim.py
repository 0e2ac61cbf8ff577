"""Tests of lightning_oto.optim: GroupIndex, saliency registry, DHSPG / H2SPG / HESSO."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn

from lightning_oto.optim import (
    DHSPG,
    H2SPG,
    HESSO,
    GroupIndex,
    available_saliencies,
    get_saliency,
    register_saliency,
)
from lightning_oto.optim import saliency as saliency_mod
from lightning_oto.space.groups import Group, ParamSlice

ALL = (DHSPG, H2SPG, HESSO)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add latency (and thrash on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- fixtures
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.b2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def conv_groups(prunable_last: bool = True) -> list[Group]:
    """One group per output channel: conv row + conv bias + bn weight/bias entries."""
    gs = []
    gid = 0
    for conv, bn, n in (("c1", "b1", 8), ("c2", "b2", 6)):
        for i in range(n):
            sl = [ParamSlice(f"{conv}.weight", 0, (i,)), ParamSlice(f"{conv}.bias", 0, (i,)),
                  ParamSlice(f"{bn}.weight", 0, (i,)), ParamSlice(f"{bn}.bias", 0, (i,))]
            gs.append(Group(gid, f"{conv}[{i}]", sl))
            gid += 1
    # a non-prunable group (never zeroed)
    gs.append(Group(gid, "fc", [ParamSlice("fc.weight", 0, None)], prunable=False, reason="output"))
    return gs


class MLP(nn.Module):
    def __init__(self, hidden: int = 12) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, hidden)
        self.l2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def mlp_groups(hidden: int = 12) -> list[Group]:
    return [Group(i, f"h{i}", [ParamSlice("l1.weight", 0, (i,)), ParamSlice("l1.bias", 0, (i,))])
            for i in range(hidden)]


def conv_batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def mlp_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 6, generator=g)
    w = torch.randn(6, 2, generator=g)
    return x, torch.sin(x @ w)


def train_conv(model: nn.Module, opt: torch.optim.Optimizer, batches, start: int = 0, steps: int | None = None) -> list[float]:
    losses = []
    end = len(batches) if steps is None else start + steps
    for x, y in batches[start:end]:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_mlp(model: nn.Module, opt: torch.optim.Optimizer, steps: int, data) -> list[float]:
    x, y = data
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def group_values(model: nn.Module, groups: list[Group]) -> dict[int, torch.Tensor]:
    p = dict(model.named_parameters())
    out = {}
    for g in groups:
        vals = []
        for s in g.slices:
            t = p[s.name].detach()
            vals.append((t if s.indices is None else t.index_select(s.dim, torch.tensor(s.indices))).flatten())
        out[g.id] = torch.cat(vals).clone()
    return out


# ---------------------------------------------------------------------------- GroupIndex
def test_group_index_stats_match_loop() -> None:
    torch.manual_seed(0)
    params = {
        "a": torch.randn(5, 4, 3),
        "b": torch.randn(5),
        "c": torch.randn(3, 7),  # sliced along dim 1
        "d": torch.randn(2, 2),  # whole tensor
    }
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    groups = [
        Group(10, "g0", [ParamSlice("a", 0, (0, 2)), ParamSlice("b", 0, (0, 2)), ParamSlice("c", 1, (1,))]),
        Group(11, "g1", [ParamSlice("a", 0, (4,)), ParamSlice("c", 1, (0, 6))]),
        Group(12, "g2", [ParamSlice("d", 0, None)]),
        Group(13, "g3", [ParamSlice("b", 0, (3,))]),
    ]
    idx = GroupIndex(params, groups)
    order = [e.name for e in idx.entries]
    st = idx.stats([grads[n] for n in order])
    for pos, g in enumerate(groups):
        xs, gs = [], []
        for s in g.slices:
            sel = (lambda t: t.flatten()) if s.indices is None else (lambda t, s=s: t.index_select(s.dim, torch.tensor(s.indices)).flatten())
            xs.append(sel(params[s.name]))
            gs.append(sel(grads[s.name]))
        x, gr = torch.cat(xs), torch.cat(gs)
        assert torch.allclose(st.x_norm_sq[pos], (x * x).sum(), rtol=1e-5)
        assert torch.allclose(st.grad_norm_sq[pos], (gr * gr).sum(), rtol=1e-5)
        assert torch.allclose(st.dot[pos], (x * gr).sum(), rtol=1e-5, atol=1e-6)
        assert st.numel[pos].item() == x.numel()
    # yardstick: rows at their parameter's mean squared row norm
    ref = torch.zeros(4)
    for pos, g in enumerate(groups):
        for sl in g.slices:
            t = params[sl.name]
            rows = t.movedim(sl.dim, 0).reshape(t.shape[sl.dim], -1)
            mean = (rows * rows).sum(1).mean()
            ref[pos] += mean * (t.shape[sl.dim] if sl.indices is None else len(sl.indices))
    assert torch.allclose(st.x_ref_sq, ref, rtol=1e-5)
    # zero_ touches exactly the groups asked for, nothing else
    before = {k: v.clone() for k, v in params.items()}
    idx.zero_(idx.mask_from_ids([10, 12]))
    assert idx.ids_from_mask(idx.is_zero()) == [10, 12]
    assert torch.equal(params["a"][1], before["a"][1]) and torch.equal(params["a"][4], before["a"][4])
    assert torch.equal(params["c"][:, 0], before["c"][:, 0]) and (params["c"][:, 1] == 0).all()
    # scale_
    idx.scale_(torch.tensor([1.0, 2.0, 1.0, 0.5]))
    assert torch.equal(params["a"][4], 2 * before["a"][4])
    assert torch.equal(params["b"][3], 0.5 * before["b"][3])
    assert torch.equal(params["b"][1], before["b"][1])  # unowned entry untouched


def test_group_index_missing_grads_and_noncontiguous() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 2)
    wt = torch.randn(3, 4, 2).transpose(0, 1)  # non-contiguous, sliced along dim 0
    b = torch.randn(4)
    groups = [Group(i, f"g{i}", [ParamSlice("w", 0, (i,)), ParamSlice("wt", 0, (i,)), ParamSlice("b", 0, (i,))])
              for i in range(4)]
    idx = GroupIndex({"w": w, "wt": wt, "b": b}, groups)
    gw = torch.randn_like(w)
    grads = {"w": gw, "wt": None, "b": None}
    st = idx.stats([grads[e.name] for e in idx.entries])
    for i in range(4):
        x = torch.cat([w[i].flatten(), wt[i].flatten(), b[i:i + 1]])
        assert torch.allclose(st.x_norm_sq[i], (x * x).sum(), rtol=1e-5)
        assert torch.allclose(st.grad_norm_sq[i], (gw[i] ** 2).sum(), rtol=1e-5)
        assert torch.allclose(st.dot[i], (gw[i] * w[i]).sum(), rtol=1e-5, atol=1e-6)


def test_group_index_rejects_bad_groups() -> None:
    params = {"w": torch.zeros(4, 3), "v": torch.zeros(4)}
    with pytest.raises(ValueError, match="not disjoint"):
        GroupIndex(params, [Group(0, "a", [ParamSlice("w", 0, (0, 1))]), Group(1, "b", [ParamSlice("w", 0, (1,))])])
    with pytest.raises(ValueError, match="same dim"):
        GroupIndex(params, [Group(0, "a", [ParamSlice("w", 0, (0,))]), Group(1, "b", [ParamSlice("w", 1, (1,))])])
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        GroupIndex(params, [Group(0, "a", [ParamSlice("nope", 0, (0,))])])
    with pytest.raises(ValueError, match="out of range"):
        GroupIndex(params, [Group(0, "a", [ParamSlice("v", 0, (9,))])])


# ---------------------------------------------------------------------------- phases / exact sparsity
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("target", [0.25, 0.5])
def test_exact_k_zero_groups_and_stay_zero(cls, target) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    groups = conv_groups()
    W, P = 6, 8
    opt = cls(model.named_parameters(), groups, lr=0.05, warmup_steps=W, projection_steps=P,
              target_group_sparsity=target, weight_decay=1e-4)
    batches = conv_batches(W + P + 15)
    assert opt.phase == "warmup"
    train_conv(model, opt, batches, 0, W)
    assert opt.phase == "projection"
    K = round(target * 14)
    assert len(opt.redundant_group_ids) == K == opt.num_redundant_target
    train_conv(model, opt, batches, W, P)
    assert opt.phase == "hybrid"
    zero = opt.zero_group_ids()
    assert zero == opt.redundant_group_ids and len(zero) == K
    assert opt.group_sparsity() == pytest.approx(K / 14)
    before = group_values(model, groups)
    train_conv(model, opt, batches, W + P, 15)
    after = group_values(model, groups)
    assert opt.zero_group_ids() == zero
    for gid in zero:
        assert (after[gid] == 0).all()
    important = [g.id for g in groups if g.id not in zero]
    for gid in important:
        assert not torch.equal(before[gid], after[gid]), f"important group {gid} did not train"
    # every redundant group became zero one way or the other, and the counters say which
    assert opt.zeroed_by_half_space + opt.forced_at_deadline == K
    assert sorted(opt.zero_steps) == zero and all(W < s <= W + P for s in opt.zero_steps.values())


def test_projection_zero_with_no_projection_window_and_no_warmup() -> None:
    torch.manual_seed(0)
    model = ConvNet()
    opt = DHSPG(model.named_parameters(), conv_groups(), lr=0.05, warmup_steps=0, projection_steps=0,
                target_group_sparsity=0.5)
    assert opt.phase == "warmup"
    train_conv(model, opt, conv_batches(1), 0, 1)
    assert opt.phase == "hybrid"
    assert len(opt.zero_group_ids()) == 7


def test_half_space_zeroes_before_deadline() -> None:
    """Zero-gradient groups follow the base lambda to their target; the half-space test zeroes them early.

    Window 40 steps, target half-way (step 3 + 20 = 23).  The base push shrinks a group geometrically
    to fade_ratio = 1e-3 of its selection norm by the target, so after t steps the ratio is
    1e-3^(t/20).  The half-space test may cut it once the ratio is <= cut_ratio = 1e-2, i.e. from
    t = 14 (ratio 1e-3^0.7 = 7.9e-3), six steps before the target and 26 before the deadline.
    """
    torch.manual_seed(0)
    model = MLP()
    groups = mlp_groups()
    # three dead hidden units: the (frozen) output layer ignores them, so their gradient is exactly 0
    with torch.no_grad():
        model.l1.weight[:3] *= 1e-3
        model.l2.weight[:, :3] = 0.0
    model.l2.weight.requires_grad_(False)
    opt = DHSPG(model.named_parameters(), groups, lr=0.05, warmup_steps=3, projection_steps=40,
                target_group_sparsity=0.25, epsilon=0.9, momentum=0.0)
    train_mlp(model, opt, 3, mlp_data())
    red = opt.redundant_group_ids
    assert red == [0, 1, 2] and opt.projection_interval == 1
    norms = opt.index.norms()[:3].clone()
    train_mlp(model, opt, 10, mlp_data())
    assert opt.zero_group_ids() == []
    # geometric shrink: after 10 of the 20 steps to the target, 1e-3 ** (10/20) of the magnitude is left
    assert torch.allclose(opt.index.norms()[:3], norms * 1e-3 ** 0.5, rtol=1e-4)
    train_mlp(model, opt, 4, mlp_data())
    assert opt.zero_group_ids() == []  # it entered step 16 at 1e-3 ** 0.65 = 1.1e-2: not faded enough
    train_mlp(model, opt, 1, mlp_data())
    assert opt.phase == "projection"
    assert opt.zero_group_ids() == red  # zeroed by the projection, not by the end-of-window force
    assert opt.zeroed_by_half_space == 3 and opt.forced_at_deadline == 0
    assert opt.zero_steps == {0: 18, 1: 18, 2: 18}
    assert all(abs(r / 1e-3 ** 0.7 - 1) < 1e-3 for r in opt.cut_norm_ratios().values())
    train_mlp(model, opt, 30, mlp_data())
    assert opt.phase == "hybrid" and opt.zeroed_by_half_space == 3 and opt.forced_at_deadline == 0


def test_lambda_keeps_descent_direction() -> None:
    """The amplification of lambda above the schedule's base respects DHSPG's descent bound.

    The base itself is never undercut (the schedule must bring the group down), so it is made
    negligible here with ``lambda_scale``.  The step of a redundant group is damped by
    ``rho = |x| / |x at selection|``, so the bound reads ``rho |g|^2 + lam |g| cos >= m rho |g|^2``.
    """
    torch.manual_seed(1)
    model = MLP()
    groups = mlp_groups()
    opt = DHSPG(model.named_parameters(), groups, lr=0.05, warmup_steps=2, projection_steps=50,
                target_group_sparsity=0.5, descent_margin=0.2, momentum=0.0, lambda_scale=1e-6)
    x, y = mlp_data()
    train_mlp(model, opt, 2, (x, y))
    selected = opt.index.norms().clone()
    for _ in range(5):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        st = opt.index.stats()
        opt.step()
        red = opt.index.mask_from_ids(opt.redundant_group_ids)
        lam = opt.lambdas
        gn, xn = st.grad_norm, st.x_norm
        cos = st.cosine
        rho = (xn / selected).clamp(max=1.0)
        # <d, -g> = rho |g|^2 + lam |g| cos >= margin rho |g|^2
        lhs = rho * gn**2 + lam * gn * cos
        assert (lhs[red] >= 0.2 * rho[red] * gn[red] ** 2 - 1e-6).all()
        assert (lam[red] >= 0).all() and (lam[~red] == 0).all()


# ---------------------------------------------------------------------------- partition
@pytest.mark.parametrize("sal", ["default", "magnitude"])
def test_partition_picks_lowest_saliency(sal) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    tiny = [1, 4, 9, 12]
    with torch.no_grad():
        for gid in tiny:
            conv, bn, i = (model.c1, model.b1, gid) if gid < 8 else (model.c2, model.b2, gid - 8)
            conv.weight[i] *= 1e-4
            conv.bias[i] *= 1e-4
            bn.weight[i] = 1e-4
            bn.bias[i] = 0.0
    opt = DHSPG(model.named_parameters(), conv_groups(), lr=0.01, warmup_steps=5, projection_steps=5,
                target_group_sparsity=4 / 14, saliency=sal)
    train_conv(model, opt, conv_batches(5))
    assert opt.redundant_group_ids == tiny
    s = opt.saliency_scores
    assert s is not None and s.shape == (14,)
    order = torch.argsort(s).tolist()
    assert sorted(opt.prunable_group_ids[i] for i in order[:4]) == tiny


def test_saliency_steps_window_gives_same_partition() -> None:
    """Scoring only the last N warm-up steps: same partition, EMA close to the every-step one."""
    res = []
    for n in (None, 40):
        torch.manual_seed(0)
        model = MLP()
        opt = DHSPG(model.named_parameters(), mlp_groups(), lr=0.05, warmup_steps=60, projection_steps=5,
                    target_group_sparsity=0.5, saliency_steps=n, saliency_ema=0.8)
        train_mlp(model, opt, 60, mlp_data())
        res.append((opt.redundant_group_ids, opt.saliency_scores))
    assert res[0][0] == res[1][0]
    assert torch.allclose(res[0][1], res[1][1], rtol=1e-3, atol=1e-4)


def test_default_saliency_is_layer_scale_invariant() -> None:
    """A layer with a 100x smaller weight scale is not wiped out by the default proxy."""
    counts = {}
    for sal in ("magnitude", "default"):
        torch.manual_seed(0)
        model = ConvNet()
        with torch.no_grad():
            for p in (model.c1.weight, model.c1.bias, model.b1.weight, model.b1.bias):
                p.mul_(0.01)
        opt = DHSPG(model.named_parameters(), conv_groups(), lr=1e-3, warmup_steps=3, projection_steps=3,
                    target_group_sparsity=0.5, saliency=sal)
        train_conv(model, opt, conv_batches(3))
        red = opt.redundant_group_ids
        counts[sal] = (sum(1 for g in red if g < 8), sum(1 for g in red if g >= 8))
    assert counts["magnitude"] == (7, 0)  # global raw magnitude: (almost) the whole first layer
    assert 1 <= counts["default"][1] and counts["default"][0] <= 6


def test_custom_saliency_callable_and_registered_name() -> None:
    seen = []

    def reverse(stats):
        seen.append(stats)
        return -torch.arange(len(stats.group_ids), dtype=torch.float32)

    torch.manual_seed(0)
    model = MLP()
    opt = DHSPG(model.named_parameters(), mlp_groups(), lr=0.05, warmup_steps=3, projection_steps=3,
                target_group_sparsity=0.25, saliency=reverse)
    train_mlp(model, opt, 3, mlp_data())
    assert opt.redundant_group_ids == [9, 10, 11]
    assert len(seen) == 3 and seen[0].x_norm_sq.shape == (12,)

    register_saliency("test_first_ids", lambda st: torch.arange(len(st.group_ids), dtype=torch.float32), overwrite=True)
    try:
        assert "test_first_ids" in available_saliencies()
        model = MLP()
        opt = H2SPG(model.named_parameters(), mlp_groups(), lr=0.05, warmup_steps=2, projection_steps=2,
                    target_group_sparsity=0.25, saliency="test_first_ids")
        train_mlp(model, opt, 2, mlp_data())
        assert opt.redundant_group_ids == [0, 1, 2]
        with pytest.raises(ValueError, match="already registered"):
            register_saliency("test_first_ids", lambda st: st.dot)
    finally:
        saliency_mod._REGISTRY.pop("test_first_ids", None)
    with pytest.raises(ValueError, match="shape"):
        opt = DHSPG(MLP().named_parameters(), mlp_groups(), warmup_steps=1, saliency=lambda st: torch.zeros(3))
        train_mlp(model, opt, 1, mlp_data())


def test_saliency_formulas() -> None:
    from lightning_oto.optim import GroupStats

    st = GroupStats(
        x_norm_sq=torch.tensor([4.0, 4.0, 0.01, 0.0]),
        grad_norm_sq=torch.tensor([1.0, 1.0, 1.0, 1.0]),
        dot=torch.tensor([2.0, -2.0, 0.1, 0.0]),
        numel=torch.tensor([4.0, 4.0, 4.0, 4.0]),
        group_ids=(0, 1, 2, 3),
    )
    d = get_saliency("default")(st)
    # no yardstick: m = rms / max rms = [1, 1, .05, 0]; cos = [1, -1, 1, 0]
    assert torch.allclose(d, torch.tensor([0.5, 1.5, 0.025, 0.0]))
    st.x_ref_sq = torch.tensor([16.0, 1.0, 0.01, 1.0])  # layer-relative: m = [0.5, 2, 1, 0]
    assert torch.allclose(get_saliency("default")(st), torch.tensor([0.25, 3.0, 0.5, 0.0]))
    assert torch.allclose(get_saliency("magnitude")(st), torch.tensor([1.0, 1.0, 0.05, 0.0]))
    assert torch.allclose(get_saliency("taylor")(st), torch.tensor([2.0, 2.0, 0.1, 0.0]))
    with pytest.raises(ValueError, match="valid names: default, magnitude, taylor"):
        get_saliency("nope")


# ---------------------------------------------------------------------------- H2SPG hierarchy
def fixed_scores(values):
    return lambda st: torch.tensor(values, dtype=torch.float32)


def test_h2spg_skips_invalid_candidate_figure3() -> None:
    """Figure 3: conv7 has a smaller score than conv2 but removing it disconnects input→output."""
    # segment graph: in → {0,1} → 2 → out ; in → 7 → out is the only other path? Build a tiny
    # DAG as adjacency lists where group g removes vertex g.
    edges = {"in": [0, 7], 0: [1], 1: [2], 2: ["out"], 7: ["out"], 3: ["out"], "in2": []}
    edges["in"].append(3)

    def connected(removed: set[int]) -> bool:
        stack, seen = ["in"], set()
        while stack:
            v = stack.pop()
            if v == "out":
                return True
            if v in seen or v in removed:
                continue
            seen.add(v)
            stack.extend(edges.get(v, []))
        return False

    calls = []

    def check(accepted: frozenset[int], cand: int) -> bool:
        calls.append((accepted, cand))
        return connected(set(accepted) | {cand})

    torch.manual_seed(0)
    model = MLP(hidden=8)
    groups = mlp_groups(8)
    # saliency ascending: 7 (smallest), 0, 3, 2, 1, ...
    scores = [0.2, 0.5, 0.4, 0.3, 0.9, 0.9, 0.9, 0.1]
    opt = H2SPG(model.named_parameters(), groups, hierarchy_check=check, lr=0.05, warmup_steps=2,
                projection_steps=2, target_group_sparsity=3 / 8, saliency=fixed_scores(scores))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_mlp(model, opt, 4, mlp_data())
    # 7 accepted first (path via 0 and 3 remains); 0 then would leave path via 3 only → ok;
    # 3 would disconnect (7, 0, 3 removed) → skipped; 2 → also disconnected? path in→0 removed,
    # so removing 2 is fine.  Expected: {7, 0, 2}
    assert opt.redundant_group_ids == [0, 2, 7]
    assert calls[0] == (frozenset(), 7)
    assert (frozenset({0, 7}), 3) in calls
    assert opt.zero_group_ids() == [0, 2, 7]
    # DHSPG ignores the hierarchy and takes the 3 smallest, producing an invalid network
    model2 = MLP(hidden=8)
    opt2 = DHSPG(model2.named_parameters(), groups, lr=0.05, warmup_steps=2, projection_steps=2,
                 target_group_sparsity=3 / 8, saliency=fixed_scores(scores))
    train_mlp(model2, opt2, 4, mlp_data())
    assert opt2.redundant_group_ids == [0, 3, 7]
    assert not connected({0, 3, 7})


def test_h2spg_warns_when_fewer_than_k_valid() -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = H2SPG(model.named_parameters(), mlp_groups(), hierarchy_check=lambda acc, c: c in (5, 6),
                lr=0.05, warmup_steps=2, projection_steps=2, target_group_sparsity=0.5)
    with pytest.warns(UserWarning, match="only 2 of the requested 6"):
        train_mlp(model, opt, 2, mlp_data())
    assert opt.redundant_group_ids == [5, 6]
    train_mlp(model, opt, 4, mlp_data())
    assert opt.zero_group_ids() == [5, 6]


def test_dhspg_on_erase_mode_whole_tensor_groups() -> None:
    """Erase-mode ablation: groups own whole parameters (operators); no hierarchy check."""
    torch.manual_seed(0)

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.branches = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.inp(x))
            for b in self.branches:
                h = h + torch.relu(b(h))
            return self.out(h)

    model = Res()
    groups = [Group(i, f"branch{i}", [ParamSlice(f"branches.{i}.weight", 0, None),
                                     ParamSlice(f"branches.{i}.bias", 0, None)], vertex=i) for i in range(4)]
    opt = DHSPG(model.named_parameters(), groups, lr=0.05, warmup_steps=3, projection_steps=4,
                target_group_sparsity=0.5, variant="adam")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)
    for _ in range(20):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert len(opt.zero_group_ids()) == 2
    for gid in opt.zero_group_ids():
        assert (model.branches[gid].weight == 0).all() and (model.branches[gid].bias == 0).all()


# ---------------------------------------------------------------------------- checkpoint / resume
def _build(cls, variant: str, seed: int):
    torch.manual_seed(seed)
    model = ConvNet()
    kw = dict(lr=0.05 if variant == "sgd" else 0.01, variant=variant, warmup_steps=6, projection_steps=8,
              target_group_sparsity=0.5, weight_decay=1e-3)
    if variant == "sgd":
        kw["nesterov"] = True
    if cls is HESSO:
        kw["pruning_periods"] = 2
    return model, cls(model.named_parameters(), conv_groups(), **kw)


@pytest.mark.parametrize("cls,variant", [(DHSPG, "sgd"), (H2SPG, "adam"), (HESSO, "adamw")])
@pytest.mark.parametrize("split", [3, 6, 10, 16])
def test_resume_from_state_dict_equals_uninterrupted(cls, variant, split) -> None:
    total = 22
    batches = conv_batches(total, seed=1)
    ref_model, ref_opt = _build(cls, variant, seed=0)
    train_conv(ref_model, ref_opt, batches)

    model, opt = _build(cls, variant, seed=0)
    train_conv(model, opt, batches, 0, split)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    model2, opt2 = _build(cls, variant, seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.num_steps == split and opt2.phase == opt.phase
    assert opt2.redundant_group_ids == opt.redundant_group_ids
    train_conv(model2, opt2, batches, split)

    assert opt2.redundant_group_ids == ref_opt.redundant_group_ids
    assert opt2.zero_group_ids() == ref_opt.zero_group_ids()
    assert torch.equal(opt2.saliency_scores, ref_opt.saliency_scores)
    assert opt2.zero_steps == ref_opt.zero_steps
    assert (opt2.zeroed_by_half_space, opt2.forced_at_deadline) == (ref_opt.zeroed_by_half_space,
                                                                     ref_opt.forced_at_deadline)
    for (n, p), (_, q) in zip(ref_model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n  # bit-identical


def test_state_dict_contents_and_mismatch() -> None:
    model, opt = _build(DHSPG, "sgd", 0)
    train_conv(model, opt, conv_batches(8))
    sd = opt.state_dict()
    oto = sd["oto"]
    for key in ("num_steps", "saliency_ema", "redundant", "frozen", "lambdas", "deadline", "selections_done"):
        assert key in oto
    assert oto["num_steps"] == 8 and len(oto["redundant"]) == 7
    other = DHSPG(MLP().named_parameters(), mlp_groups(), warmup_steps=1)
    with pytest.raises(ValueError, match="different groups"):
        other.load_state_dict(copy.deepcopy(sd))


# ---------------------------------------------------------------------------- base variants
@pytest.mark.parametrize("variant,kw", [
    ("sgd", dict(momentum=0.9)),
    ("sgd", dict(momentum=0.9, nesterov=True)),
    ("sgd", dict(momentum=0.0)),
    ("adam", dict()),
    ("adamw", dict(weight_decay=1e-2)),
])
def test_variants_reduce_loss(variant, kw) -> None:
    torch.manual_seed(0)
    model = MLP()
    lr = 0.1 if variant == "sgd" else 0.02
    opt = DHSPG(model.named_parameters(), mlp_groups(), lr=lr, variant=variant, warmup_steps=20,
                projection_steps=20, target_group_sparsity=0.25, **kw)
    losses = train_mlp(model, opt, 120, mlp_data())
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])
    assert len(opt.zero_group_ids()) == 3


@pytest.mark.parametrize("variant,ref", [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)),
    ("nesterov", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3)),
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=1e-3)),
])
def test_base_variant_matches_torch(variant, ref) -> None:
    """Important groups / ungrouped variables follow exactly the torch optimizers."""
    torch.manual_seed(0)
    m1 = MLP()
    m2 = copy.deepcopy(m1)
    kw = dict(lr=0.1 if variant in ("sgd", "nesterov") else 0.01, weight_decay=1e-3,
              variant="sgd" if variant == "nesterov" else variant, nesterov=variant == "nesterov")
    o1 = DHSPG(m1.named_parameters(), mlp_groups(), warmup_steps=100, **kw)
    o2 = ref(m2.parameters())
    data = mlp_data()
    train_mlp(m1, o1, 10, data)
    train_mlp(m2, o2, 10, data)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=1e-6), variant


def test_lr_scheduler_drives_lr() -> None:
    model = MLP()
    opt = DHSPG(model.named_parameters(), mlp_groups(), lr=0.1, warmup_steps=2, projection_steps=4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = mlp_data()
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


# ---------------------------------------------------------------------------- argument validation
@pytest.mark.parametrize("kw,msg", [
    (dict(lr=0.0), "lr must be"),
    (dict(lr=-1.0), "lr must be"),
    (dict(variant="rmsprop"), "valid variants: sgd, adam, adamw"),
    (dict(target_group_sparsity=1.0), r"target_group_sparsity must be in \[0, 1\)"),
    (dict(target_group_sparsity=-0.1), r"target_group_sparsity must be in \[0, 1\)"),
    (dict(saliency="nope"), "valid names: .*default.*magnitude.*taylor"),
    (dict(momentum=1.5), "momentum"),
    (dict(nesterov=True, momentum=0.0), "nesterov"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(projection_steps=2.5), "projection_steps"),
    (dict(epsilon=1.0), "epsilon"),
    (dict(saliency_ema=1.0), "saliency_ema"),
    (dict(lambda_scale=0.0), "lambda_scale"),
    (dict(descent_margin=1.0), "descent_margin"),
    (dict(pruning_periods=0), "pruning_periods"),
    (dict(saliency_steps=0), "saliency_steps"),
    (dict(pruning_periods=5, projection_steps=2), "pruning_periods"),
])
def test_bad_arguments(kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        DHSPG(MLP().named_parameters(), mlp_groups(), **kw)


def test_bad_params_and_groups() -> None:
    with pytest.raises(ValueError, match="named_parameters"):
        DHSPG(list(MLP().parameters()), mlp_groups())
    with pytest.raises(ValueError, match="unknown parameter"):
        DHSPG(MLP().named_parameters(), [Group(0, "x", [ParamSlice("missing.weight")])])
    with pytest.raises(ValueError, match="hierarchy_check must be callable"):
        H2SPG(MLP().named_parameters(), mlp_groups(), hierarchy_check=3)


def test_no_prunable_groups_is_plain_optimizer() -> None:
    model = MLP()
    opt = DHSPG(model.named_parameters(), [], warmup_steps=1, projection_steps=1)
    losses = train_mlp(model, opt, 20, mlp_data())
    assert losses[-1] < losses[0]
    assert opt.zero_group_ids() == [] and opt.group_sparsity() == 0.0 and opt.phase == "hybrid"


def test_hesso_progressive_periods() -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = HESSO(model.named_parameters(), mlp_groups(), lr=0.05, warmup_steps=3, projection_steps=8,
                pruning_periods=2, target_group_sparsity=0.5)
    data = mlp_data()
    train_mlp(model, opt, 3, data)
    assert len(opt.redundant_group_ids) == 3
    first = opt.redundant_group_ids
    norms0 = opt.index.norms()
    train_mlp(model, opt, 2, data)
    red = opt.index.mask_from_ids(first)
    assert (opt.index.norms()[red] < norms0[red]).all()  # shrinking
    train_mlp(model, opt, 2, data)
    assert opt.zero_group_ids() == first  # zero at the end of period 1
    assert len(opt.redundant_group_ids) == 6
    train_mlp(model, opt, 4, data)
    assert opt.phase == "hybrid" and len(opt.zero_group_ids()) == 6


# ---------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = MLP()
        opt = DHSPG(model.named_parameters(), mlp_groups(), lr=0.05, warmup_steps=4, projection_steps=3,
                    target_group_sparsity=0.5)
        # different data per rank and no gradient sync: local saliencies differ
        train_mlp(model, opt, 4, mlp_data(seed=10 + rank))
        torch.save({"red": opt.redundant_group_ids, "ema": opt.saliency_scores}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_ranks_agree_on_redundant_set(tmp_path) -> None:
    import multiprocessing as mp

    # non-trivial: alone, the two ranks would pick different sets
    # (also warms torch's lazy imports in the parent so forked workers start instantly)
    local = []
    for rank in range(2):
        torch.manual_seed(0)
        model = MLP()
        opt = DHSPG(model.named_parameters(), mlp_groups(), lr=0.05, warmup_steps=4, projection_steps=3,
                    target_group_sparsity=0.5)
        train_mlp(model, opt, 4, mlp_data(seed=10 + rank))
        local.append(opt.redundant_group_ids)
    assert local[0] != local[1]

    out = str(tmp_path / "res")
    # fork (where available) avoids re-importing torch in every worker
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"DDP worker failed (exit code {p.exitcode})"
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["red"] == r1["red"] and len(r0["red"]) == 6
    assert torch.equal(r0["ema"], r1["ema"])
    assert math.isfinite(float(r0["ema"].sum()))


# ---------------------------------------------------------------------------- device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["sgd", "adamw"])
def test_cuda_matches_cpu_and_follows_model_to(variant) -> None:
    """Optimizer built on CPU, model moved to CUDA afterwards: same partition as a CPU run."""
    torch.manual_seed(0)
    ref = MLP()
    model = copy.deepcopy(ref)
    kw = dict(lr=0.05, variant=variant, warmup_steps=4, projection_steps=4, target_group_sparsity=0.5)
    o_ref = DHSPG(ref.named_parameters(), mlp_groups(), **kw)
    opt = DHSPG(model.named_parameters(), mlp_groups(), **kw)
    model.cuda()
    x, y = mlp_data()
    train_mlp(ref, o_ref, 12, (x, y))
    train_mlp(model, opt, 12, (x.cuda(), y.cuda()))
    assert opt.redundant_group_ids == o_ref.redundant_group_ids
    assert opt.zero_group_ids() == o_ref.zero_group_ids() and len(opt.zero_group_ids()) == 6
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.allclose(p, q.cpu(), atol=1e-4)
    sd = opt.state_dict()
    opt2 = DHSPG(model.named_parameters(), mlp_groups(), **kw)
    opt2.load_state_dict(sd)
    train_mlp(model, opt2, 2, (x.cuda(), y.cuda()))
    assert opt2.zero_group_ids() == o_ref.zero_group_ids()
