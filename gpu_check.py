"""Every GPU check in one bounded offline run (DESIGN.md section 8), `python -u bench.py --gpu --quick`:
  environment  versions; device-to-device copy GB/s, bf16 matrix product TFLOP/s
  fusion       our fusion kernel and its backward against fp64, compiled against eager; GB/s against PyTorch's
  sdpa         per attention call site of the steps: the SDPA backend PyTorch picks, each backend's error
  steps        AR decode, speculative step, tree step of a Qwen3-8B-shaped target: eager and compiled ms
  prefill      the compiled prefill (dynamic length) at two prompt lengths against eager
  gpt_oss      GPT-OSS sinks, windows, YaRN, MXFP4 experts in fp32, eager and CUDA-graph replays, against a
               CPU copy
  experts      the MoE kernel against the PyTorch reference, gpt-oss-20b and Qwen3-30B-A3B layers: error, ms
  invariant    the batch-invariant mode: verify = one-token decodes bit for bit (dense eager and compiled,
               GPT-OSS eager); its operators against cuBLAS and SDPA: ms, a row as alone
  training     a training step (block-sparse flex_attention and its backward) against the CPU path
  twin         the committed demo draft on demo/twin (random weights): tokens/s
"""
import dataclasses
import json
import multiprocessing
import os
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

import generate
from assets import DEMO, DEMO_PROMPT, build_demo_folder
from bench_gpu import (GPT_OSS_20B_CONFIG, QWEN3_8B, QWEN3_30B_A3B_CONFIG, copy_bandwidth, random_model,
                       time_experts, time_invariant_ops, time_ms)
from checkpoint import load_checkpoint, load_draft, model_args
from draft import Draft
from fuse_kernel import fuse_layers, fuse_layers_reference
from generate import compile_static
from loss import block_loss, make_batch
from model import ModelArgs, Transformer
from sampling import Sampling
from tokenizer import chat_format, chat_prompt, load_tokenizer
from trees import draft_tree, tree_layout

# openai/gpt-oss-20b's config.json (MXFP4 experts) with two of its 24 layers (one sliding, one full) and a
# smaller vocabulary
GPT_OSS_20B_2L = model_args({**GPT_OSS_20B_CONFIG, "vocab_size": 32768, "num_hidden_layers": 2,
                             "layer_types": ["sliding_attention", "full_attention"]})
# one layer of Qwen3-30B-A3B (128 bf16 experts, top-8)
QWEN3_30B_A3B_1L = model_args({**QWEN3_30B_A3B_CONFIG, "vocab_size": 32768, "num_hidden_layers": 1})
# the checks' dense target: Qwen3-8B's layers and attention, two of them, a smaller vocabulary
QWEN3_8B_2L = dataclasses.replace(QWEN3_8B, vocab_size=32768, num_hidden_layers=2,
                                  layer_types=("full_attention",) * 2)


@dataclass
class Quick:
    """What the quick run builds and how long it may take: the GPU run's sizes (the tests shrink them)."""
    device: str = "cuda"
    target: ModelArgs = dataclasses.field(default_factory=lambda: QWEN3_8B)
    checks_target: ModelArgs = dataclasses.field(default_factory=lambda: QWEN3_8B_2L)
    gpt_oss: ModelArgs = dataclasses.field(default_factory=lambda: GPT_OSS_20B_2L)
    qwen3_moe: ModelArgs = dataclasses.field(default_factory=lambda: QWEN3_30B_A3B_1L)
    moe_tokens: tuple = (1, 16, 4096)  # decode, verify, prefill
    draft_layers: int = 7  # DFlare over 9 target layers: the shape of AngelSlim's Qwen3-8B draft
    context: int = 1024
    block_size: int = 16
    tree_budget: int = 32
    prefill_lengths: tuple = (300, 1000)  # both longer than GPT-OSS's 128-token window
    train_tokens: int = 512
    train_anchors: int = 32
    fusion_rows: tuple = (16, 16384)
    copy_bytes: int = 2**31
    matmul_size: int = 8192
    twin_tokens: int = 128
    iters: int = 20
    autotune: bool = False
    backend: str = "inductor"
    deadline_s: float = 360.0


