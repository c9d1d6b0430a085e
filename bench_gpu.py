"""GPU step timings on random weights: the sweep behind `python bench.py --gpu`, and helpers shared with
the quick run (gpu_check.py, `python bench.py --gpu --quick`). DESIGN.md section 8.

    python bench.py --gpu [--autotune]   # three drafts, their steps' parts, four tree budgets, eager and
                                         # compiled; gpt-oss-20b, Qwen3-30B-A3B: steps, prefill, experts;
                                         # the batch-invariant mode: steps, operators against cuBLAS, SDPA

Compiled steps are CUDA graphs; --autotune adds max-autotune's GEMM search (minutes per graph).
"""
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import generate
import trees
from attention import attention
from checkpoint import hf_name, model_args
from draft import Draft
from fuse_kernel import fuse_layers_reference
from generate import compile_static
from invariant_kernel import invariant_attention, invariant_linear
from model import MoE, ModelArgs, Transformer
from moe_kernel import moe_experts, moe_experts_reference
from sampling import Sampling

QWEN3_8B = ModelArgs(model_type="qwen3", vocab_size=151936, hidden_size=4096, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                     max_position_embeddings=40960, layer_types=("full_attention",) * 36)
# openai/gpt-oss-20b's config.json (experts in MXFP4, as released)
GPT_OSS_20B_CONFIG = {
    "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "num_hidden_layers": 24,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880,
    "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 150000, "max_position_embeddings": 131072,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "truncate": False, "original_max_position_embeddings": 4096},
    "quantization_config": {"quant_method": "mxfp4"}}
