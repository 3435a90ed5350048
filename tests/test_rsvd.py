"""randomized_svd and cholesky_qr against fp64 torch.linalg.svd: subspaces, singular values, tail errors."""
import pytest
import torch

from loram_fast import cholesky_qr, randomized_svd


def _matrix(m, n, decay=0.8, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))
    S = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * S[..., None, :]) @ V.mT).float()


def _tail_ratio(A, U, S, Vh, r):
    """‖A − U S Vh‖_F / ‖A − A_r‖_F (1 = optimal)."""
    Ad = A.double()
    opt = torch.linalg.svdvals(Ad)[..., r:].square().sum(-1).sqrt()
    got = (Ad - (U.double() * S.double()[..., None, :]) @ Vh.double()).norm(dim=(-2, -1))
    return (got / opt).max().item()


def _max_angle_sin(Q1, Q2):
    """sin of the largest principal angle between two column spaces (orthonormal bases): ‖(I − Q1 Q1ᵀ) Q2‖₂."""
    Q1, Q2 = Q1.double(), Q2.double()
    return torch.linalg.matrix_norm(Q2 - Q1 @ (Q1.mT @ Q2), ord=2).max().item()


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (100, 300)])
def test_accuracy_on_decaying_spectrum(shape):
    A = _matrix(*shape)
    r = 5
    U, S, Vh = randomized_svd(A, r)
    assert U.shape == (shape[0], r) and S.shape == (r,) and Vh.shape == (r, shape[1])
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    Ue, Se, Vhe = torch.linalg.svd(A.double())
    assert torch.allclose(S.double(), Se[:r], rtol=1e-4)
    assert _max_angle_sin(U, Ue[:, :r]) < 1e-3 and _max_angle_sin(Vh.mT, Vhe[:r].mT) < 1e-3
    assert _tail_ratio(A, U, S, Vh, r) <= 1.01
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(U.double().mT @ U.double(), eye, atol=1e-5)
    assert torch.allclose(Vh.double() @ Vh.double().mT, eye, atol=1e-5)


def test_never_worse_than_svd_lowrank_at_equal_q_and_niter():
    A = _matrix(200, 150, decay=0.93)
    r, p, niter = 8, 8, 2
    ours, theirs = [], []
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        ours.append(_tail_ratio(A, *randomized_svd(A, r, oversample=p, niter=niter, generator=g), r))
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(A, q=r + p, niter=niter)
        theirs.append(_tail_ratio(A, U[:, :r], S[:r], V[:, :r].mT, r))
    assert sum(ours) / 5 <= 1.001 * sum(theirs) / 5


def test_batched_equals_single():
    A = _matrix(64, 40, batch=(3,))
    U, S, Vh = randomized_svd(A, 6)
    assert U.shape == (3, 64, 6) and S.shape == (3, 6) and Vh.shape == (3, 6, 40)
    for i in range(3):
        Ui, Si, Vhi = randomized_svd(A[i], 6)
        assert torch.allclose(S[i], Si, rtol=1e-5)
        assert torch.allclose((U[i] * S[i]) @ Vh[i], (Ui * Si) @ Vhi, atol=1e-5)


def test_exact_path_zero_and_errors():
    A = _matrix(20, 12)
    U, S, Vh = randomized_svd(A, 12)  # rank >= min(m, n): the exact SVD, min(m, n) components
    assert U.shape == (20, 12) and torch.allclose(S.double(), torch.linalg.svdvals(A.double()), rtol=1e-5)
    Z = torch.zeros(30, 17)
    U, S, Vh = randomized_svd(Z, 4)
    assert torch.equal(S, torch.zeros(4))
    assert torch.allclose(U.mT @ U, torch.eye(4), atol=1e-5) and torch.allclose(Vh @ Vh.mT, torch.eye(4), atol=1e-5)
    for bad in (float("nan"), float("inf")):
        B = A.clone()
        B[3, 4] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            randomized_svd(B, 3)
    with pytest.raises(ValueError, match="positive integer"):
        randomized_svd(A, 0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.05), (torch.float16, 1.01)])