def compute_dtype(device: torch.device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def relative_error(ours, reference) -> float:
    """||ours - reference|| / ||reference||, in fp64 on the host."""
    ours, reference = ours.detach().double().cpu(), reference.detach().double().cpu()
    return float((ours - reference).norm() / reference.norm().clamp(min=1e-30))


def first_call_s(fn, device) -> float:
    """Seconds of fn's first call: with a compiled fn, its compilation (and CUDA-graph recording)."""
    t0 = time.perf_counter()
    fn()
    generate.synchronize(device)
    return time.perf_counter() - t0


def check(result: dict, ok: bool, what: str):
    """Record a failed check in the part's result: the part fails, the run goes on."""
    if not ok:
        result.setdefault("failed_checks", []).append(what)
        print(f"  FAILED: {what}", flush=True)


@torch.no_grad()
def part_environment(q: Quick, result: dict):
    """Versions, and the machine's two ceilings: device-to-device copy bandwidth, bf16 matrix product rate."""
    import triton

    device = torch.device(q.device)
    result.update(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result.update(device=props.name, capability=f"{props.major}.{props.minor}",
                      sms=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1),
                      cudnn=torch.backends.cudnn.version())
    result["copy_gbs"] = copy_bandwidth(device, q.copy_bytes)
    a, b = (torch.randn(q.matmul_size, q.matmul_size, device=device, dtype=torch.bfloat16) for _ in range(2))
    result["matmul_tflops"] = 2 * q.matmul_size**3 / time_ms(lambda: a @ b, device, q.iters) / 1e9
    print("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))


def fusion_gradients(fuse, x, w, gamma, grad_out, eps):
    """The gradients of the fusion logits and the norm weight through `fuse` (compiled or not)."""
    w, gamma = w.detach().requires_grad_(), gamma.detach().requires_grad_()
    return torch.autograd.grad(fuse(x, w, gamma, eps), (w, gamma), grad_out)


def part_fusion(q: Quick, result: dict):
    """DFlare fusion (T = 9, D = 8) at a decode block's rows and a training batch's: our operator and its
    backward, eager and compiled, against fp64; the forward timed against the PyTorch fusion it replaces."""
    device, T, D, H, eps = torch.device(q.device), 9, 8, q.target.hidden_size, q.target.rms_norm_eps
    # no CUDA graphs here: they would copy X into the graph's own input buffer at every call
    compiled = lambda fn: torch.compile(lambda *a: fn(*a), fullgraph=True, dynamic=False, backend=q.backend)
    systems = {"ours": fuse_layers, "ours compiled": compiled(fuse_layers), "pytorch": fuse_layers_reference,
               "pytorch compiled": compiled(fuse_layers_reference)}
    for N in q.fusion_rows:
        generator = torch.Generator(device).manual_seed(N)
        x, grad_out = (torch.randn(*shape, device=device, generator=generator).to(torch.bfloat16)
                       for shape in [(N, T, H), (N, D, H)])
        w = torch.randn(D, T, device=device, generator=generator)
        gamma = (1 + 0.1 * torch.randn(H, device=device, generator=generator)).to(torch.bfloat16)
        as64 = [t.double() for t in (x, w, gamma, grad_out)]
        with torch.no_grad():
            out, exact = fuse_layers(x, w, gamma, eps), fuse_layers_reference(*as64[:3], eps)
            compiled_out = systems["ours compiled"](x, w, gamma, eps)
        exact_grads = fusion_gradients(fuse_layers_reference, *as64, eps)
        result[N] = row = {"error": relative_error(out, exact),
                           "compiled_equals_eager": torch.equal(compiled_out, out)}
        for name in ("ours", "ours compiled"):
            grads = fusion_gradients(systems[name], x, w, gamma.float(), grad_out, eps)  # fp32, as trained
            row[f"{name} gradient errors"] = [relative_error(g, e) for g, e in zip(grads, exact_grads)]
        check(result, row["error"] < 1e-2, f"N={N}: our kernel's error {row['error']:.1e} (bf16: < 1e-2)")
        check(result, row["compiled_equals_eager"], f"N={N}: the compiled operator differs from eager")
        worst = max(row["ours gradient errors"] + row["ours compiled gradient errors"])
        check(result, worst < 1e-3, f"N={N}: our backward's error {worst:.1e} (< 1e-3)")
        moved = (x.numel() + N * D * H) * x.element_size()  # X read once, the output written once
        with torch.no_grad():
            for name, fn in systems.items():
                ms = time_ms(lambda: fn(x, w, gamma, eps), device, q.iters)
                row[name] = {"ms": ms, "gbs": moved / ms / 1e6}
        print(f"  N={N:<6} errors: forward {row['error']:.1e}, gradients {worst:.1e} | " + " | ".join(
            f"{name} {row[name]['ms']:.4f} ms {row[name]['gbs']:.0f} GB/s" for name in systems), flush=True)


def checks_models(q: Quick, device, dtype):
    """The checks target and a 1-layer DFlare draft for it, random, in dtype."""
    target = random_model(lambda: Transformer(q.checks_target), device, dtype)
    draft = random_model(lambda: Draft.for_target(q.checks_target, 1, block_size=q.block_size), device, dtype)
    return target, draft.bind(target)


class FirstSdpaCall(TorchFunctionMode):
    """Keeps the arguments of the first scaled_dot_product_attention call made under it."""

    def __init__(self):
        super().__init__()
        self.args = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.args is None:
            self.args = (*args, kwargs.get("attn_mask"))[:4]
        return func(*args, **kwargs)


SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.MATH)


def sdpa_backends(q, k, v, mask) -> dict:
    """The backend PyTorch picks for this call, each backend's error against fp32 math (or why it refuses)."""
    result = {"q": list(q.shape), "k": list(k.shape), "mask": list(mask.shape),
              "chosen": SDPBackend(torch._fused_sdp_choice(q, k, v, mask)).name}
    with sdpa_kernel([SDPBackend.MATH]):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    for backend in SDPA_BACKENDS:
        with warnings.catch_warnings(record=True) as reasons, sdpa_kernel([backend]):
            warnings.simplefilter("always")
            try:
                result[backend.name] = relative_error(F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                                      reference)
            except RuntimeError as e:  # the warnings give the reasons: leave out headers and other backends
                why = [str(w.message) for w in reasons if not str(w.message).rstrip().endswith("because:")
                       and "runtime disabled" not in str(w.message)]
                result[backend.name] = "refused: " + " / ".join(why or [str(e).splitlines()[0]])
    return result


@torch.no_grad()
def part_sdpa(q: Quick, result: dict):
    """Every attention call site of the steps: the SDPA backend PyTorch picks, each backend's error against
    fp32 math. Compiled steps pick the same way (same shapes, at trace time)."""
    device = torch.device(q.device)
    target, draft = checks_models(q, device, compute_dtype(device))
    max_seq_len = q.context + generate.step_span(q.block_size, q.tree_budget)
    target.setup_caches(1, max_seq_len)
    draft.setup_caches(1, max_seq_len)
    generator = torch.Generator(device).manual_seed(0)
    prompt = torch.randint(0, q.checks_target.vocab_size, (1, q.context), device=device, generator=generator)
    pos = torch.full((1,), q.context, device=device)
    block = prompt[:, :q.block_size]
    block_pos = pos[:, None] + torch.arange(q.block_size, device=device)
    guesses = torch.randn(1, q.block_size - 1, q.checks_target.vocab_size, device=device, generator=generator)
    nodes, depth, parent = draft_tree(guesses, q.tree_budget)
    tree = tree_layout(parent, pos, max_seq_len, q.block_size - 1)
    ids = draft.args.target_layer_ids
    positions = torch.arange(q.context, device=device)[None]
    sites = {f"target prefill ({q.context})": lambda: generate.prefill(target, prompt, positions, pos - 1,
                                                                       draft),
             "target decode (1)": lambda: target(block[:, :1], pos[:, None]),
             f"target verify ({q.block_size})": lambda: target(block, block_pos, capture=ids),
             f"target tree ({nodes.shape[1]})": lambda: target(nodes, pos[:, None] + depth, capture=ids,
                                                               tree=tree),
             f"draft block ({q.block_size})": lambda: draft.block_logits(draft.noise_block(block[:, 0]), pos)}
    for site, call in sites.items():
        with FirstSdpaCall() as first:
            call()
        result[site] = row = sdpa_backends(*first.args)
        errors = [f"{b.name.split('_')[0].lower()} " + (f"{row[b.name]:.1e}" if isinstance(row[b.name], float)
                                                        else "refused") for b in SDPA_BACKENDS]
        print(f"  {site:<20} q {row['q']} k {row['k']}: picks {row['chosen']} | {' '.join(errors)}",
              flush=True)
        if device.type == "cuda":
            for backend in SDPA_BACKENDS:
                if isinstance(row[backend.name], str):
                    print(f"    {backend.name}: {row[backend.name]}")
        chosen = row.get(row["chosen"])
        check(result, isinstance(chosen, float) and chosen < 2e-2,
              f"{site}: {row['chosen']}'s error {chosen} (bf16: < 2e-2)")
        check(result, device.type != "cuda" or row["chosen"] != "MATH",
              f"{site}: the math fallback (fp32 scores for every head)")


def step_calls(target, draft, steps, q: Quick) -> dict:
    """The three steps as calls on fixed inputs, decoding at position q.context."""
    device = target.embed_tokens.weight.device
    token = torch.randint(0, target.args.vocab_size, (1,), device=device)
    pos = torch.full((1,), q.context, device=device)
    active, sampling = torch.ones(1, dtype=torch.bool, device=device), Sampling()
    return {"AR decode (1 token)": lambda: steps.decode(target, token[:, None], pos[:, None], sampling),
            f"speculative step (block {q.block_size})":
                lambda: steps.speculative(target, draft, token, pos, active, sampling, q.block_size),
            f"tree step ({q.tree_budget} nodes)":
                lambda: steps.tree(target, draft, token, pos, active, sampling, q.block_size, q.tree_budget)}


@torch.no_grad()
def part_steps(q: Quick, result: dict):
    """AR decode, speculative step and tree step of the Qwen3-8B-shaped target, eager and compiled: ms, the AR
    step's weight bandwidth, the speedup at the papers' tau 6.5 (random weights accept nothing)."""
    device = torch.device(q.device)
    dtype = compute_dtype(device)
    target = random_model(lambda: Transformer(q.target), device, dtype)
    draft = random_model(lambda: Draft.for_target(q.target, q.draft_layers, block_size=q.block_size), device,
                         dtype).bind(target)
    max_seq_len = q.context + generate.step_span(q.block_size, q.tree_budget)
    target.setup_caches(1, max_seq_len)
    draft.setup_caches(1, max_seq_len)
    weight_bytes = generate.weight_bytes_per_step(target)
    print(f"  target {q.target.num_hidden_layers} layers, hidden {q.target.hidden_size}, {dtype}, "
          f"{weight_bytes / 1e9:.2f} GB of weights a step; DFlare {q.draft_layers} layers over "
          f"{len(draft.args.target_layer_ids)} target layers; context {q.context}", flush=True)
    result["weight_gb"] = weight_bytes / 1e9
    compiled = generate.compile_steps(device, q.autotune, q.backend)
    for kind, steps in [("eager", generate.EAGER), ("compiled", compiled)]:
        for name, call in step_calls(target, draft, steps, q).items():
            row = result.setdefault(name, {})
            if kind == "compiled":
                row["compile_s"] = first_call_s(call, device)
            row[f"{kind}_ms"] = time_ms(call, device, q.iters)
            compiling = f" (compiled in {row['compile_s']:.0f} s)" if kind == "compiled" else ""
            print(f"  {kind:<8} {name:<28} {row[f'{kind}_ms']:>8.3f} ms{compiling}", flush=True)
    ar_ms = result["AR decode (1 token)"]["compiled_ms"]
    step_ms = result[f"speculative step (block {q.block_size})"]["compiled_ms"]
    result["ar_weight_gbs"] = weight_bytes / ar_ms / 1e6
    result["projected_speedup_at_tau_6_5"] = 6.5 * ar_ms / step_ms
    print(f"  compiled: the AR step reads the weights at {result['ar_weight_gbs']:.0f} GB/s; a speculative "
          f"step costs {step_ms / ar_ms:.2f} AR steps: {6.5 * ar_ms / step_ms:.2f}x at tau 6.5", flush=True)


@torch.no_grad()
def part_prefill(q: Quick, result: dict):
    """The compiled prefill (a draft capturing context) at two prompt lengths against eager: one graph."""
    device = torch.device(q.device)
    target, draft = checks_models(q, device, compute_dtype(device))
    target.setup_caches(1, max(q.prefill_lengths))
    draft.setup_caches(1, max(q.prefill_lengths))
    compiled = generate.compile_steps(device, q.autotune, q.backend).prefill
    for n in q.prefill_lengths:
        generator = torch.Generator(device).manual_seed(n)
        tokens = torch.randint(0, q.checks_target.vocab_size, (1, n), device=device, generator=generator)
        last = torch.tensor([n - 1], device=device)
        args = (target, tokens, torch.arange(n, device=device)[None], last, draft)
        eager = generate.prefill(*args)
        seconds = first_call_s(lambda: compiled(*args), device)
        result[n] = row = {"error": relative_error(compiled(*args), eager), "first_call_s": seconds}
        print(f"  {n} tokens: compiled against eager {row['error']:.1e}, first call {seconds:.1f} s",
              flush=True)
        check(result, row["error"] < 3e-2, f"{n} tokens: the compiled prefill's error {row['error']:.1e}")
    graphs = counters["stats"]["unique_graphs"]
    check(result, graphs == 1, f"{graphs} graphs for {len(q.prefill_lengths)} lengths (one dynamic graph)")


@torch.no_grad()
def part_gpt_oss(q: Quick, result: dict):
    """Two GPT-OSS-20B layers in fp32 against a CPU copy: a prompt past the window, then compiled steps."""
    device = torch.device(q.device)
    n, bs = q.prefill_lengths[0], q.block_size
    target = random_model(lambda: Transformer(q.gpt_oss), device, torch.float32)
    target.setup_caches(1, n + bs)
    with torch.device("meta"):
        on_cpu = Transformer(q.gpt_oss)
    on_cpu.load_state_dict({k: v.cpu() for k, v in target.state_dict().items()}, assign=True)
    on_cpu.setup_caches(1, n + bs)
    tokens = torch.randint(0, q.gpt_oss.vocab_size, (1, n + bs), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(n + bs)[None]
    prompt, prompt_pos = tokens[:, :n], positions[:, :n]
    result["prefill_error"] = relative_error(target(prompt.to(device), prompt_pos.to(device))[0],
                                             on_cpu(prompt, prompt_pos)[0])
    forward = compile_static(lambda t, tokens, positions: t(tokens, positions)[0], device, q.autotune,
                             q.backend)
    for name, span in [("decode", slice(n, n + 1)), ("verify", slice(n, n + bs))]:
        reference = on_cpu(tokens[:, span], positions[:, span])[0]
        call = lambda: forward(target, tokens[:, span].to(device), positions[:, span].to(device))
        result[f"{name}_compile_s"] = first_call_s(call, device)
        call()  # the second call records the CUDA graph: the third replays it
        result[f"{name}_error"] = relative_error(call(), reference)
    print(f"  against the CPU: prefill ({n} tokens, eager) {result['prefill_error']:.1e}, compiled decode "
          f"{result['decode_error']:.1e}, compiled verify ({bs} tokens) {result['verify_error']:.1e}",
          flush=True)
    for name in ("prefill_error", "decode_error", "verify_error"):
        check(result, result[name] < 1e-3, f"{name} {result[name]:.1e} (fp32: < 1e-3)")


@torch.no_grad()
def part_experts(q: Quick, result: dict):
    """One MoE layer of each shape (GPT-OSS's MXFP4 experts, Qwen3-MoE's bf16 ones): dflare::moe_experts (the
    kernel on CUDA) against the PyTorch reference, error and ms."""
    device = torch.device(q.device)
    for name, args in (("gpt-oss-20b", q.gpt_oss), ("Qwen3-30B-A3B", q.qwen3_moe)):
        print(f"  {name}:", flush=True)
        result[name] = rows = time_experts(args, device, compute_dtype(device), q.iters, q.moe_tokens)
        for n, row in rows.items():
            check(result, row["error"] < 2e-2, f"{name}, {n} tokens: error {row['error']:.1e} (bf16: < 2e-2)")


def verify_equals_decodes(target, n: int, forward) -> bool:
    """After a 300-token prefill of two rows, forward(target, tokens, positions) -> (logits, every layer's
    output) of n tokens at once equals those of n one-token calls, bit for bit."""
    device = target.embed_tokens.weight.device
    context, block = (torch.randint(0, target.args.vocab_size, (2, length), device=device)
                      for length in (300, n))
    target.setup_caches(2, 300 + n)
    target(context, torch.arange(300, device=device).expand(2, -1))
    positions = 300 + torch.arange(n, device=device).expand(2, -1)
    # clones: a CUDA graph's outputs are overwritten by its next replay
    verify = [t.clone() for t in forward(target, block, positions)]
    decodes = [[t.clone() for t in forward(target, block[:, i:i + 1], positions[:, i:i + 1])]
               for i in range(n)]
    return all(torch.equal(ours, torch.cat(theirs, dim=1)) for ours, theirs in zip(verify, zip(*decodes)))


@torch.no_grad()
def part_invariant(q: Quick, result: dict):
    """The batch-invariant mode (DESIGN.md section 10) on the checks' dense target (eager and compiled) and
    GPT-OSS (sinks, a window; eager): a verify of block_size tokens gives the logits and layers of one-token
    decodes bit for bit; then its operators at the timed target's shapes against cuBLAS and SDPA."""
    device = torch.device(q.device)
    dtype = compute_dtype(device)

    def forward(target, tokens, positions):
        return target(tokens, positions, capture=tuple(range(target.args.num_hidden_layers)), invariant=True)

    compiled = generate.compile_static(forward, device, q.autotune, q.backend)
    for name, args in (("dense", q.checks_target), ("gpt_oss", q.gpt_oss)):
        target = random_model(lambda: Transformer(args), device, dtype)
        # compiled once: Inductor's code around the operators is the same for every family
        for kind, fn in (("eager", forward), ("compiled", compiled))[:2 if name == "dense" else 1]:
            result[f"{name} {kind}"] = same = verify_equals_decodes(target, q.block_size, fn)
            print(f"  {name}, {kind}: verify of {q.block_size} = one-token decodes bit for bit: {same}",
                  flush=True)
            check(result, same, f"{name}, {kind}: verify of {q.block_size} differs from one-token decodes")
    result["ops"] = time_invariant_ops(q.target, device, dtype, q.iters)
    check(result, all(row["row_as_alone"] for row in result["ops"].values()),
          "an operator's row differs from the row alone")


def training_step(draft, target, batch):
    """loss.block_loss (fp32) and its backward: the loss and the draft's gradients."""
    draft.zero_grad()
    loss, _ = block_loss(draft, target, batch)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in draft.named_parameters()}


def part_training(q: Quick, result: dict):
    """A training step (fp32, 2-layer DFlare draft) on the device's path against the CPU path: loss, grads."""
    device = torch.device(q.device)
    target = random_model(lambda: Transformer(q.checks_target), device, torch.float32)
    draft = Draft.for_target(q.checks_target, 2, target_layer_ids=(0, 1), block_size=q.block_size)
    draft = draft.to(device).bind(target)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, q.checks_target.vocab_size, q.train_tokens)
    samples = [(tokens, np.ones(q.train_tokens, np.float32))]
    anchors = [np.sort(rng.choice(q.train_tokens - q.block_size, q.train_anchors, replace=False))]
    batch = lambda on: make_batch(samples, anchors, q.block_size, 7.0, on)
    loss, grads = training_step(draft, target, batch(device))
    grads = {name: g.cpu() for name, g in grads.items()}
    ref_loss, ref_grads = training_step(draft.cpu(), target.cpu(), batch("cpu"))
    result["loss_error"] = relative_error(loss, ref_loss)
    result["grad_errors"] = {name: relative_error(grads[name], ref_grads[name]) for name in grads}
    worst = max(result["grad_errors"], key=result["grad_errors"].get)
    worst_error = result["grad_errors"][worst]
    print(f"  {q.train_tokens} tokens, {q.train_anchors} blocks of {q.block_size}: loss against the CPU "
          f"{result['loss_error']:.1e}, worst gradient ({worst}) {worst_error:.1e}", flush=True)
    check(result, result["loss_error"] < 1e-4, f"loss error {result['loss_error']:.1e} (< 1e-4)")
    check(result, worst_error < 1e-3, f"{worst}'s gradient error {worst_error:.1e} (< 1e-3)")


