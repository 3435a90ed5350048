"""CorDA (both modes) against peft's own ``preprocess_corda`` + ``corda_init`` on the same samples, and the paths
that change a model (step-0 output, a second init, rollback, reload, bad input)."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda  # needs attrs (test extra)

import loram_fast

from conftest import logits, relative_error, taken_over
from test_safety import _interrupt_every_step, assert_same, full_state

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _samples(n=6, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (1, length), generator=g)} for _ in range(n)]


def _peft_corda(base, mode, samples, targets=TARGETS, **kw):
    """peft's own CorDA: preprocess_corda on the raw model (one forward call per sample), then get_peft_model."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method=mode), **kw)
    model = copy.deepcopy(base)
    preprocess_corda(model, cfg, run_model=lambda: [model(**s) for s in samples])
    return get_peft_model(model, cfg)


def _ours(base, mode, targets=TARGETS, **data):
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    loram_fast.init_model(model, "corda", corda_method=mode, progress=False, **data)
    return model


def _compare(ours, theirs, tol):
    layers = dict(theirs.named_modules())
    n = 0
    for name, layer in ours.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            ref = layers[name]
            ba = [m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float() for m in (layer, ref)]
            assert relative_error(ba[0], ba[1]) <= tol, name
            w = [m.get_base_layer().weight.float() for m in (layer, ref)]
            assert relative_error(w[0], w[1]) <= tol, name
            n += 1
    assert n > 0


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_same_as_peft(llama_base, tokens, mode):
    samples = _samples()
    theirs = _peft_corda(llama_base, mode, samples)
    ours = _ours(llama_base, mode, dataloader=samples)
    _compare(ours, theirs, 1e-5)
    assert relative_error(logits(ours, tokens), logits(llama_base, tokens)) <= 1e-5  # residual: output kept


