"""The peft hook: LoraConfig(init_lora_weights="<registered method>") with stock peft."""
import importlib

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import loram_fast
from loram_fast import peft_hook

from conftest import GPT2_TARGETS, LLAMA_TARGETS, logits, perturb_adapters, relative_error


@pytest.mark.parametrize("method", ["loram", "loram_dct"])
def test_hook_equals_init_model(llama_base, method):
    import copy

    cfg = dict(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    via_hook = get_peft_model(copy.deepcopy(llama_base), LoraConfig(init_lora_weights=method, **cfg))
    via_api = get_peft_model(copy.deepcopy(llama_base), LoraConfig(**cfg))
    loram_fast.init_model(via_api, method=method, progress=False)
    a, b = via_hook.state_dict(), via_api.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_hook_bf16_and_gpt2(gpt2, tokens):
    y0 = logits(gpt2, tokens)
    model = get_peft_model(gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True,
                                            init_lora_weights="loram"))
    assert relative_error(logits(model, tokens), y0) <= 1e-5


def test_from_pretrained_recreates_residual(llama_base, tokens, tmp_path):
    import copy

    model = get_peft_model(copy.deepcopy(llama_base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights="loram"))
    perturb_adapters(model, seed=3)  # "train"
    trained = logits(model, tokens)
    model.save_pretrained(tmp_path)
    saved = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert saved < 200_000  # only the adapters are saved, no residual weights
    loaded = PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)
    assert relative_error(logits(loaded, tokens), trained) <= 1e-5


def test_peft_own_inits_untouched(llama):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().max() == 0  # peft's gaussian: B = 0
    with pytest.raises(ValueError, match="Unknown initialization"):
        get_peft_model(llama, LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights="not_a_method"),
                       adapter_name="x")


def test_install_is_idempotent():
    fn = LoraLayer.reset_lora_parameters
    peft_hook.install()
    importlib.reload(loram_fast)
    assert LoraLayer.reset_lora_parameters is fn
    assert peft_hook.installed()


def test_hook_validation_error_names_problem(llama):
    with pytest.raises(ValueError, match="dead adapter"):
        get_peft_model(llama, LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights="loram"))
