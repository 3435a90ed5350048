"""init_model on tiny transformers models built from configs."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import loram_fast
from loram_fast.methods.loram import loram_reference

from conftest import GPT2_TARGETS, LLAMA_TARGETS, assert_state_equal, logits, relative_error, state


def _peft(base, targets, **kw):
    kw.setdefault("r", 8)
    kw.setdefault("lora_alpha", 16)
    return get_peft_model(base, LoraConfig(target_modules=targets, **kw))


@pytest.mark.parametrize("method", ["loram", "loram_dct"])
def test_llama_output_unchanged_fp32(llama, tokens, method):
    y0 = logits(llama, tokens)
    model = _peft(llama, LLAMA_TARGETS)
    out = loram_fast.init_model(model, method=method, progress=False)
    assert out is model
    assert relative_error(logits(model, tokens), y0) <= 1e-5
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_B["default"].weight.abs().max() > 0  # really re-initialised (peft's default B is zero)


def test_llama_adapters_and_residual_equal_reference(llama_base, llama):
    model = _peft(llama, LLAMA_TARGETS, r=5, lora_alpha=7)
    loram_fast.init_model(model, progress=False)
    for name, mod in llama_base.named_modules():
        if name.split(".")[-1] not in LLAMA_TARGETS:
            continue
        A, B, W_res = loram_reference(mod.weight, 5, 7 / 5)
        layer = model.base_model.model.get_submodule(name)
        assert relative_error(layer.lora_A["default"].weight, A) <= 1e-5
        assert relative_error(layer.lora_B["default"].weight, B) <= 1e-5
        assert relative_error(layer.base_layer.weight, W_res) <= 1e-5


def test_rslora_scaling(llama_base, llama):
    model = _peft(llama, ["q_proj"], r=4, lora_alpha=8, use_rslora=True)
    loram_fast.init_model(model, progress=False)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 2)
    _, _, W_res = loram_reference(llama_base.model.layers[1].self_attn.q_proj.weight, 4, 8 / 2)
    assert relative_error(layer.base_layer.weight, W_res) <= 1e-5


def test_gpt2_conv1d_fan_in_fan_out(gpt2_base, gpt2, tokens):
    y0 = logits(gpt2, tokens)
    model = _peft(gpt2, GPT2_TARGETS, fan_in_fan_out=True)
    loram_fast.init_model(model, progress=False)
    assert relative_error(logits(model, tokens), y0) <= 1e-5
    # c_attn stores in×out (48×144): the math runs on the out×in view and is written back transposed
    W = gpt2_base.transformer.h[0].attn.c_attn.weight
    A, B, W_res = loram_reference(W.T, 8, 2.0)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.shape == (8, 48) and layer.lora_B["default"].weight.shape == (144, 8)
    assert relative_error(layer.lora_A["default"].weight, A) <= 1e-5
    assert relative_error(layer.base_layer.weight, W_res.T) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(llama_base, tokens, dtype):
    base = copy.deepcopy(llama_base).to(dtype)
    y0 = logits(base, tokens)
    model = _peft(base, LLAMA_TARGETS)
    loram_fast.init_model(model, progress=False)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert layer.base_layer.weight.dtype == dtype
    # adapters hold values rounded to the base dtype, in the dtype peft gave them (fp32 with autocast)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == torch.float32
    assert torch.equal(A, A.to(dtype).to(A.dtype)) and torch.equal(B, B.to(dtype).to(B.dtype))
    # output preserved within the dtype's precision (the residual is rounded once per weight entry)
    assert relative_error(logits(model, tokens), y0) <= 20 * torch.finfo(dtype).eps


def test_rounded_residual_option(llama_base, llama):
    base = copy.deepcopy(llama_base).to(torch.bfloat16)
    W0 = base.model.layers[0].self_attn.v_proj.weight.detach().clone()
    model = _peft(base, ["v_proj"])
    loram_fast.init_model(model, progress=False, rounded_residual=True)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    expect = (W0.float() - layer.scaling["default"] * B @ A).to(torch.bfloat16)
    assert torch.equal(layer.base_layer.weight, expect)


def test_unknown_method_touches_nothing(llama):
    model = _peft(llama, LLAMA_TARGETS)
    saved = state(model)
    with pytest.raises(ValueError, match=r"'nope'.*loram"):
        loram_fast.init_model(model, method="nope")
    assert_state_equal(model, saved)
    with pytest.raises(TypeError, match="unknown option"):
        loram_fast.init_model(model, method="loram", beta=3)
    assert_state_equal(model, saved)


def test_bad_layer_found_before_any_write(llama):
    model = _peft(llama, LLAMA_TARGETS, r=2)
    llama.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("inf")
    saved = state(model)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*NaN or Inf"):
        loram_fast.init_model(model, progress=False)
    assert_state_equal(model, saved)


def test_constant_weight_named_alone_in_its_batch(llama):
    """Weights of one shape are computed together; the error names the one that is constant, not its batch."""
    model = _peft(llama, LLAMA_TARGETS, r=2)
    llama.model.layers[1].self_attn.q_proj.weight.data.fill_(0.5)
    saved = state(model)
    with pytest.raises(ValueError, match=r"^module '[^']*layers\.1\.self_attn\.q_proj' \(Linear [0-9]+×[0-9]+\): "
                                         r"loram_fast\.loram: the weight is constant") as info:
        loram_fast.init_model(model, progress=False)
    assert "o_proj" not in str(info.value) and "layers.0" not in str(info.value)
    assert_state_equal(model, saved)


def test_r_one_and_rank_too_large_raise(llama):
    saved_model = _peft(llama, ["q_proj"], r=1)
    saved = state(saved_model)
    with pytest.raises(ValueError, match="dead adapter"):
        loram_fast.init_model(saved_model, progress=False)
    assert_state_equal(saved_model, saved)


def test_embedding_layer_not_supported(llama):
    model = _peft(llama, ["embed_tokens", "q_proj"])
    saved = state(model)
    with pytest.raises(NotImplementedError, match="'embedding'.*embed_tokens"):
        loram_fast.init_model(model, progress=False)
    assert_state_equal(model, saved)


def test_failure_while_writing_rolls_back(llama, tokens, monkeypatch):
    model = _peft(llama, LLAMA_TARGETS)
    y0 = logits(model, tokens)
    saved = state(model)
    import loram_fast.transaction as transaction

    calls = {"n": 0}
    original = transaction.apply_residual

    def flaky(W, residual, sign=-1.0, **kw):
        if sign < 0:
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("simulated kernel failure")
        return original(W, residual, sign, **kw)

    monkeypatch.setattr(transaction, "apply_residual", flaky)
    with pytest.raises(RuntimeError, match="simulated"):  # the torch product writes in place, one call per weight
        loram_fast.init_model(model, progress=False, backend="torch")
    now = model.state_dict()
    for k, v in saved.items():
        if "lora_" in k:
            assert torch.equal(now[k], v), k  # old adapters are restored exactly
        else:
            assert relative_error(now[k], v) <= 1e-6, k  # residuals undone (up to one fp32 rounding)
    assert relative_error(logits(model, tokens), y0) <= 1e-5


def test_second_adapter_by_name(llama):
    model = _peft(llama, ["q_proj"])
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    default_B = layer.lora_B["default"].weight.detach().clone()
    loram_fast.init_model(model, adapter_name="other", progress=False, allow_shared_base=True)
    assert torch.equal(layer.lora_B["default"].weight, default_B)
    assert layer.lora_B["other"].weight.abs().max() > 0
    with pytest.raises(ValueError, match="no peft LoRA layer holds adapter 'missing'"):
        loram_fast.init_model(model, adapter_name="missing", progress=False)


def test_not_a_peft_model_raises(llama):
    with pytest.raises(ValueError, match="no peft LoRA layers"):
        loram_fast.init_model(llama)


def test_available_methods_and_backends():
    assert {"loram", "loram_dct"} <= set(loram_fast.available_methods())
    b = loram_fast.backends()
    assert b["torch"] is True and set(b) == {"triton", "cuda", "cpu-ext", "torch"}
    assert all(v is True or isinstance(v, str) for v in b.values())
