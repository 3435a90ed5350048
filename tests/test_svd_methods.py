"""PiSSA / pissa_niter_N / MiLoRA / OLoRA through init_model and the hook, against peft and fp64 SVDs."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import loram_fast
from loram_fast import peft_hook
from loram_fast.methods.svd import olora_init_batch, svd_init_batch

from conftest import GPT2_TARGETS, LLAMA_TARGETS, assert_state_equal, logits, relative_error


def _layers(model, adapter="default"):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.r}


def _delta(layer):
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.scaling["default"] * B.detach().double() @ A.detach().double()


def _weight(layer):
    W = layer.base_layer.weight.detach()
    return W.T if getattr(layer, "fan_in_fan_out", False) else W


@pytest.mark.parametrize("method", ["pissa", "olora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_equal_to_peft(method, arch, llama_base, gpt2_base):
    base = llama_base if arch == "llama" else gpt2_base
    kw = dict(r=6, lora_alpha=9, target_modules=LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS,
              fan_in_fan_out=arch == "gpt2")
    if method == "olora" and arch == "gpt2":
        pytest.skip("peft's olora QR-factors the stored in×out layout of Conv1D; we use the out×in view (documented)")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=method, **kw))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    loram_fast.init_model(ours, method=method, progress=False)
    la, lb = _layers(theirs), _layers(ours)
    for name in la:
        assert relative_error(_weight(lb[name]), _weight(la[name])) <= 1e-5, name
        assert relative_error(_delta(lb[name]), _delta(la[name])) <= 1e-5, name


@pytest.mark.parametrize("method", ["pissa", "milora", "olora", "pissa_niter_2"])
def test_output_unchanged(method, llama, tokens):
    y0 = logits(llama, tokens)
    model = get_peft_model(llama, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS))
    loram_fast.init_model(model, method=method, progress=False)
    assert relative_error(logits(model, tokens), y0) <= 1e-5


def test_milora_minor_components_fp64(llama_base, llama):
    model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    loram_fast.init_model(model, method="milora", progress=False)
    for name, layer in _layers(model).items():
        W0 = llama_base.get_submodule(name.replace("base_model.model.", "", 1)).weight.detach().double()
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        minor = U[:, -4:] @ torch.diag(S[-4:]) @ Vh[-4:]
        assert relative_error(_delta(layer), minor) <= 1e-4, name
        assert relative_error(_weight(layer).double(), W0 - minor) <= 1e-5, name
        # A and B carry sqrt(S/s) each, as PiSSA splits them
        A = layer.lora_A["default"].weight.detach().double()
        assert torch.allclose((A.norm(dim=1) ** 2).sort().values, (S[-4:] / 2).sort().values, rtol=1e-4)


def test_pissa_niter_close_to_optimal_on_decaying_spectrum():
    torch.manual_seed(0)
    m, n, r = 120, 90, 8
    U, _ = torch.linalg.qr(torch.randn(m, n))
    V, _ = torch.linalg.qr(torch.randn(n, n))
    S = 0.7 ** torch.arange(n, dtype=torch.float32)
    W = (U * S) @ V.T
    exact = svd_init_batch([W], r, [2.0])[0]
    fast = svd_init_batch([W], r, [2.0], niter=2)[0]
    tail = relative_error(W - 2.0 * exact.B @ exact.A, W)
    err = relative_error(W - 2.0 * fast.B @ fast.A, W)
    assert err <= 1.01 * tail


def test_batched_equals_single(monkeypatch):
    import loram_fast.methods.svd as svd

    monkeypatch.setattr(svd, "STACK_ON_CPU", True)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(40, 30, generator=g) for _ in range(3)]
    for fn in (lambda v, s: svd_init_batch(v, 5, s), lambda v, s: olora_init_batch(v, 5, s)):
        batched = fn(views, [1.0, 2.0, 0.5])
        for W, s, res in zip(views, [1.0, 2.0, 0.5], batched):
            single = fn([W], [s])[0]
            assert relative_error(res.B @ res.A, single.B @ single.A) <= 1e-5


def test_rank_too_large_and_nan(llama):
    model = get_peft_model(llama, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    llama.model.layers[0].self_attn.q_proj.weight.data[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        loram_fast.init_model(model, method="pissa", progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        loram_fast.init_model(model, method="olora", progress=False)


def test_hook_milora_and_take_over(llama_base):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    via_hook = get_peft_model(copy.deepcopy(llama_base), LoraConfig(init_lora_weights="milora", **kw))
    via_api = get_peft_model(copy.deepcopy(llama_base), LoraConfig(**kw))
    loram_fast.init_model(via_api, method="milora", progress=False)
    assert_state_equal(via_api, via_hook.state_dict())
    # opt-in: peft's own "pissa_niter_N" / "olora" strings routed through loram_fast
    try:
        peft_hook.install(take_over_peft_inits=True)
        from peft.tuners.lora import LoraLayer

        assert getattr(LoraLayer.pissa_init, "_loram_fast_hook", False)
        taken = get_peft_model(copy.deepcopy(llama_base), LoraConfig(init_lora_weights="olora", **kw))
        api = get_peft_model(copy.deepcopy(llama_base), LoraConfig(**kw))
        loram_fast.init_model(api, method="olora", progress=False)
        assert_state_equal(api, taken.state_dict())
    finally:
        peft_hook.uninstall()
        peft_hook.install()
    from peft.tuners.lora import LoraLayer

    assert not getattr(LoraLayer.pissa_init, "_loram_fast_hook", False)


@pytest.mark.parametrize("via", ["init_model", "hook"])
@pytest.mark.parametrize("method", ["milora", "mica"])
def test_minor_components_skip_the_attempt_after_a_shape_fell_back(method, via, monkeypatch):
    """Three 400×400 weights with flat bottoms (σ_k ∝ k^-0.5) and one 400×300: the first of each shape tries the
    iteration and gives up; the other 400×400 ones go to the fallback (the Gram route) at once. Through the peft
    hook too (mica by the take-over), whose layer-by-layer inits of one injection share that memo. Every layer gets
    LAPACK's minor subspace either way."""
    import loram_fast.methods.svd as svd_mod
    from loram_fast.ops import topsvd

    def flat(m, n, seed):
        g = torch.Generator().manual_seed(seed)
        k = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        return ((U * torch.arange(1, k + 1, dtype=torch.float64) ** -0.5) @ V.T).float()

    net = torch.nn.Sequential(torch.nn.Linear(400, 400, bias=False), torch.nn.Linear(400, 400, bias=False),
                              torch.nn.Linear(300, 400, bias=False), torch.nn.Linear(400, 400, bias=False))
    with torch.no_grad():
        for i, lin in enumerate(net):
            lin.weight.copy_(flat(*lin.weight.shape, seed=i))
    originals = [lin.weight.detach().clone() for lin in net]
    calls = []

    def spy(W, r, **kw):
        got, route = topsvd.bottom_svd_route(W, r, **kw)
        calls.append((tuple(W.shape), kw.get("attempt", True), got.fallback, route == "gram"))
        return got, route

    monkeypatch.setattr(svd_mod, "bottom_svd_route", spy)
    monkeypatch.setattr(svd_mod, "bottom_svd", lambda *a, **kw: spy(*a, **kw)[0])
    cfg = dict(r=6, lora_alpha=6, target_modules=["0", "1", "2", "3"])
    if via == "init_model":
        model = get_peft_model(net, LoraConfig(**cfg))
        loram_fast.init_model(model, method, progress=False)
    else:
        from conftest import peft_take_over

        with peft_take_over():
            model = get_peft_model(net, LoraConfig(init_lora_weights=method, **cfg))
    # (shape, attempted, fell back, by the Gram route): later 400×400 weights go to the Gram route of W at once
    assert sorted(calls) == sorted([((400, 400), True, True, True), ((400, 300), True, True, True),
                                    ((400, 400), False, True, True), ((400, 400), False, True, True)])
    for name, W in zip(["0", "1", "2", "3"], originals):
        layer = dict(model.named_modules())[f"base_model.model.{name}"]
        U = torch.linalg.svd(W.double(), full_matrices=False).U[:, -6:]
        B = layer.lora_B["default"].weight.detach().double()
        Q = torch.linalg.qr(B)[0]  # the minor left subspace: B's columns span it
        assert torch.linalg.svdvals(U.T @ Q).min() >= 1 - 1e-4, name
