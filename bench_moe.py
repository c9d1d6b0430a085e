"""CPU decoding of mixture-of-experts targets against transformers on the same folders: `python bench.py
--moe` (DESIGN.md section 9). transformers is the peer a user would pick instead, so this benchmark needs it.

Two random folders in the released formats, built once under --out: GPT-OSS-shaped (hidden 1024, 32 experts of
1024, top-4, 4 layers, experts MXFP4) and Qwen3-MoE-shaped (hidden 1024, 64 experts of 512, top-8, 4 layers,
bf16). Each decode runs in a fresh process, ours and transformers' alternating, repeated: medians of tokens/s
and of peak RSS, beside a process that imports as much and loads nothing. Then the experts' FLOPs per prefill
token against top-k and E.
"""
import json
import multiprocessing
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import model as model_module
import moe_kernel
from bench_gpu import fill_random_
from checkpoint import hf_name, load_checkpoint, model_args, save_weights, write_json
from generate import generate
from model import Transformer
from sampling import Sampling

COMMON = dict(vocab_size=8192, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, initializer_range=0.02)
FAMILIES = {"GPT-OSS": dict(intermediate_size=1024, num_local_experts=32, num_experts_per_tok=4,
                            sliding_window=128),
            "Qwen3-MoE": dict(intermediate_size=2048, moe_intermediate_size=512, num_experts=64,
                              num_experts_per_tok=8, norm_topk_prob=True)}


