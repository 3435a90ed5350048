"""NLoRA / SLoRA / IntTune: the r×r middle matrix on stock peft LoRA layers."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import loram_fast

from conftest import GPT2_TARGETS, LLAMA_TARGETS, logits, perturb_adapters, relative_error

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft(base, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("target_modules", TARGETS)
    return get_peft_model(copy.deepcopy(base), LoraConfig(**kw))


def _expected_logits(base, tokens, r, s, targets, nystrom="copy"):
    """The base model with every target weight replaced by W + s·W[:, :r] N W[:r, :] (the reference's step 0)."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if name.split(".")[-1] in targets:
                W = mod.weight.double()
                N = W[:r, :r] if nystrom == "copy" else torch.linalg.pinv(W[:r, :r])
                mod.weight.copy_(W + s * W[:, :r] @ N @ W[:r, :])
    return logits(ref, tokens)


@pytest.mark.parametrize("nystrom", ["copy", "pinv"])
def test_nlora_forward_is_reference_math(llama_base, tokens, nystrom):
    model = _peft(llama_base)
    loram_fast.init_model(model, "nlora", nystrom=nystrom, progress=False)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    W = llama_base.model.layers[0].mlp.down_proj.weight
    assert torch.equal(layer.lora_A["default"].weight, W[:4, :]) and torch.equal(layer.lora_B["default"].weight, W[:, :4])
    N = layer.lora_N["default"].weight
    assert N.shape == (4, 4)
    expect_N = W[:4, :4] if nystrom == "copy" else torch.linalg.pinv(W[:4, :4].double()).float()
    assert relative_error(N, expect_N) <= 1e-6
    assert torch.equal(layer.base_layer.weight, W)  # reference: the base weight is untouched
    tol = 1e-5 if nystrom == "copy" else 1e-4  # pinv of a small random block amplifies rounding
    assert relative_error(logits(model, tokens), _expected_logits(llama_base, tokens, 4, 2.0, TARGETS, nystrom)) <= tol


def test_residual_option_keeps_output(llama_base, tokens):
    model = _peft(llama_base)
    y0 = logits(model, tokens)
    loram_fast.init_model(model, "nlora", residual=True, progress=False)
    assert relative_error(logits(model, tokens), y0) <= 1e-5


@pytest.mark.parametrize("method", ["nlora", "inttune"])
def test_hook_equals_init_model(llama_base, method):
    via_hook = _peft(llama_base, init_lora_weights=method)
    via_api = _peft(llama_base)
    loram_fast.init_model(via_api, method, progress=False)
    a, b = via_hook.state_dict(), via_api.state_dict()
    assert a.keys() == b.keys() and any(".lora_N." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_hook_slora_bounds(llama_base):
    import math

    model = _peft(llama_base, init_lora_weights="slora")
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    A, B, N = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_N["default"].weight)
    assert B.abs().max() == 0
    assert 0 < A.abs().max() <= 1 / math.sqrt(A.shape[1]) and 0 < N.abs().max() <= 1 / math.sqrt(4)


def test_trainable_parameter_counts(llama_base):
    r, layers = 4, 2 * len(TARGETS)
    counts = {}
    for method in ["nlora", "slora", "inttune"]:
        model = _peft(llama_base, init_lora_weights=method)
        model.set_adapter("default")  # peft re-marks adapters trainable here; IntTune's A, B must stay frozen
        counts[method] = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert counts["inttune"] == layers * r * r
    plain = _peft(llama_base)
    lora = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    assert counts["nlora"] == counts["slora"] == lora + layers * r * r


def test_slora_init(llama_base, tokens):
    model = _peft(llama_base)
    y0 = logits(model, tokens)
    loram_fast.init_model(model, "slora", progress=False)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    assert layer.lora_B["default"].weight.abs().max() == 0
    assert layer.lora_N["default"].weight.abs().max() > 0 and layer.lora_A["default"].weight.abs().max() > 0
    assert relative_error(logits(model, tokens), y0) <= 1e-6  # B = 0: no change at step 0


def test_save_load_round_trip_and_merge(llama_base, tokens, tmp_path):
    model = _peft(llama_base, init_lora_weights="nlora")
    perturb_adapters(model, seed=2)  # "train"
    trained = logits(model, tokens)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    orig = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_N["default"].weight, orig.lora_N["default"].weight)
    assert relative_error(logits(loaded, tokens), trained) <= 1e-6
    loaded.merge_adapter()
    assert relative_error(logits(loaded, tokens), trained) <= 1e-5
    loaded.unmerge_adapter()
    assert relative_error(logits(loaded, tokens), trained) <= 1e-5
    merged = loaded.merge_and_unload()
    assert relative_error(logits(merged, tokens), trained) <= 1e-5


