"""EVA: loram_fast vs peft's ``initialize_lora_eva_weights`` on the same batches, one run.

    python bench/eva.py [--quick]

Model: a Llama-shaped decoder (2 layers, hidden 1024, MLP 2816; --quick: 512 / 1408), random weights, LoRA r = 16
on all 7 projections, EvaConfig defaults (rho = 2, tau = 0.99); 32 batches of 4×128 tokens (attention mask and
label mask applied), cycled until every layer converges. Both run the same incremental PCA steps. peft runs the
model again for every batch of every cycle and first hashes every entry of every layer's input in Python
(``HashHook``) to find layers with equal inputs; ours replays the first cycle's layer inputs (``eva_cache_mib``,
default 1024) and compares a fingerprint computed on the device. ``ours, no replay``: ``eva_cache_mib=0``. Columns:
interleaved median time, ``ratio`` = peft time / ours, ``peak_mib`` = peak RSS increase in a fresh subprocess,
``max_abs_diff`` = largest difference between peft's LoRA weights and each provider's (0: the same model), and
``ranks_moved`` = how many layers EVA gave another rank than 16.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, machine_info, measure_interleaved, peak_rss, publish, reset_peak_rss  # noqa: E402

import loram_fast  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def setup(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp = (512, 1408) if quick else (1024, 2816)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=mlp,
                                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8)).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(32):
        ids = torch.randint(0, 1000, (4, 128), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, 100:] = 0
        labels = ids.clone()
        labels[:, :8] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return base, batches, hidden, mlp


def peft_eva(base, batches):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                           init_lora_weights="eva", eva_config=EvaConfig()))
    initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    return model


def ours_eva(base, batches, **data):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    loram_fast.init_model(model, "eva", dataloader=batches, progress=False, **data)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    base, batches, hidden, mlp = setup(args.quick)
    providers = {"peft": lambda: peft_eva(base, batches), "ours": lambda: ours_eva(base, batches),
                 "ours, no replay": lambda: ours_eva(base, batches, eva_cache_mib=0)}
    if args.peak:
        before = reset_peak_rss()
        providers[args.peak]()
        print((peak_rss() - before) / 2**20)
        return
    info = machine_info("cpu")
    times = measure_interleaved(providers, warmup=0, reps=args.reps)
    models = {name: fn() for name, fn in providers.items()}
    rows = []
    for name in providers:
        peak = float(subprocess.run([sys.executable, __file__, "--peak", name] + (["--quick"] if args.quick else []),
                                    check=True, capture_output=True, text=True).stdout.split()[-1])
        cfg = models[name].peft_config["default"]
        a, b = models["peft"].state_dict(), models[name].state_dict()
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if "lora_" in k) \
            if a.keys() == b.keys() else float("inf")
        rows.append({"bench": "eva", "provider": name, "median_s": times[name]["median_s"],
                     "ratio": times["peft"]["median_s"] / times[name]["median_s"], "peak_mib": peak,
                     "max_abs_diff": diff, "ranks_moved": len(cfg.rank_pattern), "hidden": hidden, "mlp": mlp,
                     **info})
    header = heading("EVA: 2 Llama-shaped decoder layers, 7 projections, r = 16", info,
                     f"hidden {hidden}, MLP {mlp}; see bench/eva.py for the setup and columns.\n\n", peft=True)
    publish(rows, "eva_cpu", ["provider", "median_s", "ratio", "peak_mib", "max_abs_diff", "ranks_moved"], header)


if __name__ == "__main__":
    main()