@pytest.mark.parametrize("stream", [False, True])
def test_low_precision_input(dtype, tol, stream, monkeypatch):
    import loram_fast.ops.matmul as matmul

    if stream:  # no fp32 copy allowed: every product reads the low-precision matrix chunk by chunk
        monkeypatch.setattr(matmul, "FP32_COPY_BUDGET", 0)
    A = _matrix(90, 70).to(dtype)
    U, S, Vh = randomized_svd(A, 6)
    assert S.dtype == torch.float32
    # against the optimum of the matrix as stored: rounding the input is the only loss
    assert _tail_ratio(A.float(), U, S, Vh, 6) <= tol


def test_deterministic_by_default():
    A = _matrix(50, 60)
    a, b = randomized_svd(A, 4), randomized_svd(A, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cholesky_qr_and_fallback():
    Y = torch.randn(80, 12, generator=torch.Generator().manual_seed(0))
    Q = cholesky_qr(Y)
    assert torch.allclose(Q.mT @ Q, torch.eye(12), atol=1e-5)
    assert _max_angle_sin(Q, torch.linalg.qr(Y.double()).Q) < 1e-5
    # a numerically rank-deficient panel: Cholesky of the Gram matrix breaks down, QR takes over
    bad = Y.clone()
    bad[:, 5] = bad[:, 4] * (1 + 1e-9)
    Qb = cholesky_qr(torch.stack([Y, bad]))
    assert torch.isfinite(Qb).all()
    assert torch.allclose(Qb[1].mT @ Qb[1], torch.eye(12), atol=1e-4)
    assert torch.allclose(Qb[0], Q, atol=1e-6)


def test_target_accuracy_mode():
    """tol= picks the number of passes: the residual test holds on return, fewer passes for a steeper spectrum, and
    a looser tol costs fewer passes than a tighter one."""
    from loram_fast.ops import topsvd

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(600, 400, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(500, 400, generator=g, dtype=torch.float64))
    passes = {}
    for decay in (0.5, 1.0):
        A = ((U * torch.arange(1, 401, dtype=torch.float64) ** -decay) @ V.T).float()
        for tol in (1e-2, 1e-4):
            Uo, S, Vh, n_passes, ok = topsvd.subspace_iteration(A, 8, 16, tol, 50)
            assert ok
            passes[decay, tol] = n_passes
            res = (A.double() @ Vh.double().T - Uo.double() * S.double()).norm(dim=0)
            assert res.max() <= 1.01 * tol * S[0]
            got = randomized_svd(A, 8, tol=tol)
            assert torch.allclose(got[1], S)
    assert passes[1.0, 1e-2] < passes[0.5, 1e-2] and passes[0.5, 1e-2] < passes[0.5, 1e-4]
    with pytest.raises(ValueError, match="tol"):
        randomized_svd(torch.randn(50, 40), 4, tol=0)


@pytest.mark.parametrize("m,n", [(120, 300), (300, 120), (200, 200)])
@pytest.mark.parametrize("niter", [0, 1, 2])
def test_same_steps_as_svd_lowrank_at_q_equal_r(m, n, niter):
    """With oversample 0 and the same Gaussian draw, randomized_svd takes torch.svd_lowrank's steps, in its
    orientation (a wide matrix runs transposed: U then comes from the core SVD, half a power pass ahead): the same
    subspaces and singular values. Checked on a flat spectrum, where the orientation changes the result."""
    A = _matrix(m, n, decay=0.97, seed=5)
    r = 8
    torch.manual_seed(11)
    Ut, St, Vt = torch.svd_lowrank(A, q=r, niter=niter)
    U, S, Vh = randomized_svd(A, r, oversample=0, niter=niter, generator=torch.Generator().manual_seed(11))
    assert _max_angle_sin(U, Ut) <= 1e-3 and _max_angle_sin(Vh.mT, Vt) <= 1e-3
    assert torch.allclose(S, St, rtol=1e-4)
    assert U.is_contiguous() and Vh.is_contiguous()
