"""A weight split across processes (torch.distributed / DTensor), and the products the solvers need from it.

``Sharding``: an out×in matrix M split along ``dim`` (0: rows, 1: columns) over the ranks of ``group`` in
``torch.chunk`` pieces (DTensor's ``Shard`` and FSDP2's layout); this rank holds ``[offset, offset + size)``.
``sharding_of(W, transposed)`` reads it off a DTensor base weight (``transposed``: the weight is stored in×out, as
GPT-2's Conv1D); a plain tensor or a replicated DTensor gives None.

``MatrixOperator``: M through the products of a randomized / subspace-iteration SVD, so the same solver loop runs on
one process and on a sharded weight. Vectors live on one of two sides: ``"m"`` (length out, like ``M x``) or ``"n"``
(length in, like ``Mᵀ y``); the sharded side's vectors are held as this rank's rows only, the other side's whole.

    mm(X)   = M X      (X n-side, q columns → m-side)   row-sharded: local;  column-sharded: one all-reduce m×q
    tmm(Y)  = Yᵀ M     (Y m-side → q×n, n-side columns) row-sharded: one all-reduce q×n;  column-sharded: local
    qr(Y, side)        Householder QR locally; on the sharded side CholeskyQR2 with one all-reduce of the q×q Gram
                       matrix per pass (fp64), falling back to gathering the m×q (or n×q) panel when ill-conditioned

Every collective goes through :func:`all_reduce` / :func:`gather`, which count their payload bytes in ``COUNTER``
(``bench/sharded.py`` reads it). Every decision that could raise is taken on all-reduced values, so all ranks raise
together and none waits in a collective the others left.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .matmul import matmul_f32
from .moments import Moments, weight_moments
from .orth import cholesky_pass, orthonormalize
from .threads import small_op

# payload bytes and calls of every collective made here, and the bytes of the all-gathers among them (reset and
# read by benchmarks and tests)
COUNTER = {"bytes": 0, "calls": 0, "gathered": 0}


def _dist():
    import torch.distributed as dist

    return dist


def _count(nbytes: int, gathered: bool = False) -> None:
    COUNTER["bytes"] += nbytes
    COUNTER["calls"] += 1
    if gathered:
        COUNTER["gathered"] += nbytes


def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum ``t`` over ``group`` in place (and return it)."""
    _count(t.numel() * t.element_size())
    _dist().all_reduce(t, group=group)
    return t


def all_max(t: torch.Tensor, group) -> torch.Tensor:
    """Element-wise maximum of ``t`` over ``group``, in place (and return it)."""
    dist = _dist()
    _count(t.numel() * t.element_size())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def any_rank(flag: bool, group, device=None) -> bool:
    """True on every rank when ``flag`` is True on any rank of ``group`` (``device``: where the backend reduces)."""
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0], device=device), group).item() > 0)


