"""Half-space projected gradient optimizers: DHSPG (pruning), H2SPG (erasing), HESSO.

They see only removal groups (:class:`~lightning_oto.space.groups.Group`), never the graph.

Phases (``optimizer.phase``), counted in optimizer steps:

``"warmup"``
    Steps ``0 .. warmup_steps-1``: the base variant (SGD / Adam / AdamW) updates every variable
    while the per-group saliency (smaller = more redundant, see :mod:`.saliency`) is
    exponentially averaged.  At the end of step ``warmup_steps-1`` (at the start of the first
    step when ``warmup_steps == 0``) the redundant set is chosen:
    ``K = floor(target_group_sparsity * #prunable groups + 0.5)`` groups — DHSPG: the K
    smallest scores; H2SPG: ascending scores, accepting a candidate only if ``hierarchy_check``
    passes.  Under DDP the EMA is averaged over ranks first, so every rank picks the same set.
``"projection"``
    The next ``projection_steps`` steps: important groups and ungrouped variables get base-variant
    updates; redundant groups get a plain gradient step plus an adaptive group-sparsity push,
    then the half-space projection (HESSO: a linear shrink instead).  A redundant group that
    reaches zero is frozen at zero.  At the end of the window every redundant group still
    non-zero is forced to zero, so exactly K prunable groups are zero.
``"hybrid"``
    Afterwards: redundant groups stay exactly zero forever — values and optimizer state
    (momentum, Adam moments); the base update multiplies their rows by a 0/1 keep mask inside
    fused ``addcmul`` ops, so this costs no extra pass — and every other variable trains with the
    base variant.

Redundant-group step of DHSPG / H2SPG (``g`` = gradient + ``weight_decay * x``, ``lr`` the current
learning rate, ``R_g`` the number of projection steps left for the group, this one included)::

    cos_g   = <g_g, x_g> / (|g_g| |x_g|)                      # 0 if either is zero
    lam_g   = min( lambda_scale * |x_g| / (lr * R_g),          # shrink |x_g| to 0 by the deadline
                   (1 - descent_margin) * |g_g| / (-cos_g) )   # only when cos_g < 0
    y_g     = x_g - lr * (g_g + lam_g * x_g / |x_g|)
    x_g    <- 0    if <y_g, x_g> <= epsilon * |x_g|^2           # half-space projection
              y_g  otherwise

The second term of the ``min`` is the adaptive part: with ``d = -(g + lam x/|x|)`` one has
``<d, -g> = |g|^2 + lam |g| cos``, so ``lam <= (1-m)|g|/(-cos)`` keeps ``<d, -g> >= m |g|^2``:
the step remains a descent direction of the loss with margin ``m``.  When the gradient already
points toward the origin (``cos >= 0``) the push is unconstrained.  The first term makes the push
just strong enough to reach zero by the end of the window, independent of the learning-rate scale
(so it works for Adam learning rates too); ``lambda_scale > 1`` reaches zero earlier (through the
half-space test).  Where the descent cap binds, a group may still be non-zero at the deadline
and is then forced to zero.  The half-space test costs no pass over the data:
``<y, x> = a|x|^2 - c<grad, x>`` with the per-group scalars of ``y = a x - c grad``.

Everything (step counter, saliency EMA, redundant/frozen sets, deadlines, schedule, momentum /
Adam moments, last lambdas) is in ``state_dict()``; a resumed run reproduces an uninterrupted one.
One parameter group only (learning-rate schedulers work on it as usual).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from lightning_oto.optim.group_index import GroupIndex, GroupStats
from lightning_oto.optim.saliency import SaliencyFn, get_saliency
from lightning_oto.space.groups import Group

__all__ = ["HalfSpaceOptimizer", "DHSPG", "H2SPG", "HESSO", "VARIANTS"]

VARIANTS = ("sgd", "adam", "adamw")
_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")
_STATE_VERSION = 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    if t.numel() and _distributed() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


def _all_reduce_any(mask: torch.Tensor) -> torch.Tensor:
    if _distributed() and dist.get_world_size() > 1:
        m = mask.to(torch.int32)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return m.bool()
    return mask


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class HalfSpaceOptimizer(torch.optim.Optimizer):
    """Base class of the half-space projected gradient family (see the module docstring).

    Args:
        named_params: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.  Every
            parameter is optimized; group slices refer to these names.
        groups: removal structures; only ``prunable`` groups with variables are candidates.
        lr, variant, momentum, nesterov, betas, eps, weight_decay: the base optimizer
            (``variant`` in ``"sgd"``, ``"adam"``, ``"adamw"``; ``momentum``/``nesterov`` for SGD,
            ``betas``/``eps`` for Adam(W); AdamW decouples the weight decay).
        target_group_sparsity: fraction of prunable groups to zero, in ``[0, 1)``.
        warmup_steps, projection_steps: phase lengths in optimizer steps.
        pruning_periods: split the projection window in this many periods; period ``i`` adds
            redundant groups up to ``round(K*(i+1)/pruning_periods)`` and zeroes them by its end.
        epsilon: half-space threshold in ``[0, 1)``.
        lambda_scale: multiplier of the shrink-rate part of lambda (``>0``; 1 reaches zero exactly
            at the deadline when the descent cap is inactive).
        descent_margin: ``m`` in ``[0, 1)`` of the descent cap on lambda.
        saliency: registered name or callable ``GroupStats -> [G]`` (smaller = more redundant).
        saliency_ema: EMA coefficient ``beta`` in ``[0, 1)`` (``ema = beta*ema + (1-beta)*score``).
        saliency_steps: ``None`` (default): score every warm-up step.  An integer ``N`` scores only
            the last ``N`` steps before each partition, so earlier warm-up steps cost exactly a
            base-optimizer step.  Older scores carry weight ``beta**age`` anyway (``0.9**66 <
            1e-3``), so e.g. ``N = 100`` changes the EMA negligibly.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        groups: Sequence[Group],
        lr: float = 0.1,
        variant: str = "sgd",
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        target_group_sparsity: float = 0.5,
        warmup_steps: int = 1000,
        projection_steps: int = 1000,
        pruning_periods: int = 1,
        epsilon: float = 0.0,
        lambda_scale: float = 1.0,
        descent_margin: float = 0.1,
        saliency: str | SaliencyFn = "default",
        saliency_ema: float = 0.9,
        saliency_steps: int | None = None,
    ) -> None:
        named = self._check_named_params(named_params)
        self._check_args(
            lr=lr, variant=variant, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
            weight_decay=weight_decay, target_group_sparsity=target_group_sparsity,
            warmup_steps=warmup_steps, projection_steps=projection_steps,
            pruning_periods=pruning_periods, epsilon=epsilon, lambda_scale=lambda_scale,
            descent_margin=descent_margin, saliency_ema=saliency_ema, saliency_steps=saliency_steps,
        )
        self._saliency_fn = get_saliency(saliency)
        groups = list(groups)
        for g in groups:
            if not isinstance(g, Group):
                raise ValueError(f"groups must be lightning_oto.space.groups.Group objects, got {type(g).__name__}")
        candidates = []
        for g in groups:
            if not g.prunable:
                continue
            if not g.slices:
                warnings.warn(f"prunable group {g.id} ({g.name!r}) has no variables; it is not a candidate")
                continue
            candidates.append(g)
        # unique parameters, in the given order
        params: list[torch.nn.Parameter] = []
        seen: set[int] = set()
        for _, p in named:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        defaults = dict(
            lr=lr, variant=variant, momentum=momentum, nesterov=nesterov, betas=tuple(betas), eps=eps,
            weight_decay=weight_decay,
        )
        self._init_done = False
        super().__init__(params, defaults)
        self._init_done = True

        self._index = GroupIndex(named, candidates)
        self._params = params
        self.target_group_sparsity = float(target_group_sparsity)
        self.warmup_steps = int(warmup_steps)
        self.projection_steps = int(projection_steps)
        self.pruning_periods = int(pruning_periods)
        self.epsilon = float(epsilon)
        self.lambda_scale = float(lambda_scale)
        self.descent_margin = float(descent_margin)
        self.saliency_ema = float(saliency_ema)
        self.saliency_steps = saliency_steps
        self.num_prunable = self._index.num_groups
        self.num_redundant_target = _round_half_up(self.target_group_sparsity * self.num_prunable)

        G = self.num_prunable
        dev = self._index.device
        self._num_steps = 0
        # no candidates: nothing to score, the (empty) partition can happen on schedule
        self._ema: torch.Tensor | None = torch.zeros(0, device=dev) if G == 0 else None
        self._redundant = torch.zeros(G, dtype=torch.bool, device=dev)
        self._frozen = torch.zeros(G, dtype=torch.bool, device=dev)
        self._deadline = torch.zeros(G, dtype=torch.long, device=dev)
        self._lambdas = torch.zeros(G, dtype=torch.float32, device=dev)
        self._selections_done = 0
        self._schedule = self._build_schedule()
        self._cache_dirty = True

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_named_params(named_params: Any) -> list[tuple[str, torch.Tensor]]:
        if isinstance(named_params, torch.nn.Module):
            named_params = named_params.named_parameters()
        if isinstance(named_params, torch.Tensor):
            raise ValueError("named_params must be (name, parameter) pairs, e.g. model.named_parameters()")
        named = list(named_params)
        for item in named:
            if (
                not isinstance(item, (tuple, list))
                or len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], torch.Tensor)
            ):
                raise ValueError(
                    "named_params must be (name, parameter) pairs, e.g. model.named_parameters(); "
                    f"got an element of type {type(item).__name__}"
                )
        return named

    @staticmethod
    def _check_args(**a: Any) -> None:
        def finite(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not finite(a["lr"]) or a["lr"] <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {a['lr']!r}")
        if a["variant"] not in VARIANTS:
            raise ValueError(f"unknown variant {a['variant']!r}; valid variants: {', '.join(VARIANTS)}")
        if not finite(a["momentum"]) or not 0.0 <= a["momentum"] < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {a['momentum']!r}")
        if a["nesterov"] and (a["variant"] != "sgd" or a["momentum"] <= 0):
            raise ValueError("nesterov=True requires variant='sgd' and momentum > 0")
        b = a["betas"]
        if not isinstance(b, (tuple, list)) or len(b) != 2 or not all(finite(x) and 0.0 <= x < 1.0 for x in b):
            raise ValueError(f"betas must be two numbers in [0, 1), got {b!r}")
        if not finite(a["eps"]) or a["eps"] < 0:
            raise ValueError(f"eps must be >= 0, got {a['eps']!r}")
        if not finite(a["weight_decay"]) or a["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0, got {a['weight_decay']!r}")
        t = a["target_group_sparsity"]
        if not finite(t) or not 0.0 <= t < 1.0:
            raise ValueError(f"target_group_sparsity must be in [0, 1), got {t!r}")
        for k in ("warmup_steps", "projection_steps"):
            v = a[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be an integer >= 0, got {v!r}")
        pp = a["pruning_periods"]
        if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
            raise ValueError(f"pruning_periods must be an integer >= 1, got {pp!r}")
        if pp > max(a["projection_steps"], 1):
            raise ValueError(
                f"pruning_periods ({pp}) cannot exceed projection_steps ({a['projection_steps']})"
            )
        if not finite(a["epsilon"]) or not 0.0 <= a["epsilon"] < 1.0:
            raise ValueError(f"epsilon (half-space threshold) must be in [0, 1), got {a['epsilon']!r}")
        if not finite(a["lambda_scale"]) or a["lambda_scale"] <= 0:
            raise ValueError(f"lambda_scale must be > 0, got {a['lambda_scale']!r}")
        if not finite(a["descent_margin"]) or not 0.0 <= a["descent_margin"] < 1.0:
            raise ValueError(f"descent_margin must be in [0, 1), got {a['descent_margin']!r}")
        if not finite(a["saliency_ema"]) or not 0.0 <= a["saliency_ema"] < 1.0:
            raise ValueError(f"saliency_ema must be in [0, 1), got {a['saliency_ema']!r}")
        ss = a["saliency_steps"]
        if ss is not None and (isinstance(ss, bool) or not isinstance(ss, int) or ss < 1):
            raise ValueError(f"saliency_steps must be None or an integer >= 1, got {ss!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_init_done", False):
            raise NotImplementedError(
                f"{type(self).__name__} indexes its parameters at construction; add_param_group is not supported"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ public read-only API
    @property
    def phase(self) -> str:
        """``"warmup"``, ``"projection"`` or ``"hybrid"`` (see the module docstring)."""
        if self._selections_done == 0:
            return "warmup"
        if self._num_steps < self.warmup_steps + self.projection_steps:
            return "projection"
        return "hybrid"

    @property
    def num_steps(self) -> int:
        return self._num_steps

    @property
    def index(self) -> GroupIndex:
        return self._index

    @property
    def prunable_group_ids(self) -> list[int]:
        """Ids of the candidate groups, in the order of :attr:`saliency_scores`."""
        return list(self._index.group_ids)

    @property
    def redundant_group_ids(self) -> list[int]:
        return self._index.ids_from_mask(self._redundant)

    @property
    def saliency_scores(self) -> torch.Tensor | None:
        """EMA saliency per candidate group (order of :attr:`prunable_group_ids`), or ``None``."""
        return None if self._ema is None else self._ema.detach().clone()

    @property
    def lambdas(self) -> torch.Tensor:
        """Lambda of the last projection step per candidate group (0 for important groups)."""
        return self._lambdas.detach().clone()

    def zero_group_ids(self) -> list[int]:
        """Prunable groups whose variables are all exactly zero (sorted ids)."""
        if self.num_prunable == 0:
            return []
        return self._index.ids_from_mask(self._index.is_zero())

    def group_sparsity(self) -> float:
        """Fraction of prunable groups that are exactly zero."""
        if self.num_prunable == 0:
            return 0.0
        return len(self.zero_group_ids()) / self.num_prunable

    # ------------------------------------------------------------------ schedule / selection
    def _build_schedule(self) -> list[tuple[int, int, int]]:
        """``(at_step, cumulative_k, deadline)`` per selection."""
        W, P, n, K = self.warmup_steps, self.projection_steps, self.pruning_periods, self.num_redundant_target
        bounds = [W + (i * P) // n for i in range(n + 1)]
        return [(bounds[i], _round_half_up(K * (i + 1) / n), bounds[i + 1]) for i in range(n)]

    def _choose(self, scores: torch.Tensor, k: int, exclude: torch.Tensor) -> list[int]:
        """Positions of ``k`` new redundant groups (DHSPG: the smallest scores)."""
        s = torch.where(exclude, torch.full_like(scores, float("inf")), scores)
        order = torch.sort(s, stable=True).indices.tolist()
        ex = exclude.tolist()
        return [i for i in order if not ex[i]][:k]

    def _score(self, stats: GroupStats) -> torch.Tensor:
        s = self._saliency_fn(stats)
        if not isinstance(s, torch.Tensor) or s.shape != (self.num_prunable,):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"saliency function must return a tensor of shape [{self.num_prunable}], got {got}")
        return s.detach().to(device=self._index.device, dtype=torch.float32)

    def _update_ema(self, stats: GroupStats) -> None:
        s = self._score(stats)
        if self._ema is None:
            self._ema = s.clone()
        else:
            self._ema.mul_(self.saliency_ema).add_(s, alpha=1.0 - self.saliency_ema)

    def _maybe_select(self) -> None:
        while self._selections_done < len(self._schedule):
            at, k_cum, deadline = self._schedule[self._selections_done]
            if self._num_steps < at:
                break
            if self._ema is None:  # no statistics yet (only possible before the very first step)
                break
            _all_reduce_mean_(self._ema)  # identical decision on every rank
            k_new = max(0, k_cum - int(self._redundant.sum()))
            chosen = self._choose(self._ema, k_new, self._redundant.clone()) if k_new else []
            if chosen:
                idx = torch.tensor(chosen, dtype=torch.long, device=self._redundant.device)
                self._redundant[idx] = True
                self._deadline[idx] = deadline
                self._cache_dirty = True
            self._selections_done += 1
            self._on_selected(chosen)
        self._finalize_due()

    def _on_selected(self, positions: list[int]) -> None:
        """Hook: redundant groups were just chosen.  Their optimizer state is cleared."""
        if positions:
            mask = torch.zeros_like(self._redundant)
            mask[torch.tensor(positions, device=mask.device)] = True
            self._zero_state_rows(self._index.rows_for(mask))

    def _finalize_due(self) -> None:
        """Force-zero redundant groups whose deadline has passed."""
        self._refresh_cache()
        if self._num_steps < self._next_deadline:
            return
        due = self._redundant & ~self._frozen & (self._deadline <= self._num_steps)
        self._freeze(due)
        self._refresh_cache()

    @torch.no_grad()
    def _freeze(self, mask: torch.Tensor) -> None:
        rows = self._index.rows_for(mask)
        for e, r in zip(self._index.entries, rows):
            if r is not None:
                e.view(e.param.data).index_fill_(e.dim, r[0], 0.0)
        self._zero_state_rows(rows)
        self._frozen |= mask
        self._cache_dirty = True

    @torch.no_grad()
    def _zero_state_rows(self, rows: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        for e, r in zip(self._index.entries, rows):
            if r is None:
                continue
            st = self.state.get(e.param)
            if not st:
                continue
            for key in _STATE_KEYS:
                t = st.get(key)
                if isinstance(t, torch.Tensor):
                    e.view(t).index_fill_(e.dim, r[0], 0.0)

    def _refresh_cache(self) -> None:
        """Row indices / masks derived from the redundant and frozen sets (they change rarely)."""
        if not self._cache_dirty:
            return
        entries = self._index.entries
        active = self._redundant & ~self._frozen
        self._active_count = int(active.sum())
        self._active_rows = self._index.rows_for(active) if self._active_count else [None] * len(entries)
        self._next_deadline = int(self._deadline[active].min()) if self._active_count else math.inf
        # keep masks: 0 on every redundant row, so the base update leaves them (and their state) alone
        self._keep: dict[int, torch.Tensor] = {}
        self._fully_frozen: set[int] = set()
        if bool(self._redundant.any()):
            red_ext = self._index._ext(self._redundant, False)
            frozen_ext = self._index._ext(self._frozen, False)
            for e in entries:
                rows_red = red_ext[e.owner]
                if not bool(rows_red.any()):
                    continue
                if bool(frozen_ext[e.owner].all()):
                    self._fully_frozen.add(id(e.param))
                    continue
                keep = (~rows_red).to(e.param.dtype).view(e.bshape)
                self._keep[id(e.param)] = keep.reshape(e.param.shape) if e.scalar else keep
        self._cache_dirty = False

    # ------------------------------------------------------------------ redundant-group update
    def _redundant_coeffs(self, stats: GroupStats, active: torch.Tensor, hp: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Per-group ``(a, c, use_half_space)`` of the trial step ``y_g = a_g x_g - c_g grad_g``."""
        lr, wd = float(hp["lr"]), float(hp["weight_decay"])
        xsq, gsq, dot = stats.x_norm_sq, stats.grad_norm_sq, stats.dot
        x_norm = xsq.clamp_min(0).sqrt()
        geff_norm = (gsq + 2 * wd * dot + wd * wd * xsq).clamp_min(0).sqrt()
        dot_eff = dot + wd * xsq
        den = geff_norm * x_norm
        tiny = torch.finfo(den.dtype).tiny
        cos = torch.where(den > 0, dot_eff / den.clamp_min(tiny), torch.zeros_like(den))
        remaining = (self._deadline - self._num_steps).clamp_min(1).to(xsq.dtype)
        lam_shrink = self.lambda_scale * x_norm / (lr * remaining)
        lam_desc = torch.where(
            cos < 0,
            (1.0 - self.descent_margin) * geff_norm / (-cos).clamp_min(tiny),
            torch.full_like(cos, float("inf")),
        )
        lam = torch.where(active, torch.minimum(lam_shrink, lam_desc), torch.zeros_like(lam_shrink))
        self._lambdas = lam
        push = torch.where(x_norm > 0, lr * lam / x_norm.clamp_min(tiny), torch.zeros_like(lam))
        a = 1.0 - lr * wd - push
        c = torch.full_like(a, lr)
        return a, c, True

    @torch.no_grad()
    def _redundant_step(self, stats: GroupStats, hp: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per entry with active redundant rows: broadcast row factors ``(A, C)``.

        Applied *after* the base update (which leaves redundant rows untouched thanks to the keep
        masks) as ``x <- A*x - C*grad``: ``A = a_g, C = c_g`` on active redundant rows and
        ``A = 1, C = 0`` elsewhere (exact no-op).  Half-space projected groups get ``A = C = 0``.
        The half-space test needs no extra pass: ``<y, x> = a |x|^2 - c <grad, x>`` per group.
        """
        active = self._redundant & ~self._frozen
        a, c, half_space = self._redundant_coeffs(stats, active, hp)
        zero_now = torch.zeros_like(active)
        if half_space:
            inner = a * stats.x_norm_sq - c * stats.dot
            zero_now = _all_reduce_any(active & (inner <= self.epsilon * stats.x_norm_sq))
            a = torch.where(zero_now, torch.zeros_like(a), a)
            c = torch.where(zero_now, torch.zeros_like(c), c)
        a_ext = self._index._ext(torch.where(active, a, torch.ones_like(a)), 1.0)
        c_ext = self._index._ext(torch.where(active, c, torch.zeros_like(c)), 0.0)
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for e, r in zip(self._index.entries, self._active_rows):
            if r is None:
                continue
            dt = e.param.dtype
            A = a_ext[e.owner].view(e.bshape).to(dt)
            C = None if e.param.grad is None else c_ext[e.owner].view(e.bshape).to(dt)
            if e.scalar:
                A = A.reshape(())
                C = None if C is None else C.reshape(())
            out.append((e.param, A, C))
        self._pending_zero = zero_now
        return out

    @torch.no_grad()
    def _apply_redundant(self, factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
        ps = [p for p, _, _ in factors]
        torch._foreach_mul_(ps, [A for _, A, _ in factors])
        with_g = [(p, C) for p, _, C in factors if C is not None]
        if with_g:
            torch._foreach_addcmul_([p for p, _ in with_g], [p.grad for p, _ in with_g], [C for _, C in with_g], value=-1.0)

    # ------------------------------------------------------------------ base variant
    def _state_tensor(self, p: torch.Tensor, key: str) -> torch.Tensor:
        st = self.state[p]
        t = st.get(key)
        if t is None:
            t = torch.zeros_like(p, memory_format=torch.preserve_format)
            st[key] = t
        return t

    @torch.no_grad()
    def _base_update(self, hp: dict[str, Any]) -> None:
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        skip = self._fully_frozen
        for p in self.param_groups[0]["params"]:
            if p.grad is None or id(p) in skip:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
        if not params:
            return
        lr, wd, variant = float(hp["lr"]), float(hp["weight_decay"]), hp["variant"]
        # Redundant rows are masked out by multiplying with a broadcast 0/1 "keep" row vector
        # inside fused ops (addcmul), so they cost no extra pass; unmasked params use a scalar 1.
        keeps: list[torch.Tensor] | None = None
        if self._keep:
            one = {}
            keeps = []
            for p in params:
                k = self._keep.get(id(p))
                if k is None:
                    key = (p.dtype, p.device)
                    if key not in one:
                        one[key] = torch.ones((), dtype=p.dtype, device=p.device)
                    k = one[key]
                keeps.append(k)
        if variant == "sgd":
            m = float(hp["momentum"])
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if m:
                bufs = [self._state_tensor(p, "momentum_buffer") for p in params]
                torch._foreach_mul_(bufs, m)
                if keeps is None:
                    torch._foreach_add_(bufs, grads)
                else:
                    torch._foreach_addcmul_(bufs, grads, keeps)  # redundant rows of buf stay 0
                if hp["nesterov"]:
                    d = torch._foreach_add(grads, bufs, alpha=m)
                    if keeps is None:
                        torch._foreach_add_(params, d, alpha=-lr)
                    else:
                        torch._foreach_addcmul_(params, d, keeps, value=-lr)
                else:
                    torch._foreach_add_(params, bufs, alpha=-lr)
            elif keeps is None:
                torch._foreach_add_(params, grads, alpha=-lr)
            else:
                torch._foreach_addcmul_(params, grads, keeps, value=-lr)
            return
        b1, b2 = (float(b) for b in hp["betas"])
        eps = float(hp["eps"])
        t = self._num_steps + 1
        if wd:
            if variant == "adamw":
                if keeps is None:
                    torch._foreach_mul_(params, 1.0 - lr * wd)
                else:  # decoupled decay only where the base update applies
                    torch._foreach_mul_(params, [1.0 - (lr * wd) * k for k in keeps])
            else:
                grads = torch._foreach_add(grads, params, alpha=wd)
        if keeps is not None:
            grads = torch._foreach_mul(grads, keeps)  # moments of redundant rows stay exactly 0
        exp_avg = [self._state_tensor(p, "exp_avg") for p in params]
        exp_avg_sq = [self._state_tensor(p, "exp_avg_sq") for p in params]
        torch._foreach_lerp_(exp_avg, grads, 1.0 - b1)
        torch._foreach_mul_(exp_avg_sq, b2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - b2)
        bc1 = 1.0 - b1**t
        bc2 = 1.0 - b2**t
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, -lr / bc1)

    # ------------------------------------------------------------------ step
    def _follow_device(self) -> None:
        """Move the bookkeeping tensors if the parameters moved (``model.to(device)`` after construction)."""
        self._index._sync_device()
        dev = self._index.device
        if self._redundant.device != dev:
            self._redundant = self._redundant.to(dev)
            self._frozen = self._frozen.to(dev)
            self._deadline = self._deadline.to(dev)
            self._lambdas = self._lambdas.to(dev)
            if self._ema is not None:
                self._ema = self._ema.to(dev)
            self._cache_dirty = True

    @staticmethod
    def _all_reduce_stats(st: GroupStats) -> GroupStats:
        if _distributed() and dist.get_world_size() > 1:
            packed = _all_reduce_mean_(st.packed().contiguous())
            st = GroupStats.from_packed(packed, st.numel, st.group_ids)
        return st

    def _stats(self) -> GroupStats:
        return self._all_reduce_stats(self._index.stats())

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step (phase logic in the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hp = self.param_groups[0]
        self._follow_device()
        self._refresh_cache()
        pending = self._selections_done < len(self._schedule)
        if pending and self.saliency_steps is not None:
            pending = self._num_steps >= self._schedule[self._selections_done][0] - self.saliency_steps
        stats = None
        if self.num_prunable and pending:
            stats = self._stats()
            self._update_ema(stats)
            self._maybe_select()  # warmup_steps == 0: select before the first update
            self._refresh_cache()
        trials = None
        if self._active_count:
            if stats is None:
                stats = self._stats()
            trials = self._redundant_step(stats, hp)
        self._base_update(hp)
        # redundant groups: the base update left them untouched (keep masks); now their own step
        if trials is not None:
            self._apply_redundant(trials)
        if trials is not None and bool(self._pending_zero.any()):
            self._frozen |= self._pending_zero
            self._cache_dirty = True
        self._num_steps += 1
        self._maybe_select()
        return loss

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["oto"] = {
            "version": _STATE_VERSION,
            "class": type(self).__name__,
            "group_ids": list(self._index.group_ids),
            "num_steps": self._num_steps,
            "selections_done": self._selections_done,
            "saliency_ema": None if self._ema is None else self._ema.detach().clone(),
            "redundant": self.redundant_group_ids,
            "frozen": self._index.ids_from_mask(self._frozen),
            "deadline": self._deadline.detach().clone(),
            "lambdas": self._lambdas.detach().clone(),
            "schedule": list(self._schedule),
            "warmup_steps": self.warmup_steps,
            "projection_steps": self.projection_steps,
            "pruning_periods": self.pruning_periods,
            "target_group_sparsity": self.target_group_sparsity,
            "num_redundant_target": self.num_redundant_target,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        oto = state_dict.pop("oto", None)
        if oto is None and state_dict.get("state"):
            raise ValueError(
                f"this optimizer state was not saved by a {type(self).__name__} (no 'oto' entry): it probably comes "
                "from the plain optimizer of an earlier run. Resume from a checkpoint written while the OTO optimizer "
                "was installed, or start the search fresh.")
        if oto is not None and list(oto["group_ids"]) != list(self._index.group_ids):
            raise ValueError(
                "optimizer state was saved for different groups "
                f"({len(oto['group_ids'])} candidate groups vs {self.num_prunable} now); "
                "rebuild the optimizer with the same search space before loading"
            )
        super().load_state_dict(state_dict)
        if oto is None:
            return
        dev = self._index.device
        self._num_steps = int(oto["num_steps"])
        self._selections_done = int(oto["selections_done"])
        ema = oto["saliency_ema"]
        self._ema = None if ema is None else ema.detach().clone().to(device=dev, dtype=torch.float32)
        self._redundant = self._index.mask_from_ids(oto["redundant"])
        self._frozen = self._index.mask_from_ids(oto["frozen"])
        self._deadline = oto["deadline"].detach().clone().to(device=dev, dtype=torch.long)
        self._lambdas = oto["lambdas"].detach().clone().to(device=dev, dtype=torch.float32)
        self._schedule = [tuple(s) for s in oto.get("schedule", self._schedule)]
        # the checkpoint's schedule wins (like the param-group hyper-parameters torch restores)
        for key in ("warmup_steps", "projection_steps", "pruning_periods", "target_group_sparsity",
                    "num_redundant_target"):
            if key in oto:
                setattr(self, key, oto[key])
        self._cache_dirty = True


class DHSPG(HalfSpaceOptimizer):
    """Dual half-space projected gradient (OTOv2/OTOv3 pruning mode).

    The redundant set is the ``K`` candidate groups with the smallest saliency EMA.  Used on
    erase-mode groups it works the same way (validity is checked elsewhere).
    """


class H2SPG(HalfSpaceOptimizer):
    """Hierarchical half-space projected gradient (OTOv3 erasing mode, Algorithm 3).

    Args:
        hierarchy_check: ``check(accepted_ids, candidate_id) -> bool``: ``True`` when removing the
            candidate in addition to the already accepted groups keeps the network valid.
            Candidates are visited in ascending saliency; rejected ones are skipped.  ``None``
            accepts every candidate (then H2SPG behaves like DHSPG).
        **kwargs: see :class:`HalfSpaceOptimizer`.

    If fewer than ``K`` candidates can be accepted, the valid maximum is used and a warning says
    how many.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        groups: Sequence[Group],
        hierarchy_check: Callable[[frozenset[int], int], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        if hierarchy_check is not None and not callable(hierarchy_check):
            raise ValueError("hierarchy_check must be callable (accepted_ids: frozenset[int], candidate_id: int) -> bool")
        self.hierarchy_check = hierarchy_check
        super().__init__(named_params, groups, **kwargs)

    def _choose(self, scores: torch.Tensor, k: int, exclude: torch.Tensor) -> list[int]:
        if self.hierarchy_check is None:
            return super()._choose(scores, k, exclude)
        order = torch.sort(scores, stable=True).indices.tolist()
        ex = exclude.tolist()
        ids = self._index.group_ids
        accepted_ids = set(self._index.ids_from_mask(exclude & self._redundant))
        chosen: list[int] = []
        for pos in order:
            if len(chosen) >= k:
                break
            if ex[pos]:
                continue
            if self.hierarchy_check(frozenset(accepted_ids), ids[pos]):
                chosen.append(pos)
                accepted_ids.add(ids[pos])
        if len(chosen) < k:
            warnings.warn(
                f"H2SPG: only {len(chosen)} of the requested {k} redundant groups keep the network valid; "
                f"using {len(chosen)} (group sparsity "
                f"{(int(self._redundant.sum()) + len(chosen)) / max(self.num_prunable, 1):.3f} instead of "
                f"{self.target_group_sparsity:.3f})",
                stacklevel=3,
            )
        return chosen


class HESSO(HalfSpaceOptimizer):
    """Hybrid efficient structured sparse optimizer: progressive shrink instead of half-space.

    Same phases and selection as DHSPG (use ``pruning_periods > 1`` to add redundant groups
    progressively).  A redundant group takes a plain gradient step and is then scaled by
    ``(R-1)/R`` (``R`` = steps left before its deadline), so it decays linearly in magnitude and
    is exactly zero at its deadline — no lambda, no half-space test.
    """

    def _redundant_coeffs(self, stats: GroupStats, active: torch.Tensor, hp: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        lr, wd = float(hp["lr"]), float(hp["weight_decay"])
        remaining = (self._deadline - self._num_steps).clamp_min(1).to(torch.float32)
        shrink = (remaining - 1.0) / remaining
        a = (1.0 - lr * wd) * shrink
        c = lr * shrink
        self._lambdas = torch.zeros_like(shrink)
        return a, c, False
