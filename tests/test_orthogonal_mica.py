"""orthogonal and mica: the same adapters as peft's own orthogonal_init / mica_init (through the take-over, and
init_model), their invariants, and their refusals."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

import loram_fast
from loram_fast import peft_hook

from conftest import logits, peft_take_over, relative_error

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def take_over():
    with peft_take_over():
        yield


def _adapters(model):
    return {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                m.lora_B["default"].weight.requires_grad)
            for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _stock(llama_base, init, seed=0, dtype=torch.float32):
    peft_hook.uninstall()
    try:
        torch.manual_seed(seed)
        return get_peft_model(copy.deepcopy(llama_base).to(dtype),
                              LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    finally:
        peft_hook.install()


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_take_over_gives_peft_adapters(llama_base, take_over, init, dtype, monkeypatch):
    calls = []
    original = peft_hook.init_layer
    monkeypatch.setattr(peft_hook, "init_layer", lambda *a, **k: (calls.append(a[2]), original(*a, **k))[1])
    theirs = _adapters(_stock(llama_base, init, dtype=dtype))  # leaves the plain hook installed
    peft_hook.install(take_over_peft_inits=True)
    torch.manual_seed(0)
    ours_model = get_peft_model(copy.deepcopy(llama_base).to(dtype),
                                LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    assert calls and set(calls) == {init}  # our code ran, for every layer
    for name, (A, B, trainable) in _adapters(ours_model).items():
        tA, tB, t_trainable = theirs[name]
        assert torch.equal(A, tA) and trainable == t_trainable, name
        assert torch.allclose(B, tB, atol=1e-6) if init == "orthogonal" else torch.allclose(B.abs(), tB.abs(), atol=1e-6)


def test_init_model_orthogonal_and_mica(llama_base, tokens):
    for method, options in (("orthogonal", {"seed": 3}), ("mica", {})):
        model = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        loram_fast.init_model(model, method, progress=False, **options)
        assert relative_error(logits(model, tokens), logits(llama_base, tokens)) <= 1e-6  # B A = 0, W untouched
        for m in model.modules():
            if isinstance(m, LoraLayer):
                A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
                flags = (A.requires_grad, B.requires_grad)
                A, B = A.detach(), B.detach()
                assert (B @ A).abs().max() <= 1e-6 * max(1.0, float(B.abs().max() * A.abs().max()))
                if method == "mica":
                    assert flags == (True, False) and torch.count_nonzero(A) == 0
                    U = torch.linalg.svd(m.get_base_layer().weight.float()).U
                    # B spans the minor left singular subspace
                    assert torch.allclose(U[:, -4:] @ (U[:, -4:].T @ B), B, atol=1e-5)
                else:
                    assert A.abs().sum() > 0 and B.abs().sum() > 0
    a = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    b = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    loram_fast.init_model(a, "orthogonal", seed=5, progress=False)
    torch.randn(100)  # the global generator moves; seed= does not use it
    loram_fast.init_model(b, "orthogonal", seed=5, progress=False)
    for (A1, B1, _), (A2, B2, _) in zip(_adapters(a).values(), _adapters(b).values()):
        assert torch.equal(A1, A2) and torch.equal(B1, B2)


def test_orthogonal_needs_an_even_rank(llama_base):
    model = get_peft_model(copy.deepcopy(llama_base), LoraConfig(r=3, lora_alpha=8, target_modules=TARGETS))
    with pytest.raises(ValueError, match="even rank, got r=3"):
        loram_fast.init_model(model, "orthogonal", progress=False)
