"""Vectorized index of removal groups over parameters.

Optimizers need per-group quantities (norms, dot products) every step.  A Python loop over groups
would cost O(#groups) interpreter work per step, which is prohibitive for channel-level groups
(tens of thousands of groups).  Instead, for every parameter touched by a group we store one
``owner`` vector along the slicing dimension: ``owner[i]`` is the position of the group that owns
entry ``i`` along ``dim`` (or ``G`` — a trash bucket — when no group owns it).  Per-group
reductions are then "reduce over the other dims, then ``index_add_`` by owner", i.e. a handful of
tensor ops per *parameter*, independent of the number of groups.

Positions (``0..G-1``) follow the order of the ``groups`` list given to :class:`GroupIndex`;
``GroupIndex.group_ids[pos]`` is the matching :attr:`Group.id`.

FSDP2 (``DTensor`` parameters sharded on dim 0): every entry works on this rank's local shard, its
``owner`` covers the local rows only, and the per-group sums are this rank's partial sums, added over
the ranks by one all-reduce per evaluation (:mod:`.shards`).  Zeroing, scaling and row factors touch
the local shard only: nothing is gathered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from lightning_oto.optim.shards import all_reduce_sum_, is_sharded, local_view, shard_layout, world_size
from lightning_oto.space.groups import Group

__all__ = ["GroupIndex", "GroupStats", "IndexEntry"]


@dataclass
class IndexEntry:
    """One parameter touched by at least one group."""

    name: str
    param: torch.Tensor
    dim: int
    owner: torch.Tensor  # long [size_along_dim]; value G means "no group"
    reduce_dims: tuple[int, ...]
    bshape: tuple[int, ...]  # broadcast shape of a per-row vector against the parameter
    scalar: bool = False  # 0-d parameter (handled as a 1-element vector)
    shards: int = 1  # FSDP2: ranks the parameter is split over (1: every rank holds it whole)
    global_owner: torch.Tensor | None = None  # owner over the whole parameter (None: same as ``owner``)

    @property
    def x(self) -> torch.Tensor:
        """The parameter's values on this rank (a ``DTensor``'s local shard, read fresh: FSDP2 may re-point it)."""
        return local_view(self.param)

    @property
    def all_owners(self) -> torch.Tensor:
        return self.owner if self.global_owner is None else self.global_owner

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (param-shaped) as the tensor the index works on (0-d → 1-d view)."""
        return t.view(1) if self.scalar else t

    def row_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over every dim except the slicing dim (``t`` is already ``view``-ed)."""
        if not self.reduce_dims:
            return t
        if self.dim == 0 and t.is_contiguous():
            return t.view(t.shape[0], -1).sum(1)
        return t.sum(self.reduce_dims)

    def _rows2d(self, t: torch.Tensor) -> torch.Tensor | None:
        """``[rows, -1]`` view when the slicing dim leads and ``t`` is contiguous (else ``None``)."""
        if self.dim == 0 and self.reduce_dims and t.is_contiguous():
            return t.view(t.shape[0], -1)
        return None

    def row_dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-row dot product of ``a`` and ``b`` (shaped like the entry, or a row subset of it)."""
        if not self.reduce_dims:
            return a * b
        a2, b2 = self._rows2d(a), self._rows2d(b)
        if a2 is not None and b2 is not None:
            return torch.linalg.vecdot(a2, b2)
        return (a * b).sum(self.reduce_dims)

    def row_sq(self, a: torch.Tensor) -> torch.Tensor:
        """Per-row sum of squares (``vector_norm`` reads ``a`` once, no temporary)."""
        if not self.reduce_dims:
            return a * a
        a2 = self._rows2d(a)
        if a2 is not None and a2.dtype in (torch.float32, torch.float64):
            return torch.linalg.vector_norm(a2, dim=1).square_()
        return (a * a).sum(self.reduce_dims)

    def row_stats(self, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """``[rows, 3]``: per-row ``|x|^2``, ``|g|^2``, ``<g, x>`` (``g=None`` counts as zero)."""
        xx = self.row_sq(x)
        if g is None:
            z = torch.zeros_like(xx)
            return torch.stack([xx, z, z], dim=1)
        return torch.stack([xx, self.row_sq(g), self.row_dot(g, x)], dim=1)


@dataclass
class GroupStats:
    """Per-group statistics at the current iterate (each tensor has shape ``[G]``).

    Saliency functions receive this object.  ``dot`` is ``<grad_g, x_g>``.  ``x_ref_sq`` is the
    squared norm the group *would* have if each of its rows (entries along the slicing dim) had
    the mean squared row norm of its parameter — the yardstick that makes magnitudes comparable
    across layers of different scale (``None`` when unknown).
    """

    x_norm_sq: torch.Tensor
    grad_norm_sq: torch.Tensor
    dot: torch.Tensor
    numel: torch.Tensor
    group_ids: tuple[int, ...]
    x_ref_sq: torch.Tensor | None = None

    @property
    def x_norm(self) -> torch.Tensor:
        return self.x_norm_sq.clamp_min(0).sqrt()

    @property
    def grad_norm(self) -> torch.Tensor:
        return self.grad_norm_sq.clamp_min(0).sqrt()

    @property
    def cosine(self) -> torch.Tensor:
        """cos(-grad_g, -x_g) = <g, x>/(|g||x|); 0 where either vector is zero."""
        den = self.x_norm * self.grad_norm
        return torch.where(den > 0, self.dot / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))

    @property
    def relative_magnitude(self) -> torch.Tensor:
        """``sqrt(x_norm_sq / x_ref_sq)``: 1 for a group of typical size within its layers.

        Falls back to ``rms / max(rms)`` when ``x_ref_sq`` is unknown.
        """
        if self.x_ref_sq is None:
            rms = self.x_norm / self.numel.clamp_min(1).sqrt()
            if rms.numel() == 0:
                return rms
            return rms / rms.max().clamp_min(torch.finfo(rms.dtype).tiny)
        ref = self.x_ref_sq
        ratio = self.x_norm_sq / ref.clamp_min(torch.finfo(ref.dtype).tiny)
        return torch.where(ref > 0, ratio, torch.zeros_like(ratio)).clamp_min(0).sqrt()

    def packed(self) -> torch.Tensor:
        """``[G, 4]`` tensor (x_norm_sq, grad_norm_sq, dot, x_ref_sq) — one buffer for all-reduce."""
        ref = self.x_ref_sq if self.x_ref_sq is not None else torch.full_like(self.x_norm_sq, float("nan"))
        return torch.stack([self.x_norm_sq, self.grad_norm_sq, self.dot, ref], dim=1)


