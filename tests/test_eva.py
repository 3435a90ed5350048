"""EVA against peft's own ``initialize_lora_eva_weights`` on the same batches (ranks, patterns, removed layers, A
and B bit for bit), and the paths that change a model (rollback, reload, bad input)."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import initialize_lora_eva_weights

import loram_fast

from conftest import logits, perturb_adapters, relative_error
from test_safety import _interrupt_every_step, assert_same, full_state

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # q and v read the same input: one shared PCA


def _batches(n=8, seed=1):
    """Token batches with padding (attention_mask) and masked labels, which EVA leaves out."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 18:] = 0
        labels = ids.clone()
        labels[0, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _peft_eva(base, batches, dtype=torch.float32, **eva):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(**eva))
    model = get_peft_model(copy.deepcopy(base).to(dtype), cfg)
    initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    return model


def _ours(base, batches, dtype=torch.float32, **options):
    model = get_peft_model(copy.deepcopy(base).to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    loram_fast.init_model(model, "eva", dataloader=batches, progress=False, **options)
    return model


def _assert_same_model(ours, theirs, skip=()):
    assert dict(ours.named_modules()).keys() == dict(theirs.named_modules()).keys()  # removed layers alike
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if not any(s in k for s in skip):
            assert torch.equal(a[k], b[k]), k
    ca, cb = ours.peft_config["default"], theirs.peft_config["default"]
    assert ca.rank_pattern == cb.rank_pattern and ca.alpha_pattern == cb.alpha_pattern
    assert sorted(ca.target_modules) == sorted(cb.target_modules)
    for name, m in ours.named_modules():
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling:
            assert m.scaling["default"] == dict(theirs.named_modules())[name].scaling["default"], name


@pytest.mark.parametrize("rho,adjust", [(1.0, True), (2.0, True), (2.0, False)])
def test_same_model_as_peft(llama_base, tokens, rho, adjust):
    """rho = 2 moves rank between layers: o_proj grows to 8, one down_proj drops to 0 and loses its LoRA layer."""
    batches = _batches()
    theirs = _peft_eva(llama_base, batches, rho=rho, tau=0.9, adjust_scaling_factors=adjust)
    ours = _ours(llama_base, batches, rho=rho, tau=0.9, adjust_scaling_factors=adjust)
    _assert_same_model(ours, theirs)
    if rho > 1:
        assert ours.peft_config["default"].rank_pattern  # ranks did move
        assert len(ours.peft_config["default"].target_modules) < 2 * len(TARGETS)  # a layer was removed
    assert torch.equal(logits(ours, tokens), logits(llama_base, tokens))  # B = 0: output unchanged


def test_bf16_and_eva_config(llama_base):
    batches = _batches()
    theirs = _peft_eva(llama_base, batches, dtype=torch.bfloat16, rho=2.0, tau=0.9)
    ours = _ours(llama_base, batches, dtype=torch.bfloat16, eva_config=EvaConfig(rho=2.0, tau=0.9))
    _assert_same_model(ours, theirs)
    recorded = ours.peft_config["default"].init_lora_weights
    assert recorded.startswith("loram_fast:eva[") and "rho=2.0" in recorded and "tau=0.9" in recorded


def test_whiten_once(llama_base):
    """whiten=True: layers with their own input match peft; where q and v share one PCA, peft divides the shared
    components in place once per layer of the group (both end up whitened twice); ours whitens each once."""
    batches = _batches()
    theirs = _peft_eva(llama_base, batches, rho=1.0, tau=0.9, whiten=True)
    ours = _ours(llama_base, batches, rho=1.0, tau=0.9, whiten=True)
    _assert_same_model(ours, theirs, skip=("q_proj.lora_A", "v_proj.lora_A"))
    plain = _ours(llama_base, batches, rho=1.0, tau=0.9)
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    white, unwhite = ours.state_dict()[q], plain.state_dict()[q]
    scale = unwhite.norm(dim=1) / white.norm(dim=1)  # √σ per component (rows of A are unit vectors before)
    assert torch.allclose(white * scale[:, None], unwhite, atol=1e-6)
    assert not torch.allclose(theirs.state_dict()[q], white)


def test_interrupt_at_every_step_restores_every_bit(llama_base, monkeypatch):
    batches = _batches(n=4)

    def factory():
        return get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))

    steps = _interrupt_every_step(monkeypatch, factory, "eva", {"dataloader": batches, "rho": 2.0, "tau": 0.9},
                                  assert_same)
    assert steps >= 10