def test_same_as_peft_where_top_svd_iterates():
    """hidden 256, r = 4: ipm's top-r triplets come from subspace iteration, not a full SVD (min(m, n) > 4q)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4)).eval()
    samples = _samples(n=12, length=48)
    # a random model's W·C has close singular values around σ_r: the rank-r product agrees to about
    # tol·σ_1/gap (both are fp32 results; the full SVD is itself that far from the fp64 one)
    _compare(_ours(base, "ipm", dataloader=samples), _peft_corda(base, "ipm", samples), 3e-4)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_bf16(llama_base, mode):
    base = copy.deepcopy(llama_base).to(torch.bfloat16)
    samples = _samples()
    _compare(_ours(base, mode, dataloader=samples), _peft_corda(base, mode, samples), 1e-2)


def test_gpt2_conv1d(gpt2_base):
    samples = _samples()
    theirs = _peft_corda(gpt2_base, "ipm", samples, targets=["c_attn", "c_proj"], fan_in_fan_out=True)
    model = get_peft_model(copy.deepcopy(gpt2_base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                                fan_in_fan_out=True))
    loram_fast.init_model(model, "corda", dataloader=samples, progress=False)
    _compare(model, theirs, 1e-5)


def test_batches_count_each_sample_and_run_model(llama_base):
    """A batch of b samples is b of peft's calls; run_model (peft's callback convention) gives the same."""
    samples = _samples()
    one_by_one = _ours(llama_base, "ipm", dataloader=samples)
    batched = _ours(llama_base, "ipm", dataloader=[{"input_ids": torch.cat([s["input_ids"] for s in samples[:3]])},
                                                   {"input_ids": torch.cat([s["input_ids"] for s in samples[3:]])}])
    _compare(batched, one_by_one, 1e-5)
    holder = {}

    def run_model():
        for s in samples:
            holder["model"](**s)

    model = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    holder["model"] = model
    loram_fast.init_model(model, "corda", run_model=run_model, progress=False)
    _compare(model, one_by_one, 1e-5)


def test_second_init_and_reload(llama_base, tokens, tmp_path):
    samples = _samples()
    model = _ours(llama_base, "kpm", dataloader=samples)
    loram_fast.init_model(model, "corda", corda_method="ipm", dataloader=samples, progress=False)
    # the first residual folded back is W up to a rounding, which the near-degenerate SVD amplifies
    _compare(model, _ours(llama_base, "ipm", dataloader=samples), 1e-4)
    assert relative_error(logits(model, tokens), logits(llama_base, tokens)) <= 1e-5
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="came from training data"):
        PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)


def test_interrupt_restores_every_bit(llama_base, monkeypatch):
    samples = _samples(n=2)

    def factory():
        return get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))

    assert _interrupt_every_step(monkeypatch, factory, "corda", {"dataloader": samples}, assert_same) >= 4


def test_bad_input_changes_nothing(llama_base):
    model = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    before = full_state(model)
    with pytest.raises(ValueError, match="need data"):
        loram_fast.init_model(model, "corda", progress=False)
    with pytest.raises(TypeError, match="does not take gradient_mode"):
        loram_fast.init_model(model, "corda", dataloader=_samples(), gradient_mode="sketch", progress=False)
    with pytest.raises(ValueError, match="corda_method"):
        loram_fast.init_model(model, "corda", dataloader=_samples(), corda_method="abc", progress=False)
    with pytest.raises(TypeError, match="a list"):
        loram_fast.init_model(model, "corda", dataloader=[[1, 2]], progress=False)
    assert_same(model, before)


def test_ipm_never_forms_w_times_c_when_iteration_converges(monkeypatch):
    """W·C' as an operator: top_svd iterates on the products and matches the dense matrix's triplets; the m×n fp32
    product is formed only for a full-SVD fallback (spied on)."""
    from loram_fast.ops import sharded, topsvd

    g = torch.Generator().manual_seed(0)
    m, n, r = 384, 320, 4
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    W = (U * torch.arange(1, n + 1).float().pow(-1.0)) @ V.T
    X = torch.randn(200, n, generator=g) @ torch.diag(torch.linspace(1, 0.1, n))
    C = X.T @ X / 200
    formed = []
    monkeypatch.setattr(sharded.RightProductOperator, "whole", lambda self: formed.append(1) or W @ self.right)
    got = topsvd.top_svd(sharded.RightProductOperator(W, C), r)
    assert not got.fallback and got.passes > 0 and not formed
    ref = topsvd.top_svd(W @ C, r)
    assert relative_error(got.S, ref.S) <= 1e-5
    assert relative_error((got.U * got.S) @ got.Vh, (ref.U * ref.S) @ ref.Vh) <= 1e-4


def test_corda_config_is_recorded_as_plain_options(llama_base):
    samples = _samples()
    model = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    loram_fast.init_model(model, "corda", corda_config=CordaConfig(corda_method="kpm"), dataloader=samples,
                          progress=False)
    assert model.peft_config["default"].init_lora_weights == "loram_fast:corda[corda_method=kpm]"
    _compare(model, _ours(llama_base, "kpm", dataloader=samples), 0.0)
    with pytest.raises(TypeError, match="eigens"):
        loram_fast.init_model(model, "corda", eigens=object(), dataloader=samples, progress=False)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_hook_take_over_of_peft_corda(llama_base, monkeypatch, mode):
    """With the take-over, peft's LoraConfig(init_lora_weights="corda") after preprocess_corda runs our writer on
    peft's eigens (a spy proves it): the same model as peft's own corda_init, the eigens consumed."""
    samples = _samples()
    theirs = _peft_corda(llama_base, mode, samples)
    calls = []
    with taken_over(monkeypatch, lambda method, options: calls.append(method)):
        ours = _peft_corda(llama_base, mode, samples)
    assert calls == ["corda"] * 6
    _compare(ours, theirs, 1e-6)
    assert not any(hasattr(m, "eigens") for m in ours.modules())


def test_layers_reading_one_input_share_their_damping(llama_base, monkeypatch):
    """q_proj and v_proj read the same hidden states: one covariance tensor and one damping loop for both (2
    decoder layers × (q/v + down_proj) = 4 loops instead of 6), with peft's result (test_same_as_peft)."""
    from loram_fast.methods import corda

    calls = []
    real = corda.damped_covariance
    monkeypatch.setattr(corda, "damped_covariance", lambda C: calls.append(C) or real(C))
    _ours(llama_base, "ipm", dataloader=_samples())
    assert len(calls) == 4


def test_reload_onto_a_base_that_holds_the_residual(llama_base, tokens, tmp_path):
    """As for LoRA-GA: save the residual base with the adapter, reload with residual_base_config: the same model."""
    from loram_fast.peft_hook import residual_base_config
    from conftest import perturb_adapters

    model = _ours(llama_base, "ipm", dataloader=_samples())
    perturb_adapters(model, seed=5)
    trained = logits(model, tokens)
    model.save_pretrained(tmp_path / "adapter")
    residual_base = copy.deepcopy(model.get_base_model())
    for name, module in list(residual_base.named_modules()):  # the base as it is now: the LoRA layers' base layers
        for child_name, child in list(module.named_children()):
            if hasattr(child, "base_layer"):
                setattr(module, child_name, child.base_layer)
    loaded = PeftModel.from_pretrained(residual_base, tmp_path / "adapter",
                                       config=residual_base_config(str(tmp_path / "adapter")))
    assert relative_error(logits(loaded, tokens), trained) <= 1e-6
