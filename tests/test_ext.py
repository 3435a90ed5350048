"""The compiled extension (cpu-ext backend, and the cuda backend where a GPU and a CUDA build exist) against the
torch references, and torch.library.opcheck. Outputs are NaN-filled first, so an unwritten entry fails."""
import pytest
import torch

from loram_fast import _ext
from loram_fast.ops import (dst_basis, dst_basis_batched, loram_residual_, lowrank_update_, scaled_basis,
                            weight_moments)

from conftest import relative_error, require_backend, ulp_close

require_backend("cpu-ext")

ops = torch.ops.loram_fast
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_CUDA = _ext.status(cuda=True)


@pytest.fixture(params=["cpu-ext", "cuda"])
def backend(request):
    """(backend name, device) pairs: cpu-ext on CPU tensors, cuda on GPU tensors (skipped without a GPU build)."""
    if request.param == "cuda" and _CUDA is not True:
        pytest.skip(f"cuda backend unavailable: {_CUDA}")
    return request.param, ("cuda" if request.param == "cuda" else "cpu")


@pytest.mark.parametrize("n,r", [(37, 5), (1000, 16), (4099, 3)])
@pytest.mark.parametrize("kind", ["dst1", "dct2"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_basis(n, r, kind, dtype, backend):
    _, device = backend
    out = torch.full((n, r), float("nan"), dtype=dtype, device=device)  # an unwritten entry stays NaN
    ops.basis_fill_(out, _ext.KIND_IDS[kind])
    out = out.cpu()
    ref = dst_basis(n, r, kind=kind, dtype=torch.float64, backend="torch")
    assert torch.isfinite(out).all()
    assert ulp_close(out, ref) if dtype != torch.float64 else (out - ref).abs().max() < 1e-13


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_basis(dtype, backend):
    _, device = backend
    scale = torch.rand(4099, generator=torch.Generator().manual_seed(1)) + 0.5
    out = torch.full((4099, 3), float("nan"), dtype=dtype, device=device)
    ops.basis_fill_scaled_(out, scale.to(device), _ext.KIND_IDS["dst1"])
    ref = scaled_basis(4099, 3, scale, dtype=torch.float64, backend="torch")
    assert torch.isfinite(out).all() and ulp_close(out.cpu(), ref)


def test_basis_batched(backend):
    name, device = backend
    shapes = [(37, 5), (53, 2), (4099, 3)]
    got = dst_basis_batched(shapes, kind="dct2", device=device, backend=name)
    for (n, r), g in zip(shapes, got):
        assert (g.cpu() - dst_basis(n, r, kind="dct2", backend="torch")).abs().max() < 2e-7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 53), (1000, 37), (4099, 5)])
def test_moments(dtype, shape, backend):
    name, device = backend
    W = (torch.randn(*shape) * 0.05 + 0.01).to(dtype)
    Wd = W.to(device)
    got = weight_moments(Wd, rows=True, cols=True, backend=name)
    ref = weight_moments(W, rows=True, cols=True, backend="torch")
    assert abs(got.variance() - ref.variance()) <= 1e-6 * ref.variance()
    assert relative_error(got.row_sq.cpu(), ref.row_sq) <= 1e-5 and relative_error(got.col_sq.cpu(), ref.col_sq) <= 1e-5
    assert abs(weight_moments(Wd.T, backend=name).variance() - ref.variance()) <= 1e-6 * ref.variance()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", [(37, 53), (1000, 37), (4099, 5)])
