"""The README's main job: build a small Llama-shaped model from a config (no download), apply each
available init method with ``init_model``, and report method / time / output change.

    python -m loram_fast.demo [--hidden 1024] [--layers 4] [--rank 16] [--dtype float32]

"Output change" is ‖logits_after − logits_before‖ / ‖logits_before‖ at step 0: methods that write a
residual keep it at rounding level. Gradient-based methods get two random token batches as their data (their
time includes the gradient estimation). The last row times the LoRAM reference code path (a transcription of
its ``loram_init``, applied layer by layer) on the same model for comparison.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings

import torch

from . import available_methods, backends, get_method, init_model
from .baselines import reference_loram_model


def build_model(hidden: int, layers: int, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=128)
    return LlamaForCausalLM(cfg).to(dtype).eval()


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def _row(name, seconds, before, after, note=""):
    change = float((after - before).norm() / before.norm())
    return {"method": name, "time_s": seconds, "output_change": change, "note": note}


def run(hidden=1024, layers=4, rank=16, alpha=32, dtype=torch.float32, methods=None) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    backends()  # loads (or JIT-builds, first use only) the compiled backends before anything is timed
    base = build_model(hidden, layers, dtype)
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    before = _logits(base, tokens)
    # a few random token batches stand in for training data for the gradient-based methods
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": (t := torch.randint(0, 1000, (2, 32), generator=g)), "labels": t} for _ in range(2)]
    eva_batches = [{"input_ids": (t := torch.randint(0, 1000, (4, 64), generator=g)), "labels": t} for _ in range(8)]
    rows = []
    names = methods or [m.replace("<N>", "4") for m in available_methods()]
    for name in names:
        spec = get_method(name)
        data = {"dataloader": batches} if spec.needs_data else {}
        if spec.data_kind == "eva" and spec.needs_data:
            # EVA cycles its batches until the components converge: more varied data and a looser threshold keep
            # the demo short
            data = {"dataloader": eva_batches, "tau": 0.9}
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
        start = time.perf_counter()
        init_model(model, method=name, progress=False, **data)
        rows.append(_row(name, time.perf_counter() - start, before, _logits(model, tokens),
                         _note(spec)))
    # the LoRAM reference code path, layer by layer, for comparison
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
    start = time.perf_counter()
    reference_loram_model(model)
    rows.append(_row("loram (reference code path)", time.perf_counter() - start, before, _logits(model, tokens),
                     "transcription of the LoRAM repo"))
    return rows


def format_table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| method | init time (s) | output change | note |", "|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['time_s']:.3f} | {r['output_change']:.2e} | {r['note']} |")
    return "\n".join(lines) + "\n"


def _note(spec) -> str:
    if spec.replaces_weight:
        return "W replaced by its quantised form (output kept only with lora_alpha = r)"
    note = "residual in W" if spec.residual else "W untouched"
    if spec.needs_data:
        note += (", input PCA of 8 random batches (tau 0.9)" if spec.data_kind == "eva"
                 else f", {spec.data_kind} from 2 random batches")
    return note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--methods", nargs="*", default=None)
    args = p.parse_args(argv)
    # one line per notable event (e.g. the first-use build of the C++ kernels); loram_fast's messages name it
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations between peft and transformers
    dtype = getattr(torch, args.dtype)
    rows = run(args.hidden, args.layers, args.rank, args.alpha, dtype, args.methods)
    device = "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    header = (f"Llama-shaped model, hidden {args.hidden}, {args.layers} layers, r={args.rank}, alpha={args.alpha}, "
              f"{args.dtype}, on {device} ({torch.get_num_threads()} threads); backends available: "
              f"{', '.join(b for b, ok in backends().items() if ok is True)}")
    sys.stdout.write(format_table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
