"""peft's own initialization cases for PiSSA, ``pissa_niter_N``, OLoRA and LoRA-GA, run with loram_fast in charge.

peft tests these inits in ``tests/test_initialization.py`` (PiSSA / OLoRA: step-0 output, save → reload, conversion
to a plain LoRA with ``rank_pattern`` / ``alpha_pattern`` / ``use_rslora``, the rslora+pattern refusal) and in
``tests/test_lora_ga.py`` (LoRA-GA: save → reload, conversion, lower precision). The same cases are written here
for our code paths: ``peft_hook.install(take_over_peft_inits=True)`` routes peft's own ``init_lora_weights="pissa"``,
``"pissa_niter_N"`` and ``"olora"`` through loram_fast, and ``loram_fast.init_model(model, "lora_ga", ...)`` is our
LoRA-GA. Every take-over test checks that loram_fast really ran (a spy on the hook), so none of them can pass on
peft's own code by accident.

Tolerances are peft's, from those two files:
- ``INIT_ATOL`` = 1e-6 (default rtol): ``test_lora_pissa_linear_init_default`` and
  ``test_lora_olora_linear_init_default``, output at step 0 equal to the base model's.
- ``CONVERT_TOL`` = 1e-6, as atol and rtol: ``test_lora_{pissa,olora}_conversion_same_output_after_loading*`` (plain,
  ``_with_rank_pattern``, ``_with_alpha_pattern``, ``_with_rslora``), for the normal reload, the converted adapter on
  the original base and the base weights.
- ``LORA_GA_ATOL`` = 1e-5 (default rtol): ``test_lora_ga.py::test_save_load_inference`` and
  ``::test_save_load_with_weight_conversion``; ``LOW_PRECISION_ATOL`` = 1e-2: ``::test_lower_precision_dtype``.
peft has no test comparing its init with another implementation's (there we use ``CONVERT_TOL`` on the weights)
and none of LoRA-GA's step-0 output (there we use ``INIT_ATOL``, the same property as PiSSA's and OLoRA's).
"""
import contextlib
import copy

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import loram_fast
from loram_fast import peft_hook

from conftest import GPT2_TARGETS, LLAMA_TARGETS, logits, perturb_adapters, taken_over

INIT_ATOL = 1e-6
CONVERT_TOL = 1e-6
LORA_GA_ATOL = 1e-5
LOW_PRECISION_ATOL = 1e-2

# LoraConfig variants of peft's conversion tests; the patterns give the layers different ranks / scalings
# (r = 8 and lora_alpha = 8, peft's defaults, as there)
VARIANTS = {
    "plain": dict(r=8, lora_alpha=8),
    "rank_pattern": dict(r=8, lora_alpha=8, rank_pattern={"q_proj": 4, "down_proj": 12}),
    "alpha_pattern": dict(r=8, lora_alpha=8, alpha_pattern={"k_proj": 5, "up_proj": 12}),
    "rslora": dict(r=8, lora_alpha=8, use_rslora=True),
}


# -- helpers ------------------------------------------------------------------------------------------------------

@pytest.fixture
def take_over(monkeypatch):
    """peft's "pissa", "pissa_niter_N" and "olora" routed through loram_fast for one test; the default (peft's own
    code for these names, loram_fast's hook for ours) is restored afterwards, also when the test fails.
    Yields the list of method names loram_fast's take-over initialised a layer with, one entry per layer."""
    calls = []
    with taken_over(monkeypatch, lambda method, options: calls.append(method)):
        yield calls


@contextlib.contextmanager
def stock_peft():
    """Inside a take-over test: peft's own inits for the block (the default hook), the take-over again after it."""
    peft_hook.uninstall()
    peft_hook.install()
    try:
        assert not getattr(LoraLayer.pissa_init, "_loram_fast_hook", False)
        yield
    finally:
        peft_hook.install(take_over_peft_inits=True)


