"""top_svd (exact PiSSA without a full SVD) against fp64 torch.linalg.svd: singular values, the rank-r product,
the a-posteriori residual test, and the fallback where iteration would be slow."""
import pytest
import torch

from loram_fast.ops.topsvd import top_svd


def _matrix(m, n, decay, seed=0):
    """U diag(k^-decay) Vᵀ with random orthogonal U, V (fp64): decay 0.5 is a realistic LLM-weight spectrum."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    S = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    return (U * S) @ V.T


def _truth(W64, r):
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    return S[:r], (U[:, :r] * S[:r]) @ Vh[:r]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("m,n,r", [(800, 800, 8), (600, 1000, 4), (1000, 700, 12)])
def test_matches_full_svd(m, n, r, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    W64 = _matrix(m, n, 0.5)
    S_true, P_true = _truth(W64, r)
    res = top_svd(W64.float().to(device), r)
    res = res._replace(U=res.U.cpu(), S=res.S.cpu(), Vh=res.Vh.cpu())
    assert not res.fallback and res.passes >= 1  # iterated, and converged
    assert ((res.S.double() - S_true).abs() / S_true).max() <= 1e-5
    P = (res.U.double() * res.S.double()) @ res.Vh.double()
    # the full fp32 SVD's own error on the rank-r product is ~1e-6 here; ours stays within a few times that
    U, S, Vh = torch.linalg.svd(W64.float(), full_matrices=False)
    full = (U[:, :r].double() * S[:r].double()) @ Vh[:r].double()
    ours_err = float((P - P_true).norm() / P_true.norm())
    full_err = float((full - P_true).norm() / P_true.norm())
    assert ours_err <= max(5 * full_err, 1e-5), (ours_err, full_err)
    # the a-posteriori test itself, recomputed here in fp64
    resid = (W64 @ res.Vh.double().T - res.U.double() * res.S.double()).norm(dim=0)
    assert resid.max() <= 2e-6 * res.S[0]
    assert torch.allclose(res.U.double().T @ res.U.double(), torch.eye(r, dtype=torch.float64), atol=1e-5)


def test_flat_spectrum_falls_back_quickly():
    """A Gaussian matrix: σ_q/σ_r ≈ 1, iteration would take long; the full SVD runs after passes worth at most a
    quarter of its flops."""
    m, n, r = 600, 500, 8
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    res = top_svd(W, r)
    q, k = max(2 * r, r + 16), min(m, n)
    assert res.fallback and res.passes * 4 * m * n * q <= 0.25 * (4 * m * n * k + 8 * k ** 3)
    # the fallback on the CPU: the fp64 Gram route, at least as close to the fp64 truth as fp32 LAPACK
    S64, P64 = _truth(W.double(), r)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert ((res.S.double() - S64).abs() / S64).max() <= ((S[:r].double() - S64).abs() / S64).max()
    lapack = float(((U[:, :r] * S[:r]) @ Vh[:r]).double().sub(P64).norm())
    assert float(((res.U * res.S[None]) @ res.Vh).double().sub(P64).norm()) <= 0.7 * lapack


@pytest.mark.parametrize("m,n", [(600, 500), (500, 600), (1000, 300), (300, 1000)])
def test_flat_spectrum_fallback_by_gram_and_without(m, n, monkeypatch):
    """The top-r fallback after the iteration gives up: the fp64 Gram route of W (near square) or of R from a QR
    (far from square), each matrix of a batch; the full SVD bit for bit on another device or where a top value is
    at fp32 noise (a raised noise floor here)."""
    from loram_fast.ops import topsvd

    r = 8
    W = torch.randn(2, m, n, generator=torch.Generator().manual_seed(2))
    routes = []
    real = topsvd._gram_fallback
    monkeypatch.setattr(topsvd, "_gram_fallback", lambda *a: routes.append(a[0].shape) or real(*a))
    res = top_svd(W, r)
    assert res.fallback and routes == [(m, n), (m, n)]
    assert res.U.shape == (2, m, r) and res.S.shape == (2, r) and res.Vh.shape == (2, r, n)
    for b in range(2):
        S64, P64 = _truth(W[b].double(), r)
        U, S, Vh = torch.linalg.svd(W[b], full_matrices=False)
        assert ((res.S[b].double() - S64).abs() / S64).max() <= max(1e-7, ((S[:r].double() - S64).abs() / S64).max())
        got = float(((res.U[b] * res.S[b][None]) @ res.Vh[b]).double().sub(P64).norm())
        assert got <= float(((U[:, :r] * S[:r]) @ Vh[:r]).double().sub(P64).norm())
        assert torch.allclose(res.U[b].mT @ res.U[b], torch.eye(r), atol=1e-5)
        assert torch.allclose(res.Vh[b] @ res.Vh[b].mT, torch.eye(r), atol=1e-5)
    full = torch.linalg.svd(W, full_matrices=False)
    for name, value in (("GRAM_DEVICES", ("cuda",)), ("GRAM_FLOOR", 0.99)):
        with monkeypatch.context() as mp:
            mp.setattr(topsvd, name, value)
            res = top_svd(W, r)
        assert res.fallback and torch.equal(res.S, full.S[:, :r]) and torch.equal(res.U, full.U[..., :r]), name


def test_small_matrix_uses_full_svd_and_batch_and_bf16():
    assert top_svd(torch.randn(60, 50), 4).fallback  # min(m, n) <= 4q
    W = torch.stack([_matrix(400, 300, 0.5, seed=s) for s in range(2)])
    res = top_svd(W.float(), 6)
    assert res.U.shape == (2, 400, 6) and res.S.shape == (2, 6) and res.Vh.shape == (2, 6, 300)
    for b in range(2):
        S_true, _ = _truth(W[b], 6)
        assert ((res.S[b].double() - S_true).abs() / S_true).max() <= 1e-5
    Wb = W[0].bfloat16()
    S_true, _ = _truth(Wb.double(), 6)
    assert ((top_svd(Wb, 6).S.double() - S_true).abs() / S_true).max() <= 1e-5


def test_errors():
    with pytest.raises(ValueError, match="rank r=9"):
        top_svd(torch.randn(8, 8), 9)
    with pytest.raises(ValueError, match="tol"):
        top_svd(torch.randn(8, 8), 2, tol=2.0)
    W = _matrix(400, 400, 0.5).float()
    W[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        top_svd(W, 4)


# -- bottom_svd: MiCA / MiLoRA's minor triplets without a full SVD ------------------------------------------------

def _bottom_truth(W64, r):
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    return U[:, -r:], S[-r:], Vh[-r:]


def _subspace_gap(got, basis):
    """‖(I − P) got‖ for P the projector on the orthonormal columns of ``basis``."""
    return float((got - basis @ (basis.T @ got)).norm())


@pytest.mark.parametrize("m,n", [(512, 512), (384, 640), (640, 384)])
@pytest.mark.parametrize("need", ["U", "Vh", "both"])
def test_bottom_svd_iterates_where_the_bottom_has_gaps(m, n, need):
    """Gaussian matrices: where square, the smallest singular values spread out at the hard edge and
    shift-and-invert converges without the full SVD; rectangular ones crowd at a soft edge and fall back. Either way
    the result is at least as close to the fp64 truth as fp32 LAPACK."""
    from loram_fast.ops.topsvd import bottom_svd

    W64 = torch.randn(m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = 6
    U64, S64, Vh64 = _bottom_truth(W64, r)
    W = W64.float()
    got = bottom_svd(W, r, need=need)
    lapack = torch.linalg.svd(W, full_matrices=False)
    if m == n:
        assert not got.fallback and got.passes > 0
    assert ((got.S.double() - S64).abs() / S64).max() <= max(1e-4, 2 * float(((lapack.S[-r:].double() - S64).abs()
                                                                              / S64).max()))
    assert torch.all(got.S[:-1] >= got.S[1:])  # descending, as the last r of a full SVD
    if need != "Vh":
        lap = _subspace_gap(lapack.U[:, -r:].double(), U64)
        assert _subspace_gap(got.U.double(), U64) <= 2 * lap + 1e-6
        assert torch.allclose(got.U.T @ got.U, torch.eye(r), atol=1e-5)
    else:
        assert got.U is None
    if need != "U":
        lap = _subspace_gap(lapack.Vh[-r:].T.double(), Vh64.T)
        assert _subspace_gap(got.Vh.T.double(), Vh64.T) <= 2 * lap + 1e-6
    if need == "both":  # the triplets belong together: W v = σ u
        assert float((W @ got.Vh.T - got.U * got.S).norm() / W.norm()) <= 1e-5


@pytest.mark.parametrize("m,n", [(512, 512), (384, 640), (640, 384), (800, 300), (300, 800)])
@pytest.mark.parametrize("need", ["U", "Vh", "both"])
@pytest.mark.parametrize("attempt", [True, False])
def test_bottom_svd_falls_back_on_a_flat_bottom(m, n, need, attempt):
    """σ_k ∝ k^-0.5: the smallest values crowd together and iterating would not pay; the full SVD (of W when near
    square, of R with Q applied from its reflectors when W is ≥ 11/6 times as tall or wide) gives the same subspaces
    as LAPACK's, the triplets together (``attempt=False``: the same without iterating)."""
    from loram_fast.ops.topsvd import bottom_svd, bottom_svd_route

    W64 = _matrix(m, n, 0.5, seed=4)
    r = 6
    U64, S64, Vh64 = _bottom_truth(W64, r)
    W = W64.float()
    got, route = bottom_svd_route(W, r, need=need, attempt=attempt)
    assert got.fallback and got.passes <= (2 if attempt else 0) and route == "gram"
    assert torch.equal(bottom_svd(W, r, need=need, attempt=attempt).S, got.S)  # the public form: the same result
    lapack = torch.linalg.svd(W, full_matrices=False)
    # on the CPU the fallback is the fp64 Gram route (of R after the attempt; without it, of W near square and of R
    # from a QR far from square), closer to the fp64 truth than fp32 LAPACK: the subspaces at most 0.7× LAPACK's
    # distance (measured 0.02–0.45×), which a fallback to a full fp32 SVD (≈ 1×) would not meet
    closer = 0.7
    if need != "Vh":
        assert _subspace_gap(got.U.double(), U64) <= closer * _subspace_gap(lapack.U[:, -r:].double(), U64)
        assert torch.allclose(got.U.T @ got.U, torch.eye(r), atol=1e-5)
    if need != "U":
        assert _subspace_gap(got.Vh.T.double(), Vh64.T) <= closer * _subspace_gap(lapack.Vh[-r:].T.double(), Vh64.T)
    if need == "both":
        assert float((W @ got.Vh.T - got.U * got.S).norm() / W.norm()) <= 1e-5
    assert torch.all(got.S[:-1] >= got.S[1:])
    assert ((got.S.double() - S64).abs() / S64).max() <= ((lapack.S[-r:].double() - S64).abs() / S64).max()


