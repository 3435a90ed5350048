"""Gradient estimation and the data-driven inits (LoRA-One, LoRA-GA) against math computed in the test."""
import copy
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

import loram_fast

from conftest import lm_batches, logits, relative_error

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def batches():
    return lm_batches(3, vocab=128, length=10, seed=0)


def _reference_grads(base, batches):
    """Mean over batches of dloss/dW for every target weight, computed plainly."""
    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {n: m.weight for n, m in model.named_modules() if n.split(".")[-1] in TARGETS}
    for w in weights.values():
        w.requires_grad_(True)
    for b in batches:
        model(**b).loss.backward()
    return {n: w.grad.double() / len(batches) for n, w in weights.items()}


def _layers(model):
    from peft.tuners.lora import LoraLayer

    return {n.replace("base_model.model.", "", 1): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _peft(base, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, **kw))


def test_full_gradient_matches_plain_backward(llama_base, batches):
    from loram_fast.api import find_lora_layers
    from loram_fast.data import estimate_gradients

    model = _peft(llama_base)
    targets = find_lora_layers(model, "default")
    grads = estimate_gradients(model, [t.weight for t in targets], [False] * len(targets), [t.layer for t in targets],
                               dataloader=batches)
    ref = _reference_grads(llama_base, batches)
    for t, g in zip(targets, grads):
        assert g.dtype == torch.float32
        assert relative_error(g, ref[t.name.replace("base_model.model.", "", 1)]) <= 1e-5


@pytest.mark.parametrize("scale", ["stable", "gd", "unit", "weightS"])
def test_lora_one_math(llama_base, batches, scale):
    model = _peft(llama_base, use_rslora=True)
    y0 = logits(model, batches[0]["input_ids"])
    loram_fast.init_model(model, "lora_one", dataloader=batches, scale=scale, progress=False)
    ref = _reference_grads(llama_base, batches)
    for name, layer in _layers(model).items():
        U, S, Vh = torch.linalg.svd(-ref[name])
        r, s = 4, layer.scaling["default"]
        BA_expect = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r] / S[0]
        if scale == "stable":
            BA_expect = BA_expect / 128
        elif scale == "gd":
            BA_expect = BA_expect / s**2
        elif scale == "weightS":
            S_w = torch.linalg.svdvals(llama_base.get_submodule(name).weight.double())
            BA_expect = BA_expect * ((S_w[:r] / s).sqrt().mean()) ** 2
        BA = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        assert relative_error(BA, BA_expect) <= 1e-4, name
        # A and B carry equal halves: row norms of A equal column norms of B
        assert torch.allclose(layer.lora_A["default"].weight.norm(dim=1), layer.lora_B["default"].weight.norm(dim=0),
                              rtol=1e-4)
        assert torch.equal(layer.base_layer.weight, llama_base.get_submodule(name).weight)  # W untouched
    assert relative_error(logits(model, batches[0]["input_ids"]), y0) > 0  # not a residual method


@pytest.mark.parametrize("direction", ["ArBr", "A2rBr", "ArB2r"])
@pytest.mark.parametrize("scale", ["stable", "weight_svd", "gd_scale", "unit"])
def test_lora_ga_parity_with_peft(llama_base, batches, direction, scale, monkeypatch):
    """Same gradient, same SVD (both sides' svd_lowrank replaced by an exact SVD): same adapters and residual."""
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    def exact_lowrank(A, q=6, niter=2, M=None):
        U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
        return U[:, :q].float(), S[:q].float(), Vh[:q].T.float()

    monkeypatch.setattr(torch, "svd_lowrank", exact_lowrank)
    import peft.tuners.lora.layer as peft_layer

    monkeypatch.setattr(peft_layer, "svd_lowrank", exact_lowrank, raising=False)
    ga = LoraGAConfig(direction=direction, scale=scale)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=ga)
    theirs = copy.deepcopy(llama_base)

    def train_step():
        for b in batches:
            theirs(**b).loss.backward()

    preprocess_loraga(theirs, cfg, train_step)
    theirs = get_peft_model(theirs, cfg)
    ours = _peft(llama_base)
    loram_fast.init_model(ours, "lora_ga", dataloader=batches, lora_ga_config=ga, progress=False)
    lt, lo = _layers(theirs), _layers(ours)
    for name in lt:
        for key in ("lora_A", "lora_B"):
            a, b = getattr(lt[name], key)["default"].weight, getattr(lo[name], key)["default"].weight
            # singular vectors are unique up to sign: compare up to a per-component sign
            assert relative_error(a.abs(), b.abs()) <= 1e-4, (name, key)
        assert relative_error(lo[name].base_layer.weight, lt[name].base_layer.weight) <= 1e-5, name