# Qwen/Qwen3-30B-A3B's config.json (experts in bf16)
QWEN3_30B_A3B_CONFIG = {
    "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 40960}
MOE_TARGETS = {"gpt-oss-20b": GPT_OSS_20B_CONFIG, "Qwen3-30B-A3B": QWEN3_30B_A3B_CONFIG}


def random_model(module_fn, device, dtype):
    """module_fn() allocated once, in dtype, on device (built on meta: no fp32 host copy, 33 GB for a
    Qwen3-8B), with small random weights, RMSNorm weights 1; DFlare fusion logits stay fp32, as loaded."""
    with torch.device("meta"):
        module = module_fn().to(dtype)
        if isinstance(module, Draft) and module.args.fusion == "layerwise":
            module.layer_fusion_weights.data = module.layer_fusion_weights.data.float()
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fill_random_(name, p)
    return module.eval()


def fill_random_(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Small random weights: RMSNorm weights 1, MXFP4 experts any e2m1 pairs with scales near 2^-6."""
    if name.endswith("norm.weight"):
        return tensor.fill_(1.0)
    if name.endswith("_blocks"):
        return tensor.random_(0, 256)
    if name.endswith("_scales"):
        return tensor.random_(119, 123)
    return tensor.normal_(0, 0.02)


def time_ms(fn, device, iters: int) -> float:
    """Median wall time of fn() in ms, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        generate.synchronize(device)
        t0 = time.perf_counter()
        fn()
        generate.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def copy_bandwidth(device, n_bytes: int) -> float:
    """GB/s of a device-to-device copy of n_bytes (read + write)."""
    x = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    return 2 * n_bytes / time_ms(lambda: x.clone(), device, 10) / 1e6


def draft_block_bytes(draft: Draft, target: Transformer) -> int:
    """Weight bytes a draft block reads: the draft's layers and norm and the target's lm_head; not the context
    fusion and projections, which only write_context reads."""
    context_only = ("fc.", "layer_fusion_weights", "hidden_norm.", "_proj_target.")
    own = sum(p.numel() * p.element_size() for name, p in draft.named_parameters()
              if not any(part in name for part in context_only))
    return own + target.lm_head.weight.numel() * target.lm_head.weight.element_size()


@torch.no_grad()
def bench_steps(target_args=QWEN3_8B, draft_layers=(5, 8), device="cuda", dtype=torch.bfloat16, compile=True,
                context=1024, block_size=16, tau=6.5, iters=50, tree_budgets=(16, 32, 64, 128),
                autotune=False):
    """Time and print the AR step; per draft its block, verify forward and speculative step, with their weight
    bandwidth and the speedup projected at acceptance length tau; then the tree step's parts per budget with
    the largest DFlare draft."""
    device = torch.device(device)
    target = random_model(lambda: Transformer(target_args), device, dtype)
    max_seq_len = context + max(2 * block_size, *tree_budgets)
    target.setup_caches(1, max_seq_len)
    steps = generate.compile_steps(device, autotune) if compile else generate.EAGER
    maybe_compile = (lambda fn: compile_static(fn, device, autotune)) if compile else (lambda fn: fn)
    sampling = Sampling()
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.full((1,), context, device=device)
    active = torch.ones(1, dtype=torch.bool, device=device)
    weight_bytes = generate.weight_bytes_per_step(target)
    copy_gbs = copy_bandwidth(device, min(2**31, weight_bytes))
    ar_ms = time_ms(lambda: steps.decode(target, token, pos[:, None], sampling), device, iters)
    verify = maybe_compile(lambda t, tokens, positions, ids: t(tokens, positions, capture=ids))
    block_positions = pos[:, None] + torch.arange(block_size, device=device)
    block_tokens = torch.zeros(1, block_size, dtype=torch.long, device=device)
    print_header(device, dtype, compile, target_args, weight_bytes, context, block_size, copy_gbs)
    print(f"{'AR step (1 token)':<34} {ar_ms:>8.3f} {weight_bytes / ar_ms / 1e6:>16.0f}")
    results = {"copy_gbs": copy_gbs, "ar_ms": ar_ms}
    for fusion, n_layers in [("linear", draft_layers[0])] + [("layerwise", n) for n in draft_layers]:
        draft = random_model(lambda: Draft.for_target(target_args, num_layers=n_layers, fusion=fusion,
                                                      block_size=block_size), device, dtype).bind(target)
        name = f"{'DFlare' if fusion == 'layerwise' else 'DFlash'} {n_layers}L"
        draft.setup_caches(1, max_seq_len)
        ids = draft.args.target_layer_ids
        draft_block = maybe_compile(lambda d, tokens, p: d.block_logits(d.noise_block(tokens[:, 0]), p))
        draft_ms = time_ms(lambda: draft_block(draft, block_tokens, pos), device, iters)
        verify_ms = time_ms(lambda: verify(target, block_tokens, block_positions, ids), device, iters)
        step = lambda: steps.speculative(target, draft, token[:, 0], pos, active, sampling, block_size)
        step_ms = time_ms(step, device, iters)
        projected = tau * ar_ms / step_ms
        draft_bytes = draft_block_bytes(draft, target)
        print(f"{f'{name} draft block':<34} {draft_ms:>8.3f} {draft_bytes / draft_ms / 1e6:>16.0f}")
        print(f"{f'verify ({block_size} tokens, capture {len(ids)})':<34} {verify_ms:>8.3f} "
              f"{weight_bytes / verify_ms / 1e6:>16.0f}")
        print(f"{f'{name} whole step':<34} {step_ms:>8.3f}   projected speedup at tau {tau}: "
              f"{projected:.2f}x")
        results[name] = {"draft_ms": draft_ms, "verify_ms": verify_ms, "step_ms": step_ms,
                         "projected_speedup": projected}
        if fusion == "layerwise":  # the same step with the PyTorch fusion (compiled: Inductor's kernel)
            draft.fuse_layers = fuse_layers_reference
            results[name]["step_ms_reference_fusion"] = ms = time_ms(step, device, iters)
            print(f"{f'{name} step, PyTorch fusion':<34} {ms:>8.3f}   (ours / this: {step_ms / ms:.2f})")
    results["tree"] = time_tree_steps(target, draft, steps, maybe_compile, pos, block_size, tree_budgets,
                                      iters)
    if target_args.model_type == "qwen3":  # the dflash package runs Qwen3 targets (transformers' classes)
        results.update(dflash_reference_row(target, block_size, context, draft_layers[0], device, dtype))
    return results


@torch.no_grad()
def bench_moe(device="cuda", dtype=torch.bfloat16, compile=True, autotune=False, prefill_len=4096,
              iters=20) -> dict:
    """Per MoE target (random weights, real shapes): the compiled steps (decode, verify of 16, speculative
    step, tree of 32), a prefill, and one layer's experts through the kernel and the PyTorch reference."""
    results = {}
    for name, config in MOE_TARGETS.items():
        target_args = model_args(config)
        print(f"== {name} ==")
        results[name] = bench_steps(target_args, draft_layers=(5,), device=device, dtype=dtype,
                                    compile=compile, iters=iters, tree_budgets=(32,), autotune=autotune)
        torch.cuda.empty_cache()
        results[name]["prefill_tokens_per_s"] = time_prefill(target_args, device, dtype, prefill_len)
        results[name]["experts"] = time_experts(target_args, device, dtype, iters)
        torch.cuda.empty_cache()
    return results


def time_prefill(target_args: ModelArgs, device, dtype, prefill_len: int) -> float:
    """Tokens/s of an eager prefill of prefill_len random tokens (logits at the last one only), printed."""
    target = random_model(lambda: Transformer(target_args), device, dtype)
    target.setup_caches(1, prefill_len)
    tokens = torch.randint(0, target_args.vocab_size, (1, prefill_len), device=device)
    positions = torch.arange(prefill_len, device=device)[None]
    last = torch.tensor([prefill_len - 1], device=device)
    ms = time_ms(lambda: target(tokens, positions, logits_at=last), torch.device(device), 3)
    print(f"{f'prefill ({prefill_len} tokens, eager)':<34} {ms:>8.1f} ms, "
          f"{prefill_len / ms * 1000:,.0f} tokens/s")
    return prefill_len / ms * 1000


def time_experts(target_args: ModelArgs, device, dtype, iters: int, token_counts=(1, 16, 4096)) -> dict:
    """One layer's experts (random routing) through dflare::moe_experts (our kernel on CUDA) and the PyTorch
    reference: ms, GB/s of the routed experts' weights, the kernel's error against the reference."""
    device = torch.device(device)
    layer = random_model(lambda: MoE(target_args), device, dtype)
    weights = (*layer.experts.weights("gate_up_proj"), *layer.experts.weights("down_proj"),
               target_args.swiglu_limit, target_args.swiglu_alpha)
    expert_bytes = sum(t.numel() * t.element_size() for t in weights[:6] if t is not None)
    expert_bytes /= target_args.num_experts
    print(f"{'experts of one layer':<34} {'kernel ms':>9} {'GB/s':>6} {'reference ms':>12} {'GB/s':>6} "
          f"{'error':>8}")
    results = {}
    for n in token_counts:
        x = torch.randn(n, target_args.hidden_size, device=device, dtype=dtype)
        scores = torch.randn(n, target_args.num_experts, device=device)
        top, expert_ids = scores.topk(target_args.num_experts_per_tok, dim=-1)
        args = (x, expert_ids, torch.softmax(top, dim=-1).to(dtype), *weights)
        read = expert_ids.unique().numel() * expert_bytes  # each routed expert's weights, once
        row = {"kernel_ms": time_ms(lambda: moe_experts(*args), device, iters),
               "reference_ms": time_ms(lambda: moe_experts_reference(*args), device, iters)}
        reference = moe_experts_reference(*args).float()
        row["error"] = ((moe_experts(*args).float() - reference).norm() / reference.norm()).item()
        print(f"{f'  {n} tokens':<34} {row['kernel_ms']:>9.3f} {read / row['kernel_ms'] / 1e6:>6.0f} "
              f"{row['reference_ms']:>12.3f} {read / row['reference_ms'] / 1e6:>6.0f} {row['error']:>8.1e}")
        results[n] = row
    return results


@torch.no_grad()
def bench_invariant(target_args=QWEN3_8B, device="cuda", dtype=torch.bfloat16, compile=True, context=1024,
                    block_size=16, iters=50, autotune=False) -> dict:
    """The batch-invariant mode's cost (DESIGN.md section 10): the AR step and a DFlare 5L speculative step
    without and with it, then its operators against the usual path's calls."""
    device = torch.device(device)
    target = random_model(lambda: Transformer(target_args), device, dtype)
    target.setup_caches(1, context + 2 * block_size)
    draft = random_model(lambda: Draft.for_target(target_args, num_layers=5, block_size=block_size),
                         device, dtype).bind(target)
    draft.setup_caches(1, context + 2 * block_size)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.full((1,), context, device=device)
    active = torch.ones(1, dtype=torch.bool, device=device)
    print(f"{'batch-invariant mode':<34} {'AR step ms':>10} {'spec. step ms':>13}")
    results = {}
    for invariant in (False, True):
        target.batch_invariant = invariant
        steps = generate.compile_steps(device, autotune) if compile else generate.EAGER
        ar_ms = time_ms(lambda: steps.decode(target, token, pos[:, None], Sampling()), device, iters)
        step_ms = time_ms(lambda: steps.speculative(target, draft, token[:, 0], pos, active, Sampling(),
                                                    block_size), device, iters)
        results["on" if invariant else "off"] = {"ar_ms": ar_ms, "step_ms": step_ms}
        print(f"{'  on' if invariant else '  off':<34} {ar_ms:>10.3f} {step_ms:>13.3f}")
    target.batch_invariant = False
    results["ops"] = time_invariant_ops(target_args, device, dtype, iters)
    return results


def time_invariant_ops(target_args: ModelArgs, device, dtype, iters: int, token_counts=(1, 16, 64),
                       cache_length=4096) -> dict:
    """dflare::invariant_linear and invariant_attention against what the usual path calls (F.linear: cuBLAS;
    SDPA) for one layer's weights, the lm_head and a cache of cache_length keys, per count of rows (a decode,
    a verify, four verifies): ms each, and whether an n-row call's first row is the row alone's, bit for
    bit."""
    device, a, results = torch.device(device), target_args, {}
    print(f"{'batch-invariant operators':<34} {'ours ms':>8} {'usual ms':>9} {'ours/usual':>10} "
          f"{'row as alone':>12}")

    def row(name, ours, usual, alone, first_of):
        results[name] = {"ours_ms": time_ms(ours, device, iters), "usual_ms": time_ms(usual, device, iters),
                         "row_as_alone": bool(torch.equal(first_of(ours()), alone()))}
        r = results[name]
        print(f"{f'  {name}':<34} {r['ours_ms']:>8.3f} {r['usual_ms']:>9.3f} "
              f"{r['ours_ms'] / r['usual_ms']:>10.2f} {str(r['row_as_alone']):>12}")

    for name, (n, k) in {"q_proj": (a.num_attention_heads * a.head_dim, a.hidden_size),
                         "up_proj": (a.intermediate_size, a.hidden_size),
                         "down_proj": (a.hidden_size, a.intermediate_size),
                         "lm_head": (a.vocab_size, a.hidden_size)}.items():
        w = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
        for m in token_counts:
            x = torch.randn(m, k, device=device, dtype=dtype)
            row(f"{name}, {m} rows", lambda: invariant_linear(x, w, None), lambda: F.linear(x, w),
                lambda: invariant_linear(x[:1], w, None), lambda out: out[:1])
    H, H_KV, D = a.num_attention_heads, a.num_key_value_heads, a.head_dim
    for m in token_counts:
        B, S = (m, 1) if m < 16 else (m // 16, 16)
        q = torch.randn(B, H, S, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, H_KV, cache_length, D, device=device, dtype=dtype) for _ in range(2))
        query_pos = torch.arange(cache_length - S, cache_length, device=device).repeat(H // H_KV)
        mask = (torch.arange(cache_length, device=device) <= query_pos[:, None]).expand(B, 1, -1, -1)
        first_mask = mask.reshape(B, 1, H // H_KV, S, cache_length)[:, :, :, 0]  # query 0's rows
        row(f"attention, {B} x {S} queries", lambda: invariant_attention(q, k, v, mask, None),
            lambda: attention(q, k, v, mask),
            lambda: invariant_attention(q[:, :, :1], k, v, first_mask, None), lambda out: out[:, :, :1])
    return results


def print_header(device, dtype, compile: bool, target_args, weight_bytes: int, context: int, block_size: int,
                 copy_gbs: float):
    """bench_steps' setup line, copy bandwidth and table heads."""
    how = ("compiled (CUDA graphs)" if device.type == "cuda" else "compiled") if compile else "eager"
    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, {dtype}, {how}; target {target_args.num_hidden_layers} layers, hidden "
          f"{target_args.hidden_size}, {weight_bytes / 1e9:.2f} GB of weights per step; context {context}, "
          f"block {block_size}")
    print(f"copy bandwidth {copy_gbs:.0f} GB/s")
    print(f"{'step':<34} {'ms':>8} {'GB/s of weights':>16}")


def dflash_reference_row(target, block_size: int, context: int, n_layers: int, device, dtype) -> dict:
    """{"dflash_reference_step_ms": ms} of the dflash package's own loop, printed; {} without the package."""
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]):  # not our code: math allowed
            ms = time_dflash_reference(target, block_size, context, n_layers, device, dtype)
        name = f"dflash package, DFlash {n_layers}L step"
        print(f"{name:<34} {ms:>8.3f}   (its own dflash_generate loop)")
        return {"dflash_reference_step_ms": ms}
    except ImportError:
        print("dflash package not importable here: reference-implementation timing skipped")
        return {}


def time_tree_steps(target, draft, steps, maybe_compile, pos, block_size: int, budgets, iters: int) -> dict:
    """Per tree budget N: ms of picking the tree (draft_tree), the verify forward of its N nodes, moving a
    block's worth of accepted cache entries, and the whole tree step."""
    device = pos.device
    pick = maybe_compile(trees.draft_tree)
    verify = maybe_compile(lambda t, tokens, positions, ids, layout: t(tokens, positions, capture=ids,
                                                                      tree=layout))
    move = maybe_compile(lambda t, source, dest: t.move_cached(source, dest))
    logits = torch.randn(1, block_size - 1, target.args.vocab_size, device=device,
                         dtype=target.lm_head.weight.dtype)
    token = torch.zeros(1, dtype=torch.long, device=device)
    active = torch.ones(1, dtype=torch.bool, device=device)
    ids = draft.args.target_layer_ids
    print(f"{'tree step, DFlare ' + str(draft.args.num_hidden_layers) + 'L':<34} {'pick':>8} {'verify':>8} "
          f"{'move':>8} {'step':>8}   (ms)")
    results = {}
    for budget in budgets:
        tokens, depth, parent = trees.draft_tree(logits, budget)
        layout = trees.tree_layout(parent, pos, target.max_seq_length, block_size - 1)
        source = layout[0][:, :block_size]
        dest = pos[:, None] + torch.arange(block_size, device=device)
        row = {"pick_ms": time_ms(lambda: pick(logits, budget), device, iters),
               "verify_ms": time_ms(lambda: verify(target, tokens, pos[:, None] + depth, ids, layout), device,
                                    iters),
               "move_ms": time_ms(lambda: move(target, source, dest), device, iters),
               "step_ms": time_ms(lambda: steps.tree(target, draft, token, pos, active, Sampling(),
                                                     block_size, budget), device, iters)}
        print(f"{f'  budget {budget} ({tokens.shape[1]} nodes)':<34} "
              + " ".join(f"{v:>8.3f}" for v in row.values()))
        results[budget] = row
    return results


def time_dflash_reference(target: Transformer, block_size: int, context: int, n_layers: int, device, dtype,
                          new_tokens: int = 32) -> float:
    """ms per draft+verify step of the z-lab `dflash` package's own loop (transformers, dynamic caches), on a
    transformers copy of the same target weights and a random DFlash draft; ImportError without it."""
    import transformers
    from dflash.model import DFlashDraftModel, dflash_generate

    a = target.args
    common = dict(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                  num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
                  head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps, rope_theta=a.rope_theta,
                  max_position_embeddings=a.max_position_embeddings, tie_word_embeddings=False)
    with torch.device("meta"):
        hf_config = transformers.Qwen3Config(num_hidden_layers=a.num_hidden_layers, **common)
        hf_target = transformers.Qwen3ForCausalLM(hf_config)
    # share our tensors (no copy); only the rotary buffers need real memory
    state = {hf_name(k): v for k, v in target.state_dict().items()}
    hf_target.load_state_dict(state, assign=True)
    with torch.device(device):
        hf_target.model.rotary_emb = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(hf_config)
    hf_target.eval()
    ours = random_model(lambda: Draft.for_target(a, n_layers, fusion="linear", block_size=block_size), device,
                        dtype)
    dflash_config = {"target_layer_ids": list(ours.args.target_layer_ids),
                     "mask_token_id": ours.args.mask_token_id}
    draft_config = transformers.Qwen3Config(num_hidden_layers=n_layers, block_size=block_size,
                                            num_target_layers=a.num_hidden_layers,
                                            dflash_config=dflash_config, **common)
    with torch.device(device):
        draft = DFlashDraftModel(draft_config).to(dtype)
    draft.load_state_dict(ours.state_dict())
    draft.eval()
    prompt = torch.zeros(1, context, dtype=torch.long, device=device)
    dflash_generate(draft, hf_target, prompt, 8, None, block_size=block_size)  # warm-up
    stats = (dflash_generate(draft, hf_target, prompt, new_tokens, None, block_size=block_size,
                             return_stats=True) if device.type == "cuda" else None)
    if stats is None:  # its timer calls torch.cuda.synchronize: time the whole loop ourselves on CPU
        t0 = time.perf_counter()
        out = dflash_generate(draft, hf_target, prompt, new_tokens, None, block_size=block_size)
        steps = max(out.shape[1] - context - 1, 1)  # random weights: about one token per step
        return (time.perf_counter() - t0) * 1000 / steps
    return stats.time_per_output_token * stats.num_output_tokens * 1000 / len(stats.acceptance_lengths)