def test_save_and_reload(llama_base, tokens, tmp_path):
    model = _ours(llama_base, _batches(), rho=2.0, tau=0.9)
    perturb_adapters(model, seed=4)
    trained = logits(model, tokens)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)
    assert relative_error(logits(loaded, tokens), trained) <= 1e-6


def test_no_convergence_within_max_batches_changes_nothing(llama_base):
    model = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    before = full_state(model)
    with pytest.raises(ValueError, match="did not converge within max_batches=2"):
        loram_fast.init_model(model, "eva", dataloader=_batches(), tau=1.0, max_batches=2, progress=False)
    with pytest.raises(ValueError, match="rho"):
        loram_fast.init_model(model, "eva", dataloader=_batches(), rho=0.5, progress=False)
    with pytest.raises(TypeError, match="does not take loss_fn"):
        loram_fast.init_model(model, "eva", dataloader=_batches(), loss_fn=lambda m, b: 0, progress=False)
    assert_same(model, before)


@pytest.mark.parametrize("cache_mib", [0, 0.05])
def test_replayed_inputs_give_the_same_model(llama_base, cache_mib, caplog):
    """Later cycles replay the first cycle's layer inputs instead of running the model: the same model as forward
    passes every cycle (cache_mib=0, peft's way), and as a cache that overflows part way (0.05 MiB)."""
    batches = _batches(n=4)
    with caplog.at_level("INFO", logger="loram_fast"):
        cached = _ours(llama_base, batches, rho=2.0, tau=0.95)
    assert "forward passes)" in caplog.text
    passes = int(caplog.text.split("converged after ")[1].split()[0])
    forwards = int(caplog.text.split("batch (")[1].split()[0])
    assert forwards == len(batches) < passes  # the replay really replaced forward passes
    other = _ours(llama_base, batches, rho=2.0, tau=0.95, eva_cache_mib=cache_mib)
    _assert_same_model(other, cached)
    _assert_same_model(other, _peft_eva(llama_base, batches, rho=2.0, tau=0.95))


def test_take_over_routes_peft_initialize_lora_eva_weights(llama_base, monkeypatch):
    """With the take-over, peft's own EVA flow (LoraConfig("eva") + peft.initialize_lora_eva_weights) runs
    init_model (a spy proves it) and gives peft's model; uninstalling restores peft's function."""
    import peft
    from loram_fast import peft_hook

    batches = _batches()
    theirs = _peft_eva(llama_base, batches, rho=2.0, tau=0.9)
    calls = []
    real = loram_fast.api.init_model
    monkeypatch.setattr(loram_fast.api, "init_model", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    original = peft.initialize_lora_eva_weights
    peft_hook.install(take_over_peft_inits=True)
    try:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                         eva_config=EvaConfig(rho=2.0, tau=0.9))
        model = get_peft_model(copy.deepcopy(llama_base), cfg)
        peft.initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    finally:
        peft_hook.uninstall()
        peft_hook.install()
    assert calls == ["eva"]
    assert peft.initialize_lora_eva_weights is original
    _assert_same_model(model, theirs)


def test_many_targets_get_peft_minimal_target_modules():
    """21 LoRA layers (over peft's threshold of 20): target_modules are written in peft's minimal form."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    batches = _batches()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=1.0, tau=0.9))
    theirs = get_peft_model(copy.deepcopy(base), cfg)
    initialize_lora_eva_weights(theirs, dataloader=batches, show_progress_bar=False)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    loram_fast.init_model(ours, "eva", dataloader=batches, rho=1.0, tau=0.9, progress=False)
    assert len(ours.peft_config["default"].target_modules) < 21  # the minimal form, not 21 names
    _assert_same_model(ours, theirs)