def test_lowrank_update(dtype, transposed, shape, backend):
    name, device = backend
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(*shape, generator=g).to(dtype)
    r = min(4, *shape)
    B, A = torch.randn(shape[0], r, generator=g), torch.randn(r, shape[1], generator=g)
    expect = lowrank_update_(W0.clone(), B, A, -0.3, backend="torch")
    if transposed:
        store = W0.T.contiguous().to(device)
        lowrank_update_(store.T, B, A, -0.3, backend=name)
        got = store.T
    else:
        got = lowrank_update_(W0.clone().to(device), B, A, -0.3, backend=name)
    assert got.dtype == dtype and ulp_close(got.cpu(), expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dst1", "dct2"])
def test_loram_residual(dtype, kind, backend):
    name, device = backend
    W0 = torch.randn(1000, 37).to(dtype)
    expect = loram_residual_(W0.clone(), 0.7, 16, kind, backend="torch")
    got = loram_residual_(W0.clone().to(device), 0.7, 16, kind, backend=name)
    assert ulp_close(got.cpu(), expect)


def test_opcheck_every_op(backend):
    _, device = backend
    W = torch.randn(9, 7, device=device)
    checks = [
        (ops.basis_fill_.default, (torch.empty(9, 4, device=device), 0)),
        (ops.basis_fill_scaled_.default, (torch.empty(9, 4, device=device), torch.rand(9, device=device), 1)),
        (ops.basis_fill_batched_.default, (torch.empty(40, device=device), [9, 4], [3, 2], [0, 27], 1)),
        (ops.row_moments.default, (W,)),
        (ops.col_sq.default, (W.T,)),
        (ops.lowrank_update_.default,
         (W.clone(), torch.randn(9, 2, device=device), torch.randn(2, 7, device=device), 0.5)),
        (ops.loram_residual_.default, (W.clone(), 0.5, 3, 0)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_meta_tensors_through_fake_kernels():
    W = torch.empty(11, 5, device="meta")
    s, q = ops.row_moments(W)
    assert s.shape == (11,) and q.device.type == "meta" and ops.col_sq(W).shape == (5,)


def test_init_model_on_compiled_backend(llama_base, tokens, backend):
    import copy

    from peft import LoraConfig, get_peft_model

    import loram_fast

    from conftest import logits

    name, device = backend
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    a = get_peft_model(copy.deepcopy(llama_base).to(device), cfg)
    b = get_peft_model(copy.deepcopy(llama_base), cfg)
    loram_fast.init_model(a, backend=name, progress=False)
    a = a.cpu()
    loram_fast.init_model(b, backend="torch", progress=False)
    assert relative_error(logits(a, tokens), logits(b, tokens)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_update_rounds_like_torch(dtype, backend):
    """With a product that is exact in fp32, the fused pass must round W + α·B A exactly as ``Tensor.to`` does
    (round to nearest even), bit for bit, ties included."""
    name, device = backend
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(257, 131, generator=g).to(dtype)
    B = torch.randint(-4, 5, (257, 2), generator=g).float() / 64
    A = torch.randint(-4, 5, (2, 131), generator=g).float() / 64
    expect = (W0.float() + B @ A).to(dtype)
    got = lowrank_update_(W0.clone().to(device), B, A, 1.0, backend=name).cpu()
    assert torch.equal(got.view(torch.int16), expect.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_strided_views(dtype, backend):
    """Views with a row stride larger than the row (a column slice of a bigger weight) and a storage offset."""
    name, device = backend
    big = torch.randn(70, 1030).to(dtype).to(device)
    view = big[3:, 5:1029]  # 67×1024, stride (1030, 1)
    ref = weight_moments(view.cpu().contiguous(), rows=True, backend="torch")
    got = weight_moments(view, rows=True, backend=name)
    assert abs(got.variance() - ref.variance()) <= 1e-6 * ref.variance()
    assert relative_error(got.row_sq.cpu(), ref.row_sq) <= 1e-5
    B, A = torch.randn(67, 3), torch.randn(3, 1024)
    expect = lowrank_update_(view.cpu().contiguous(), B, A, 0.25, backend="torch")
    before = big.clone()
    lowrank_update_(view, B, A, 0.25, backend=name)
    assert ulp_close(view.cpu(), expect)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[3:, 5:1029] = False
    assert torch.equal(big[outside], before[outside])  # nothing written outside the view