def _claim(params: dict[str, torch.Tensor], groups: Sequence[Group], group_ids: tuple[int, ...]
           ) -> tuple[dict[str, list[int]], dict[str, int], list[str], list[int]]:
    """Which group owns each entry of every sliced parameter (position ``len(groups)``: none); checks that the
    groups are disjoint and slice each parameter along one dim.  Returns (owners, dims, order, numel)."""
    G = len(groups)
    numel = [0] * G
    owners: dict[str, list[int]] = {}
    dims: dict[str, int] = {}
    order: list[str] = []
    for pos, g in enumerate(groups):
        for s in g.slices:
            if s.name not in params:
                known = ", ".join(sorted(params)[:10])
                raise ValueError(
                    f"group {g.id} ({g.name!r}) references unknown parameter {s.name!r}; "
                    f"known parameters include: {known}"
                )
            p = params[s.name]
            nd = max(p.dim(), 1)
            d = s.dim + nd if s.dim < 0 else s.dim
            if not 0 <= d < nd:
                raise ValueError(f"group {g.id}: dim {s.dim} out of range for {s.name!r} of shape {tuple(p.shape)}")
            if s.name in dims and dims[s.name] != d:
                raise ValueError(
                    f"parameter {s.name!r} is sliced along dim {dims[s.name]} by one group and dim {d} "
                    f"by group {g.id}; all slices of a parameter must use the same dim"
                )
            if s.name not in dims:
                dims[s.name] = d
                size = p.shape[d] if p.dim() > 0 else 1
                owners[s.name] = [G] * size
                order.append(s.name)
            own = owners[s.name]
            idx = range(len(own)) if s.indices is None else s.indices
            for i in idx:
                if not -len(own) <= i < len(own):
                    raise ValueError(
                        f"group {g.id}: index {i} out of range for {s.name!r} dim {d} (size {len(own)})"
                    )
                if own[i] != G:
                    raise ValueError(
                        f"groups are not disjoint: entry {i} of {s.name!r} (dim {d}) belongs to group "
                        f"{group_ids[own[i]]} and group {g.id}"
                    )
                own[i] = pos
            numel[pos] += s.numel(tuple(p.shape) if p.dim() > 0 else (1,))
    return owners, dims, order, numel