@torch.no_grad()
def part_twin(q: Quick, result: dict):
    """The demo DFlare draft on demo/twin (random weights), AR and speculative, compiled: tokens/s."""
    device, folder = torch.device(q.device), DEMO / "twin"
    build_demo_folder(folder)
    target = load_checkpoint(folder, device, compute_dtype(device))
    draft = load_draft(DEMO / "dflare", target, device, compute_dtype(device))
    prompt = load_tokenizer(folder).encode(chat_prompt([{"role": "user", "content": DEMO_PROMPT}],
                                                        chat_format(folder)))
    steps = generate.compile_steps(device, q.autotune, q.backend)._replace(prefill=generate.prefill)
    target.setup_caches(1, len(prompt) + q.twin_tokens + draft.args.block_size)
    draft.setup_caches(1, len(prompt) + q.twin_tokens + draft.args.block_size)
    for name, d in [("autoregressive", None), ("DFlare (demo/dflare)", draft)]:
        run = lambda n: generate.generate(target, [prompt], n, Sampling(), draft=d,
                                          block_size=draft.args.block_size, steps=steps)[1]
        compile_s = first_call_s(lambda: run(4), device)
        stats = run(q.twin_tokens)
        result[name] = row = {"tokens_per_s": stats["tokens_per_s"], "step_ms": 1000 / stats["steps_per_s"],
                              "compile_s": compile_s}
        if d is not None:
            row["tau_meaningless"] = sum(stats["acceptance_lengths"][0]) / len(stats["acceptance_lengths"][0])
        tau = f"; tau {row['tau_meaningless']:.2f}, meaningless on random weights" if d is not None else ""
        print(f"  {name:<22} {row['tokens_per_s']:>8.1f} tokens/s, {row['step_ms']:.2f} ms a step "
              f"(compiled in {compile_s:.0f} s){tau}", flush=True)


