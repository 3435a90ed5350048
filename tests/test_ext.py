"""The compiled extension (cpu-ext backend, and the cuda backend where a GPU and a CUDA build exist) against the
torch references, and torch.library.opcheck. Outputs are NaN-filled first, so an unwritten entry fails."""
import pytest
import torch

from loram_fast import _ext
from loram_fast.ops import dst_basis, loram_residual_, lowrank_update_, weight_moments

from conftest import relative_error, require_backend, residual_close, row_norms_match, ulp_close

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


@pytest.mark.parametrize("n,r", [(37, 5), (1000, 16), (4099, 3), (6, 6)])
@pytest.mark.parametrize("kind", ["dst1", "dct2"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_basis(n, r, kind, dtype, backend):
    _, device = backend
    out = torch.full((n, r), float("nan"), dtype=dtype, device=device)  # an unwritten entry stays NaN
    ops.basis_fill_(out, ["dst1", "dct2"].index(kind))
    out = out.cpu()
    ref = dst_basis(n, r, kind=kind, dtype=torch.float64, backend="torch")
    assert torch.isfinite(out).all()
    assert ulp_close(out, ref) if dtype != torch.float64 else (out - ref).abs().max() < 1e-13
    # written as rows (the transpose of an r×n tensor, the layout of LoRAM's A): the same bits, every entry written
    rows = torch.full((r, n), float("nan"), dtype=dtype, device=device)
    ops.basis_fill_(rows.T, ["dst1", "dct2"].index(kind))
    assert torch.equal(rows.cpu().T, out)
    assert torch.equal(dst_basis(n, r, kind=kind, dtype=dtype, device=device, transposed=True).cpu(), out.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 53), (1000, 37), (4099, 5)])
def test_moments(dtype, shape, backend):
    name, device = backend
    W = (torch.randn(*shape) * 0.05 + 0.01).to(dtype)
    Wd = W.to(device)
    got = weight_moments(Wd, backend=name)
    ref = weight_moments(W, backend="torch")
    assert abs(got.variance() - ref.variance()) <= 1e-6 * ref.variance()
    sums, sqs = ops.row_moments(Wd)  # the per-row partials every backend hands to combine_rows
    assert relative_error(sums.cpu(), W.double().sum(1)) <= 1e-5 and relative_error(sqs.cpu(), W.double().square().sum(1)) <= 1e-5
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