@pytest.mark.parametrize("m,n", [(300, 120), (120, 300), (150, 150)])
def test_by_gram_in_blocks_and_where_it_declines(m, n, monkeypatch):
    """The fp64 Gram route directly: the same triplets whatever the fp64 block size (one row per block, a block
    that does not divide the rows, one block), the last r of the fp64 SVD to fp32 rounding (singular values 1e-6
    relative, subspaces 1e-5); None on a rank-deficient matrix (bottom values at fp32 noise: the full SVD's choice),
    on a device outside ``GRAM_DEVICES`` and beyond ``GRAM_MAX_SIDE``."""
    from loram_fast.ops import topsvd
    from loram_fast.ops.topsvd import _by_gram

    W = _matrix(m, n, 0.5, seed=6).float()
    r = 5
    U64, S64, Vh64 = _bottom_truth(W.double(), r)  # the truth of the fp32 matrix itself
    results = [_by_gram(W, r, rows_per_block=b) for b in (min(m, n), 7 * min(m, n) + 3, 1 << 22)]
    for U, S, V in results:
        assert U.shape == (m, r) and S.shape == (r,) and V.shape == (n, r) and U.dtype == torch.float32
        assert ((S.double() - S64).abs() / S64).max() <= 1e-6
        assert _subspace_gap(U.double(), U64) <= 1e-5 and _subspace_gap(V.double(), Vh64.T) <= 1e-5
        assert float((W @ V - U * S).norm() / S.min()) <= 1e-5  # W v = σ u, relative to σ itself
    for U, S, V in results[1:]:
        assert torch.allclose(S, results[0][1], rtol=1e-6)
        assert torch.allclose((U * S) @ V.T, (results[0][0] * results[0][1]) @ results[0][2].T, atol=1e-6)
    singular = torch.randn(m, 8, generator=torch.Generator().manual_seed(1)) @ torch.randn(8, n)
    assert _by_gram(singular, r) is None
    with monkeypatch.context() as mp:
        mp.setattr(topsvd, "GRAM_DEVICES", ("cuda",))
        assert _by_gram(W, r) is None
    monkeypatch.setattr(topsvd, "GRAM_MAX_SIDE", min(m, n) - 1)
    assert _by_gram(W, r) is None and topsvd._gram_fallback(W, r, "bottom") is None