def test_lora_ga_output_unchanged_and_random_direction(llama_base, batches):
    model = _peft(llama_base)
    tokens = batches[1]["input_ids"]
    y0 = logits(model, tokens)
    torch.manual_seed(0)
    loram_fast.init_model(model, "lora_ga", dataloader=batches, direction="random", solver="exact", progress=False)
    assert relative_error(logits(model, tokens), y0) <= 1e-5
    ref = _reference_grads(llama_base, batches)
    for name, layer in _layers(model).items():
        _, _, Vh = torch.linalg.svd(ref[name])
        A = layer.lora_A["default"].weight.double()
        # every row of A is one of the top 2r right singular vectors (up to sign)
        overlap = (A @ Vh[:8].T).abs()
        assert torch.allclose(overlap.max(dim=1).values, torch.ones(4, dtype=torch.float64), atol=1e-4)


def test_sketch_mode_recovers_low_rank_gradient(llama_base, batches):
    full = _peft(llama_base)
    sketch = _peft(llama_base)
    loram_fast.init_model(full, "lora_one", dataloader=batches, progress=False)
    # the gradient has rank <= 60 tokens, so a 64+8 sketch captures it exactly
    loram_fast.init_model(sketch, "lora_one", dataloader=batches, gradient_mode="sketch", sketch_rank=64,
                          progress=False)
    lf, ls = _layers(full), _layers(sketch)
    for name in lf:
        BAf = lf[name].lora_B["default"].weight @ lf[name].lora_A["default"].weight
        BAs = ls[name].lora_B["default"].weight @ ls[name].lora_A["default"].weight
        assert relative_error(BAs, BAf) <= 1e-3, name


def test_state_restored_and_train_step(llama_base, batches):
    model = _peft(llama_base)
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    probe = next(p for n, p in model.named_parameters() if "lora_A" in n)
    probe.grad = torch.ones_like(probe)
    calls = []

    def train_step():
        calls.append(1)
        for b in batches:
            model(**b).loss.backward()

    loram_fast.init_model(model, "lora_one", train_step=train_step, progress=False)
    assert calls == [1]
    assert not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(probe.grad, torch.ones_like(probe))
    assert all(not layer.disable_adapters for layer in _layers(model).values())
    # train_step and dataloader give the same gradient: same init
    other = _peft(llama_base)
    loram_fast.init_model(other, "lora_one", dataloader=batches, loss_fn=lambda m, b: m(**b).loss, progress=False)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert relative_error(a, b) <= 1e-5 or torch.equal(a, b), n


def test_data_errors(llama_base, batches):
    model = _peft(llama_base)
    with pytest.raises(ValueError, match="need data"):
        loram_fast.init_model(model, "lora_one", progress=False)
    with pytest.raises(TypeError, match="takes no data"):
        loram_fast.init_model(model, "loram", dataloader=batches)
    with pytest.raises(ValueError, match="2r=80 gradient components.*use r <= 32"):
        tiny = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=40, target_modules=["q_proj"]))
        loram_fast.init_model(tiny, "lora_ga", dataloader=batches, progress=False)


def test_hook_without_data_falls_back(llama_base, caplog):
    with caplog.at_level(logging.WARNING, logger="loram_fast"):
        model = get_peft_model(copy.deepcopy(llama_base),
                               LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="lora_one"))
    assert any("needs data" in r.getMessage() for r in caplog.records)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().max() == 0


