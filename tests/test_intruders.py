"""reduce_intruder_dimension against peft's own function on the same adapters (fp32: the same intruders and the
same mitigated delta per layer), and its refusals."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.intruders import reduce_intruder_dimension as peft_reduce

import loram_fast

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _trained(llama_base, scale):
    """A peft model whose adapter was 'trained' to large random values, so some top directions of W + ΔW are new."""
    model = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.lora_A["default"].weight.copy_(torch.randn(m.lora_A["default"].weight.shape, generator=g) * scale)
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * scale)
    return model


def _deltas(model, adapter):
    return {n: (m.get_delta_weight(adapter)) for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("scale,lam", [(0.3, 0.75), (0.1, 0.5), (0.02, 0.75)])
def test_same_result_as_peft(llama_base, scale, lam):
    theirs_model, ours_model = _trained(llama_base, scale), _trained(llama_base, scale)
    theirs_log, ours_log = [], []
    peft_reduce(theirs_model, mitigation_lambda=lam, logging_sink=theirs_log.append)
    loram_fast.reduce_intruder_dimension(ours_model, mitigation_lambda=lam, logging_sink=ours_log.append)
    strip = [line.split(": ", 1)[1] if ": " in line else line for line in theirs_log]
    assert [line.split(": ", 1)[1] if ": " in line else line for line in ours_log] == strip
    assert any("Intruders" in line for line in strip) or scale == 0.02  # the large adapters do plant intruders
    theirs, ours = _deltas(theirs_model, "intruder_reduced"), _deltas(ours_model, "intruder_reduced")
    for name, d in theirs.items():
        assert torch.allclose(ours[name], d, rtol=1e-4, atol=1e-5 * d.abs().max().item()), name
    assert ours_model.active_adapters == ["intruder_reduced"]
    # the old adapter is untouched
    before = _deltas(_trained(llama_base, scale), "default")
    for name, d in _deltas(ours_model, "default").items():
        assert torch.equal(d, before[name])


def test_refusals(llama_base):
    model = _trained(llama_base, 0.1)
    with pytest.raises(ValueError, match="no LoRA layer holds adapter 'nope'"):
        loram_fast.reduce_intruder_dimension(model, old_adapter_name="nope")
    with pytest.raises(ValueError, match="top_k"):
        loram_fast.reduce_intruder_dimension(model, top_k=0)


def test_conv1d_layers_work_in_the_out_by_in_orientation(gpt2_base):
    """GPT-2 Conv1D (fan_in_fan_out): the new adapter has peft's shapes and the same mitigated delta as an nn.Linear
    holding the transposed weight and the same adapter."""
    model = get_peft_model(copy.deepcopy(gpt2_base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc"],
                                                                 fan_in_fan_out=True))
    layer = model.base_model.model.transformer.h[0].mlp.c_fc
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=g) * 0.5)
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.5)
    W = layer.get_base_layer().weight.detach().T.clone()  # out×in
    linear = torch.nn.Sequential(torch.nn.Linear(W.shape[1], W.shape[0], bias=False))
    with torch.no_grad():
        linear[0].weight.copy_(W)
    ref = get_peft_model(linear, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    ref_layer = ref.base_model.model[0]
    with torch.no_grad():
        ref_layer.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
        ref_layer.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    loram_fast.reduce_intruder_dimension(model, top_k=4)
    loram_fast.reduce_intruder_dimension(ref, top_k=4)
    for name in ("lora_A", "lora_B"):
        assert getattr(layer, name)["intruder_reduced"].weight.shape == getattr(layer, name)["default"].weight.shape
    got = layer.get_delta_weight("intruder_reduced").T  # stored in×out → out×in
    expect = ref_layer.get_delta_weight("intruder_reduced")
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-6)