@dataclass(frozen=True)
class Sharding:
    """M (out×in) split along ``dim`` over ``world`` ranks of ``group``: this rank holds ``[offset, offset + size)``
    of the ``length`` entries of that dimension (``torch.chunk`` pieces, as DTensor's ``Shard``)."""

    group: object
    dim: int
    offset: int
    size: int
    length: int
    world: int

    def sizes(self) -> list[int]:
        chunk = -(-self.length // self.world)
        return [max(0, min(chunk, self.length - i * chunk)) for i in range(self.world)]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole of a sharded-side quantity from each rank's rows (dim 0 of ``local``); every rank gets it."""
        sizes = self.sizes()
        chunk = max(sizes)
        padded = local.new_zeros((chunk, *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        _count(padded.numel() * padded.element_size() * self.world, gathered=True)
        _dist().all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole sharded-side quantity (rows along dim 0)."""
        return full.narrow(0, self.offset, self.size)


# tensor classes that are never sharded (the common case, asked several times per layer)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def sharding_of(W, transposed: bool = False) -> Optional[Sharding]:
    """How the DTensor ``W`` is split, as a :class:`Sharding` of its out×in view (``transposed``: W is stored in×out).
    None for a plain tensor or a fully replicated DTensor. Raises ``NotImplementedError`` for layouts other than one
    ``Shard(0)`` / ``Shard(1)`` placement (others ``Replicate``)."""
    if type(W) in _PLAIN:
        return None
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch without distributed support
        return None
    if not isinstance(W, DTensor):
        return None
    shards = [(i, p) for i, p in enumerate(W.placements) if not isinstance(p, Replicate)]
    if not shards:
        return None
    if len(shards) > 1 or type(shards[0][1]) is not Shard or W.dim() != 2:
        raise NotImplementedError(f"loram_fast: a base weight with DTensor placements {tuple(W.placements)} is not "
                                  "supported; supported: one Shard(0) or Shard(1) placement, the others Replicate "
                                  "(FSDP2, HSDP, distribute_tensor)")
    mesh_dim, placement = shards[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, global_offset = compute_local_shape_and_global_offset(W.shape, W.device_mesh, W.placements)
    stored_dim = placement.dim % 2
    dim = 1 - stored_dim if transposed else stored_dim
    return Sharding(group=W.device_mesh.get_group(mesh_dim), dim=dim, offset=int(global_offset[stored_dim]),
                    size=int(local_shape[stored_dim]), length=int(W.shape[stored_dim]),
                    world=W.device_mesh.size(mesh_dim))


def local_part(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's piece of ``full`` laid out like the DTensor ``param`` (``full`` itself for a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    out = full
    for d, (size, start) in enumerate(zip(shape, offset)):
        out = out.narrow(d, int(start), int(size))
    return out


def is_dtensor(t) -> bool:
    return type(t) not in _PLAIN and callable(getattr(t, "to_local", None))


def local_tensor(t) -> torch.Tensor:
    """The local tensor of a DTensor (in place: writes reach the sharded storage), else ``t`` itself."""
    if type(t) in _PLAIN:
        return t
    to_local = getattr(t, "to_local", None)
    return t.to_local() if callable(to_local) else t


class MatrixOperator:
    """M (``shape`` = out×in) through products (see the module docstring). ``local``: this rank's block, the whole
    M when ``sharding`` is None. Results are fp32. ``as_stored``: :meth:`tmm` multiplies a transposed view of a
    row-major matrix as stored (see :meth:`transposed`)."""

    as_stored = False

    def __init__(self, local: torch.Tensor, shape: tuple[int, int], sharding: Optional[Sharding] = None,
                 backend=None):
        self.local = local
        self.shape = (int(shape[0]), int(shape[1]))
        self.sharding = sharding
        self.backend = backend
        self.device = local.device
        self.dtype = local.dtype

    def transposed(self, as_stored: bool = False) -> "MatrixOperator":
        """Mᵀ (the sharded dimension follows). ``as_stored``: its :meth:`tmm` forms ``Yᵀ Mᵀ`` as ``(M Y)ᵀ``, M read as
        stored (1.3× faster on a 1024×2752 weight, other roundings); without it, the products take the GEMM forms
        of ``torch.svd_lowrank`` on a transposed matrix (:func:`~loram_fast.ops.rsvd.svd_lowrank_sharded` keeps
        one process's roundings that way)."""
        sharding = None if self.sharding is None else replace(self.sharding, dim=1 - self.sharding.dim)
        flipped = MatrixOperator(self.local.mT, (self.shape[1], self.shape[0]), sharding, self.backend)
        flipped.as_stored = as_stored
        return flipped

    def sharded(self, side: str) -> bool:
        return self.sharding is not None and self.sharding.dim == (0 if side == "m" else 1)

    def _reduce_if(self, t: torch.Tensor, side: str) -> torch.Tensor:
        return all_reduce(t, self.sharding.group) if self.sharded(side) else t

    def mm(self, X: torch.Tensor) -> torch.Tensor:
        """M X for X n-side (this rank's rows when the columns of M are sharded): m-side."""
        return self._reduce_if(matmul_f32(self.local, X, backend=self.backend), "n")

    def tmm(self, Y: torch.Tensor) -> torch.Tensor:
        """Yᵀ M (q×n; this rank's columns when they are sharded) for Y m-side (``as_stored``: as ``(Mᵀ Y)ᵀ``)."""
        if self.as_stored and self.local.dim() == 2 and self.local.mT.is_contiguous():
            return self._reduce_if(matmul_f32(self.local.mT, Y, backend=self.backend).mT, "m")
        return self._reduce_if(matmul_f32(Y.mT, self.local, backend=self.backend), "m")

    def col_norms(self, Y: torch.Tensor, side: str) -> torch.Tensor:
        """Euclidean norms of the columns of a ``side`` quantity."""
        if not self.sharded(side):
            return torch.linalg.vector_norm(Y, dim=-2)
        return all_reduce(Y.double().square().sum(-2), self.sharding.group).sqrt().float()

    # what a non-finite sketch means, in the error it raises
    nonfinite = "the input holds NaN or Inf values"

    def sketch(self, q: int, generator: Optional[torch.Generator], owner: str) -> torch.Tensor:
        """``M Ω`` (m-side) through :meth:`mm` (so subclasses, products and inverses, get it too), with Ω ~ N(0, 1)
        n×q fp32 from ``generator`` (default: seeded with 0 on M's device, so results are deterministic; the same Ω
        on every rank, and as on one process). A NaN or Inf anywhere in M reaches the sketch: one cheap check on it,
        not a pass over M, raises ``ValueError`` naming ``owner`` on every rank."""
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(0)
        omega = torch.randn(self.shape[1], q, generator=generator, device=self.device, dtype=torch.float32)
        Y = self.mm(self.sharding.local_rows(omega) if self.sharded("n") else omega)
        bad = not bool(torch.isfinite(Y).all())
        if bad if self.sharding is None else any_rank(bad, self.sharding.group, self.device):
            raise ValueError(f"loram_fast.{owner}: {self.nonfinite}")
        return Y

    def orth(self, Y: torch.Tensor, side: str = "m") -> torch.Tensor:
        """An orthonormal basis of the columns of a ``side`` quantity."""
        if not self.sharded(side):
            return orthonormalize(Y, backend=self.backend)
        return self.qr(Y, side)[0]

    def qr(self, Y: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``Y = Q R`` (fp32) of a ``side`` quantity, R q×q upper triangular, with the signs of Householder QR
        (``torch.linalg.qr``, LAPACK's convention) also on the sharded side, so sign-sensitive consumers (LoRA-GA
        pairs the i-th right with the (r+i)-th left singular vector) get one process's result."""
        if not self.sharded(side):
            with small_op(self.device):
                return torch.linalg.qr(Y.float())
        sh = self.sharding
        q = Y.shape[-1]
        if sh.length <= 2 * q:  # a short panel: Householder on the whole of it
            return self._gathered_qr(Y)
        Q, R = Y.double(), None
        for _ in range(2):  # CholeskyQR2 on the Gram matrix summed over the ranks
            Q, Rk, ok = cholesky_pass(Q, reduce=lambda gram: all_reduce(gram, sh.group))
            if not bool(ok):
                return self._gathered_qr(Y)  # the same Gram matrix on every rank: all take this branch together
            R = Rk if R is None else Rk @ R
        signs = self._householder_signs(Q)
        return (Q * signs).float(), (signs[:, None] * R).float()

    def _gathered_qr(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Qf, Rf = torch.linalg.qr(self.sharding.gather(Y.float()))
        return self.sharding.local_rows(Qf).contiguous(), Rf

    def _householder_signs(self, Q: torch.Tensor) -> torch.Tensor:
        """D (±1 per column) with ``Q·D`` the Householder Q of the same panel (Q: this rank's rows of a sharded panel
        with orthonormal columns, fp64). Householder QR of a matrix with orthonormal columns takes every reflector's
        sign from its top q×q block T alone, so LAPACK's QR of ``[T; C]`` (C completing the columns to orthonormal,
        ``CᵀC = I − TᵀT``) shows the signs: one all-reduce of q×q (Ballard et al. 2015, Householder reconstruction)."""
        sh, q = self.sharding, Q.shape[-1]
        top = torch.zeros(q, q, dtype=Q.dtype, device=Q.device)
        a, b = sh.offset, min(q, sh.offset + sh.size)  # this rank's global rows among the first q
        if a < b:
            top[a:b] = Q[:b - a]
        all_reduce(top, sh.group)
        lam, V = torch.linalg.eigh(torch.eye(q, dtype=Q.dtype, device=Q.device) - top.mT @ top)
        completion = lam.clamp_min(0).sqrt()[:, None] * V.mT
        R = torch.linalg.qr(torch.cat([top, completion])).R
        signs = torch.sign(torch.diagonal(R))
        return torch.where(signs == 0, torch.ones_like(signs), signs)

    def gather(self, X: torch.Tensor, side: str) -> torch.Tensor:
        """The whole of a ``side`` quantity (rows along dim 0) on every rank."""
        return self.sharding.gather(X) if self.sharded(side) else X

    def gram(self, side: str) -> torch.Tensor:
        """The fp64 Gram matrix over an unsharded ``side``: AᵀA (n×n, side "n") or AAᵀ (m×m, side "m"), summed
        over the ranks' blocks (one all-reduce of its size)."""
        if self.sharded(side):
            raise ValueError(f"loram_fast: the Gram matrix over the sharded side {side!r} needs every rank's block")
        A = self.local.double()
        G = A.mT @ A if side == "n" else A @ A.mT
        return all_reduce(G, self.sharding.group) if self.sharding is not None else G

    def whole(self) -> torch.Tensor:
        """All of M on every rank (an all-gather of out×in entries when sharded; what ``gather_full_weights``
        costs)."""
        if self.sharding is None:
            return self.local
        if self.sharding.dim == 0:
            return self.sharding.gather(self.local)
        return self.sharding.gather(self.local.mT.contiguous()).mT

    def moments(self) -> Moments:
        """Count, sum and sum of squares (fp64) of all entries of M, all-reduced."""
        mom = weight_moments(self.local, backend=self.backend)
        if self.sharding is None:
            return mom
        totals = all_reduce(torch.tensor([mom.sum, mom.sumsq, float(mom.count)], dtype=torch.float64,
                                         device=self.device), self.sharding.group).tolist()
        return Moments(int(totals[2]), totals[0], totals[1])

    def block(self, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        """``M[rows[0]:rows[1], cols[0]:cols[1]]`` (fp32) on every rank: one all-reduce of its size when sharded."""
        (r0, r1), (c0, c1) = rows, cols
        if self.sharding is None:
            return self.local[r0:r1, c0:c1].float()
        sh = self.sharding
        out = torch.zeros(r1 - r0, c1 - c0, dtype=torch.float32, device=self.device)
        lo, hi = sh.offset, sh.offset + sh.size
        if sh.dim == 0:
            a, b = max(r0, lo), min(r1, hi)
            if a < b:
                out[a - r0:b - r0] = self.local[a - lo:b - lo, c0:c1].float()
        else:
            a, b = max(c0, lo), min(c1, hi)
            if a < b:
                out[:, a - c0:b - c0] = self.local[r0:r1, a - lo:b - lo].float()
        return all_reduce(out, sh.group)


class RightProductOperator(MatrixOperator):
    """``M = W C`` (W out×in in its own dtype, C in×in fp32) through products, never formed: ``M X = W (C X)``,
    ``Yᵀ M = (Yᵀ W) C``; :meth:`whole` forms it (fp32) for a fallback. One process (no sharding)."""

    def __init__(self, W: torch.Tensor, C: torch.Tensor, backend=None):
        super().__init__(W, (W.shape[0], C.shape[1]), None, backend)
        self.right = C.float()

    def transposed(self, as_stored: bool = False) -> "MatrixOperator":
        raise NotImplementedError("loram_fast: RightProductOperator has no transposed form")

    def mm(self, X: torch.Tensor) -> torch.Tensor:
        return matmul_f32(self.local, self.right @ X, backend=self.backend)

    def tmm(self, Y: torch.Tensor) -> torch.Tensor:
        return matmul_f32(Y.mT, self.local, backend=self.backend) @ self.right

    def whole(self) -> torch.Tensor:
        return matmul_f32(self.local, self.right, backend=self.backend)
