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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hook_initialises_an_injection_at_once_as_layer_by_layer(llama_base, monkeypatch, dtype):
    """Within peft's inject_adapter the hook checks each LoRAM layer and initialises them all at the end, in one
    compute_and_write call (batched residual writes): every parameter and buffer bit for bit as when each layer is
    initialised from its own update_layer (BATCHED_IN_INJECTION emptied); on the torch backend, layer by layer."""
    import copy

    from loram_fast import compute

    cfg = dict(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights="loram")
    base = copy.deepcopy(llama_base).to(dtype)
    calls = []
    real = compute.compute_and_write
    monkeypatch.setattr(compute, "compute_and_write", lambda spec, targets, *a, **k: (
        calls.append(len(targets)), real(spec, targets, *a, **k))[1])
    batched = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    assert calls == [2 * len(LLAMA_TARGETS)]
    monkeypatch.setattr(peft_hook, "BATCHED_IN_INJECTION", ())
    per_layer = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    assert calls[1:] == [1] * (2 * len(LLAMA_TARGETS))
    a, b = batched.state_dict(), per_layer.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for (n, p), (_, q) in zip(batched.named_parameters(), per_layer.named_parameters()):
        assert p.requires_grad == q.requires_grad, n
    # on the torch backend every residual write keeps a weight copy until its transaction ends: layer by layer
    monkeypatch.setattr(peft_hook, "BATCHED_IN_INJECTION", ("loram", "loram_dct"))
    monkeypatch.setenv("LORAM_FAST_BACKEND", "torch")
    del calls[:]
    get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    assert calls == [1] * (2 * len(LLAMA_TARGETS))


def test_hook_failure_in_an_injection_leaves_every_base_weight_untouched(llama_base):
    """NaN in the last targeted weight: peft's get_peft_model raises the error naming that module, no base weight has
    changed (layer by layer, the earlier layers' residuals would already be in their weights), and the LoRA layers
    peft put into the model in place add nothing (B = 0)."""
    import copy

    base = copy.deepcopy(llama_base)
    last = base.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        last[3, 5] = float("nan")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*NaN"):
        get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights="loram"))
    after = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys()
    for n, p in before.items():  # bit for bit, the NaN in place
        assert torch.equal(after[n].isnan(), p.isnan()) and torch.equal(after[n].nan_to_num(), p.nan_to_num()), n
    # peft has wrapped the layers in place: each adds nothing to its base (B = 0, as after peft's default init)
    layers = [m for m in base.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    assert all(float(m.lora_B["default"].weight.abs().max()) == 0 for m in layers)


def test_hook_keeps_dora_and_update_layer_outside_an_injection_layer_by_layer(llama_base, monkeypatch):
    """DoRA reads the initialised weight right after the init (in update_layer), and a direct update_layer call has
    no injection around it: both go through init_layer, one layer at a time, with the same result as init_model."""
    import copy

    seen = []
    real = peft_hook.init_layer
    monkeypatch.setattr(peft_hook, "init_layer", lambda layer, *a, **k: (seen.append(layer), real(layer, *a, **k))[1])
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    dora = get_peft_model(copy.deepcopy(llama_base), LoraConfig(init_lora_weights="loram", **cfg))
    assert len(seen) == 4
    ref = get_peft_model(copy.deepcopy(llama_base), LoraConfig(**cfg))
    loram_fast.init_model(ref, "loram", progress=False)
    a, b = dora.state_dict(), ref.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7), k
    from peft.tuners.lora import Linear

    seen.clear()
    plain = torch.nn.Linear(64, 48, bias=False)
    W = plain.weight.detach().clone()
    lora = Linear(plain, "default", LoraConfig(r=4, lora_alpha=8, init_lora_weights="loram"), r=4, lora_alpha=8)
    assert seen == [lora] and not torch.equal(plain.weight, W)  # initialised within its own update_layer


@pytest.mark.parametrize("batched", [True, False])
def test_hook_failure_in_update_layer_leaves_the_new_adapter_adding_nothing(llama_base, monkeypatch, batched):
    """A second adapter with LoRAM on layers that already hold one: the shared base weight is refused in the first
    layer's update_layer (checked there both when batching and layer by layer). That layer keeps its weight, and the
    new adapter, created with its module's random B, adds nothing (B = 0)."""
    import copy

    if not batched:
        monkeypatch.setattr(peft_hook, "BATCHED_IN_INJECTION", ())
    model = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="also use"):
        model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="loram"))
    assert torch.equal(layer.get_base_layer().weight, before)
    assert "second" in layer.lora_B and float(layer.lora_B["second"].weight.abs().max()) == 0