class GroupIndex:
    """Vectorized map groups ↔ parameter entries.

    Args:
        named_params: ``(name, tensor)`` pairs or a ``{name: tensor}`` mapping; the tensors are
            kept by reference (in-place methods modify them).
        groups: groups to index; their ``slices`` must be disjoint and all slices of one parameter
            must use the same ``dim``.  Raises ``ValueError`` otherwise.
        replica_mean: under DDP, :meth:`stats` and :meth:`products` average over the ranks (the
            optimizers' identical decision on every rank).  With ``DTensor`` parameters they always sum
            the shards' partial sums (and average over replicas), whatever this says.
    """

    def __init__(
        self,
        named_params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        groups: Sequence[Group],
        replica_mean: bool = False,
    ) -> None:
        params = dict(named_params.items() if isinstance(named_params, Mapping) else named_params)
        self.replica_mean = replica_mean
        self.sharded = any(is_sharded(p) for p in params.values())
        self.groups = list(groups)
        self.group_ids: tuple[int, ...] = tuple(g.id for g in self.groups)
        if len(set(self.group_ids)) != len(self.group_ids):
            raise ValueError("GroupIndex: group ids must be unique")
        self.pos_of_id: dict[int, int] = {gid: i for i, gid in enumerate(self.group_ids)}
        G = len(self.groups)
        self.num_groups = G
        owners, dims, order, numel = _claim(params, self.groups, self.group_ids)
        self.entries: list[IndexEntry] = []
        for name in order:
            self.entries.append(self._entry(name, params[name], dims[name], owners[name]))
        dev = self.entries[0].x.device if self.entries else torch.device("cpu")
        self.numel = torch.tensor(numel, dtype=torch.float32, device=dev)

    @staticmethod
    def _entry(name: str, p: torch.Tensor, d: int, owners: list[int]) -> IndexEntry:
        """One entry; a dim-0 slice of an FSDP2 shard owns only the rows this rank holds."""
        scalar = p.dim() == 0
        nd = 1 if scalar else p.dim()
        dev = local_view(p).device
        owner = torch.tensor(owners, dtype=torch.long, device=dev)
        global_owner, shards = None, 1
        if is_sharded(p):
            lay = shard_layout(name, p)
            shards = round(lay.weight * world_size())
            if d == 0:  # other dims: every column is here, the rows (reduced over) are a partial sum
                global_owner, owner = owner, owner[lay.start: lay.start + lay.rows].clone()
        bshape = [1] * nd
        bshape[d] = owner.numel()
        return IndexEntry(name=name, param=p, dim=d, owner=owner, reduce_dims=tuple(i for i in range(nd) if i != d),
                          bshape=tuple(bshape), scalar=scalar, shards=shards, global_owner=global_owner)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.numel.device

    def _sync_device(self) -> None:
        """Follow the parameters if they moved (e.g. model.to(device) after construction).

        All parameters live on one device (the per-group sums need that), so checking the first
        one is enough: the check costs nothing on an ordinary step.
        """
        if not self.entries or self.entries[0].x.device == self.numel.device:
            return
        for e in self.entries:
            if e.owner.device != e.x.device:
                e.owner = e.owner.to(e.x.device)
                e.global_owner = None if e.global_owner is None else e.global_owner.to(e.x.device)
        if self.entries and self.numel.device != self.entries[0].x.device:
            self.numel = self.numel.to(self.entries[0].x.device)

    def _ext(self, values: torch.Tensor, fill: float | bool) -> torch.Tensor:
        """``values`` ([G]) with the trash bucket appended (value ``fill``)."""
        tail = torch.full((1,), fill, dtype=values.dtype, device=values.device)
        return torch.cat([values, tail])

    def mask_from_ids(self, ids: Iterable[int]) -> torch.Tensor:
        """Boolean ``[G]`` mask of the given group ids."""
        m = torch.zeros(self.num_groups, dtype=torch.bool, device=self.device)
        pos = [self.pos_of_id[i] for i in ids]
        if pos:
            m[torch.tensor(pos, device=self.device)] = True
        return m

    def ids_from_mask(self, mask: torch.Tensor) -> list[int]:
        return sorted(self.group_ids[i] for i in mask.nonzero().flatten().tolist())

    # ------------------------------------------------------------------ reductions
    def _reduces(self) -> bool:
        """Do :meth:`stats` / :meth:`products` all-reduce (shards always; replicas when ``replica_mean``)?"""
        return world_size() > 1 and (self.sharded or self.replica_mean)

    @torch.no_grad()
    def stats(self, grads: Sequence[torch.Tensor | None] | None = None) -> GroupStats:
        """Per-group ``|x|^2``, ``|grad|^2``, ``<grad, x>``, numel and the layer yardstick.

        ``grads`` is aligned with :attr:`entries` (default: each parameter's ``.grad``; a missing
        gradient counts as zero).  Distributed: one all-reduce of one buffer (the three sums per group
        and the squared norm per entry that the yardstick needs).
        """
        g = [e.param.grad for e in self.entries] if grads is None else list(grads)
        g = [None if t is None else local_view(t) for t in g]
        acc, rows_xsq = self._products({"g": g}, (("x", "x"), ("g", "g"), ("g", "x")), None, keep_rows=True)
        # yardstick: each row's parameter-mean squared row norm (a few vectorized ops in total)
        row_entry, entry_rows, global_row_entry, global_owner = self._row_entry()
        G, E = self.num_groups, entry_rows.numel()
        entry_sq = torch.zeros(E, dtype=acc.dtype, device=self.device).index_add_(0, row_entry, rows_xsq)
        if self._reduces():
            flat = all_reduce_sum_(torch.cat([acc[:, :G].reshape(-1), entry_sq]))
            acc, entry_sq = flat[: 3 * G].view(3, G), flat[3 * G:]
        means = entry_sq / entry_rows
        ref = torch.zeros(G + 1, dtype=acc.dtype, device=self.device)
        ref.index_add_(0, global_owner, means[global_row_entry])
        return GroupStats(acc[0, :G], acc[1, :G], acc[2, :G], self.numel, self.group_ids, ref[:G])

    @torch.no_grad()
    def products(self, tensors: dict[str, Sequence[torch.Tensor | None]], pairs: Sequence[tuple[str, str]],
                 entry_ids: Sequence[int]) -> torch.Tensor:
        """``[len(pairs), G]``: per group ``<a, b>`` for every pair of names, over ``entry_ids`` only.

        ``"x"`` names the parameters; ``tensors[name][k]`` is the tensor of ``entry_ids[k]``
        (``None``: zero; a ``DTensor`` counts by its local shard).  The optimizer calls it on the few
        parameters that hold active redundant rows, so an evaluation never reads the rest of the
        model.  Distributed: one all-reduce (every rank must call it, with its own ``entry_ids``).
        """
        ids = tuple(entry_ids)
        full = {name: [None] * len(self.entries) for name in tensors}
        for name, ts in tensors.items():
            for i, t in zip(ids, ts):
                full[name][i] = None if t is None else local_view(t)
        out = self._products(full, tuple(pairs), ids)[0][:, : self.num_groups].contiguous()
        return all_reduce_sum_(out) if self._reduces() else out

    def _products(self, tensors: dict[str, list[torch.Tensor | None]], pairs: tuple[tuple[str, str], ...],
                  entry_ids: tuple[int, ...] | None, keep_rows: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row products written straight into one buffer, then one ``index_add_`` for all of them.

        Entries with a reduction (conv / linear rows): a norm (``<a, a>``) reads its tensor once, a
        dot product twice, with no temporaries; 1-d entries (biases, norm affine) are concatenated
        first.  ``tensors[name]`` is aligned with :attr:`entries`; ``keep_rows`` also returns the
        row values of the first pair.  When the sums will be all-reduced, each row is weighted by its
        share (:mod:`.shards`), so the SUM over ranks is the sum over shards, averaged over replicas.
        """
        self._sync_device()
        big, small, owner_all = self._layout_of(entry_ids)
        f32 = torch.float32
        buf = torch.empty(len(pairs), owner_all.numel(), dtype=f32, device=self.device)
        off = 0
        for i in big:
            e = self.entries[i]
            n = e.owner.numel()
            views = {"x": e.view(e.x)}
            views.update({name: (None if ts[i] is None else e.view(ts[i])) for name, ts in tensors.items()})
            rows = {k: (e._rows2d(v) if v is not None and v.dtype == f32 else None) for k, v in views.items()}
            fast = all(rows[k] is not None or views[k] is None for k in views)
            for k, (a, b) in enumerate(pairs):
                out = buf[k, off : off + n]
                if views[a] is None or views[b] is None:
                    out.zero_()
                elif not fast:
                    out.copy_(e.row_sq(views[a]) if a == b else e.row_dot(views[a], views[b]))
                elif a == b:
                    torch.linalg.vector_norm(rows[a], dim=1, out=out)
                    out.square_()
                else:
                    torch.linalg.vecdot(rows[a], rows[b], out=out)
            off += n
        if small:
            flat = {"x": torch.cat([self.entries[i].x.reshape(-1) for i in small]).to(f32)}
            for name, ts in tensors.items():
                flat[name] = torch.cat([self.entries[i].x.new_zeros(self.entries[i].owner.numel())
                                        if ts[i] is None else ts[i].reshape(-1) for i in small]).to(f32)
            for k, (a, b) in enumerate(pairs):
                torch.mul(flat[a], flat[b], out=buf[k, off:])
        weights = self._row_weights(entry_ids) if self._reduces() else None
        if weights is not None:
            buf.mul_(weights)
        acc = torch.zeros(len(pairs), self.num_groups + 1, dtype=f32, device=self.device)
        acc.index_add_(1, owner_all, buf)
        return acc, (buf[0] if keep_rows else None)

    def _row_weights(self, entry_ids: tuple[int, ...] | None) -> torch.Tensor | None:
        """Per row of the :meth:`_products` layout: this rank's share ``shards / world`` (``None``: all 1)."""
        big, small, owner_all = self._layout_of(entry_ids)
        world = world_size()
        shares = [self.entries[i].shards / world for i in big + small]
        if all(w == 1.0 for w in shares):
            return None
        sizes = torch.tensor([self.entries[i].owner.numel() for i in big + small], dtype=torch.long)
        return torch.repeat_interleave(torch.tensor(shares, dtype=torch.float32), sizes).to(self.device)

    def _row_entry(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the :meth:`stats` layout: entry number of every local row, rows per entry (whole parameter),
        and over the whole parameters the entry number and owner of every row (the yardstick's sum)."""
        big, small, _ = self._layout_of(None)
        re = getattr(self, "_row_entry_cache", None)
        if re is None or re[0].device != self.device:
            order = [self.entries[i] for i in big + small]
            local = torch.tensor([e.owner.numel() for e in order], dtype=torch.long)
            whole = torch.tensor([e.all_owners.numel() for e in order], dtype=torch.long)
            arange = torch.arange(len(order))
            owners = [e.all_owners for e in order]
            global_owner = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
            re = (torch.repeat_interleave(arange, local).to(self.device), whole.to(torch.float32).to(self.device),
                  torch.repeat_interleave(arange, whole).to(self.device), global_owner.to(self.device))
            self._row_entry_cache = re
        return re

    def _layout_of(self, entry_ids: tuple[int, ...] | None) -> tuple[list[int], list[int], torch.Tensor]:
        """Entry order of :meth:`_products` (reduced entries, then 1-d ones) and their owners, cached."""
        cache: dict = self.__dict__.setdefault("_layouts", {})
        lay = cache.get(entry_ids)
        if lay is None or lay[2].device != self.device:
            ids = range(len(self.entries)) if entry_ids is None else entry_ids
            big = [i for i in ids if self.entries[i].reduce_dims]
            small = [i for i in ids if not self.entries[i].reduce_dims]
            owners = [self.entries[i].owner for i in big + small]
            owner_all = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long, device=self.device)
            lay = (big, small, owner_all.to(self.device))
            if len(cache) > 64:  # subsets change only at selections; bound the cache anyway
                cache.clear()
            cache[entry_ids] = lay
        return lay

    def _per_group(self, rows_of: Callable[[IndexEntry, torch.Tensor], torch.Tensor],
                   tensors: Sequence[torch.Tensor] | None, dtype: torch.dtype) -> torch.Tensor:
        """``[G]``: per group, the sum of ``rows_of(entry, values)`` over its rows.  With ``DTensor``
        parameters the ranks' partial sums are added (one all-reduce; every rank must call it)."""
        self._sync_device()
        sharded = self.sharded and world_size() > 1
        acc = torch.zeros(self.num_groups + 1, dtype=torch.float64 if sharded else dtype, device=self.device)
        for i, e in enumerate(self.entries):
            t = e.view(local_view(e.param if tensors is None else tensors[i]).detach())
            rows = rows_of(e, t).to(acc.dtype)
            if sharded and e.shards != world_size():
                rows = rows * (e.shards / world_size())
            acc.index_add_(0, e.owner, rows)
        if sharded:
            all_reduce_sum_(acc)
            acc = acc.round() if dtype == torch.long else acc
        return acc[: self.num_groups].to(dtype)

    @torch.no_grad()
    def group_sums(self, tensors: Sequence[torch.Tensor] | None = None, *, square: bool = True) -> torch.Tensor:
        """Per-group sum of squares (or sum) of ``tensors`` aligned with :attr:`entries`."""
        return self._per_group(lambda e, t: e.row_sq(t) if square else e.row_reduce(t), tensors, torch.float32)

    @torch.no_grad()
    def nonzero_counts(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Exact number of non-zero entries per group (no floating-point underflow)."""
        return self._per_group(lambda e, t: e.row_reduce((t != 0).long()), tensors, torch.long)

    def is_zero(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Boolean ``[G]``: every variable of the group is exactly zero."""
        return self.nonzero_counts(tensors) == 0

    def norms(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        return self.group_sums(tensors).sqrt()

    # ------------------------------------------------------------------ row views
    def rows_for(self, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per entry: ``(row_indices, owner_positions)`` of the rows owned by groups in ``mask``.

        ``None`` where the entry has no such row.  Computed once and cached by callers (it
        synchronises with the device).
        """
        self._sync_device()
        ext = self._ext(mask.to(self.device), False)
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for e in self.entries:
            sel = ext[e.owner]
            rows = sel.nonzero().flatten()
            out.append((rows, e.owner[rows]) if rows.numel() else None)
        return out

    # ------------------------------------------------------------------ in-place updates
    @torch.no_grad()
    def scale_(self, factors: torch.Tensor, tensors: Sequence[torch.Tensor | None] | None = None) -> None:
        """``t_g *= factors[g]`` for every group (unowned entries untouched)."""
        self._sync_device()
        ext = self._ext(factors.to(self.device), 1.0)
        for i, e in enumerate(self.entries):
            t = e.param if tensors is None else tensors[i]
            if t is None:
                continue
            e.view(local_view(t)).mul_(ext[e.owner].view(e.bshape).to(t.dtype))

    @torch.no_grad()
    def zero_(self, mask: torch.Tensor, tensors: Sequence[torch.Tensor | None] | None = None) -> None:
        """Set the variables of the groups in ``mask`` ([G] bool) exactly to zero."""
        for i, r in enumerate(self.rows_for(mask)):
            if r is None:
                continue
            e = self.entries[i]
            t = e.param if tensors is None else tensors[i]
            if t is not None:
                e.view(local_view(t)).index_fill_(e.dim, r[0], 0.0)


class RowFactors:
    """Persistent per-row factors for a subset of entries, refreshed by one gather.

    ``views[k]`` broadcasts against the parameter of ``entry_ids[k]`` (its rows along the slicing
    dim), in that parameter's dtype.  :meth:`fill` writes ``per_group[owner]`` (``default`` for rows
    no group owns) into every view at once, so an optimizer can fold per-group coefficients into
    fused ``mul_`` / ``addcmul_`` updates without a Python loop over groups and without
    synchronising with the device.
    """

    def __init__(self, index: GroupIndex, entry_ids: Sequence[int]) -> None:
        self.entry_ids = tuple(entry_ids)
        entries = [index.entries[i] for i in self.entry_ids]
        dev = index.device
        self.owner = (torch.cat([e.owner for e in entries]) if entries
                      else torch.zeros(0, dtype=torch.long, device=dev))
        self.flat = torch.ones(self.owner.numel(), dtype=torch.float32, device=dev)
        self.views: list[torch.Tensor] = []
        self._casts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (float32 view, own-dtype copy)
        off = 0
        for e in entries:
            n = e.owner.numel()
            v = self.flat[off : off + n].view(e.bshape)
            if e.scalar:
                v = v.view(())
            if e.param.dtype != torch.float32:
                c = torch.empty(v.shape, dtype=e.param.dtype, device=dev)
                self._casts.append((v, c))
                v = c
            self.views.append(v)
            off += n

    def fill(self, per_group: torch.Tensor, default: float) -> None:
        """Every row gets ``per_group[its group]``; rows of no group get ``default``."""
        ext = torch.cat([per_group.to(self.flat.dtype), self.flat.new_full((1,), default)])
        torch.index_select(ext, 0, self.owner, out=self.flat)
        for src, dst in self._casts:
            dst.copy_(src)
