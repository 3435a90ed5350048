"""LoftQ: bitsandbytes' NF4 / int8 quantisers bit for bit (against the installed bitsandbytes, which runs on CPU,
and against a transcription of its CUDA decision tree), peft's ``loftq_init`` result, and every path that changes a
model (init, hook, save → reload, a second init, rollback, Conv1D, DoRA)."""
import copy
import inspect
import textwrap

import bitsandbytes.functional as bnb_functional  # the test extra installs it: the reference, no skip
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code
from bitsandbytes.nn import Int8Params
from peft import LoftQConfig, LoraConfig, PeftModel, get_peft_model

import loram_fast
import loram_fast.transaction as transaction
from loram_fast.methods.loftq import loftq_factors
from loram_fast.ops import quant

from conftest import logits, perturb_adapters, relative_error, taken_over
from test_safety import _interrupt_every_step, assert_same, full_state

TARGETS = ["q_proj", "v_proj", "down_proj"]  # down_proj: in = 176, blocks of 64 span rows


def _peft(base, targets=TARGETS, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 4)  # LoftQ does not divide out the scaling: s = 1 reproduces W
    return get_peft_model(base, LoraConfig(target_modules=targets, **kw))


def _generic_dequantize_4bit(A, quant_state):
    """bitsandbytes' generic (and CUDA) layout: blocks over the flattened weight. Its CPU kernel
    (``cdequantize_blockwise_cpu_nf4_fp32``, bitsandbytes 0.50) indexes blocks per row and returns wrong values when
    the last dimension is not a multiple of the block size (see test_bitsandbytes_cpu_dequantize_differs)."""
    return _dequantize_4bit_compute(A.reshape(-1), quant_state.absmax, _get_4bit_code("nf4", A.device),
                                    quant_state.blocksize, quant_state.shape, quant_state.dtype)


@pytest.fixture(scope="module")
def peft_loftq():
    """peft's own ``loftq_init`` source with its compute device ("cuda" / "xpu") replaced by "cpu": every other line,
    bitsandbytes calls included, is peft's. bitsandbytes' ``dequantize_4bit`` runs its generic implementation (the
    layout of its CUDA kernel, which peft uses) instead of the CPU kernel that mis-indexes some shapes."""
    import bitsandbytes.functional
    import peft.utils.loftq_utils as loftq_utils

    src = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
    device = '"xpu" if is_xpu_available() else "cuda"'
    assert src.count(device) == 1, "peft's loftq_init changed: update this transcription"
    namespace = dict(vars(loftq_utils))
    exec(compile(src.replace(device, '"cpu"'), loftq_utils.__file__, "exec"), namespace)

    def loftq_init(*args, **kwargs):
        original = bitsandbytes.functional.dequantize_4bit
        bitsandbytes.functional.dequantize_4bit = _generic_dequantize_4bit
        try:
            return namespace["loftq_init"](*args, **kwargs)
        finally:
            bitsandbytes.functional.dequantize_4bit = original

    return loftq_init


