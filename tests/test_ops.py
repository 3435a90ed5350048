"""Torch references of the ops layer and the dispatch point."""
import math

import numpy as np
import pytest
import torch

from loram_fast.ops import backends, dispatch, dst_basis, loram_residual_, lowrank_update_, matmul_f32, weight_moments
from loram_fast.ops import residual as residual_op

from conftest import relative_error, residual_close

# the torch references, and whatever the dispatch picks automatically on CPU (cpu-ext where it is built)
AUTO_AND_TORCH = pytest.mark.parametrize("backend", [None, "torch"], ids=["auto", "torch"])


def _np_basis(n, r, kind):
    i = np.arange(n, dtype=np.float64)[:, None]
    k = np.arange(r, dtype=np.float64)[None, :]
    if kind == "dst1":
        return math.sqrt(2 / (n + 1)) * np.sin(np.pi * (i + 1) * (k + 1) / (n + 1))
    out = math.sqrt(2 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    out[:, 0] /= math.sqrt(2)
    return out


@pytest.mark.parametrize("n,r", [(37, 5), (1000, 16), (4099, 3)])
@pytest.mark.parametrize("kind", ["dst1", "dct2"])
@AUTO_AND_TORCH
def test_basis_entries_and_orthonormal(n, r, kind, backend):
    V = dst_basis(n, r, kind=kind, backend=backend)
    assert V.shape == (n, r) and V.dtype == torch.float32
    assert np.abs(V.numpy() - _np_basis(n, r, kind)).max() < 2e-7
    assert torch.allclose(V.double().T @ V.double(), torch.eye(r, dtype=torch.float64), atol=1e-6)


@AUTO_AND_TORCH
def test_basis_exact_angles_for_large_n(backend):
    n, r = 200_003, 4  # (i+1)(k+1) > 2**19: naive fp32 angles lose ~1e-2 here
    V = dst_basis(n, r, dtype=torch.float64, backend=backend)
    i = torch.arange(n, dtype=torch.float64)
    exact = math.sqrt(2 / (n + 1)) * torch.sin(((i + 1) * 4 % (2 * (n + 1))) * math.pi / (n + 1))
    assert (V[:, 3] - exact).abs().max() < 1e-12


def test_basis_errors():
    with pytest.raises(ValueError, match="r=6 > n=5"):
        dst_basis(5, 6)
    with pytest.raises(ValueError, match="unknown kind"):
        dst_basis(5, 2, kind="dst2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@AUTO_AND_TORCH
def test_moments(dtype, backend):
    W = (torch.randn(301, 77) * 0.1 + 0.05).to(dtype)
    m = weight_moments(W, backend=backend)
    Wd = W.double()
    assert m.count == W.numel() and math.isclose(float(m.sum), Wd.sum().item(), rel_tol=1e-6)
    assert math.isclose(m.variance(), torch.var(Wd).item(), rel_tol=1e-6)  # fp32 accumulation
    assert math.isclose(m.variance(), torch.var(W.float()).item(), rel_tol=1e-6)
    mt = weight_moments(W.T, backend=backend)  # strided input
    assert math.isclose(mt.variance(), m.variance(), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
@AUTO_AND_TORCH
def test_lowrank_update(dtype, transposed, backend):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(53, 37, generator=g).to(dtype)
    B, A = torch.randn(53, 4, generator=g), torch.randn(4, 37, generator=g)
    expect = (W0.float() + 0.3 * B @ A).to(dtype)
    if transposed:
        store = W0.T.contiguous().clone()
        lowrank_update_(store.T, B, A, 0.3, backend=backend)
        got = store.T
    else:
        got = W0.clone()
        lowrank_update_(got, B, A, 0.3, backend=backend)
    assert got.dtype == dtype
    tol = 0 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert ((got.float() - expect.float()).abs() <= tol * expect.float().abs() + 1e-5).all()


@pytest.mark.parametrize("kind", ["dst1", "dct2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
@AUTO_AND_TORCH
def test_loram_residual_against_exact(kind, dtype, transposed, backend):
    """Every backend's residual (the torch product; the compiled closed form) against the fp64 product: within
    1e-6 of its largest entry, rounded once to W's dtype. Shapes with r = 1, r = min(m, n) and m + 1 | n + 1 (rows
    whose angle equals a column's: the exact-phase branch)."""
    for m, n, r in [(37, 53, 5), (63, 127, 63), (30, 300, 1), (99, 199, 17)]:
        W0 = (torch.randn(n, m).T if transposed else torch.randn(m, n)).to(dtype)
        got = W0.clone()
        loram_residual_(got, 0.7, r, kind, backend=backend)
        assert residual_close(got, W0, 0.7, r, kind), (m, n, r)


def test_closed_form_mirror_and_exact_branch():
    """The torch transcription of kernel_math.h (what the Triton path uses): the displacement form and the
    exact-phase form both equal the fp64 basis product; the irregular set holds exactly the near entries."""
    for kind in ("dst1", "dct2"):
        for m, n, r in [(63, 127, 9), (40, 41, 40), (128, 128, 3)]:
            V = dst_basis(m, r, kind=kind, dtype=torch.float64, backend="torch")
            U = dst_basis(n, r, kind=kind, dtype=torch.float64, backend="torch")
            K = (V @ U.T) / residual_op.closed_form_amp(m, n, kind)
            rows, cols = residual_op.closed_form_terms(m, r, kind), residual_op.closed_form_terms(n, r, kind)
            den = cols[2][None, :] - rows[2][:, None]
            regular = den.abs() >= residual_op.NEAR_TOL
            fast = (rows[0][:, None] * cols[1][None, :] - rows[1][:, None] * cols[0][None, :]) / den
            assert (fast - K)[regular].abs().max() < 1e-9 * K.abs().max()
            i, j = torch.meshgrid(torch.arange(m), torch.arange(n), indexing="ij")
            exact = residual_op.closed_form_exact(i, j, m, n, r, kind)
            assert (exact - K).abs().max() < 1e-9 * K.abs().max()
            ii, jj = residual_op.closed_form_irregular(rows[2], cols[2])
            assert set(zip(ii.tolist(), jj.tolist())) == set(zip(*[t.tolist() for t in torch.nonzero(~regular, as_tuple=True)]))


def test_loram_residual_with_given_bases():
    W = torch.randn(37, 53)
    a, b = W.clone(), W.clone()
    loram_residual_(a, 0.7, 5, "dst1", backend="torch")
    loram_residual_(b, 0.7, 5, "dst1", backend="torch", bases=(dst_basis(37, 5), dst_basis(53, 5)))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="do not match"):
        loram_residual_(W, 0.7, 5, "dst1", backend="torch", bases=(dst_basis(53, 5), dst_basis(37, 5)))


def test_matmul_f32_low_precision():
    A = torch.randn(3, 70, 33).bfloat16()
    B = torch.randn(33, 9)
    out = matmul_f32(A, B)
    assert out.dtype == torch.float32
    assert relative_error(out, A.double() @ B.double()) < 1e-6


def test_dispatch_forced_backend(monkeypatch):
    assert dispatch.resolve("dst_basis", "cpu", "torch")[0] == "torch"
    unavailable = [b for b, ok in backends().items() if ok is not True]
    for b in unavailable:
        with pytest.raises(RuntimeError, match="unavailable"):
            dst_basis(8, 2, backend=b)
    with pytest.raises(ValueError, match="unknown backend"):
        dst_basis(8, 2, backend="fortran")
    monkeypatch.setenv("LORAM_FAST_BACKEND", "torch")
    assert dispatch.resolve("weight_moments", "cpu")[0] == "torch"


def test_dispatch_remembers_the_automatic_choice_until_an_op_is_registered(monkeypatch):
    """resolve remembers its automatic choice per op and device type; a new registration is seen at once, and a
    forced backend (argument or LORAM_FAST_BACKEND) is never answered from the memory."""
    op = "test_only_op"
    monkeypatch.setitem(dispatch._IMPLS, op, {})
    first, second = (lambda: "torch impl"), (lambda: "cpu-ext impl")
    dispatch.register(op, "torch")(first)
    assert dispatch.resolve(op, "cpu") == ("torch", first)
    assert dispatch.resolve(op, torch.device("cpu")) == ("torch", first)
    if backends()["cpu-ext"] is True:  # the compiled backend comes first on the CPU
        dispatch.register(op, "cpu-ext")(second)
        assert dispatch.resolve(op, "cpu") == ("cpu-ext", second)
        monkeypatch.setenv("LORAM_FAST_BACKEND", "torch")
        assert dispatch.resolve(op, "cpu") == ("torch", first)
        monkeypatch.delenv("LORAM_FAST_BACKEND")
        assert dispatch.resolve(op, "cpu", "torch") == ("torch", first)
        assert dispatch.resolve(op, "cpu") == ("cpu-ext", second)
    monkeypatch.undo()
    dispatch._RESOLVED.clear()


def test_moments_large_mean_uses_stable_path():
    W = 100.0 + 1e-3 * torch.randn(300, 200, dtype=torch.float64)
    m = weight_moments(W.float())
    # mean²/var = 1e10: the plain sum-of-squares form would lose every digit; var_mean keeps fp32 accuracy
    assert math.isclose(m.variance(), torch.var(W.float()).item(), rel_tol=1e-3)


@pytest.mark.parametrize("kind", ["dst1", "dct2"])
def test_basis_column_sums_closed_form(kind):
    from loram_fast.ops.bases import basis_column_sums

    for n, r in [(37, 5), (1000, 256), (6, 6), (2, 1)]:
        ref = dst_basis(n, r, kind=kind, dtype=torch.float64, backend="torch").sum(0)
        assert (basis_column_sums(n, r, kind) - ref).abs().max() < 1e-12 * max(1.0, float(ref.abs().max()))


def test_thread_helpers_restore_the_thread_count(monkeypatch):
    """small_op runs on one thread and fair_share uses only idle cores (here: told that every core but one is busy);
    both restore the thread count, also after an exception."""
    from loram_fast.ops import threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setenv("LORAM_FAST_FAIR_SHARE", "1")
    try:
        assert threads._runnable_elsewhere() is None or threads._runnable_elsewhere() >= 0
        with threads.small_op("cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(threads, "_runnable_elsewhere", lambda: 10)
        with pytest.raises(RuntimeError), threads.fair_share():
            assert torch.get_num_threads() == 1
            raise RuntimeError
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(threads, "_runnable_elsewhere", lambda: 0)
        with threads.fair_share():
            assert torch.get_num_threads() == 2
        monkeypatch.setenv("LORAM_FAST_FAIR_SHARE", "0")
        monkeypatch.setattr(threads, "_runnable_elsewhere", lambda: 10)
        with threads.fair_share():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