def test_gpt2_conv1d(gpt2_base, tokens):
    model = _peft(gpt2_base, target_modules=GPT2_TARGETS, fan_in_fan_out=True)
    loram_fast.init_model(model, "nlora", progress=False)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    Wv = gpt2_base.transformer.h[0].attn.c_attn.weight.T  # out×in view
    assert torch.equal(layer.lora_A["default"].weight, Wv[:4, :])
    assert relative_error(logits(model, tokens), _expected_logits_gpt2(gpt2_base, tokens)) <= 1e-5


def _expected_logits_gpt2(base, tokens, r=4, s=2.0):
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if name.split(".")[-1] in GPT2_TARGETS:
                Wv = mod.weight.T.double()
                mod.weight.copy_((Wv + s * Wv[:, :r] @ Wv[:r, :r] @ Wv[:r, :]).T)
    return logits(ref, tokens)


def test_errors(llama_base):
    model = _peft(llama_base, r=70, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="exceeds min"):
        loram_fast.init_model(model, "nlora", progress=False)
    with pytest.raises(ValueError, match="unknown nystrom"):
        loram_fast.init_model(_peft(llama_base), "nlora", nystrom="svd", progress=False)
    emb = _peft(llama_base, target_modules=["embed_tokens"])
    with pytest.raises(NotImplementedError):
        loram_fast.init_model(emb, "nlora", progress=False)


# -- peft's functions that read an adapter's delta see s·B N A (issue: get_delta_weight left N out) -------------

def _delta(layer, adapter="default"):
    A, B, N = (getattr(layer, n)[adapter].weight.double() for n in ("lora_A", "lora_B", "lora_N"))
    return layer.scaling[adapter] * B @ N @ A


def _three_matrix_layers(model, adapter="default"):
    return [(n, m) for n, m in model.named_modules() if adapter in getattr(m, "lora_N", {})]


@pytest.mark.parametrize("method", ["nlora", "slora", "inttune"])
def test_get_delta_weight_includes_the_middle_matrix(llama_base, method):
    model = _peft(llama_base)
    loram_fast.init_model(model, method, progress=False)
    perturb_adapters(model, seed=4)  # B is zero for slora until trained
    layers = _three_matrix_layers(model)
    assert layers
    for name, layer in layers:
        assert relative_error(layer.get_delta_weight("default"), _delta(layer)) <= 1e-6, name


@pytest.mark.parametrize("method", ["nlora", "inttune"])
def test_merge_and_unload_and_weighted_adapters_use_b_n_a(llama_base, tokens, method):
    model = _peft(llama_base)
    loram_fast.init_model(model, method, progress=False)
    perturb_adapters(model, seed=5)
    # add_weighted_adapter with an SVD combination reads get_delta_weight: rank 2r holds both B N A exactly
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    loram_fast.init_model(model, "nlora", adapter_name="second", progress=False)
    perturb_adapters(model, seed=7)
    model.add_weighted_adapter(["default", "second"], [0.7, 0.4], "combined", combination_type="svd", svd_rank=8)
    for name, layer in _three_matrix_layers(model):
        combined = layer.get_delta_weight("combined").double()
        expect_delta = 0.7 * _delta(layer) + 0.4 * _delta(layer, "second")
        assert relative_error(combined, expect_delta) <= 1e-4, name
    for kind, adapters in [("cat", ["default", "second"]), ("svd", ["default"])]:  # one adapter: peft's "linear"
        with pytest.raises(NotImplementedError, match="middle matrix"):
            model.add_weighted_adapter(adapters, [1.0] * len(adapters), "x", combination_type=kind)
    model.set_adapter("default")
    y = logits(model, tokens)
    expect = {n: (l.base_layer.weight.double() + _delta(l)) for n, l in _three_matrix_layers(model)}
    for a in ("second", "combined"):
        model.delete_adapter(a)
    merged = copy.deepcopy(model).merge_and_unload()
    for name, W in expect.items():
        plain = name.replace("base_model.model.", "", 1)
        assert relative_error(merged.get_submodule(plain).weight, W) <= 1e-6, name
    assert relative_error(logits(merged, tokens), y) <= 1e-5


def test_convert_to_lora_keeps_the_middle_matrix(llama_base, tokens):
    from peft.tuners.lora.conversion import convert_to_lora

    model = _peft(llama_base)
    loram_fast.init_model(model, "nlora", progress=False)
    perturb_adapters(model, seed=6)
    config, state_dict = convert_to_lora(model, rank=8)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    key = next(k for k in state_dict if "layers.0.self_attn.q_proj.lora_A" in k)
    A = state_dict[key].double()
    B = state_dict[key.replace("lora_A", "lora_B")].double()
    scale = config.lora_alpha / config.r
    assert relative_error(scale * B @ A, _delta(layer)) <= 1e-4
