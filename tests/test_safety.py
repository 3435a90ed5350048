"""A user's model is never silently wrong: every path that changes a model gives the right model, or raises and
leaves it bit-identical (state dict, requires_grad flags, peft config, variants, modules)."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import loram_fast
import loram_fast.transaction as transaction
from loram_fast import peft_hook

from conftest import LLAMA_TARGETS, logits, perturb_adapters, relative_error

# every method that needs no data, with the options that change its result
NO_DATA = [("loram", {}), ("loram_dct", {}), ("pissa", {}), ("pissa_niter_2", {}), ("milora", {}), ("olora", {}),
           ("nlora", {}), ("nlora", {"residual": True, "nystrom": "pinv"}), ("slora", {}), ("inttune", {}),
           ("orthogonal", {}), ("orthogonal", {"seed": 1}), ("mica", {})]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft(base, targets=TARGETS, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return get_peft_model(base, LoraConfig(target_modules=targets, **kw))


def _batches(n=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (t := torch.randint(0, 128, (2, 10), generator=g)), "labels": t} for _ in range(n)]


def full_state(model):
    """Everything an init may touch: tensors (bitwise), flags, configs, variants, extra modules, records."""
    out = {"tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
           "flags": {n: p.requires_grad for n, p in model.named_parameters()},
           "config": {k: copy.deepcopy(c.to_dict()) for k, c in getattr(model, "peft_config", {}).items()}}
    layers = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_variant"):
            layers[name] = (tuple(sorted((a, type(v).__name__) for a, v in m.lora_variant.items())),
                            tuple(m.adapter_layer_names), sorted(getattr(m, "lora_N", {}).keys()),
                            dict(getattr(m, "frozen_peft_weight_names", {}) or {}),
                            sorted(m.__dict__.get("_loram_fast_residuals", {}).keys()))
    out["layers"] = layers
    return out


def _bits(t):
    """The tensor's bit pattern (NaN == NaN, -0.0 != 0.0)."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}
    return t.view(ints[t.dtype]) if t.dtype in ints else t


def assert_same(model, before):
    now = full_state(model)
    assert now["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(_bits(now["tensors"][k]), _bits(v)), f"{k} changed"
    assert now["flags"] == before["flags"]
    assert now["config"] == before["config"]
    assert now["layers"] == before["layers"]


# -- 1. save → reload ---------------------------------------------------------------------------------------------

@pytest.fixture
def take_over(request):
    """peft's own strings ("pissa", "pissa_niter_N", "olora") run peft's own code unless the take-over is
    installed (peft's pissa_niter_N draws from the global RNG, so peft's own reload differs from its init); with
    it, they are ours, deterministic, in the init and in the reload."""
    if request.node.callspec.params.get("route") == "LoraConfig":
        peft_hook.install(take_over_peft_inits=True)
        yield
        peft_hook.uninstall()
        peft_hook.install()
    else:
        yield


@pytest.mark.parametrize("method,options", NO_DATA, ids=lambda x: str(x))
@pytest.mark.parametrize("route", ["init_model", "LoraConfig"])
def test_save_reload_gives_the_same_model(llama_base, tokens, tmp_path, method, options, route, take_over):
    if route == "LoraConfig" and options:
        pytest.skip("LoraConfig takes options only in the recorded form (tested below)")
    if route == "init_model":
        model = _peft(copy.deepcopy(llama_base))
        loram_fast.init_model(model, method, progress=False, **options)
        assert model.peft_config["default"].init_lora_weights.startswith("loram_fast:" + method)
    else:
        model = _peft(copy.deepcopy(llama_base), init_lora_weights=method)
    before_training = logits(model, tokens)
    perturb_adapters(model, seed=11)  # "train"
    trained = logits(model, tokens)
    assert relative_error(trained, before_training) > 1e-4
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # the reload's own random init (slora) must not matter
    loaded = PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)
    assert relative_error(logits(loaded, tokens), trained) <= 1e-5
    if method in ("nlora", "inttune", "slora"):
        layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
        assert "default" in layer.lora_N  # the saved N was loaded, not dropped