def _exact_lowrank(monkeypatch):
    def exact_lowrank(A, q=6, niter=2, M=None):
        U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
        return U[:, :q].float(), S[:q].float(), Vh[:q].T.float()

    import peft.tuners.lora.layer as peft_layer

    monkeypatch.setattr(torch, "svd_lowrank", exact_lowrank)
    monkeypatch.setattr(peft_layer, "svd_lowrank", exact_lowrank, raising=False)


def _peft_lora_ga(base, cfg, train_step_of):
    from peft.tuners.lora.loraga import preprocess_loraga

    theirs = copy.deepcopy(base)
    preprocess_loraga(theirs, cfg, train_step_of(theirs))
    return get_peft_model(theirs, cfg)


def _same_products(theirs, ours, tol):
    lt, lo = _layers(theirs), _layers(ours)
    assert lt
    for name in lt:
        BAt = lt[name].lora_B["default"].weight.double() @ lt[name].lora_A["default"].weight.double()
        BAo = lo[name].lora_B["default"].weight.double() @ lo[name].lora_A["default"].weight.double()
        assert relative_error(BAo, BAt) <= tol, name
        assert relative_error(lo[name].base_layer.weight, lt[name].base_layer.weight) <= tol, name


def test_lora_ga_stable_scale_on_conv1d_follows_peft(monkeypatch):
    """peft scales by the first dimension of the weight as stored (in for GPT-2 Conv1D): ours by default;
    stable_dim="out" uses the output dimension, a factor (out/in)^¼ on B."""
    from peft import LoraGAConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # no dropout: both sides must see the same gradient
    gpt2_base = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=48, n_layer=1, n_head=4, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()

    _exact_lowrank(monkeypatch)
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": (t := torch.randint(0, 128, (2, 10), generator=g)), "labels": t} for _ in range(2)]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(scale="stable"))

    def step_of(m):
        return lambda: [m(**b).loss.backward() for b in batches]

    theirs = _peft_lora_ga(gpt2_base, cfg, step_of)
    ours = get_peft_model(copy.deepcopy(gpt2_base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                               fan_in_fan_out=True))
    loram_fast.init_model(ours, "lora_ga", dataloader=batches, scale="stable", progress=False)
    _same_products(theirs, ours, 1e-4)
    out_dim = get_peft_model(copy.deepcopy(gpt2_base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                  fan_in_fan_out=True))
    loram_fast.init_model(out_dim, "lora_ga", dataloader=batches, scale="stable", stable_dim="out", progress=False)
    for name, layer in _layers(out_dim).items():
        ratio = layer.lora_B["default"].weight.norm() / _layers(ours)[name].lora_B["default"].weight.norm()
        assert float(ratio) == pytest.approx((144 / 48) ** 0.25, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_ga_train_step_with_zero_grad_follows_peft(llama_base, batches, monkeypatch, dtype):
    """peft's train_step convention: .grad at the end (a zero_grad() inside clears what came before; accumulated in
    the weight's dtype) divided by the number of backward passes."""
    from peft import LoraGAConfig

    _exact_lowrank(monkeypatch)
    base = copy.deepcopy(llama_base).to(dtype)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig())

    def step_of(m):
        def step():
            for i, b in enumerate(batches):
                if i == 1:
                    m.zero_grad()
                m(**b).loss.backward()
        return step

    theirs = _peft_lora_ga(base, cfg, step_of)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    loram_fast.init_model(ours, "lora_ga", train_step=step_of(ours), progress=False)
    _same_products(theirs, ours, 1e-4 if dtype == torch.float32 else 1e-2)


def test_quant_state_weights_are_refused(llama):
    model = _peft(llama)
    W = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    W.quant_state = object()  # what peft's LoRA-GA looks for on a quantized weight
    with pytest.raises(TypeError, match="q_proj.*quantize the residual afterwards"):
        loram_fast.init_model(model, "lora_ga", dataloader=[{"input_ids": torch.zeros(1, 4, dtype=torch.long)}],
                              progress=False)
