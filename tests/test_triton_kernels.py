"""Triton kernels against the torch references. On CPU they run under TRITON_INTERPRET=1 (small shapes);
on a CUDA machine the same tests run compiled on the GPU."""
import pytest
import torch

from conftest import relative_error, require_backend, residual_close, row_norms_match, ulp_close

require_backend("triton")  # conftest.py sets TRITON_INTERPRET=1 on machines without CUDA

from loram_fast.ops import dst_basis, loram_residual_, lowrank_update_, matmul_f32, weight_moments  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ulp_close(got, expect):
    """Within one ulp of a low-precision dtype; fp32 within 1e-5 relative (fp32 angles in the kernels)."""
    return ulp_close(got, expect, fp32_rtol=1e-5)


@pytest.mark.parametrize("n,r", [(37, 5), (1000, 16), (4099, 3)])
@pytest.mark.parametrize("kind", ["dst1", "dct2"])
def test_basis(n, r, kind):
    got = dst_basis(n, r, kind=kind, device=DEVICE, backend="triton")
    assert torch.isfinite(got).all()  # the wrapper allocates with torch.empty: an unwritten tile would show
    assert (got.cpu() - dst_basis(n, r, kind=kind, backend="torch")).abs().max() < 2e-7
    assert torch.equal(dst_basis(n, r, kind=kind, device=DEVICE, backend="triton", transposed=True).cpu(), got.cpu().T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 53), (100, 37), (1000, 5)])
def test_moments(dtype, shape):
    W = (torch.randn(*shape) * 0.05 + 0.01).to(dtype).to(DEVICE)
    got = weight_moments(W, backend="triton")
    ref = weight_moments(W.cpu(), backend="torch")
    assert abs(got.variance() - ref.variance()) <= 1e-6 * ref.variance()
    mt = weight_moments(W.T, backend="triton")  # strided
    assert abs(mt.variance() - ref.variance()) <= 1e-6 * ref.variance()
    from loram_fast.ops import weights_moments

    assert weights_moments([W, W.T], backend="triton") == [got, mt]  # the list form: the same, weight by weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_lowrank_update(dtype, transposed):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(100, 37, generator=g).to(dtype)
    B, A = torch.randn(100, 5, generator=g), torch.randn(5, 37, generator=g)
    expect = lowrank_update_(W0.clone(), B, A, 0.3, backend="torch")
    if transposed:
        store = W0.T.contiguous().to(DEVICE)
        lowrank_update_(store.T, B.to(DEVICE), A.to(DEVICE), 0.3, backend="triton")
        got = store.T
    else:
        got = W0.clone().to(DEVICE)
        lowrank_update_(got, B.to(DEVICE), A.to(DEVICE), 0.3, backend="triton")
    assert got.dtype == dtype and _ulp_close(got.cpu(), expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dst1", "dct2"])
@pytest.mark.parametrize("transposed", [False, True])
def test_loram_residual_closed_form(dtype, kind, transposed):
    """Closed form in the kernel, irregular entries from exact phases: against the fp64 product (1e-6 of its largest
    entry, one rounding). 128×128: every diagonal entry is irregular; 63×127: rows meet columns' angles."""
    for m, n, r in [(100, 53, 20), (128, 128, 7), (63, 127, 63)]:
        W0 = (torch.randn(n, m).T if transposed else torch.randn(m, n)).to(dtype)
        got = W0.clone().to(DEVICE)
        loram_residual_(got, 0.7, r, kind, backend="triton")
        assert got.dtype == dtype and residual_close(got.cpu(), W0, 0.7, r, kind), (m, n, r)


@pytest.mark.parametrize("w_dtype,ab_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("transposed", [False, True])
def test_lowrank_row_norms(w_dtype, ab_dtype, transposed):
    row_norms_match(w_dtype, ab_dtype, transposed, (37, 53), "triton", DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_f32(dtype):
    A = torch.randn(3, 70, 33).to(dtype)
    B = torch.randn(33, 9)
    got = matmul_f32(A.to(DEVICE), B.to(DEVICE), backend="triton")
    assert got.dtype == torch.float32 and got.shape == (3, 70, 9)
    assert relative_error(got.cpu(), matmul_f32(A, B, backend="torch")) <= 1e-6
    got2 = matmul_f32(B.T.to(DEVICE), A[0].T.to(DEVICE), backend="triton")  # strided 2-D operands
    assert relative_error(got2.cpu(), B.T.double() @ A[0].T.double()) <= 1e-6


def test_init_model_on_triton_backend(llama_base, tokens):
    import copy

    from peft import LoraConfig, get_peft_model

    import loram_fast

    from conftest import logits

    model = get_peft_model(copy.deepcopy(llama_base).to(DEVICE), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    ref = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    loram_fast.init_model(model, backend="triton", progress=False)
    loram_fast.init_model(ref, backend="torch", progress=False)
    assert relative_error(logits(model, tokens.to(DEVICE)).cpu(), logits(ref, tokens)) <= 1e-5
