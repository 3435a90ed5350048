"""Layouts, patterns, bad input and save/convert round trips on tiny Llama and GPT-2 models."""
import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import loram_fast

from conftest import (GPT2_TARGETS, LLAMA_TARGETS, assert_state_equal, logits, perturb_adapters, relative_error,
                      state)

RESIDUAL_METHODS = ["loram", "loram_dct", "pissa", "milora", "olora"]


def test_rank_and_alpha_patterns(llama_base, llama, tokens):
    y0 = logits(llama, tokens)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS,
                     rank_pattern={"q_proj": 4, "down_proj": 12}, alpha_pattern={"k_proj": 3})
    model = get_peft_model(llama, cfg)
    loram_fast.init_model(model, progress=False)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    k = model.base_model.model.model.layers[0].self_attn.k_proj
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert q.lora_A["default"].weight.shape[0] == 4 and down.lora_A["default"].weight.shape[0] == 12
    assert k.scaling["default"] == pytest.approx(3 / 8)
    from loram_fast.methods.loram import loram_reference

    _, _, W_res = loram_reference(llama_base.model.layers[0].self_attn.k_proj.weight, 8, 3 / 8)
    assert relative_error(k.base_layer.weight, W_res) <= 1e-5
    assert relative_error(logits(model, tokens), y0) <= 1e-5


def test_biases_untouched(gpt2, tokens):
    biases = {n: p.detach().clone() for n, p in gpt2.named_parameters() if n.endswith("bias")}
    model = get_peft_model(gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True))
    loram_fast.init_model(model, method="pissa", progress=False)
    for n, p in gpt2.named_parameters():
        if n.endswith("bias"):
            assert torch.equal(p, biases[n.replace(".base_layer", "")]), n


def test_integer_weight_rejected_untouched(llama):
    model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    layer.base_layer.weight = torch.nn.Parameter(torch.ones(layer.base_layer.weight.shape, dtype=torch.int8),
                                                 requires_grad=False)
    saved = state(model)
    with pytest.raises(TypeError, match=r"layers\.1\.self_attn\.v_proj.*torch\.int8"):
        loram_fast.init_model(model, progress=False)
    assert_state_equal(model, saved)


def test_meta_weight_rejected(llama):
    model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.base_layer.weight = torch.nn.Parameter(torch.empty(layer.base_layer.weight.shape, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        loram_fast.init_model(model, progress=False)


@pytest.mark.parametrize("method", RESIDUAL_METHODS)
def test_convert_to_plain_lora_on_original_base(method, llama_base, tokens, tmp_path):
    """peft's save_pretrained(path_initial_model_for_weight_conversion=...) turns a residual-method adapter
    into a plain LoRA (rank 2r) for the original, unmodified base."""
    model = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    loram_fast.init_model(model, method=method, progress=False)
    init_dir = tmp_path / "init"
    model.peft_config["default"].init_lora_weights = True  # as peft documents for PiSSA / OLoRA
    model.save_pretrained(init_dir)
    model.peft_config["default"].init_lora_weights = method
    perturb_adapters(model, seed=5, scale=0.02)  # "train"
    trained = logits(model, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(init_dir))
    plain = PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path / "converted")
    assert plain.peft_config["default"].r == 8
    assert relative_error(logits(plain, tokens), trained) <= 1e-4


def test_progress_bar_and_logging(llama, caplog, capsys):
    import logging

    model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with caplog.at_level(logging.INFO, logger="loram_fast"):
        loram_fast.init_model(model, progress=False)
    assert any("initialised 2 layers" in r.getMessage() for r in caplog.records)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # progress=False: nothing on the terminal
    loram_fast.init_model(model, progress=True)
    assert "loram_fast loram" in capsys.readouterr().err  # tqdm writes to stderr


def test_quantized_param_class_rejected(llama):
    """bitsandbytes is not installed here; its 4-bit parameter class is recognised by name (it stores uint8)."""

    class Params4bit(torch.nn.Parameter):
        pass

    model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    layer.base_layer.weight = Params4bit(layer.base_layer.weight.detach().clone(), requires_grad=False)
    saved = state(model)
    with pytest.raises(TypeError, match=r"o_proj.*Params4bit.*quantize the residual afterwards"):
        loram_fast.init_model(model, method="pissa", progress=False)
    assert_state_equal(model, saved)
