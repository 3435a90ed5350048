"""The compiled extension (cpu-ext backend) against the torch references, and torch.library.opcheck."""
import pytest
import torch

from loram_fast import _ext
from loram_fast.ops import dst_basis, dst_basis_batched, loram_residual_, lowrank_update_, weight_moments

from conftest import relative_error

_STATUS = _ext.status()
if _STATUS is not True:
    pytest.skip(f"cpu-ext backend unavailable: {_STATUS}", allow_module_level=True)

ops = torch.ops.loram_fast
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ulp_close(got, expect):
    eps = 1e-6 if got.dtype == torch.float32 else torch.finfo(got.dtype).eps
    return bool(((got.float() - expect.float()).abs() <= eps * expect.float().abs() + 1e-6).all())


@pytest.mark.parametrize("n,r", [(37, 5), (1000, 16), (4099, 3)])
@pytest.mark.parametrize("kind", ["dst1", "dct2"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_basis(n, r, kind, dtype):
    out = torch.full((n, r), float("nan"), dtype=dtype)  # an unwritten entry stays NaN
    ops.basis_fill_(out, _ext.KIND_IDS[kind])
    ref = dst_basis(n, r, kind=kind, dtype=torch.float64, backend="torch")
    assert torch.isfinite(out).all()
    assert _ulp_close(out, ref) if dtype != torch.float64 else (out - ref).abs().max() < 1e-13


def test_basis_batched():
    shapes = [(37, 5), (53, 2), (4099, 3)]
    got = dst_basis_batched(shapes, kind="dct2", backend="cpu-ext")
    for (n, r), g in zip(shapes, got):
        assert (g - dst_basis(n, r, kind="dct2", backend="torch")).abs().max() < 2e-7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 53), (1000, 37), (4099, 5)])
def test_moments(dtype, shape):
    W = (torch.randn(*shape) * 0.05 + 0.01).to(dtype)
    got = weight_moments(W, rows=True, cols=True, backend="cpu-ext")
    ref = weight_moments(W, rows=True, cols=True, backend="torch")
    assert abs(got.variance() - ref.variance()) <= 1e-6 * ref.variance()
    assert relative_error(got.row_sq, ref.row_sq) <= 1e-5 and relative_error(got.col_sq, ref.col_sq) <= 1e-5
    assert abs(weight_moments(W.T, backend="cpu-ext").variance() - ref.variance()) <= 1e-6 * ref.variance()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", [(37, 53), (1000, 37), (4099, 5)])
def test_lowrank_update(dtype, transposed, shape):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(*shape, generator=g).to(dtype)
    r = min(4, *shape)
    B, A = torch.randn(shape[0], r, generator=g), torch.randn(r, shape[1], generator=g)
    expect = lowrank_update_(W0.clone(), B, A, -0.3, backend="torch")
    if transposed:
        store = W0.T.contiguous()
        lowrank_update_(store.T, B, A, -0.3, backend="cpu-ext")
        got = store.T
    else:
        got = lowrank_update_(W0.clone(), B, A, -0.3, backend="cpu-ext")
    assert got.dtype == dtype and _ulp_close(got, expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dst1", "dct2"])
def test_loram_residual(dtype, kind):
    W0 = torch.randn(1000, 37).to(dtype)
    expect = loram_residual_(W0.clone(), 0.7, 16, kind, backend="torch")
    got = loram_residual_(W0.clone(), 0.7, 16, kind, backend="cpu-ext")
    assert _ulp_close(got, expect)


def test_opcheck_every_op():
    W = torch.randn(9, 7)
    checks = [
        (ops.basis_fill_.default, (torch.empty(9, 4), 0)),
        (ops.basis_fill_batched_.default, (torch.empty(40), [9, 4], [3, 2], [0, 27], 1)),
        (ops.row_moments.default, (W,)),
        (ops.col_sq.default, (W.T,)),
        (ops.lowrank_update_.default, (W.clone(), torch.randn(9, 2), torch.randn(2, 7), 0.5)),
        (ops.loram_residual_.default, (W.clone(), 0.5, 3, 0)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_meta_tensors_through_fake_kernels():
    W = torch.empty(11, 5, device="meta")
    s, q = ops.row_moments(W)
    assert s.shape == (11,) and q.device.type == "meta" and ops.col_sq(W).shape == (5,)


def test_init_model_on_cpu_ext(llama_base, tokens):
    import copy

    from peft import LoraConfig, get_peft_model

    import loram_fast

    from conftest import logits

    a = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    b = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    loram_fast.init_model(a, backend="cpu-ext", progress=False)
    loram_fast.init_model(b, backend="torch", progress=False)
    assert relative_error(logits(a, tokens), logits(b, tokens)) <= 1e-6