def build_folder(folder: Path, family: str):
    """A random folder saved by transformers; GPT-OSS's experts then stored as released (MXFP4 blocks and
    scales, quantization_config mxfp4). Skipped when the folder is complete."""
    import transformers
    from safetensors.torch import load_file, save_file

    if (folder / "config.json").is_file():
        return
    torch.manual_seed(0)
    gpt_oss = family == "GPT-OSS"
    config_class = transformers.GptOssConfig if gpt_oss else transformers.Qwen3MoeConfig
    model_class = transformers.GptOssForCausalLM if gpt_oss else transformers.Qwen3MoeForCausalLM
    model = model_class(config_class(**COMMON, **FAMILIES[family])).to(torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    if gpt_oss:
        state = load_file(partial / "model.safetensors")
        g = torch.Generator().manual_seed(1)
        for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            E, in_features, out_features = state.pop(name).shape  # transformers' dense [E, in, out]
            state[name + "_blocks"] = torch.randint(0, 256, (E, out_features, in_features // 32, 16),
                                                    dtype=torch.uint8, generator=g)
            state[name + "_scales"] = torch.randint(118, 122, (E, out_features, in_features // 32),
                                                    dtype=torch.uint8, generator=g)
        save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((partial / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "mxfp4"}
        (partial / "config.json").write_text(json.dumps(config, indent=2))
    partial.rename(folder)  # whole or not at all


def decode_run(system: str, folder: str, threads: int, new_tokens: int, prompt_len: int) -> tuple:
    """In a fresh process: (tokens/s, peak RSS in GB) of greedy decoding new_tokens after a prompt, after a
    warm-up; system "ours", "transformers", or "baseline" (imports both, loads nothing)."""
    import transformers

    torch.set_num_threads(threads)
    prompt = list(range(1, prompt_len + 1))
    if system == "ours":
        model = load_checkpoint(folder, dtype=torch.bfloat16)
        model.setup_caches(1, prompt_len + new_tokens + 1)
        def run(n):
            return generate(model, [prompt], n, Sampling())
    elif system == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        ids = torch.tensor([prompt])
        def run(n):
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
    tokens_per_s = 0.0
    if system != "baseline":
        with torch.no_grad():
            run(4)
            t0 = time.perf_counter()
            run(new_tokens)
            tokens_per_s = new_tokens / (time.perf_counter() - t0)
    return tokens_per_s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KB on Linux


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def expert_flops_per_token(folder: str, tokens: int = 512) -> float:
    """FLOPs per token of one MoE layer's experts on a prefill of random hidden states, counted in the
    reference's matrix products (called as a plain function: FLOP counting does not look inside operators)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = load_checkpoint(folder, dtype=torch.float32)
    x = torch.randn(1, tokens, model.args.hidden_size)
    operator, model_module.moe_experts = model_module.moe_experts, moe_kernel.experts_one_by_one
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.layers[0].mlp(x)
    finally:
        model_module.moe_experts = operator
    router = 2 * tokens * model.args.hidden_size * model.args.num_experts
    return (counter.get_total_flops() - router) / tokens


def print_flops(folder: str, family: str):
    a = load_checkpoint(folder, dtype=torch.float32).args
    per_expert = 2 * 3 * a.hidden_size * a.moe_intermediate_size  # gate, up and down, a multiply-add each
    measured = expert_flops_per_token(folder)
    print(f"{family}: experts' FLOPs per prefill token {measured / 1e6:.2f} M = {measured / per_expert:.2f} "
          f"experts' worth (top-k {a.num_experts_per_tok}; every expert on every token: {a.num_experts})")


def bench_moe_cpu(out: Path, threads=(1, 2), repeats: int = 5, new_tokens: int = 64, prompt_len: int = 16):
    """Build the folders, then per family and thread count the alternating runs; prints a table."""
    results = {}
    for family in FAMILIES:
        folder = out / family.lower()
        in_fresh_process(build_folder, folder, family)  # ru_maxrss passes to child processes: keep ours small
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
        for n in threads:
            runs = {"ours": [], "transformers": [], "baseline": []}
            for r in range(repeats):
                order = ["ours", "transformers", "baseline"][::1 if r % 2 == 0 else -1]
                for system in order:
                    runs[system].append(in_fresh_process(decode_run, system, str(folder), n, new_tokens,
                                                         prompt_len))
            row = {system: tuple(statistics.median(v) for v in zip(*values))
                   for system, values in runs.items()}
            results[(family, n)] = row
            (ours_tps, ours_rss), (hf_tps, hf_rss), (_, base_rss) = row.values()
            print(f"{family:<10} {n} thread{'s' if n > 1 else ' '} ours {ours_tps:6.1f} tokens/s, "
                  f"transformers {hf_tps:6.1f} ({ours_tps / hf_tps:.2f}x) | peak RSS ours {ours_rss:.2f} GB, "
                  f"transformers {hf_rss:.2f} GB, baseline {base_rss:.2f} GB, checkpoint {size:.2f} GB",
                  flush=True)
        print_flops(str(folder), family)
    return results


def build_random_folder(folder: Path, config: dict):
    """A random target of config.json's shape saved as a sharded checkpoint folder (a shard per layer: one
    shard at a time in memory), experts as released (MXFP4 when the config says so); skipped when complete
    (config.json is written last)."""
    if (folder / "config.json").is_file():
        return
    with torch.device("meta"):  # the shapes and dtypes only
        model = Transformer(model_args(config)).to(torch.bfloat16)
    shards = {}
    for name, p in model.named_parameters():
        shards.setdefault(name.split(".")[1] if name.startswith("layers.") else "rest", []).append((name, p))
    weight_map = {}
    folder.mkdir(parents=True, exist_ok=True)
    for i, params in enumerate(shards.values()):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        state = {hf_name(name): fill_random_(name, torch.empty_like(p, device="cpu")) for name, p in params}
        save_weights(folder / file, state)
        weight_map.update(dict.fromkeys(state, file))
    write_json(folder / "model.safetensors.index.json", {"weight_map": weight_map})
    write_json(folder / "config.json", config)


def load_and_decode(folder: str, device: str, new_tokens: int = 8, prompt_len: int = 16):
    """Load the folder on device and decode new_tokens greedily after a prompt."""
    model = load_checkpoint(folder, device)
    model.setup_caches(1, prompt_len + new_tokens + 1)
    generate(model, [list(range(1, prompt_len + 1))], new_tokens, Sampling())