def test_bottom_svd_at_fp32_noise_leaves_the_gram_route_to_the_full_svd(monkeypatch):
    """Where the bottom values are at fp32 noise the Gram route declines and the result is LAPACK's full SVD of W
    bit for bit (its vectors there are rounding: the reference's own choice). A weight with 40 zero columns: R has
    zero pivots (no attempt; the pivot test declines), and without the attempt the Gram route finds σ_min = 0
    after its eigh. The declines after a failed attempt, and ``minor_svd``'s memo sending the shape's later weights
    to the full SVD at once, run on a crowded k^-0.5 bottom with the noise floor raised to 0.5·σ_1."""
    from loram_fast.methods.svd import minor_svd
    from loram_fast.ops import topsvd
    from loram_fast.ops.topsvd import bottom_svd_route

    r = 6
    crowded = _matrix(300, 300, 0.5, seed=8).float()
    zero_columns = crowded.clone()
    zero_columns[:, 100:140] = 0

    def is_lapacks(W, got):
        lapack = torch.linalg.svd(W, full_matrices=False)
        return (torch.equal(got.U, lapack.U[:, -r:]) and torch.equal(got.S, lapack.S[-r:])
                and torch.equal(got.Vh, lapack.Vh[-r:]))

    for kw in ({}, {"attempt": False}):
        got, route = bottom_svd_route(zero_columns, r, **kw)
        assert got.fallback and route == "svd" and got.passes == 0 and is_lapacks(zero_columns, got), kw
    assert bottom_svd_route(crowded, r)[1] == "gram"  # the crowded weight itself takes the Gram route
    monkeypatch.setattr(topsvd, "GRAM_FLOOR", 0.5)
    for kw in ({}, {"attempt": False}):
        got, route = bottom_svd_route(crowded, r, **kw)
        assert got.fallback and route == "svd" and is_lapacks(crowded, got), kw
    memo = {}
    first = minor_svd(crowded, r, memo=memo)
    assert first.fallback and first.passes > 0 and list(memo.values()) == [False] and is_lapacks(crowded, first)
    monkeypatch.setattr(topsvd, "GRAM_FLOOR", 1e-7)  # the route would now run: the memo must skip it
    later = minor_svd(crowded.flip(0), r, memo=memo)
    assert later.passes == 0 and later.fallback and is_lapacks(crowded.flip(0), later)