def test_recorded_string_carries_options(llama_base, tokens):
    model = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(model, "nlora", residual=True, nystrom="pinv", progress=False)
    recorded = model.peft_config["default"].init_lora_weights
    assert recorded == "loram_fast:nlora[nystrom=pinv,residual=true]"
    again = _peft(copy.deepcopy(llama_base), init_lora_weights=recorded)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_data_driven_inits_reload(llama_base, tokens, tmp_path):
    # lora_one leaves W alone: the reload needs only the saved adapters
    model = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(model, "lora_one", dataloader=_batches(), progress=False)
    perturb_adapters(model, seed=2)
    trained = logits(model, tokens)
    model.save_pretrained(tmp_path / "one")
    loaded = PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path / "one")
    assert relative_error(logits(loaded, tokens), trained) <= 1e-5
    # lora_ga's residual came from data: a reload onto the original base cannot rebuild it and says so
    model = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(model, "lora_ga", dataloader=_batches(), progress=False)
    model.save_pretrained(tmp_path / "ga")
    with pytest.raises(ValueError, match="came from training data"):
        PeftModel.from_pretrained(copy.deepcopy(llama_base), tmp_path / "ga")


# -- 2. a second init -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first,second", [("loram", "loram"), ("pissa", "loram"), ("olora", "olora"),
                                          ("loram", "nlora"), ("nlora", "loram"), ("inttune", "pissa")])
def test_second_init_replaces_the_first(llama_base, tokens, first, second):
    y0 = logits(llama_base, tokens)
    model = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(model, first, progress=False)
    loram_fast.init_model(model, second, progress=False)
    once = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(once, second, progress=False)
    assert relative_error(logits(model, tokens), logits(once, tokens)) <= 1e-5
    if second != "nlora":  # nlora (reference behaviour) changes the step-0 output on purpose
        assert relative_error(logits(model, tokens), y0) <= 1e-5
    for (k, a), b in zip(model.state_dict().items(), once.state_dict().values()):
        assert relative_error(a, b) <= 1e-5, k
    assert full_state(model)["layers"] == full_state(once)["layers"]
    assert full_state(model)["flags"] == full_state(once)["flags"]


def test_hook_then_init_model(llama_base, tokens):
    y0 = logits(llama_base, tokens)
    model = _peft(copy.deepcopy(llama_base), init_lora_weights="loram")
    loram_fast.init_model(model, "pissa", progress=False)
    assert relative_error(logits(model, tokens), y0) <= 1e-5


def test_foreign_residual_init_is_refused(llama_base):
    model = _peft(copy.deepcopy(llama_base), init_lora_weights="olora")  # peft's own olora wrote into W
    before = full_state(model)
    with pytest.raises(ValueError, match="peft's 'olora'.*cannot undo"):
        loram_fast.init_model(model, "loram", progress=False)
    assert_same(model, before)


# -- 3. interrupts: every write, exact rollback ------------------------------------------------------------------

def _count_steps(monkeypatch, model_factory, method, options):
    calls = {"n": 0}
    original = transaction.Transaction._will

    def counting(self, undo):
        original(self, undo)
        calls["n"] += 1

    model = model_factory()
    monkeypatch.setattr(transaction.Transaction, "_will", counting)
    loram_fast.init_model(model, method, progress=False, **options)
    monkeypatch.setattr(transaction.Transaction, "_will", original)
    return calls["n"]


def _interrupt_every_step(monkeypatch, factory, method, options, check) -> int:
    """Interrupt ``init_model(model, method, **options)`` at each of its undo-log steps in turn, on a fresh
    ``factory()`` model each time, and ``check(model, state_before)`` after the rollback. Returns the step count."""
    steps = _count_steps(monkeypatch, factory, method, options)
    original = transaction.Transaction._will
    for k in range(1, steps + 1):
        model = factory()
        before = full_state(model)
        calls = {"n": 0}

        def interrupting(self, undo, k=k):
            original(self, undo)
            calls["n"] += 1
            if calls["n"] == k:
                raise KeyboardInterrupt

        monkeypatch.setattr(transaction.Transaction, "_will", interrupting)
        with pytest.raises(KeyboardInterrupt):
            loram_fast.init_model(model, method, progress=False, **options)
        monkeypatch.setattr(transaction.Transaction, "_will", original)
        check(model, before)
    return steps