def _layers(model):
    return {n.replace("base_model.model.", "", 1): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _delta(layer, adapter="default"):
    """s·B·A in fp64, out×in."""
    A, B = layer.lora_A[adapter].weight.detach().double(), layer.lora_B[adapter].weight.detach().double()
    return layer.scaling[adapter] * B @ A


def _weight(layer):
    """The base weight, out×in (GPT-2 Conv1D stores in×out)."""
    W = layer.get_base_layer().weight.detach()
    return W.T if layer.fan_in_fan_out else W


def _config(arch, variant, init_lora_weights):
    kw = dict(VARIANTS[variant], init_lora_weights=init_lora_weights)
    if arch == "gpt2":
        return LoraConfig(target_modules=GPT2_TARGETS, fan_in_fan_out=True, **kw)
    return LoraConfig(target_modules=LLAMA_TARGETS, **kw)


def _close(a, b, tol):
    return torch.allclose(a.detach().float(), b.detach().float(), atol=tol, rtol=tol)


def _scale_B(model, factor=2.0):
    """Stand-in for training that commutes with the sign of each singular vector (every lora_B times ``factor``),
    so two inits that agree in s·B·A still agree after it."""
    with torch.no_grad():
        for layer in _layers(model).values():
            for B in layer.lora_B.values():
                B.weight.mul_(factor)


def _save_initial(model, path):
    """The initial adapter, saved marked as plain LoRA (as peft documents for PiSSA / OLoRA / LoRA-GA)."""
    config = model.peft_config["default"]
    recorded = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(path)
    finally:
        config.init_lora_weights = recorded


def _convert(model, path, initial):
    """peft's conversion to a plain LoRA of rank 2r for the original base (ΔW = s·(B·A − B0·A0))."""
    model.save_pretrained(path, path_initial_model_for_weight_conversion=str(initial))


def _assert_converted(converted, model, base):
    """A converted adapter as peft makes it: rank 2r in every layer (rank_pattern doubled), the same scaling per
    layer (alpha doubled, or ×√2 with rslora), a plain-LoRA config, and the original base weights untouched."""
    cfg, orig = converted.peft_config["default"], model.peft_config["default"]
    assert cfg.init_lora_weights is True
    assert cfg.r == 2 * orig.r
    assert cfg.rank_pattern == {k: 2 * v for k, v in (orig.rank_pattern or {}).items()}
    lc, lm = _layers(converted), _layers(model)
    assert lc.keys() == lm.keys() and lc
    for name, layer in lc.items():
        assert layer.r["default"] == 2 * lm[name].r["default"], name
        assert layer.lora_A["default"].weight.shape[0] == 2 * lm[name].lora_A["default"].weight.shape[0], name
        assert layer.scaling["default"] == pytest.approx(lm[name].scaling["default"], rel=1e-12), name
        original = base.get_submodule(name).weight
        assert _close(layer.get_base_layer().weight, original, CONVERT_TOL), name


# -- PiSSA / pissa_niter_N / OLoRA with the take-over ---------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16", "olora", "OLoRA"])
def test_init_keeps_output(init, take_over, llama, tokens):
    """peft's test_lora_{pissa,olora}_linear_init_default: at step 0 the output is the base model's (peft accepts
    "OLoRA" in any case)."""
    expected = logits(llama, tokens)
    original = {n: m.weight.detach().clone() for n, m in llama.named_modules() if n.split(".")[-1] in LLAMA_TARGETS}
    model = get_peft_model(llama, LoraConfig(init_lora_weights=init, target_modules=LLAMA_TARGETS, r=8,
                                             lora_alpha=16))
    layers = _layers(model)
    assert take_over == ["olora" if init == "OLoRA" else init] * len(layers)  # loram_fast did every layer
    assert torch.allclose(logits(model, tokens), expected, atol=INIT_ATOL)
    for name, layer in layers.items():
        # a residual was written (the output is not unchanged merely because nothing happened)
        assert not _close(layer.get_base_layer().weight, original[name], CONVERT_TOL), name
        assert _close(_weight(layer).double() + _delta(layer), original[name].double(), CONVERT_TOL), name


PARITY = [("pissa", "llama", v) for v in VARIANTS] + [("olora", "llama", v) for v in VARIANTS] + [
    ("pissa", "gpt2", "plain")]


@pytest.mark.parametrize("method,arch,variant", PARITY)
def test_same_init_as_stock_peft(method, arch, variant, take_over, llama_base, gpt2_base):
    """Where peft is deterministic (exact PiSSA, OLoRA), the take-over gives peft's own init: the same residual and
    the same s·B·A in every layer, for every rank / alpha pattern and rslora. OLoRA's factors themselves agree
    (both are the Householder QR of the same first r columns); PiSSA's singular vectors only up to sign.
    (OLoRA on GPT-2 Conv1D differs on purpose, see README; not compared.)"""
    base = llama_base if arch == "llama" else gpt2_base
    with stock_peft():
        theirs = get_peft_model(copy.deepcopy(base), _config(arch, variant, method))
    assert take_over == []  # peft's own code made `theirs`
    ours = get_peft_model(copy.deepcopy(base), _config(arch, variant, method))
    lt, lo = _layers(theirs), _layers(ours)
    assert len(take_over) == len(lo) and lt.keys() == lo.keys()
    for name in lt:
        assert lo[name].r == lt[name].r and lo[name].scaling == lt[name].scaling, name
        assert _close(_weight(lo[name]), _weight(lt[name]), CONVERT_TOL), name
        assert _close(_delta(lo[name]), _delta(lt[name]), CONVERT_TOL), name
        if method == "olora":
            for key in ("lora_A", "lora_B"):
                assert _close(getattr(lo[name], key)["default"].weight, getattr(lt[name], key)["default"].weight,
                              CONVERT_TOL), (name, key)


def _decaying_spectrum_base(base, targets, decay=0.3):
    """A copy of ``base`` whose ``targets`` weights have singular values σ0·decay^k (well separated), where a
    randomized SVD with a few power iterations is near-exact, so peft's (randomized, q = r) and ours can be compared
    with the exact truncated SVD."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in targets:
                out, inp = module.weight.shape
                k = min(out, inp)
                U, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
                V, _ = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))
                S = 0.5 * decay ** torch.arange(k, dtype=torch.float64)
                module.weight.copy_((U * S) @ V.T)
    return model


def test_pissa_niter_properties(take_over, llama_base, tokens):
    """pissa_niter_N is randomized (peft: torch.svd_lowrank from the global RNG; ours: seeded randomized SVD with
    oversampling), so only properties are compared: both keep the output at step 0, split W exactly into
    residual + s·B·A, carry orthogonal factors with equal halves (A·Aᵀ = Bᵀ·B diagonal), never exceed the exact
    singular values, and on a well-separated spectrum both give the exact PiSSA. Ours is deterministic: the global
    seed does not change it."""
    targets = ["q_proj", "down_proj"]
    base = _decaying_spectrum_base(llama_base, targets)
    y0 = logits(base, tokens)
    kw = dict(init_lora_weights="pissa_niter_4", target_modules=targets, r=8, lora_alpha=4)
    with stock_peft():
        torch.manual_seed(1)
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    assert take_over == []
    torch.manual_seed(1)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    torch.manual_seed(2)
    again = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    assert take_over == ["pissa_niter_4"] * 8
    for a, b in zip(ours.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    for model in (theirs, ours):
        assert torch.allclose(logits(model, tokens), y0, atol=INIT_ATOL)
        for name, layer in _layers(model).items():
            W = base.get_submodule(name).weight.detach().double()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            assert _close(_weight(layer).double() + _delta(layer), W, CONVERT_TOL), name
            A, B = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
            gram_A, gram_B = A @ A.T, B.T @ B
            assert torch.allclose(gram_A, torch.diag(gram_A.diagonal()), atol=1e-5 * float(gram_A.max()))
            assert torch.allclose(gram_A, gram_B, atol=1e-5 * float(gram_A.max()))
            S_got = gram_A.diagonal() * layer.scaling["default"]  # = S_r: A = sqrt(S/s) Vh
            assert bool((S_got <= S[:8] * (1 + 1e-4)).all()), name
            exact = U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]
            assert float((_delta(layer) - exact).norm() / exact.norm()) <= 1e-3, name


CONVERSION = [(m, "llama", v) for m in ("pissa", "pissa_niter_4", "olora") for v in VARIANTS] + [
    ("pissa", "gpt2", "plain"), ("olora", "gpt2", "plain")]


@pytest.mark.parametrize("method,arch,variant", CONVERSION)
def test_save_reload_and_conversion(method, arch, variant, take_over, llama_base, gpt2_base, tokens, tmp_path):
    """peft's test_lora_{pissa,olora}_conversion_same_output_after_loading{,_with_rank_pattern,_with_alpha_pattern,
    _with_rslora}, with the take-over (and, beyond peft's cases, pissa_niter_N, which with peft's own code does not
    reload to the same residual, and GPT-2 Conv1D layers):
    - saved normally, the adapter reloads onto the original base with the same output: the take-over rebuilds the
      same residual, and the trained A and B are loaded over it;
    - saved with path_initial_model_for_weight_conversion, it is a plain LoRA of rank 2r with the same scalings that
      gives the trained output on the original, unmodified base."""
    base = llama_base if arch == "llama" else gpt2_base
    y0 = logits(base, tokens)
    model = get_peft_model(copy.deepcopy(base), _config(arch, variant, method))
    n_layers = len(_layers(model))
    assert take_over == [method] * n_layers
    assert torch.allclose(logits(model, tokens), y0, atol=INIT_ATOL)
    _save_initial(model, tmp_path / "init")
    perturb_adapters(model, seed=5, scale=0.02)  # "training"
    trained = logits(model, tokens)
    assert not _close(trained, y0, CONVERT_TOL)

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert take_over == [method] * (2 * n_layers)  # the reload's residual is ours too
    assert _close(logits(loaded, tokens), trained, CONVERT_TOL)
    assert loaded.peft_config["default"].r == model.peft_config["default"].r
    for name, layer in _layers(loaded).items():
        trained_layer = _layers(model)[name]
        assert layer.lora_A["default"].weight.shape == trained_layer.lora_A["default"].weight.shape, name
        assert layer.scaling == trained_layer.scaling, name
        assert not _close(layer.get_base_layer().weight, base.get_submodule(name).weight, CONVERT_TOL), name
        assert _close(layer.get_base_layer().weight, trained_layer.get_base_layer().weight, CONVERT_TOL), name

    config_before = model.peft_config["default"].to_dict()
    _convert(model, tmp_path / "converted", tmp_path / "init")
    assert list(model.peft_config) == ["default"]
    assert model.peft_config["default"].to_dict() == config_before  # saving with conversion changes nothing
    assert _close(logits(model, tokens), trained, 0.0)
    converted = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted")
    assert take_over == [method] * (2 * n_layers)  # a plain LoRA: no init of ours on reload
    assert _close(logits(converted, tokens), trained, CONVERT_TOL)
    _assert_converted(converted, model, base)


@pytest.mark.parametrize("method,pattern", [("pissa", "rank_pattern"), ("pissa_niter_4", "alpha_pattern"),
                                            ("olora", "rank_pattern"), ("olora", "alpha_pattern")])
def test_conversion_with_rslora_and_pattern_raises(method, pattern, take_over, llama, tmp_path):
    """peft's test_{pissa,olora}_{rank,alpha}_pattern_and_rslora_raises: the scaling of a converted adapter cannot be
    known with rslora and a pattern, so peft refuses the conversion; the take-over keeps that refusal."""
    with pytest.warns(UserWarning, match="Rank-Stabilized LoRA with rank_pattern/alpha_pattern"):
        config = LoraConfig(**dict(VARIANTS[pattern], use_rslora=True), init_lora_weights=method,
                            target_modules=LLAMA_TARGETS)
    model = get_peft_model(llama, config)
    assert take_over == [method] * len(_layers(model))
    _save_initial(model, tmp_path / "init")
    with pytest.raises(ValueError, match="not supported when using `rank_pattern` or `alpha_pattern`"):
        _convert(model, tmp_path / "converted", tmp_path / "init")
    assert not (tmp_path / "converted" / "adapter_model.safetensors").exists()


# -- LoRA-GA (loram_fast.init_model(model, "lora_ga", ...)) ---------------------------------------------------------

TARGETS_GA = ["q_proj", "k_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(4)
    return [{"input_ids": (t := torch.randint(0, 128, (2, 10), generator=g)), "labels": t} for _ in range(3)]


@pytest.fixture
def exact_svd_lowrank(monkeypatch):
    """peft's LoRA-GA and ours (by default, peft's call) use torch.svd_lowrank, which draws from the global RNG:
    an exact SVD in its place on both sides makes the two comparable."""
    def exact(A, q=6, niter=2, M=None):
        U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
        return U[:, :q].float(), S[:q].float(), Vh[:q].T.float()

    monkeypatch.setattr(torch, "svd_lowrank", exact)


def _peft_model(base, targets=TARGETS_GA, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=targets, **kw))


GA_CASES = [  # (LoraConfig variant, direction, scale): every value of each at least once
    ("plain", "ArB2r", "stable"), ("rank_pattern", "ArBr", "weight_svd"), ("alpha_pattern", "A2rBr", "gd_scale"),
    ("rslora", "random", "unit"), ("alpha_pattern", "ArB2r", "stable"), ("rslora", "ArB2r", "gd_scale")]


def _ga_variant(variant):
    kw = dict(VARIANTS[variant], r=4, lora_alpha=8)
    if variant == "rank_pattern":
        kw["rank_pattern"] = {"q_proj": 2, "down_proj": 6}
    if variant == "alpha_pattern":
        kw["alpha_pattern"] = {"k_proj": 3, "down_proj": 24}
    return kw


@pytest.mark.parametrize("variant,direction,scale", GA_CASES)
def test_lora_ga_conversion(variant, direction, scale, llama_base, batches, tokens, tmp_path):
    """peft's test_lora_ga.py::test_save_load_with_weight_conversion (direction × scale), with rank / alpha patterns
    and rslora: ours keeps the output at step 0, and its adapter converted to plain LoRA (rank 2r) gives the trained
    output on the original base. (Reloading the unconverted adapter onto the original base is refused, see README;
    tests/test_safety.py checks that.)"""
    y0 = logits(llama_base, tokens)
    model = _peft_model(llama_base, **_ga_variant(variant))
    torch.manual_seed(0)  # svd_lowrank and the random direction draw from the global RNG
    loram_fast.init_model(model, "lora_ga", dataloader=batches, direction=direction, scale=scale, progress=False)
    assert model.peft_config["default"].init_lora_weights.startswith("loram_fast:lora_ga")
    assert torch.allclose(logits(model, tokens), y0, atol=INIT_ATOL)
    assert all(bool(_delta(layer).abs().max() > 0) for layer in _layers(model).values())
    _save_initial(model, tmp_path / "init")
    perturb_adapters(model, seed=9, scale=0.02)
    trained = logits(model, tokens)
    assert not _close(trained, y0, LORA_GA_ATOL)
    _convert(model, tmp_path / "converted", tmp_path / "init")
    converted = PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path / "converted")
    assert torch.allclose(logits(converted, tokens), trained, atol=LORA_GA_ATOL)
    _assert_converted(converted, model, llama_base)


@pytest.mark.parametrize("variant", ["rank_pattern", "alpha_pattern", "rslora"])
def test_lora_ga_conversion_same_as_peft(variant, llama_base, batches, tokens, tmp_path, exact_svd_lowrank):
    """peft's own LoRA-GA (preprocess_loraga + LoraConfig(init_lora_weights="lora_ga")) and ours on the same batches,
    with rank / alpha patterns and rslora: the same init in every layer, and after the same "training" (B ×2) the
    two converted adapters give the same output on the original base as each other and as their trained models."""
    from peft.tuners.lora.loraga import preprocess_loraga

    kw = _ga_variant(variant)
    cfg = LoraConfig(target_modules=TARGETS_GA, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **kw)
    theirs = copy.deepcopy(llama_base)
    preprocess_loraga(theirs, cfg, lambda: [theirs(**b).loss.backward() for b in batches])
    theirs = get_peft_model(theirs, cfg)
    ours = _peft_model(llama_base, **kw)
    loram_fast.init_model(ours, "lora_ga", dataloader=batches, progress=False)
    lt, lo = _layers(theirs), _layers(ours)
    assert lt.keys() == lo.keys()
    for name in lt:
        assert lo[name].r == lt[name].r and lo[name].scaling == lt[name].scaling, name
        err = float((_delta(lo[name]) - _delta(lt[name])).norm() / _delta(lt[name]).norm())
        assert err <= 1e-4, name  # the gradients agree to fp32 accumulation order, not bit for bit
        assert _close(_weight(lo[name]), _weight(lt[name]), LORA_GA_ATOL), name
    outputs = {}
    for side, model in (("theirs", theirs), ("ours", ours)):
        _save_initial(model, tmp_path / side / "init")
        _scale_B(model)
        trained = logits(model, tokens)
        _convert(model, tmp_path / side / "converted", tmp_path / side / "init")
        converted = PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path / side / "converted")
        _assert_converted(converted, model, llama_base)
        outputs[side] = logits(converted, tokens)
        assert torch.allclose(outputs[side], trained, atol=LORA_GA_ATOL), side
    assert not torch.allclose(outputs["ours"], logits(llama_base, tokens), atol=LORA_GA_ATOL)
    assert torch.allclose(outputs["ours"], outputs["theirs"], atol=LORA_GA_ATOL)


def test_lora_ga_adapter_on_its_residual_base(llama_base, batches, tokens, tmp_path):
    """peft's test_lora_ga.py::test_save_load_inference loads the saved adapter onto the model whose base already
    holds the residual. The hook cannot tell that base from the original one, so a plain from_pretrained is refused
    for both (README: the residual came from data), naming both ways out; with
    ``peft_hook.residual_base_config`` the saved adapter and the residual base give the trained output."""
    model = _peft_model(llama_base)
    loram_fast.init_model(model, "lora_ga", dataloader=batches, progress=False)
    perturb_adapters(model, seed=3, scale=0.02)
    trained = logits(model, tokens)
    model.save_pretrained(tmp_path)
    residual_base = copy.deepcopy(model).unload()
    with pytest.raises(ValueError, match="came from training data.*path_initial_model_for_weight_conversion.*"
                                         "residual_base_config"):
        PeftModel.from_pretrained(copy.deepcopy(residual_base), tmp_path)
    assert LoraConfig.from_pretrained(tmp_path).init_lora_weights.startswith("loram_fast:lora_ga")
    config = loram_fast.peft_hook.residual_base_config(tmp_path)
    assert config.init_lora_weights is True
    loaded = PeftModel.from_pretrained(residual_base, tmp_path, config=config)
    assert torch.allclose(logits(loaded, tokens), trained, atol=LORA_GA_ATOL)


def test_lora_ga_bf16_conversion(llama_base, batches, tokens, tmp_path):
    """peft's test_lora_ga.py::test_lower_precision_dtype (bf16 base and adapters, autocast_adapter_dtype=False), at
    its tolerance, through the conversion: the converted plain LoRA on the original bf16 base gives the trained
    output of the bf16 residual model."""
    base = copy.deepcopy(llama_base).to(torch.bfloat16)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS_GA),
                           autocast_adapter_dtype=False)
    loram_fast.init_model(model, "lora_ga", dataloader=batches, progress=False)
    for layer in _layers(model).values():
        assert layer.lora_A["default"].weight.dtype == layer.lora_B["default"].weight.dtype == torch.bfloat16
    assert torch.allclose(logits(model, tokens), logits(base, tokens), atol=LOW_PRECISION_ATOL)
    _save_initial(model, tmp_path / "init")
    perturb_adapters(model, seed=4, scale=0.05)
    trained = logits(model, tokens)
    assert not torch.allclose(trained, logits(base, tokens), atol=LOW_PRECISION_ATOL)
    _convert(model, tmp_path / "converted", tmp_path / "init")
    converted = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted", autocast_adapter_dtype=False)
    assert converted.peft_config["default"].r == 8
    assert torch.allclose(logits(converted, tokens), trained, atol=LOW_PRECISION_ATOL)
