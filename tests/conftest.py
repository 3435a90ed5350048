"""Shared fixtures: tiny transformers models built from configs (nothing is downloaded)."""
import contextlib
import copy
import os
import warnings

import torch

# Without a GPU, Triton kernels run under its interpreter. The switch must be set before triton is first
# imported (peft imports it), or triton's own helper functions are built for compiled mode.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Tests compare results bit for bit across calls: keep the thread count independent of the machine's momentary load
# (init_model's fair_share; tests/test_ops.py tests it explicitly).
os.environ.setdefault("LORAM_FAST_FAIR_SHARE", "0")

warnings.filterwarnings("ignore", category=FutureWarning)

# Backends this run requires (comma-separated, e.g. LORAM_FAST_REQUIRE=cpu-ext,triton as CI sets it): a missing
# one fails the run instead of skipping its tests.
REQUIRED_BACKENDS = {b.strip() for b in os.environ.get("LORAM_FAST_REQUIRE", "").split(",") if b.strip()}


def require_backend(name: str) -> None:
    """At a test module's top: skip the module when backend ``name`` is unavailable here, or fail it when
    ``LORAM_FAST_REQUIRE`` names the backend (no silent skip of a backend the run depends on)."""
    from loram_fast.ops import dispatch

    ok = dispatch.backends()[name]
    if ok is True:
        return
    if name in REQUIRED_BACKENDS:
        pytest.fail(f"backend {name!r} is required (LORAM_FAST_REQUIRE) but unavailable: {ok}", pytrace=False)
    pytest.skip(f"{name} backend unavailable: {ok}", allow_module_level=True)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="session")
def llama_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def gpt2_base():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def llama(llama_base):
    return copy.deepcopy(llama_base)


@pytest.fixture
def gpt2(gpt2_base):
    return copy.deepcopy(gpt2_base)


@pytest.fixture(scope="session")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 12), generator=g)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def perturb_adapters(model, seed: int, scale: float = 0.01) -> None:
    """Stand-in for training: move every adapter parameter away from its init, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ulp_close(got, expect, fp32_rtol=1e-6):
    """Every entry of ``got`` within one ulp of its dtype of ``expect`` (relative), fp32 within ``fp32_rtol``;
    1e-6 absolute slack for entries near zero."""
    eps = fp32_rtol if got.dtype == torch.float32 else torch.finfo(got.dtype).eps
    return bool(((got.float() - expect.float()).abs() <= eps * expect.float().abs() + 1e-6).all())


def assert_state_equal(model, saved):
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), f"{k} changed"


def exact_loram_residual(W0, coef, r, kind):
    """fp64 ``W0 − coef · V_r U_rᵀ`` from fp64 bases, and the scale ``max |coef · V_r U_rᵀ|``."""
    from loram_fast.ops import dst_basis

    m, n = W0.shape
    prod = coef * (dst_basis(m, r, kind=kind, dtype=torch.float64, backend="torch")
                   @ dst_basis(n, r, kind=kind, dtype=torch.float64, backend="torch").T)
    return W0.double() - prod, float(prod.abs().max())


def residual_close(got, W0, coef, r, kind, rtol=1e-6):
    """The LoRAM residual ``got`` (W0's dtype) against the fp64 exact one: the product within ``rtol`` of its
    largest entry, plus one rounding of the result to the dtype (one ulp: a value next to a rounding boundary may
    round either way)."""
    exact, scale = exact_loram_residual(W0, coef, r, kind)
    info = torch.finfo(got.dtype)
    ulp = 2.0 ** -23 if got.dtype == torch.float32 else info.eps
    err = (got.double().cpu() - exact).abs()
    return bool((err <= rtol * scale + ulp * exact.abs() + info.tiny * info.eps).all())  # last: subnormal spacing


def row_norms_match(w_dtype, ab_dtype, transposed, shape, name, device):
    """``lowrank_row_norms`` on backend ``name`` against the torch reference (test_ext, test_triton_kernels)."""
    from loram_fast.ops.norms import lowrank_row_norms

    g = torch.Generator().manual_seed(0)
    W = (torch.randn(*shape, generator=g) * 0.05).to(w_dtype)
    B = (torch.randn(shape[0], 6, generator=g) * 0.1).to(ab_dtype)
    A = (torch.randn(6, shape[1], generator=g) * 0.1).to(ab_dtype)
    Wd = W.T.contiguous().to(device).T if transposed else W.to(device)
    got = lowrank_row_norms(Wd, B.to(device), A.to(device), 2.0, backend=name).cpu()
    expect = lowrank_row_norms(W, B, A, 2.0, backend="torch")
    assert got.dtype == expect.dtype == torch.promote_types(w_dtype, ab_dtype)
    if expect.dtype == torch.float32:
        assert relative_error(got, expect) <= 1e-6
    else:
        assert ulp_close(got, expect)


def lm_batches(count, *, vocab, length, seed):
    """``count`` language-model batches of 2 random sequences: ``{"input_ids": ids, "labels": ids}``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (2, length), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


@contextlib.contextmanager
def peft_take_over():
    """Inside the block peft's own init names run through loram_fast (the hook's take-over); the default hook is back
    afterwards, also when the block fails."""
    from loram_fast import peft_hook

    peft_hook.uninstall()
    peft_hook.install(take_over_peft_inits=True)
    try:
        yield
    finally:
        peft_hook.uninstall()
        peft_hook.install()


@contextlib.contextmanager
def taken_over(monkeypatch, record):
    """Inside the block peft's own init names run through loram_fast (the hook's take-over), and every layer the hook
    initialises is first reported as ``record(method, options)`` (a spy on ``peft_hook.init_layer``, kept for the
    rest of the test); the default hook is back afterwards, also when the block fails."""
    from loram_fast import peft_hook

    real = peft_hook.init_layer

    def spy(layer, adapter_name, method, **options):
        record(method, options)
        return real(layer, adapter_name, method, **options)

    monkeypatch.setattr(peft_hook, "init_layer", spy)
    with peft_take_over():
        yield