@pytest.mark.parametrize("method,options", [("loram", {}), ("nlora", {"residual": True}), ("inttune", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interrupt_at_every_write_restores_every_bit(llama_base, monkeypatch, method, options, dtype):
    def factory():
        m = _peft(copy.deepcopy(llama_base).to(dtype), ["q_proj", "down_proj"])
        loram_fast.init_model(m, "pissa", progress=False)  # a previous init to fold back: the hard case
        return m

    assert _interrupt_every_step(monkeypatch, factory, method, options, assert_same) >= 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interrupt_at_every_step_of_a_first_init_restores_every_bit(llama_base, monkeypatch, dtype):
    """A first LoRAM init holds its residual writes back to the end (no weight copies): an interrupt at any step
    before them restores every bit."""
    def factory():
        return _peft(copy.deepcopy(llama_base).to(dtype), ["q_proj", "down_proj"])

    copies = []
    monkeypatch.setattr(transaction.Transaction, "_save_weight", lambda self, target, always=False: copies.append(1))
    # the undo steps of 4 layers: each layer's residual record, the config, the flush (the adapters are formed in
    # place after it; the frozen flags do not change)
    assert _interrupt_every_step(monkeypatch, factory, "loram", {}, assert_same) >= 6
    assert not copies, "a first LoRAM init on the compiled kernel copies no weight"


def test_held_back_writes_failing_restore_up_to_rounding_and_say_so(llama_base, monkeypatch, caplog):
    """The held-back writes run on a kernel that cannot fail once it starts; should one raise all the same (simulated
    here before it writes), the weights written before it are restored up to one rounding and the log says so."""
    model = _peft(copy.deepcopy(llama_base).to(torch.bfloat16))
    before = full_state(model)

    def third_fails(writes, sign=-1.0, *, backend=None, done):
        for W, residual in writes[:2]:
            transaction.apply_residual(W, residual, sign, backend=backend)
            done.append((W, residual))
        raise RuntimeError("simulated")

    monkeypatch.setattr(transaction, "apply_residuals", third_fails)
    with caplog.at_level("ERROR", logger="loram_fast"), pytest.raises(RuntimeError, match="simulated"):
        loram_fast.init_model(model, "loram", progress=False)
    assert "failed after 2 of" in caplog.text and "up to one rounding" in caplog.text
    _assert_within_one_rounding(model, before)


def test_ctrl_c_during_held_back_writes_completes_the_init_then_interrupts(llama_base, monkeypatch):
    """A real SIGINT during the final (held-back) residual writes is answered once the call has committed: the model
    is the complete init, bit for bit, and KeyboardInterrupt is raised after it."""
    import os
    import signal

    model = _peft(copy.deepcopy(llama_base))
    clean = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(clean, "loram", progress=False)
    original = transaction.apply_residuals
    calls = {"n": 0}

    def interrupted_mid_flush(writes, sign=-1.0, **kw):
        calls["n"] += len(writes)
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the weights are being written
        return original(writes, sign, **kw)

    monkeypatch.setattr(transaction, "apply_residuals", interrupted_mid_flush)
    with pytest.raises(KeyboardInterrupt):
        loram_fast.init_model(model, "loram", progress=False)
    assert calls["n"] == 6
    assert_same(model, full_state(clean))


def test_ctrl_c_while_adapters_are_formed_completes_the_init_then_interrupts(llama_base, monkeypatch):
    """LoRAM's adapters are formed in their parameters' memory after the residual writes, with no copy of peft's
    initial ones: a real SIGINT then is answered once the call has committed, with the complete init, bit for bit."""
    import os
    import signal

    import loram_fast.transaction as transaction

    model = _peft(copy.deepcopy(llama_base).to(torch.bfloat16))
    clean = _peft(copy.deepcopy(llama_base).to(torch.bfloat16))
    loram_fast.init_model(clean, "loram", progress=False)
    original = transaction.form_all
    formed = []

    def interrupted(pairs, backend=None):
        formed.append(len(pairs))
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the adapters are being formed
        return original(pairs, backend)

    monkeypatch.setattr(transaction, "form_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loram_fast.init_model(model, "loram", progress=False)
    assert formed == [12]  # every adapter, in one call
    assert_same(model, full_state(clean))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loram_adapters_formed_in_their_parameters(llama_base, dtype):
    """A LoRAM init on the compiled kernels writes A and B into the adapter parameters' own memory (no fresh
    tensors), the same bits as adapters formed apart and swapped in (the torch backend), rounded through the base
    weight's dtype as the reference stores them; the weights get the same residuals either way (to rounding)."""
    from loram_fast.methods.loram import loram_reference

    model = _peft(copy.deepcopy(llama_base).to(dtype))
    apart = _peft(copy.deepcopy(llama_base).to(dtype))

    def adapters(m):
        return {n: p for n, p in m.named_parameters() if "lora_" in n}

    mine, theirs = adapters(model), adapters(apart)
    ptrs = {n: p.data_ptr() for n, p in mine.items()}
    loram_fast.init_model(model, "loram", progress=False)
    loram_fast.init_model(apart, "loram", backend="torch", progress=False)
    assert ptrs == {n: p.data_ptr() for n, p in mine.items()}, "formed in place"
    assert all(theirs[n].data_ptr() != ptrs[n] for n in theirs), "the torch backend swaps in new tensors"
    for n, p in mine.items():
        assert torch.equal(_bits(p.detach()), _bits(theirs[n].detach())), n
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    W0 = llama_base.model.layers[0].self_attn.q_proj.weight.to(dtype)
    A, B, _ = loram_reference(W0, layer.r["default"], layer.scaling["default"])
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -8  # the reference's fp32 angles; one bf16 rounding
    got_A, got_B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    assert relative_error(got_A, A) <= tol and relative_error(got_B, B) <= tol
    assert torch.equal(got_A, got_A.to(dtype).float()) and torch.equal(got_B, got_B.to(dtype).float())


def test_adapters_sharing_a_storage_are_not_formed_in_place(llama_base):
    """Two adapter parameters that share one storage (different Parameter objects): forming either in that memory
    would change the other. Each gets its own LoRAM A, as when they do not share (they are swapped, not written)."""
    model = _peft(copy.deepcopy(llama_base), ["q_proj"])
    clean = _peft(copy.deepcopy(llama_base), ["q_proj"])
    layers = model.base_model.model.model.layers
    p0, p1 = (layers[i].self_attn.q_proj.lora_A["default"].weight for i in (0, 1))
    p1.data = p0.data  # the same storage under two names
    loram_fast.init_model(model, "loram", progress=False)
    loram_fast.init_model(clean, "loram", progress=False)
    for i in (0, 1):
        got = layers[i].self_attn.q_proj.lora_A["default"].weight
        want = clean.base_model.model.model.layers[i].self_attn.q_proj.lora_A["default"].weight
        assert torch.equal(got, want), i
    assert not torch.equal(p0, p1)


def test_interrupt_inside_a_weight_write(llama_base, monkeypatch):
    """A write on a kernel that can stop part way (the torch product, chunk by chunk) gets a weight copy first."""
    model = _peft(copy.deepcopy(llama_base).to(torch.bfloat16))
    before = full_state(model)
    original = transaction.apply_residual
    calls = {"n": 0}

    def half_then_interrupt(W, residual, sign=-1.0, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            W[: W.shape[0] // 2].add_(1.0)  # a kernel stopped halfway through the weight
            raise KeyboardInterrupt
        return original(W, residual, sign, **kw)

    monkeypatch.setattr(transaction, "apply_residual", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        loram_fast.init_model(model, "loram", progress=False, backend="torch")
    assert_same(model, before)


def _assert_within_one_rounding(model, before):
    """Everything bit-identical except base weights, which may differ per entry by a rounding or two of their dtype
    at the scale of the weight's entries (each undone write is one rounding of W ± residual)."""
    now = full_state(model)
    for k, v in before["tensors"].items():
        got = now["tensors"][k]
        if "base_layer.weight" in k:
            ulp = torch.finfo(v.dtype).eps
            assert ((got.double() - v.double()).abs() <= 2 * ulp * v.double().abs().max()).all(), k
        else:
            assert torch.equal(_bits(got), _bits(v)), f"{k} changed"
    assert now["flags"] == before["flags"] and now["config"] == before["config"] and now["layers"] == before["layers"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_exact_rollback_every_step_restores_within_one_rounding(llama_base, monkeypatch, caplog, dtype):
    """exact_rollback=False keeps no weight copies: an interrupt at any step restores adapters, flags and configs
    bit for bit and base weights up to rounding, and the log says so."""
    def factory():
        m = _peft(copy.deepcopy(llama_base).to(dtype), ["q_proj", "down_proj"])
        loram_fast.init_model(m, "pissa", progress=False)
        return m

    with caplog.at_level("ERROR", logger="loram_fast"):
        _interrupt_every_step(monkeypatch, factory, "loram", {"exact_rollback": False}, _assert_within_one_rounding)
    assert "up to rounding" in caplog.text


def test_without_exact_rollback_ctrl_c_waits_for_the_write(llama_base, monkeypatch):
    """A real SIGINT during a residual write is delivered after that write completes, then everything is undone."""
    import os
    import signal

    model = _peft(copy.deepcopy(llama_base))
    before = full_state(model)
    original = transaction.apply_residual
    calls = {"n": 0}

    def interrupted_mid_write(W, residual, sign=-1.0, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the weight is being written
        return original(W, residual, sign, **kw)

    monkeypatch.setattr(transaction, "apply_residual", interrupted_mid_write)
    with pytest.raises(KeyboardInterrupt):
        loram_fast.init_model(model, "loram", progress=False, exact_rollback=False, backend="torch")
    _assert_within_one_rounding(model, before)


def test_snapshot_in_host_memory(llama_base, tokens):
    model = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(model, "loram", progress=False, snapshot_device="cpu")
    assert relative_error(logits(model, tokens), logits(llama_base, tokens)) <= 1e-5


# -- 4/5. shared base weights ---------------------------------------------------------------------------------------

def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_tied_lm_head_is_refused_for_residual_methods(tokens):
    base = _tied_llama()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = _peft(base, ["q_proj", "lm_head"])
    before = full_state(model)
    with pytest.raises(ValueError, match="lm_head.*embed_tokens.*allow_shared_base"):
        loram_fast.init_model(model, "loram", progress=False)
    assert_same(model, before)
    with pytest.raises(ValueError, match="parameter 'model.embed_tokens.weight', parameter 'lm_head.weight' also"):
        # the LoraConfig route sees the tie too
        _peft(_tied_llama(), ["q_proj", "lm_head"], init_lora_weights="loram")
    loram_fast.init_model(model, "nlora", progress=False)  # W untouched: nothing shared is changed
    y0 = logits(model, tokens)
    loram_fast.init_model(model, "loram", progress=False, allow_shared_base=True)  # accepted on request
    assert torch.isfinite(logits(model, tokens)).all() and relative_error(logits(model, tokens), y0) > 1e-6


@pytest.mark.parametrize("exact_rollback", [True, False])
def test_held_back_writes_keep_their_order_on_a_shared_weight(llama_base, monkeypatch, exact_rollback):
    """q_proj and o_proj tied to one weight, q_proj's write held back, o_proj's not: the weight still gets q_proj's
    residual first, bit for bit as when nothing is held back (and an interrupt after both restores it)."""
    def tied():
        m = _peft(copy.deepcopy(llama_base), ["q_proj", "o_proj"], rank_pattern={"o_proj": 2})  # two residuals
        attn = m.base_model.model.model.layers[0].self_attn
        attn.o_proj.base_layer.weight = attn.q_proj.base_layer.weight
        return m, attn

    def run(defer_q, interrupt=False):
        model, attn = tied()
        before = full_state(model)
        original = transaction.Transaction._can_defer

        def can_defer(self, target, init, residual):
            return defer_q and target.layer is attn.q_proj and original(self, target, init, residual)

        monkeypatch.setattr(transaction.Transaction, "_can_defer", can_defer)
        if interrupt:
            monkeypatch.setattr(transaction.Transaction, "commit_config",
                                lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
            with pytest.raises(KeyboardInterrupt):
                loram_fast.init_model(model, "loram", progress=False, allow_shared_base=True,
                                      exact_rollback=exact_rollback)
            (assert_same if exact_rollback else _assert_within_one_rounding)(model, before)
        else:
            loram_fast.init_model(model, "loram", progress=False, allow_shared_base=True,
                                  exact_rollback=exact_rollback)
        monkeypatch.undo()
        return attn.q_proj.base_layer.weight.detach().clone()

    assert torch.equal(run(defer_q=True), run(defer_q=False))
    run(defer_q=True, interrupt=True)


def test_other_adapter_on_the_same_base_is_refused(llama_base, tokens):
    model = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(model, "loram", progress=False)
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    before = full_state(model)
    with pytest.raises(ValueError, match="adapter 'default' also use"):
        loram_fast.init_model(model, "pissa", adapter_name="b", progress=False)
    assert_same(model, before)
    with pytest.raises(ValueError, match="adapter 'default', adapter 'b' also use"):
        model.add_adapter("c", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loram"))
    loram_fast.init_model(model, "nlora", adapter_name="b", progress=False)  # W untouched: fine


# -- 6. DoRA with a middle matrix -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["nlora", "slora", "inttune"])
def test_dora_with_a_middle_matrix_is_refused(llama_base, method):
    with pytest.raises(NotImplementedError, match="DoRA"):
        _peft(copy.deepcopy(llama_base), use_dora=True, init_lora_weights=method)
    model = _peft(copy.deepcopy(llama_base), use_dora=True)
    before = full_state(model)
    with pytest.raises(NotImplementedError, match="DoRA"):
        loram_fast.init_model(model, method, progress=False)
    assert_same(model, before)


# -- 7/8. flags, no_grad, inference_mode -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora_one", "lora_ga"])
def test_frozen_adapters_stay_frozen(llama_base, method):
    model = _peft(copy.deepcopy(llama_base), inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    loram_fast.init_model(model, method, dataloader=_batches(), progress=False)
    assert not any(p.requires_grad for p in model.parameters())
    # a second, inactive adapter keeps its flags too
    model = _peft(copy.deepcopy(llama_base))
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    loram_fast.init_model(model, method, dataloader=_batches(), progress=False, allow_shared_base=True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_inference_mode_around_init(llama_base, tokens):
    model = _peft(copy.deepcopy(llama_base))
    with torch.inference_mode():
        loram_fast.init_model(model, "nlora", progress=False)
    N = model.base_model.model.model.layers[0].self_attn.q_proj.lora_N["default"].weight
    assert not N.is_inference() and N.requires_grad
    model.train()
    model(tokens, labels=tokens).loss.backward()  # trains
    assert N.grad is not None
    with torch.no_grad():
        loram_fast.init_model(_peft(copy.deepcopy(llama_base)), "lora_one", dataloader=_batches(), progress=False)
    batches = _batches()
    inside, outside = _peft(copy.deepcopy(llama_base)), _peft(copy.deepcopy(llama_base))
    torch.manual_seed(0)  # lora_ga's svd_lowrank (peft's call) draws from the global RNG
    with torch.inference_mode():  # gradients are estimated all the same (outside inference mode, inside the call)
        loram_fast.init_model(inside, "lora_ga", dataloader=batches, progress=False)
    torch.manual_seed(0)
    loram_fast.init_model(outside, "lora_ga", dataloader=batches, progress=False)
    for (k, a), b in zip(inside.state_dict().items(), outside.state_dict().values()):
        assert torch.equal(a, b), k


# -- 9. options -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,kwargs,error,match", [
    ("lora_one", {"gamma": 0}, ValueError, "gamma=0"),
    ("lora_one", {"gamma": 1e-30}, ValueError, "gamma=1e-30"),
    ("lora_one", {"gamma": -1}, ValueError, "gamma=-1"),
    ("lora_one", {"gamma": float("nan")}, ValueError, "gamma=nan"),
    ("lora_ga", {"stable_gamma": 0}, ValueError, "stable_gamma=0"),
    ("lora_one", {"sketch_rank": -20, "gradient_mode": "sketch"}, ValueError, "sketch_rank=-20"),
    ("pissa_niter_2", {"oversample": "8"}, TypeError, "oversample='8'"),
    ("loram", {"allow_zero_adapter": "no"}, TypeError, "allow_zero_adapter='no'"),
    ("loram", {"adapter_name": ""}, ValueError, "adapter_name=''"),
    ("loram", {"progress": "yes"}, TypeError, "progress='yes'"),
    ("loram", {"backend": "gpu"}, ValueError, "backend='gpu'"),
    ("lora_one", {"max_batches": 0}, ValueError, "max_batches=0"),
    ("lora_one", {"dataloader": torch.zeros(3)}, TypeError, "dataloader"),
])
def test_options_are_validated_up_front(llama_base, method, kwargs, error, match):
    model = _peft(copy.deepcopy(llama_base))
    before = full_state(model)
    if get_needs_data(method) and "dataloader" not in kwargs:
        kwargs = {**kwargs, "dataloader": _batches()}
    with pytest.raises(error, match=match.replace("(", "\\(").replace("[", "\\[")):
        loram_fast.init_model(model, method, **kwargs)
    assert_same(model, before)


def get_needs_data(method):
    return loram_fast.get_method(method).needs_data


# -- 10. a forced backend is a preference per op ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["olora", "pissa_niter_2"])
def test_forced_backend_runs_composite_methods(llama_base, method):
    auto = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(auto, method, progress=False, backend="torch")
    forced = _peft(copy.deepcopy(llama_base))
    backend = "cpu-ext" if loram_fast.backends()["cpu-ext"] is True else "torch"
    loram_fast.init_model(forced, method, progress=False, backend=backend)
    for (k, a), b in zip(auto.state_dict().items(), forced.state_dict().values()):
        if "lora_" not in k:  # base weights (residuals); the factors' signs may differ between backends
            assert relative_error(a, b) <= 1e-5, k
    for name, layer in auto.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            other = forced.get_submodule(name)
            assert relative_error(other.lora_B["default"].weight @ other.lora_A["default"].weight,
                                  layer.lora_B["default"].weight @ layer.lora_A["default"].weight) <= 1e-4, name


def test_forced_backend_env_with_sketch_gradients(llama_base, monkeypatch):
    backend = "cpu-ext" if loram_fast.backends()["cpu-ext"] is True else "torch"
    monkeypatch.setenv("LORAM_FAST_BACKEND", backend)
    model = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(model, "lora_one", dataloader=_batches(), gradient_mode="sketch", sketch_rank=8,
                          progress=False)


def test_randomized_svd_with_a_forced_backend_lacking_ops():
    W = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    ref = loram_fast.randomized_svd(W, 4, backend="torch")
    ok = loram_fast.backends()["triton"] is True
    got = loram_fast.randomized_svd(W, 4, backend="triton" if ok else "torch")  # triton has no cholesky_qr
    assert relative_error(got[1], ref[1]) <= 1e-5


# -- 12. messages -----------------------------------------------------------------------------------------------

def test_nan_is_reported_at_its_module_in_a_batched_method(llama_base, monkeypatch):
    import loram_fast.methods.svd as svd

    monkeypatch.setattr(svd, "STACK_ON_CPU", True)  # same-shaped weights factorised together, as on a GPU
    model = _peft(copy.deepcopy(llama_base), LLAMA_TARGETS)
    model.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight.data[3, 3] = float("nan")
    before = full_state(model)
    with pytest.raises(ValueError) as err:
        loram_fast.init_model(model, "pissa", progress=False)
    assert "layers.1.mlp.up_proj" in str(err.value) and "layers.0.mlp.up_proj" not in str(err.value)
    assert_same(model, before)


def test_gradient_messages_name_the_module_and_the_batch():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32)).eval()
    model = _peft(bert, ["query", "dense"])
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    before = full_state(model)
    with pytest.raises(ValueError, match="pooler.dense.*part of the loss"):
        loram_fast.init_model(model, "lora_one", dataloader=[{"input_ids": ids}], progress=False,
                              loss_fn=lambda m, b: m(**b).last_hidden_state.pow(2).mean())
    assert_same(model, before)
    with pytest.raises(TypeError) as err:
        loram_fast.init_model(model, "lora_one", dataloader=[ids], progress=False)
    assert "batch 0 is a Tensor" in str(err.value) and len(str(err.value)) < 400
    assert_same(model, before)


def test_data_method_in_loraconfig_warns_once(llama_base, caplog):
    import logging

    from loram_fast import peft_hook

    peft_hook._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="loram_fast"):
        _peft(copy.deepcopy(llama_base), LLAMA_TARGETS, init_lora_weights="lora_one")
    assert sum("needs data" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("method,options", [("loram", {}), ("loram_dct", {}), ("pissa", {}), ("olora", {}),
                                            ("milora", {}), ("nlora", {"residual": True})])
def test_bf16_residual_rounded_once_from_the_exact_value(llama_base, monkeypatch, method, options):
    """Tight enough to catch a 1 % error in any residual: each bf16 residual weight must equal the exact fp32
    value W0 − s·(product) rounded once, bit for bit in >= 99 % of the entries (fp32 summation order may flip a
    rounding now and then); a residual 1 % short moves far more entries to another bf16 value."""
    base = copy.deepcopy(llama_base).to(torch.bfloat16)
    spec = loram_fast.get_method(method)

    def agreement():
        model = _peft(copy.deepcopy(base), LLAMA_TARGETS)
        loram_fast.init_model(model, method, progress=False, **options)
        worst = 1.0
        for name, layer in model.named_modules():
            if not (hasattr(layer, "lora_A") and "default" in layer.lora_A):
                continue
            W0 = base.get_submodule(name.replace("base_model.model.", "", 1)).weight
            init = spec.init(W0, layer.r["default"], layer.scaling["default"], **options)
            exact = W0.float().clone()
            loram_fast.ops.apply_residual(exact, init.residual, backend="torch")
            got = layer.base_layer.weight
            worst = min(worst, float((_bits(got) == _bits(exact.to(torch.bfloat16))).float().mean()))
        return worst

    assert agreement() >= 0.99
    original, batched = transaction.apply_residual, transaction.apply_residuals  # a residual 1 % short: caught
    monkeypatch.setattr(transaction, "apply_residual",
                        lambda W, residual, sign=-1.0, **kw: original(W, residual, sign * 0.99, **kw))
    monkeypatch.setattr(transaction, "apply_residuals",
                        lambda writes, sign=-1.0, **kw: batched(writes, sign * 0.99, **kw))
    assert agreement() < 0.99


def test_adapter_views_into_a_shared_buffer_are_written_in_place(llama_base, tokens):
    """An adapter weight that is a view into a larger buffer (as flat-parameter wrappers make them) keeps being that
    view: the init writes through it, and a rollback restores the buffer bit for bit."""
    model = _peft(copy.deepcopy(llama_base), ["q_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    A = layer.lora_A["default"].weight
    flat = torch.zeros(A.numel() + 7)
    with torch.no_grad():
        flat[3:3 + A.numel()].copy_(A.reshape(-1))
    A.data = flat[3:3 + A.numel()].view_as(A)
    loram_fast.init_model(model, "loram", progress=False)
    assert A.data.data_ptr() == flat[3:].data_ptr()  # still the view
    assert torch.equal(flat[3:3 + A.numel()].view_as(A), A.detach()) and A.abs().sum() > 0
    assert relative_error(logits(model, tokens), logits(llama_base, tokens)) <= 1e-5


# -- DoRA with residual inits -------------------------------------------------------------------------------------------

def _peft_dora_magnitude(layer, adapter="default"):
    """What peft's own DoRA layer computes for this layer's current base weight and adapters."""
    from peft.tuners.lora.dora import DoraLinearLayer

    dora = DoraLinearLayer(fan_in_fan_out=getattr(layer, "fan_in_fan_out", False))
    dora.update_layer(base_layer=layer.get_base_layer(), lora_A=layer.lora_A[adapter].weight,
                      lora_B=layer.lora_B[adapter].weight, scaling=layer.scaling[adapter])
    return dora.weight.detach()


@pytest.mark.parametrize("method,kw", [("loram", {}), ("loram_dct", {}), ("pissa", {}), ("pissa_niter_2", {}),
                                       ("olora", {}), ("milora", {}), ("lora_ga", {"dataloader": "batches"}),
                                       ("lora_one", {"dataloader": "batches"}), ("corda", {"dataloader": "batches"}),
                                       ("loftq", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_with_residual_inits(llama_base, tokens, method, kw, dtype):
    """use_dora=True: after the residual is written the magnitude vector is the row norms of W_res + s·B A, equal to
    what peft's DoRA layer computes for the new weights, so the output is unchanged at step 0."""
    from peft.tuners.lora import LoraLayer

    base = copy.deepcopy(llama_base).to(dtype)
    model = _peft(copy.deepcopy(base), use_dora=True)
    kw = {k: (_batches() if v == "batches" else v) for k, v in kw.items()}
    loram_fast.init_model(model, method, progress=False, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if method not in ("lora_one", "loftq"):  # lora_one adds s·B A on top of W by design; loftq quantises W
        assert relative_error(logits(model, tokens), logits(base, tokens)) <= tol
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            ours = layer.lora_magnitude_vector["default"].weight.detach()
            assert torch.allclose(ours.float(), _peft_dora_magnitude(layer).float(), rtol=1e-6, atol=0), method


def test_dora_through_loraconfig_and_rollback(llama_base, tokens, monkeypatch):
    """The hook path (peft computes the magnitude after our residual) preserves the output too; an interrupt at any
    step of a DoRA init restores every bit, the magnitude vectors included."""
    model = _peft(copy.deepcopy(llama_base), use_dora=True, init_lora_weights="loram")
    assert relative_error(logits(model, tokens), logits(llama_base, tokens)) <= 1e-5

    def factory():
        return _peft(copy.deepcopy(llama_base), ["q_proj", "down_proj"], use_dora=True)

    _interrupt_every_step(monkeypatch, factory, "pissa", {}, assert_same)


@pytest.mark.parametrize("method", ["loram", "nlora", "pissa", "inttune"])
def test_adapters_never_alias_the_base_weight_or_each_other(llama_base, method):
    """Stored adapters own their memory: training them cannot change the base weight, a residual record or another
    layer's adapters (fp32 model, where no dtype conversion copies anything)."""
    model = _peft(copy.deepcopy(llama_base))
    loram_fast.init_model(model, method, progress=False)
    storages = {}
    for name, p in model.named_parameters():
        ptr = p.untyped_storage().data_ptr()
        assert ptr not in storages, f"{name} shares memory with {storages.get(ptr)}"
        storages[ptr] = name