def _weights(shape, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * scale
    if W.numel() >= 128:
        W.view(-1)[:64] = 0.0  # a whole block of zeros (absmax 0)
        W.view(-1)[70] = 0.5  # an outlier that dominates its block
    return W


# -- the quantisers ---------------------------------------------------------------------------------------------------

SHAPES = [(64, 64), (37, 53), (128, 96), (3, 5), (16, 1024), (1, 65)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_bit_for_bit_with_bitsandbytes(shape, dtype):
    X = _weights(shape, 0).to(dtype)
    packed, state = bnb_functional.quantize_4bit(X, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours, absmax = quant.nf4_quantize(X)
    assert torch.equal(ours, packed) and torch.equal(absmax, state.absmax)
    state.dtype = torch.float32  # LoftQ dequantises to fp32
    expect = _generic_dequantize_4bit(packed, state)
    assert torch.equal(quant.nf4_dequantize(ours, absmax, X.shape), expect)
    assert torch.equal(quant.nf4_roundtrip(X), expect)
    if shape[-1] % 64 == 0:  # bitsandbytes' CPU kernel agrees where its layout assumption holds
        assert torch.equal(bnb_functional.dequantize_4bit(packed, state), expect)


def test_nf4_rounding_on_the_thresholds():
    """Values whose scaled form lands on a threshold: bitsandbytes scales whole blocks by x·(1/absmax) and the last,
    shorter block by x/absmax, which round differently there. Each pair (absmax, x) goes in a whole block and in the
    tail; the codes must be bitsandbytes' in both (and differ between the two, so the test sees the difference)."""
    thresholds = torch.tensor(quant.NF4_THRESHOLDS)
    absmax = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.01
    pairs = []
    for t in thresholds:
        for x in (t * absmax, torch.nextafter(t * absmax, torch.zeros_like(absmax))):
            by_div = torch.bucketize(x / absmax, thresholds)
            by_mul = torch.bucketize(x * (1.0 / absmax), thresholds)
            hit = (by_div != by_mul).nonzero().flatten()
            if len(hit):
                pairs.append((absmax[hit[0]], x[hit[0]]))
                break
    assert len(pairs) >= 10
    for a, x in pairs:
        block = torch.zeros(64)
        block[0], block[1] = a, x
        X = torch.cat([block, torch.stack([a, x])])
        packed, state = bnb_functional.quantize_4bit(X, blocksize=64, compress_statistics=False, quant_type="nf4")
        ours, absmax_ours = quant.nf4_quantize(X)
        assert torch.equal(ours, packed) and torch.equal(absmax_ours, state.absmax)
        assert (ours[0, 0] & 0xF) != (ours[32, 0] & 0xF)  # the same x, two codes


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_nf4_other_block_sizes_and_chunks(monkeypatch, blocksize):
    monkeypatch.setattr(quant, "_CHUNK_ELEMS", 4096)  # many chunks on a small weight
    X = _weights((40, 300), 1)
    packed, state = bnb_functional.quantize_4bit(X, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    ours, absmax = quant.nf4_quantize(X, blocksize)
    assert torch.equal(ours, packed) and torch.equal(absmax, state.absmax)
    assert torch.equal(quant.nf4_roundtrip(X, blocksize), _generic_dequantize_4bit(packed, state))


def test_bitsandbytes_cpu_dequantize_differs():
    """The documented exception: bitsandbytes 0.50's CPU dequantize kernel on a last dimension that is not a multiple
    of the block size. If this starts to fail, bitsandbytes fixed it: drop the exception from the docs."""
    X = _weights((128, 96), 2)
    packed, state = bnb_functional.quantize_4bit(X, blocksize=64, compress_statistics=False, quant_type="nf4")
    cpu_kernel = bnb_functional.dequantize_4bit(packed, state)
    ours = quant.nf4_roundtrip(X)
    assert not torch.equal(cpu_kernel, ours)
    assert (ours - X).abs().max() < (cpu_kernel - X).abs().max()


def _cuda_tree(x: float) -> int:
    """bitsandbytes' ``dQuantizeNF4`` (csrc/kernels.cu), transcribed branch for branch, fp32 comparisons."""
    def gt(t):
        return torch.tensor(x, dtype=torch.float32) > torch.tensor(t, dtype=torch.float32)

    if gt(0.03979014977812767):
        if gt(0.3893125355243683):
            if gt(0.6427869200706482):
                return 0b1111 if gt(0.8614784181118011) else 0b1110
            return 0b1101 if gt(0.5016634166240692) else 0b1100
        if gt(0.2035212516784668):
            return 0b1011 if gt(0.2920137718319893) else 0b1010
        return 0b1001 if gt(0.1202552504837513) else 0b1000
    if gt(-0.33967943489551544):
        if gt(-0.13791173323988914):
            return 0b0111 if gt(-0.045525018125772476) else 0b0110
        return 0b0101 if gt(-0.23460740596055984) else 0b0100
    if gt(-0.6106329262256622):
        return 0b0011 if gt(-0.4599952697753906) else 0b0010
    return 0b0001 if gt(-0.8480964004993439) else 0b0000


def test_nf4_codes_equal_the_cuda_decision_tree():
    """The CUDA kernel's tree and our bucketize give the same code for the same scaled value: every threshold and
    its fp32 neighbours, the code points, ±1 and random values."""
    code = torch.tensor(quant.NF4_CODE)
    thresholds = torch.tensor(quant.NF4_THRESHOLDS)
    assert torch.equal(thresholds, (code[:-1] + code[1:]) / 2)  # the tree's constants are the fp32 midpoints
    near = [torch.nextafter(thresholds, torch.full_like(thresholds, d)) for d in (-1.0, 1.0)]
    values = torch.cat([thresholds, *near, code, torch.tensor([-1.0, 1.0, 0.0, -0.0]),
                        torch.rand(200, generator=torch.Generator().manual_seed(3)) * 2 - 1])
    ours = torch.bucketize(values, thresholds)
    assert [_cuda_tree(float(v)) for v in values] == ours.tolist()


@pytest.mark.parametrize("shape", [(64, 64), (37, 53), (5, 300)])
def test_int8_bit_for_bit_with_bitsandbytes(shape):
    X = _weights(shape, 4)
    X[2] = 0.0  # an all-zero row
    params = Int8Params(X.clone(), requires_grad=False).to("cpu")  # what peft's loftq_init does for 8 bits
    CB, SCB = quant.int8_quantize(X)
    assert torch.equal(CB, params.data) and torch.equal(SCB, params.SCB)
    expect = bnb_functional.int8_vectorwise_dequant(params.data, params.SCB)
    assert torch.equal(quant.int8_roundtrip(X), expect)


def test_quantiser_errors():
    with pytest.raises(ValueError, match="blocksize"):
        quant.nf4_quantize(torch.zeros(4, 4), blocksize=48)
    with pytest.raises(ValueError, match="bits must be 4"):
        quant.roundtrip(torch.zeros(4, 4), 2)


# -- the method against peft's loftq_init ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("iters", [1, 2])
@pytest.mark.parametrize("shape", [(96, 128), (192, 64), (300, 256)])
def test_same_result_as_peft(peft_loftq, bits, iters, shape):
    """The exact solver: Q, A and B bit for bit (the same full SVD); the randomized one: Q bit for bit after one
    alternation (it depends on W only), the LoftQ error within 1 % of peft's."""
    W = _weights(shape, 5)
    Q, A, B = peft_loftq(W.clone(), num_bits=bits, reduced_rank=8, num_iter=iters)
    q, a, b = loftq_factors(W, 8, bits=bits, iters=iters)
    assert torch.equal(q, Q) and torch.equal(a, A) and torch.equal(b, B)
    q, a, b = loftq_factors(W, 8, bits=bits, iters=iters, solver="randomized", niter=4)
    if iters == 1:
        assert torch.equal(q, Q)
    err, ref = (W - q - b @ a).norm(), (W - Q - B @ A).norm()
    assert abs(err - ref) <= 0.01 * ref  # (alternations are not monotone: either may be lower)


def test_bf16_and_blocks_spanning_rows(peft_loftq):
    """bf16: peft quantises the weight's fp32 value and rounds Q once to bf16; so do we (through the writer)."""
    W = _weights((64, 176), 6).to(torch.bfloat16)
    Q, A, B = peft_loftq(W.clone(), num_bits=4, reduced_rank=4, num_iter=1)
    q, a, b = loftq_factors(W, 4)
    assert torch.equal(q.to(torch.bfloat16), Q)  # peft returns Q in the weight's dtype; A, B fp32
    assert torch.equal(a, A) and torch.equal(b, B)


def test_randomized_solver_is_close_to_exact():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(256, 192, generator=g) @ torch.diag(torch.linspace(1, 0.01, 192)) * 0.02
    exact = loftq_factors(W, 8)
    fast = loftq_factors(W, 8, solver="randomized", niter=4)
    assert torch.equal(exact[0], fast[0])
    e_exact = (W - exact[0] - exact[2] @ exact[1]).norm()
    e_fast = (W - fast[0] - fast[2] @ fast[1]).norm()
    assert e_exact <= e_fast <= 1.01 * e_exact


def test_loftq_refuses_bad_weights():
    W = torch.zeros(64, 64)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        loftq_factors(W, 4)
    with pytest.raises(ValueError, match="65504"):
        loftq_factors(torch.full((64, 64), 1e5), 4, bits=8)


# -- models ---------------------------------------------------------------------------------------------------------

def _expected_layers(model, base, bits=4, iters=1):
    """(module name, Q in the weight's dtype, B A) from loftq_factors on each original weight."""
    originals = dict(base.named_modules())
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            W = originals[name.removeprefix("base_model.model.")].weight
            q, a, b = loftq_factors(W, layer.r["default"], bits=bits, iters=iters)
            yield name, layer, q.to(W.dtype), b @ a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_init_model(llama_base, tokens, dtype, bits):
    base = copy.deepcopy(llama_base).to(dtype)
    model = _peft(copy.deepcopy(base))
    loram_fast.init_model(model, "loftq", loftq_bits=bits, progress=False)
    assert model.peft_config["default"].init_lora_weights == f"loram_fast:loftq[loftq_bits={bits}]"
    for name, layer, q, ba in _expected_layers(model, base, bits):
        assert torch.equal(layer.get_base_layer().weight, q), name
        got = layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
        assert relative_error(got, ba) <= (1e-5 if dtype == torch.float32 else 1e-2), name
    # Q + B A (s = 1) is closer to W than Q alone: the point of LoftQ
    quantised_only = copy.deepcopy(model)
    for layer in quantised_only.modules():
        if hasattr(layer, "lora_B") and "default" in layer.lora_B:
            layer.lora_B["default"].weight.data.zero_()
    y0 = logits(base, tokens)
    assert relative_error(logits(model, tokens), y0) < relative_error(logits(quantised_only, tokens), y0)


def test_hook_take_over_runs_ours_with_peft_config(llama_base, monkeypatch):
    calls = []
    with taken_over(monkeypatch, lambda method, options: calls.append((method, options))):
        model = _peft(copy.deepcopy(llama_base), init_lora_weights="loftq",
                      loftq_config=LoftQConfig(loftq_bits=8, loftq_iter=2))
    assert len(calls) == 6 and all(c == ("loftq", {"loftq_config": {"loftq_bits": 8, "loftq_iter": 2}})
                                   for c in calls)
    direct = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(direct, "loftq", loftq_bits=8, loftq_iter=2, progress=False)
    for (k, a), b in zip(model.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), k


def test_recorded_string_and_save_reload(llama_base, tokens, tmp_path):
    """The reload rebuilds Q from the original base through the hook and loads the trained adapters: same model."""
    model = _peft(copy.deepcopy(llama_base), init_lora_weights="loram_fast:loftq[loftq_bits=8]")
    direct = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(direct, "loftq", loftq_bits=8, progress=False)
    for (k, a), b in zip(model.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), k
    perturb_adapters(model, seed=3)
    trained = logits(model, tokens)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)
    assert torch.equal(logits(loaded, tokens), trained)


def test_second_init_is_refused_and_changes_nothing(llama_base):
    model = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(model, "loftq", progress=False)
    before = full_state(model)
    for method in ("loftq", "loram"):
        with pytest.raises(ValueError, match="replaced the base weight"):
            loram_fast.init_model(model, method, progress=False)
        assert_same(model, before)


@pytest.mark.parametrize("exact_rollback", [True, False])
def test_interrupt_at_every_step_restores_every_bit(llama_base, monkeypatch, exact_rollback):
    """A replaced weight has no inverse: it is copied before the write even with exact_rollback=False."""
    def factory():
        m = _peft(copy.deepcopy(llama_base).to(torch.bfloat16), ["q_proj", "down_proj"])
        loram_fast.init_model(m, "pissa", progress=False)  # a previous residual to fold back first
        return m

    steps = _interrupt_every_step(monkeypatch, factory, "loftq", {"exact_rollback": exact_rollback},
                                  assert_same if exact_rollback else _same_but_folded_residuals)
    assert steps >= 6


def _same_but_folded_residuals(model, before):
    """exact_rollback=False: the pissa residual folded back and re-applied may differ by a rounding; the rest is
    bit-identical (the replaced weights were restored from their copies)."""
    now = full_state(model)
    for k, v in before["tensors"].items():
        if "base_layer.weight" in k:
            assert ((now["tensors"][k].double() - v.double()).abs() <= 2 ** -7 * v.double().abs().max()).all(), k
        else:
            assert torch.equal(now["tensors"][k], v), k
    assert now["flags"] == before["flags"] and now["config"] == before["config"]


def test_failure_in_a_later_layer_restores_replaced_weights(llama_base, monkeypatch):
    model = _peft(copy.deepcopy(llama_base))
    before = full_state(model)
    real = transaction.Transaction._set_dora_magnitude
    calls = {"n": 0}

    def fail_on_third(self, target, init):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(self, target, init)

    monkeypatch.setattr(transaction.Transaction, "_set_dora_magnitude", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        loram_fast.init_model(model, "loftq", progress=False, exact_rollback=False)
    assert_same(model, before)


def test_conv1d_quantises_the_out_by_in_weight(gpt2_base):
    """GPT-2 stores Conv1D weights in×out; the quantised weight and B A are those of W = stored.T (peft's own
    loftq_init works on the stored tensor and writes in×out factors into out×in adapters)."""
    model = get_peft_model(copy.deepcopy(gpt2_base), LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"],
                                                                fan_in_fan_out=True))
    loram_fast.init_model(model, "loftq", progress=False)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    W = gpt2_base.transformer.h[0].attn.c_attn.weight.T
    q, a, b = loftq_factors(W, 4)
    assert torch.equal(layer.get_base_layer().weight, q.T)
    got = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert relative_error(got, b @ a) <= 1e-5


def test_dora_magnitude_after_loftq(llama_base):
    from peft.tuners.lora.dora import DoraLinearLayer

    model = _peft(copy.deepcopy(llama_base), use_dora=True)
    loram_fast.init_model(model, "loftq", progress=False)
    for layer in model.modules():
        if hasattr(layer, "lora_magnitude_vector") and "default" in layer.lora_magnitude_vector:
            dora = DoraLinearLayer(fan_in_fan_out=False)
            dora.update_layer(base_layer=layer.get_base_layer(), lora_A=layer.lora_A["default"].weight,
                              lora_B=layer.lora_B["default"].weight, scaling=layer.scaling["default"])
            ours = layer.lora_magnitude_vector["default"].weight
            assert torch.allclose(ours, dora.weight, rtol=1e-6, atol=0)


def test_option_errors(llama_base):
    model = _peft(copy.deepcopy(llama_base))
    before = full_state(model)
    with pytest.raises(ValueError, match="loftq_bits"):
        loram_fast.init_model(model, "loftq", loftq_bits=3, progress=False)
    with pytest.raises(ValueError, match="loftq_iter"):
        loram_fast.init_model(model, "loftq", loftq_iter=0, progress=False)
    with pytest.raises(TypeError, match="LoftQConfig"):
        loram_fast.init_model(model, "loftq", loftq_config=3, progress=False)
    assert_same(model, before)


def test_loftq_config_is_recorded_as_plain_options(llama_base):
    model = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(model, "loftq", loftq_config=LoftQConfig(loftq_bits=8, loftq_iter=2), progress=False)
    assert model.peft_config["default"].init_lora_weights == "loram_fast:loftq[loftq_bits=8,loftq_iter=2]"
    direct = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(direct, "loftq", loftq_bits=8, loftq_iter=2, progress=False)
    for (k, a), b in zip(model.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), k