ROW_NORM_CASES = [  # (W dtype, adapter dtype): the promoted dtype peft forms W + s·B A in
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("w_dtype,ab_dtype", ROW_NORM_CASES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", [(37, 53), (300, 1029)])
def test_lowrank_row_norms(w_dtype, ab_dtype, transposed, shape, backend):
    """DoRA's magnitude: every entry formed as peft forms it (in bf16 / fp16: three roundings), the norm within one
    step of the output dtype (fp32: 1e-6 relative; the order of the sums differs)."""
    name, device = backend
    row_norms_match(w_dtype, ab_dtype, transposed, shape, name, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dst1", "dct2"])
@pytest.mark.parametrize("transposed", [False, True])
def test_loram_residual(dtype, kind, transposed, backend):
    """The closed form (csrc/kernel_math.h) against the fp64 basis product: 1e-6 of the product's largest entry,
    one rounding; r from 1 to min(m, n), square shapes (every diagonal entry takes the exact-phase branch)."""
    name, device = backend
    for m, n, r in [(1000, 37, 16), (37, 1000, 37), (256, 256, 255), (511, 1023, 1), (300, 300, 64)]:
        W0 = (torch.randn(n, m).T if transposed else torch.randn(m, n)).to(dtype)
        got = W0.clone().to(device)
        loram_residual_(got, 0.7, r, kind, backend=name)
        assert residual_close(got.cpu(), W0, 0.7, r, kind), (m, n, r)


def test_opcheck_every_op(backend):
    _, device = backend
    W = torch.randn(9, 7, device=device)
    checks = [
        (ops.basis_fill_.default, (torch.empty(9, 4, device=device), 0)),
        (ops.row_moments.default, (W,)),
        (ops.lowrank_update_.default,
         (W.clone(), torch.randn(9, 2, device=device), torch.randn(2, 7, device=device), 0.5)),
        (ops.loram_residual_.default, (W.clone(), 0.5, 3, 0)),
        (ops.loram_residual_batch_.default, ([W.clone(), W.clone()], [0.5, -0.25], 3, 0)),
        (ops.lowrank_row_norms.default,
         (W, torch.randn(9, 2, device=device), torch.randn(2, 7, device=device), 0.5, 0, 0)),
        (ops.scale_rounded_.default, (torch.empty(9, 7, device=device), W, 0.5, 1)),
    ]
    if device == "cpu":  # the batched forms are CPU only (on GPUs ops/ loops over the single kernels)
        checks += [(ops.weights_moments.default, ([W, W.T, torch.randn(3, 4)],)),
                   (ops.scale_rounded_batch_.default,
                    ([torch.empty(9, 7), torch.empty(2, 3)], [W, torch.randn(2, 3)], [0.5, 2.0], 1))]
    for op, args in checks:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_moments_is_row_moments_added_in_row_order(dtype):
    """The batched totals: every weight's fp32 row partials (row_moments's, bit for bit) added in fp64 in row order;
    mixed shapes, a transposed view and a strided slice in one call."""
    base = torch.randn(300, 90) * 0.05 + 0.02
    # rows of scales 2^-20, 1 and 2^20 in turn (fp16: 2^±7): fp64 sums of their fp32 partials round, so the order of
    # the additions shows
    spread = ((torch.arange(60) % 3) - 1).double() * (20 if dtype != torch.float16 else 7)
    wide = (torch.randn(60, 33).double() * torch.pow(2.0, spread).unsqueeze(1)).to(dtype)
    Ws = [base[:37, :53].to(dtype), torch.randn(41, 1000).to(dtype).T, (torch.randn(5, 4099) * 3).to(dtype),
          base.to(dtype)[::3, 1:], torch.randn(1, 1).to(dtype), wide]
    totals = ops.weights_moments(Ws)
    assert totals.dtype == torch.float64 and totals.shape == (len(Ws), 2)
    for W, (got_sum, got_sq) in zip(Ws, totals.tolist()):
        sums, sqs = ops.row_moments(W)
        want_sum = want_sq = 0.0
        for a, b in zip(sums.tolist(), sqs.tolist()):  # Python floats are fp64: the same additions, in row order
            want_sum += a
            want_sq += b
        assert (got_sum, got_sq) == (want_sum, want_sq)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.weights_moments([Ws[0], Ws[0].double()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_moments_agree_with_each_weight_and_the_reference(dtype):
    """``weights_moments`` on cpu-ext = ``weight_moments`` of each weight (the same bits) and the torch reference's
    variance (1e-6 relative), including a weight whose mean dwarfs its spread (the cancellation fallback)."""
    from loram_fast.ops import weights_moments

    Ws = [(torch.randn(64, 48) * 0.05).to(dtype), (torch.randn(64, 48) * 1e-3 + 40.0).to(dtype),
          (torch.randn(48, 64) * 0.05).to(dtype).T, (torch.randn(7, 300) * 0.1 + 0.05).to(dtype)]
    batched = weights_moments(Ws, backend="cpu-ext")
    for W, got in zip(Ws, batched):
        one = weight_moments(W, backend="cpu-ext")
        assert (got.count, got.sum, got.sumsq) == (one.count, one.sum, one.sumsq)
        ref = weight_moments(W, backend="torch")
        assert abs(got.variance() - ref.variance()) <= 1e-6 * ref.variance()
    assert [m.variance() for m in weights_moments(Ws, backend="torch")] == [
        weight_moments(W, backend="torch").variance() for W in Ws]
    with pytest.raises(ValueError, match="one dtype"):
        weights_moments([Ws[0], Ws[0].double()])
    assert weights_moments([]) == []


def _pairs(code_dtype):
    """(outs, srcs, alphas): sizes from a few entries to > 1 MiB (non-temporal stores), outs at unaligned offsets."""
    buffer = torch.full((3 + (1 << 18) + 5 + 64 * 33,), float("nan"))
    outs = [buffer[3:3 + (1 << 18)].view(512, 512), buffer[(1 << 18) + 3:(1 << 18) + 8],
            buffer[(1 << 18) + 8:].view(64, 33)]
    srcs = [torch.randn(512, 512) * 3, torch.randn(5), torch.randn(64, 33) * 1e-30]  # subnormal products too
    return outs, srcs, [0.37, -2.5, 1e-9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_rounded_batch_is_one_call_per_pair_bit_for_bit(dtype):
    code = [torch.float32, torch.bfloat16, torch.float16].index(dtype)
    outs, srcs, alphas = _pairs(dtype)
    ops.scale_rounded_batch_(outs, srcs, alphas, code)
    for out, src, alpha in zip(outs, srcs, alphas):
        one = torch.full_like(src, float("nan"))
        ops.scale_rounded_(one, src, alpha, code)
        assert torch.equal(out, one)
        assert torch.equal(out, (src * alpha).to(dtype).float())
    inplace = srcs[0].clone()  # an out that is its own source
    ops.scale_rounded_batch_([inplace, outs[1]], [inplace, srcs[1]], [0.5, 1.0], code)
    assert torch.equal(inplace, (srcs[0] * 0.5).to(dtype).float())


def test_scale_rounded_batch_checks_everything_before_its_first_store():
    """Outs that share memory, an out overlapping another pair's source, an in-place out that is another pair's
    source too: refused before any store (every out still NaN); ``formable_together`` refuses the same batches."""
    from loram_fast.ops.rounding import ScaledRounded, formable_together

    buffer = torch.full((400,), float("nan"))
    a, b = buffer[:200].view(10, 20), buffer[100:300].view(10, 20)  # overlapping outs
    c = buffer[300:].view(5, 20)
    src, small = torch.randn(10, 20), torch.randn(5, 20)
    cases = [([a, b], [src, src]),  # two outs share memory
             ([a, c], [src, buffer[150:250].view(5, 20)])]  # out a overlaps the other pair's source
    for outs, srcs in cases:
        with pytest.raises(RuntimeError, match="scale_rounded_batch_"):
            ops.scale_rounded_batch_(outs, srcs, [1.0] * len(outs), 1)
        assert torch.isnan(buffer).all()
        assert not formable_together([(o, ScaledRounded(s.contiguous(), 1.0, torch.bfloat16))
                                      for o, s in zip(outs, srcs)])
    shared = torch.randn(10, 20)
    with pytest.raises(RuntimeError, match="in place"):
        ops.scale_rounded_batch_([shared, a], [shared, shared], [1.0, 1.0], 1)
    assert torch.isnan(buffer).all()
    assert formable_together([(a, ScaledRounded(src, 1.0, torch.bfloat16)), (c, ScaledRounded(small, 2.0,
                                                                                               torch.bfloat16))])


def test_meta_tensors_through_fake_kernels():
    W = torch.empty(11, 5, device="meta")
    s, q = ops.row_moments(W)
    assert s.shape == (11,) and q.device.type == "meta"
    ops.loram_residual_(W, 0.5, 3, 1)
    ops.lowrank_update_(W, torch.empty(11, 2, device="meta"), torch.empty(2, 5, device="meta"), 0.5)


def test_init_model_on_compiled_backend(llama_base, tokens, backend):
    import copy

    from peft import LoraConfig, get_peft_model

    import loram_fast

    from conftest import logits

    name, device = backend
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    a = get_peft_model(copy.deepcopy(llama_base).to(device), cfg)
    b = get_peft_model(copy.deepcopy(llama_base), cfg)
    ptrs = {n: p.data_ptr() for n, p in a.named_parameters() if "lora_" in n}
    loram_fast.init_model(a, backend=name, progress=False)
    # the compiled backends form LoRAM's adapters in the parameters' own memory (Transaction.flush)
    assert ptrs == {n: p.data_ptr() for n, p in a.named_parameters() if "lora_" in n}
    a = a.cpu()
    loram_fast.init_model(b, backend="torch", progress=False)
    assert relative_error(logits(a, tokens), logits(b, tokens)) <= 1e-6
    theirs = dict(b.named_parameters())
    for n, p in a.named_parameters():
        if "lora_" in n:
            assert relative_error(p.detach(), theirs[n].detach()) <= 1e-6, n


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
    ref = weight_moments(view.cpu().contiguous(), backend="torch")
    got = weight_moments(view, backend=name)
    assert abs(got.variance() - ref.variance()) <= 1e-6 * ref.variance()
    B, A = torch.randn(67, 3), torch.randn(3, 1024)
    expect = lowrank_update_(view.cpu().contiguous(), B, A, 0.25, backend="torch")
    before = big.clone()
    lowrank_update_(view, B, A, 0.25, backend=name)
    assert ulp_close(view.cpu(), expect)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[3:, 5:1029] = False
    assert torch.equal(big[outside], before[outside])  # nothing written outside the view
    before = big.clone()
    loram_residual_(view, 0.5, 8, "dst1", backend=name)
    assert residual_close(view.cpu(), before[3:, 5:1029].cpu(), 0.5, 8, "dst1")
    assert torch.equal(big[outside], before[outside])


def test_same_argument_checks_on_every_path(backend):
    """The compiled operators refuse what the Python front refuses (called directly, bypassing it)."""
    _, device = backend
    W = torch.randn(9, 7, device=device)
    with pytest.raises(RuntimeError, match="need 1 <= r <= min"):
        ops.loram_residual_(W, 0.5, 8, 0)
    with pytest.raises(RuntimeError, match="basis kind"):
        ops.loram_residual_(W, 0.5, 3, 2)
    with pytest.raises(RuntimeError, match="do not chain"):
        ops.lowrank_update_(W, torch.randn(9, 2, device=device), torch.randn(3, 7, device=device), 1.0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.loram_residual_(W.double(), 0.5, 3, 0)
    with pytest.raises(RuntimeError, match="r=5 > n=4"):
        ops.basis_fill_(torch.empty(4, 5, device=device), 0)
    with pytest.raises(RuntimeError, match="contiguous 2-D tensor or the transpose"):
        ops.basis_fill_(torch.empty(9, 8, device=device)[:, :4], 0)
    with pytest.raises(ValueError, match="need an integer 1 <= r"):
        loram_residual_(W, 0.5, 8)
    with pytest.raises(ValueError, match="unknown kind"):
        loram_residual_(W, 0.5, 3, "dst2")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dst1", "dct2"])
@pytest.mark.parametrize("transposed", [False, True])
def test_residual_batch_is_one_call_per_weight_bit_for_bit(dtype, kind, transposed, backend):
    """Each row of K formed once for several weights of one shape: the same bits as one loram_residual_ per weight
    (odd and even m; 7 weights: a group of four swept together and three one by one; the same weight twice is two
    writes in turn, also where it would fall in one group)."""
    _, device = backend
    for m, n, r in [(37, 1000, 16), (256, 256, 255), (301, 64, 7), (9, 37, 3)]:
        Ws = [(torch.randn(n, m).T if transposed else torch.randn(m, n)).to(dtype).to(device) for _ in range(7)]
        coefs = [0.7, -0.2, 1.3, 0.05, -1.1, 0.3, 2.0]
        expect = [W.clone() for W in Ws]
        for W, c in zip(expect, coefs):
            ops.loram_residual_(W, c, r, ["dst1", "dct2"].index(kind))
        got = [W.clone() for W in Ws]
        ops.loram_residual_batch_(got, coefs, r, ["dst1", "dct2"].index(kind))
        for g, e in zip(got, expect):
            assert torch.equal(g.view(torch.int16 if g.element_size() == 2 else torch.int32),
                               e.view(torch.int16 if e.element_size() == 2 else torch.int32)), (m, n, r)
        twice, once = Ws[0].clone(), Ws[0].clone()
        ops.loram_residual_batch_([twice, twice], [0.5, 0.25], r, 0)
        ops.loram_residual_(once, 0.5, r, 0)
        ops.loram_residual_(once, 0.25, r, 0)
        assert torch.equal(twice, once)
        got = [W.clone() for W in Ws[:4]]
        expect = [W.clone() for W in Ws[:4]]
        order = [0, 1, 0, 2, 3]  # weight 0 twice among the first four
        ops.loram_residual_batch_([got[i] for i in order], [0.5, -0.3, 0.25, 1.5, 0.9], r, 0)
        for i, c in zip(order, [0.5, -0.3, 0.25, 1.5, 0.9]):
            ops.loram_residual_(expect[i], c, r, 0)
        for g, e in zip(got, expect):
            assert torch.equal(g, e)


def test_residual_batch_refuses_mixed_or_overlapping_weights(backend):
    _, device = backend
    W = torch.randn(40, 30, device=device)
    with pytest.raises(RuntimeError, match="2 weights but 1 coefficients"):
        ops.loram_residual_batch_([W, W.clone()], [0.5], 3, 0)
    with pytest.raises(RuntimeError, match="first one's shape, dtype, device and strides"):
        ops.loram_residual_batch_([W, torch.randn(30, 40, device=device)], [0.5, 0.5], 3, 0)
    with pytest.raises(RuntimeError, match="first one's shape"):
        ops.loram_residual_batch_([W, W.clone().T.contiguous().T], [0.5, 0.5], 3, 0)
    big = torch.randn(60, 30, device=device)
    with pytest.raises(RuntimeError, match="share memory"):
        ops.loram_residual_batch_([big[:40], big[20:]], [0.5, 0.5], 3, 0)
    with pytest.raises(RuntimeError, match="need 1 <= r <= min"):
        ops.loram_residual_batch_([W], [0.5], 31, 0)


def test_apply_residuals_equals_one_write_after_another(backend):
    """The flush of held-back writes (ops.residual.apply_residuals) groups LoRAM residuals by shape, rank and kind:
    the same bits as apply_residual in order, also for a weight that appears in two groups or twice in one."""
    from loram_fast.ops.residual import BasisResidual, LowRankResidual, apply_residual, apply_residuals

    name, device = backend
    g = torch.Generator().manual_seed(0)
    square = [torch.randn(64, 64, generator=g).to(device) for _ in range(3)]
    wide = [torch.randn(32, 96, generator=g).to(torch.bfloat16).to(device) for _ in range(2)]
    lowrank = LowRankResidual(0.3, torch.randn(64, 4, generator=g).to(device), torch.randn(4, 64, generator=g).to(device))
    plans = [
        [(square[0], BasisResidual(0.5, 8, "dst1")), (wide[0], BasisResidual(0.2, 4, "dst1")),
         (square[1], BasisResidual(-0.7, 8, "dst1")), (wide[1], BasisResidual(0.4, 4, "dst1")),
         (square[2], BasisResidual(0.1, 8, "dct2")), (square[1], lowrank)],
        [(square[0], BasisResidual(0.5, 8, "dst1")), (square[0], BasisResidual(0.25, 8, "dst1"))],  # twice
        [(square[0], BasisResidual(0.5, 8, "dst1")), (square[1], BasisResidual(0.3, 8, "dst1")),
         (square[0], BasisResidual(0.2, 4, "dst1"))],  # square[0] in two groups: one call each, in order
    ]
    for plan in plans:
        expect = {id(W): W.clone() for W, _ in plan}
        got = {id(W): W.clone() for W, _ in plan}
        for W, res in plan:
            apply_residual(expect[id(W)], res, backend=name)
        done = []
        apply_residuals([(got[id(W)], res) for W, res in plan], backend=name, done=done)
        assert len(done) == len(plan)
        for key in expect:
            assert torch.equal(got[key], expect[key])


def test_fresh_memory_asks_for_huge_pages(monkeypatch):
    """ops.memory.empty advises huge pages on the 2 MiB-aligned inside of a large CPU tensor, nothing for a small one,
    and nothing with LORAM_FAST_HUGE_PAGES=0; the values and the tensor are ordinary."""
    from loram_fast.ops import memory

    calls = []
    monkeypatch.setattr(memory, "_madvise", lambda: lambda start, length, advice: calls.append((start, length, advice)))
    t = memory.empty((3 << 20,), dtype=torch.float32)  # 12 MiB
    assert t.shape == (3 << 20,) and t.dtype == torch.float32 and t.is_contiguous()
    (start, length, advice), = calls
    assert advice == 14 and start % (2 << 20) == 0 and length % (2 << 20) == 0 and length >= 10 << 20
    assert t.data_ptr() <= start and start + length <= t.data_ptr() + t.numel() * 4
    memory.empty((1000,), dtype=torch.float32)
    assert len(calls) == 1
    src = torch.randn(600, 1000)
    assert torch.equal(memory.clone(src), src)
    monkeypatch.undo()
    monkeypatch.setenv("LORAM_FAST_HUGE_PAGES", "0")
    memory._madvise.cache_clear()
    assert memory._madvise() is None
    memory._madvise.cache_clear()  # read again after the environment is restored


_BF16_SCRIPT = """
import sys, torch
from loram_fast.ops.dispatch import backends
backends()
g = torch.Generator().manual_seed(0)
W = torch.randn(301, 517, generator=g) * 0.05
special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, -1e-39, 3.0e38, 0.0, -0.0, 2e-38])
W.view(-1)[:9] = special
W[300, 20:29] = special  # the second half of a 32-entry step (the last row: updated with K reversed)
W[150, 44:53] = special  # across two halves
W = W.to(torch.bfloat16)
out = [W.clone(), W.clone(), W.T.contiguous().T] + [W.clone() for _ in range(5)]
torch.ops.loram_fast.loram_residual_batch_(out[:2], [0.7, 1e-36], 16, 0)  # 1e-36: subnormal sums
torch.ops.loram_fast.loram_residual_(out[2], -0.3, 5, 1)
torch.ops.loram_fast.loram_residual_batch_(out[3:], [0.7, 1e-36, -2.0, 0.1, 3.0], 16, 1)  # four swept together, one alone
U = W.clone()
torch.ops.loram_fast.lowrank_update_(U, torch.randn(301, 4, generator=g), torch.randn(4, 517, generator=g), 0.3)
M = (torch.randn(37, 5003, generator=g) * 0.05).to(torch.bfloat16)  # rows across the fp64 flush, odd tails
M.view(-1)[:4] = torch.tensor([1e-40, -1e-39, 3.0e18, 2e-38])
M = torch.cat([M, W[9:46, :]], 1)
sums = [t.view(torch.int32) for t in torch.ops.loram_fast.row_moments(M)]
torch.save([t.contiguous().view(torch.int16) for t in out + [U]] + sums, sys.argv[1])
"""


def test_bf16_hardware_rounding_is_bit_for_bit_the_portable_loop(tmp_path):
    """On a CPU with AVX512-BF16 the bf16 row updates round with vcvtneps2bf16 and the row moments sum 16 lanes at
    a time: the same bits as the portable loops (LORAM_FAST_NO_BF16_HW=1), NaN, infinities and subnormal results
    included."""
    import os
    import subprocess
    import sys

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512_bf16" not in flags:
        pytest.skip("this CPU has no AVX512-BF16: the portable loops run everywhere")
    if os.environ.get("LORAM_FAST_NO_BF16_HW"):
        pytest.skip("LORAM_FAST_NO_BF16_HW is set: this process runs the portable loops too")
    script = tmp_path / "run.py"
    script.write_text(_BF16_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "portable.pt")], check=True,
                   env={**os.environ, "LORAM_FAST_NO_BF16_HW": "1"})
    argv = sys.argv
    try:  # the same script in this process: the hardware rounding
        sys.argv = ["run.py", str(tmp_path / "hw.pt")]
        exec(compile(_BF16_SCRIPT, "run.py", "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = argv
    results = [torch.load(tmp_path / "hw.pt"), torch.load(tmp_path / "portable.pt")]
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert (results[0][0] != torch.zeros_like(results[0][0])).any()


def _bits_or_nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same fp32 bits everywhere, except that a NaN may be any NaN."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_rounded_is_torchs_rounding(dtype, backend):
    """``scale_rounded_`` = ``(src * alpha).to(dtype).to(fp32)`` bit for bit: ties, subnormal results, overflow to
    infinity, signed zeros, odd sizes (the vector loops' tails) and a size split across threads."""
    from loram_fast.ops.rounding import scale_rounded

    name, device = backend
    for shape in [(1, 7), (37, 53), (300, 517)]:
        x = torch.randn(shape)
        flat = x.view(-1)
        flat[:6] = torch.tensor([float("inf"), -0.0, 3.0e38, 1e-40, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8])
        if flat.numel() > 7:
            flat[6] = float("nan")
        for alpha in (1.0, 0.37, -1.7e-3, 7e4):
            expect = (x * alpha).to(dtype).float()
            got = scale_rounded(x.to(device), alpha, dtype, backend=name).cpu()
            reference = scale_rounded(x, alpha, dtype, backend="torch")
            assert _bits_or_nan_equal(got, expect), (shape, alpha)
            assert _bits_or_nan_equal(reference, expect), (shape, alpha)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_rounded_streamed_into_misaligned_memory(dtype, backend):
    """Outputs of >= 1 MiB written elsewhere than their source go through the CPU kernel's non-temporal path (an L1
    block, 64-byte stores): the same bits, with the output starting off a 64-byte boundary (its head and tail take
    the plain path) and special values at the block edges; the bytes around the output stay untouched."""
    name, device = backend
    n = (1 << 18) + 1000 + 5  # > 1 MiB of fp32: several blocks per thread, an odd tail
    x = torch.randn(n)
    for i in (0, 1, 13, 1023, 1024, 1025, 4096 + 16, n - 1):
        x[i] = (float("inf"), 1e-40, -0.0, 1.0 + 2.0 ** -8)[i % 4]
    for offset in (0, 3, 16):
        buf = torch.full((n + offset + 7,), 7.0, device=device)
        out = buf[offset:offset + n]
        ops.scale_rounded_(out, x.to(device), 0.37, {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype])
        expect = (x * 0.37).to(dtype).float()
        assert _bits_or_nan_equal(out.cpu(), expect), offset
        assert bool((buf[:offset] == 7.0).all()) and bool((buf[offset + n:] == 7.0).all())


def test_scale_rounded_refuses_bad_arguments(backend):
    from loram_fast.ops.rounding import scale_rounded

    _, device = backend
    x = torch.randn(8, 6, device=device)
    with pytest.raises(RuntimeError, match="must be fp32"):
        ops.scale_rounded_(torch.empty(8, 6, device=device), x.double(), 0.5, 1)
    with pytest.raises(RuntimeError, match="one shape and contiguous"):
        ops.scale_rounded_(torch.empty(6, 8, device=device), x, 0.5, 1)
    with pytest.raises(RuntimeError, match="one shape and contiguous"):
        ops.scale_rounded_(torch.empty(6, 8, device=device).T, x, 0.5, 1)
    with pytest.raises(RuntimeError, match="code must be"):
        ops.scale_rounded_(torch.empty(8, 6, device=device), x, 0.5, 3)
    buf = torch.randn(60, device=device)
    with pytest.raises(RuntimeError, match="overlap"):
        ops.scale_rounded_(buf[:48].view(8, 6), buf[4:52].view(8, 6), 0.5, 1)
    same = x.clone()
    ops.scale_rounded_(same, same, 0.5, 1)  # in place is allowed
    assert torch.equal(same, (x * 0.5).to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="contiguous fp32"):
        scale_rounded(x.T, 0.5, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be"):
        scale_rounded(x, 0.5, torch.float64)
