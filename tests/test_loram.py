"""LoRAM math (loram_fast.methods.loram) against a transcription of the reference code."""
import math

import pytest
import torch

from loram_fast.methods.loram import check_loram, loram_init, loram_reference
from loram_fast.ops import apply_residual, dst_basis

from conftest import relative_error

SHAPES = [(37, 53), (72, 200), (200, 72)]


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.02 + 0.003).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [2, 5, 16])
@pytest.mark.parametrize("scaling", [2.0, 16 / math.sqrt(5)])
def test_matches_reference_fp32(shape, r, scaling):
    W = _weight(shape)
    A_ref, B_ref, W_ref = loram_reference(W, r, scaling)
    init = loram_init(W, r, scaling)
    assert init.A.shape == (r, shape[1]) and init.B.shape == (shape[0], r)
    assert relative_error(init.A, A_ref) <= 1e-5
    assert relative_error(init.B, B_ref) <= 1e-5
    W_res = W.clone()
    apply_residual(W_res, init.residual)
    assert relative_error(W_res, W_ref) <= 1e-5
    # the residual moved W by the product, and the product is what the reference subtracts
    assert relative_error(W - W_res, W - W_ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_stays_and_matches_reference(dtype):
    W = _weight((72, 200), dtype)
    A_ref, B_ref, W_ref = loram_reference(W, 8, 2.0)
    init = loram_init(W, 8, 2.0)
    W_res = W.clone()
    apply_residual(W_res, init.residual)
    assert W_res.dtype == dtype
    # the residual is rounded once to the weight's dtype: at most one ulp of that dtype apart
    ulp = torch.finfo(dtype).eps * W_ref.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((W_res.float() - W_ref.float()).abs() <= ulp + 1e-7).all()
    assert relative_error(init.A.to(dtype), A_ref.to(dtype)) <= torch.finfo(dtype).eps


def test_variance_closed_form_matches_materialised():
    for m, n, r in [(37, 53, 5), (200, 72, 16), (64, 64, 64)]:
        for kind in ("dst1", "dct2"):
            V = dst_basis(m, r, kind=kind, dtype=torch.float64)
            U = dst_basis(n, r, kind=kind, dtype=torch.float64)
            P = V @ U.T
            s = float((V.sum(0) * U.sum(0)).sum())
            N = m * n
            assert math.isclose((r - s * s / N) / (N - 1), torch.var(P).item(), rel_tol=1e-10)
            assert math.isclose(float((P * P).sum()), r, rel_tol=1e-10)


def test_dct_variant_is_loram_recipe_with_dct_basis():
    W = _weight((37, 53))
    r, s = 5, 2.0
    init = loram_init(W, r, s, kind="dct2")
    V, U = dst_basis(37, r, kind="dct2").double(), dst_basis(53, r, kind="dct2").double()
    ratio = torch.var(W.double()) / torch.var(V @ U.T)
    beta = (math.log(r, 37) * ratio) ** 0.25
    assert relative_error(init.A, beta * U.T) <= 1e-6
    assert relative_error(init.B, beta * V) <= 1e-6
    W_res = W.clone()
    apply_residual(W_res, init.residual)
    assert relative_error(W_res, W.double() - s * beta**2 * V @ U.T) <= 1e-6


def test_deterministic_bitwise():
    W = _weight((72, 200))
    a, b = loram_init(W, 8, 2.0), loram_init(W.clone(), 8, 2.0)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    W1, W2 = W.clone(), W.clone()
    apply_residual(W1, a.residual)
    apply_residual(W2, b.residual)
    assert torch.equal(W1, W2)


def test_residual_undo_restores_fp32():
    W = _weight((37, 53))
    init = loram_init(W, 5, 2.0)
    W1 = W.clone()
    apply_residual(W1, init.residual, -1.0)
    apply_residual(W1, init.residual, +1.0)
    assert relative_error(W1, W) <= 1e-6


def test_edge_cases_raise():
    W = _weight((37, 53))
    with pytest.raises(ValueError, match="dead adapter"):
        loram_init(W, 1, 1.0)
    dead = loram_init(W, 1, 1.0, allow_zero_adapter=True)  # the reference's behaviour, on request
    assert dead.A.abs().max() == 0 and dead.B.abs().max() == 0
    with pytest.raises(ValueError, match="exceeds min"):
        loram_init(W, 38, 1.0)
    assert "min(out, in) = 1" in check_loram((1, 9), 1, allow_zero_adapter=True)
    bad = W.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        loram_init(bad, 4, 1.0)
    with pytest.raises(ValueError, match="constant"):
        loram_init(torch.zeros(8, 8), 4, 1.0)


@pytest.mark.parametrize("backend", ["cpu-ext", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_init_is_one_init_per_weight(dtype, backend):
    """LoRAM's batched form (one moments call for a shape's weights, what init_model uses) gives each weight what
    its own call gives, bit for bit; a bad weight in the batch is reported with its position."""
    from conftest import require_backend
    from loram_fast.registry import get_method

    require_backend(backend)
    method = get_method("loram")
    Ws = [_weight((48, 40), dtype, seed=s) for s in range(5)] + [_weight((40, 48), dtype, seed=9).T]
    scalings = [2.0, 0.5, 1.0, 3.0, 1.5, 0.25]
    batched = method.init_batch(Ws, 8, scalings, backend=backend, bases={})
    for W, s, got in zip(Ws, scalings, batched):
        one = method.init(W, 8, s, backend=backend, bases={})
        assert torch.equal(got.A.tensor(), one.A.tensor()) and torch.equal(got.B.tensor(), one.B.tensor())
        assert got.residual.coef == one.residual.coef and got.scaling == one.scaling == s
    bad = [W.clone() for W in Ws[:3]]
    bad[1].fill_(0.25)
    with pytest.raises(ValueError, match="constant") as info:
        method.init_batch(bad, 8, scalings[:3], backend=backend, bases={})
    assert info.value.batch_index == 1