QUICK_PARTS = [(part_environment, 60), (part_fusion, 90), (part_sdpa, 60), (part_steps, 210),
               (part_prefill, 90), (part_gpt_oss, 120), (part_experts, 90), (part_invariant, 120),
               (part_training, 120), (part_twin, 240)]


def run_part(part, q: Quick, started: float, limit: float, send):
    """In the part's own process: run it until wall-clock `started` + `limit`, then send what it measured."""
    sys.stdout.reconfigure(line_buffering=True)
    result, sent = {}, threading.Lock()

    def report(error=None):
        if not sent.acquire(blocking=False):  # the other thread is reporting: the process is about to end
            time.sleep(60)
        final = dict(result)  # a copy: a part cut short may still be writing to its dict
        if error:
            final["error"] = error
        final.update(compiled_graphs=counters["stats"]["unique_graphs"],
                     cudagraph_skips=counters["inductor"]["cudagraph_skips"])
        skips = final["cudagraph_skips"]
        check(final, not skips, f"{skips} CUDA graphs skipped (the warnings above say why)")
        if torch.cuda.is_available():
            try:
                final["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
            except RuntimeError:  # after a CUDA error the device answers nothing more
                pass
        final["ok"] = "error" not in final and not final.get("failed_checks")
        send.send(final)

    def time_up():
        print(f"  time is up ({part.__name__}): reporting what it measured", flush=True)
        report(f"timed out after {limit:.0f} s")
        os._exit(1)  # the part may be stuck anywhere: end the process here

    timer = threading.Timer(started + limit - time.time(), time_up)
    timer.daemon = True
    timer.start()
    error = None
    try:
        part(q, result)
    except Exception as e:
        traceback.print_exc(file=sys.stdout)
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    timer.cancel()
    report(error)


def run_in_process(part, q: Quick, limit: float) -> dict:
    """run_part in a fresh (spawned) process: CUDA state does not survive a fork, and a CUDA error poisons the
    process it happens in. The part reports by itself at its limit; a process that cannot is killed."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=run_part, args=(part, q, time.time(), limit, send))
    process.start()
    send.close()
    result = {"ok": False, "error": f"timed out after {limit:.0f} s, unresponsive"}
    if receive.poll(limit + 30):
        try:
            result = receive.recv()
        except EOFError:
            process.join(30)
            result = {"ok": False, "error": f"the process died (exit code {process.exitcode})"}
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    return result


def run_quick(q: Quick) -> dict:
    """Every part in order, within the run's deadline; prints as it goes, then a summary and the JSON line."""
    deadline = time.monotonic() + q.deadline_s
    print(f"quick GPU check on {q.device}: {len(QUICK_PARTS)} parts within {q.deadline_s:.0f} s", flush=True)
    parts = {}
    for part, limit in QUICK_PARTS:
        name, t0 = part.__name__.removeprefix("part_"), time.monotonic()
        limit = min(limit, deadline - t0)
        if limit < 10:
            parts[name] = result = {"ok": False, "error": "skipped: the run's time is up"}
        else:
            print(f"[{name}]", flush=True)
            parts[name] = result = run_in_process(part, q, limit)
        result["seconds"] = time.monotonic() - t0
        problems = result.get("failed_checks", []) + ([result["error"]] if "error" in result else [])
        status = "ok" if result["ok"] else "FAILED: " + "; ".join(problems)
        print(f"[{name}] {status} ({result['seconds']:.0f} s)", flush=True)
    summary = {"device": q.device, "autotune": q.autotune, "parts": parts,
               "compiled_graphs": sum(p.get("compiled_graphs", 0) for p in parts.values()),
               "cudagraph_skips": sum(p.get("cudagraph_skips", 0) for p in parts.values()),
               "failed": [name for name, p in parts.items() if not p["ok"]]}
    print(f"{len(parts) - len(summary['failed'])}/{len(parts)} parts ok; {summary['compiled_graphs']} graphs "
          f"compiled, {summary['cudagraph_skips']} CUDA graphs skipped", flush=True)
    print("JSON " + json.dumps(summary, default=str), flush=True)
    return summary