def test_bottom_svd_errors():
    from loram_fast.ops.topsvd import bottom_svd, bottom_svd_route

    W = torch.randn(200, 200)
    W[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bottom_svd(W, 4)
    with pytest.raises(ValueError, match="rank"):
        bottom_svd(torch.randn(20, 30), 21)
    with pytest.raises(ValueError, match="need"):
        bottom_svd(torch.randn(20, 30), 2, need="V")
    singular = torch.randn(300, 8) @ torch.randn(8, 300)  # rank 8: R has (near) zero pivots
    got, route = bottom_svd_route(singular, 4)
    assert torch.isfinite(got.U).all() and got.S.max() <= 1e-3 * torch.linalg.matrix_norm(singular, 2)
    assert route != "gram"  # bottom values at fp32 noise: never from the Gram route


def test_mica_and_milora_iterative_match_the_full_svd():
    """The methods on a 512×512 Gaussian weight: the same minor subspace (MiCA's B) and the same residual product
    (MiLoRA) as solver='svd', peft's full SVD."""
    from loram_fast.methods.svd import mica_init, svd_init_batch

    W = torch.randn(512, 512, generator=torch.Generator().manual_seed(5))
    fast, full = mica_init(W, 8, 1.0), mica_init(W, 8, 1.0, solver="svd")
    assert _subspace_gap(fast.B.double(), full.B.double()) <= 1e-3
    (a,), (b,) = svd_init_batch([W], 8, [2.0], which="bottom"), svd_init_batch([W], 8, [2.0], which="bottom",
                                                                               solver="svd")
    pa, pb = a.B @ a.A, b.B @ b.A
    assert float((pa - pb).norm() / pb.norm()) <= 1e-3
