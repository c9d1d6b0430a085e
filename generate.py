"""Generate text with a target model, alone or sped up by a DFlare / DFlash draft (DESIGN.md section 4).

    python generate.py                                                              # the embedded demo pair
    python generate.py --checkpoint TARGET_DIR --prompt "..."                      # autoregressive
    python generate.py --checkpoint TARGET_DIR --draft DRAFT_DIR --prompt "..."    # speculative

Streams the text, prints decode tokens/s and, speculating, tau (tokens committed per step) with its
histogram; --compare_ar also decodes autoregressively and reports the speedup; --tree_budget N checks a tree.
The decoding core (prefill, the steps, generate) comes first in this file; its command line follows.
"""
import argparse
import json
import sys
import time
from typing import Callable, NamedTuple

import torch

from assets import DEMO, DEMO_PROMPT, build_demo_folder, demo_target
from checkpoint import (InputError, default_dtype, is_draft, load_checkpoint, load_draft, pick_device,
                        read_config)
from draft import Draft
from model import Transformer
from sampling import Sampling, logits_to_probs, sample
from tokenizer import chat_format, chat_prompt, check_chat_tokens, load_tokenizer, stop_token_ids
from trees import tree_step


def prefill(target: Transformer, tokens, input_pos, last, draft=None):
    """Run the prompt [B, S] through the target; with a draft, also cache the prompt's context rows in it.
    Returns the logits [B, V] at each row's last prompt token (index last [B] into S): no other position's."""
    capture = draft.args.target_layer_ids if draft is not None else ()
    logits, hidden = target(tokens, input_pos, capture=capture, logits_at=last)
    if draft is not None:
        draft.write_context(hidden, input_pos)
    return logits[:, 0]


def decode_one_token(target: Transformer, token, input_pos, sampling: Sampling):
    """token, input_pos [B, 1] -> next token [B]."""
    logits, _ = target(token, input_pos, invariant=target.batch_invariant)
    return sample(logits[:, -1], sampling)[0]


def speculative_step(target: Transformer, draft: Draft, anchor_token, anchor_pos, active, sampling: Sampling,
                     block_size: int):
    """One draft-block + verify step for every row (DESIGN.md section 4). anchor_token, anchor_pos [B]: each
    row's last committed token and its position; active [B] bool. Returns tokens [B, bs] (accepted guesses,
    then the target's), n_accepted [B] (a row commits tokens[:n_accepted + 1]), next anchors and positions."""
    bs = block_size
    positions = anchor_pos[:, None] + torch.arange(bs, device=anchor_pos.device)
    draft_logits = draft.block_logits(draft.noise_block(anchor_token, bs), anchor_pos)
    draft_tokens, draft_probs = sample(draft_logits, sampling)
    block = torch.cat([anchor_token[:, None], draft_tokens], dim=1)
    # logits [B, bs, V], hidden [B, bs, T, H]
    logits, hidden = target(block, positions, capture=draft.args.target_layer_ids,
                            invariant=target.batch_invariant)
    draft.write_context(hidden, positions)
    if sampling.temperature == 0:
        tokens = logits.argmax(-1)
        n_accepted = (draft_tokens == tokens[:, :-1]).long().cumprod(1).sum(1)
    else:
        target_probs = logits_to_probs(logits, sampling)
        tokens, n_accepted = speculative_sampling(draft_tokens, draft_probs, target_probs)
    target.keep_states(n_accepted)  # recurrent layers: the state after the last accepted token
    next_token = tokens.gather(1, n_accepted[:, None])[:, 0]
    return (tokens, n_accepted, torch.where(active, next_token, anchor_token),
            anchor_pos + (n_accepted + 1) * active)


def speculative_sampling(draft_tokens, draft_probs, target_probs):
    """Accept guess x with probability min(1, p(x) / q(x)); at the first rejection sample max(0, p - q), else
    the bonus from p. draft_tokens [B, bs-1], draft_probs q [B, bs-1, V], target_probs p [B, bs, V]."""
    B, n_draft = draft_tokens.shape
    p_x = target_probs[:, :-1].gather(-1, draft_tokens[..., None])[..., 0]
    q_x = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    accepted = torch.rand_like(q_x) * q_x < p_x  # u < p(x) / q(x), without dividing by q
    n_accepted = accepted.long().cumprod(1).sum(1)
    # a replacement at every position (static shapes; the last row's residual is p), kept at n_accepted
    q_padded = torch.cat([draft_probs, draft_probs.new_zeros(B, 1, draft_probs.shape[-1])], dim=1)
    residual = (target_probs - q_padded).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target_probs)  # p == q, rounded
    replacement = (residual / torch.empty_like(residual).exponential_(1)).argmax(-1)
    drafts_padded = torch.cat([draft_tokens, draft_tokens[:, :1]], dim=1)
    from_draft = torch.arange(n_draft + 1, device=draft_tokens.device) < n_accepted[:, None]
    return torch.where(from_draft, drafts_padded, replacement), n_accepted


class Steps(NamedTuple):
    prefill: Callable
    decode: Callable
    speculative: Callable
    tree: Callable


EAGER = Steps(prefill, decode_one_token, speculative_step, tree_step)


def compile_steps(device: torch.device, autotune: bool = True, backend: str = "inductor") -> Steps:
    """Compiled prefill (dynamic prompt length) and steps (static shapes: CUDA graphs on GPU, max-autotune
    when autotune; a symbolic tree budget compiled for minutes). backend: another torch.compile backend."""
    return Steps(torch.compile(prefill, fullgraph=True, dynamic=True, backend=backend),
                 *(compile_static(step, device, autotune, backend) for step in EAGER[1:]))


def compile_static(fn, device: torch.device, autotune: bool = True, backend: str = "inductor"):
    """torch.compile of a function on static shapes, as compile_steps compiles the steps."""
    if backend != "inductor":
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
    mode = ("max-autotune" if autotune else "reduce-overhead") if device.type == "cuda" else None
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Outputs:
    """New tokens per row. A row ends at its first stop token or at max_new_tokens, as the target alone."""

    def __init__(self, batch_size, max_new_tokens, stop_ids, on_token):
        self.tokens = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size
        self.max_new_tokens, self.stop_ids, self.on_token = max_new_tokens, set(stop_ids), on_token

    def add(self, row, new_tokens) -> int:
        """Append tokens to a row until it is done; returns how many were kept."""
        kept = 0
        for t in new_tokens:
            if self.done[row]:
                break
            self.tokens[row].append(t)
            self.done[row] = t in self.stop_ids or len(self.tokens[row]) == self.max_new_tokens
            kept += 1
            if self.on_token:
                self.on_token(row, t)
        return kept


@torch.no_grad()
def generate(target: Transformer, prompts: list, max_new_tokens: int, sampling: Sampling, stop_ids=(),
             on_token=None, draft: Draft | None = None, block_size: int = 0, steps: Steps = EAGER,
             tree_budget: int = 0):
    """Decode a batch of token-id prompts: autoregressive, or speculative with a draft (a tree of tree_budget
    nodes per step if > 0). Returns the new tokens per row and stats (with a draft "acceptance_lengths": per
    row, the tokens each step committed); on_token(row, token_id) sees every token kept."""
    device = target.embed_tokens.weight.device
    recurrent = any(layer.recurrent for layer in target.layers)
    if draft is not None and recurrent and target.step_tokens < step_span(block_size, tree_budget):
        raise ValueError(f"the target's caches keep {target.step_tokens} tokens' states per step: call "
                         f"setup_caches(..., step_tokens={step_span(block_size, tree_budget)})")
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(B, max(len(p) for p in prompts), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    # shorter prompts are right-padded; the padding's cache entries are overwritten before any query sees them
    positions = torch.arange(tokens.shape[1], device=device)[None].expand(B, -1)
    synchronize(device)
    t0 = time.perf_counter()
    next_token = sample(steps.prefill(target, tokens, positions, lengths - 1, draft), sampling)[0]
    out = Outputs(B, max_new_tokens, stop_ids, on_token)
    for row, t in enumerate(next_token.tolist()):
        out.add(row, [t])
    synchronize(device)
    t1 = time.perf_counter()
    if draft is None:
        n_steps = autoregressive_loop(target, next_token, lengths, sampling, steps, out)
    else:
        n_steps, acceptance_lengths = speculative_loop(target, draft, next_token, lengths, sampling, steps,
                                                       out, block_size, tree_budget)
    synchronize(device)
    decode_time = max(time.perf_counter() - t1, 1e-9)
    stats = {"prefill_s": t1 - t0, "decode_s": decode_time, "decode_steps": n_steps,
             "tokens_per_s": sum(len(o) - 1 for o in out.tokens) / decode_time,
             "steps_per_s": n_steps / decode_time}
    if draft is not None:
        stats["acceptance_lengths"] = acceptance_lengths
    return out.tokens, stats


def autoregressive_loop(target, next_token, input_pos, sampling, steps: Steps, out: Outputs) -> int:
    """One token per step until every row is done (input_pos [B]: each row's next position); the steps."""
    n_steps = 0
    while not all(out.done):
        next_token = steps.decode(target, next_token[:, None].clone(), input_pos[:, None].clone(), sampling)
        input_pos = input_pos + 1
        for row, t in enumerate(next_token.tolist()):
            out.add(row, [t])
        n_steps += 1
    return n_steps


def speculative_loop(target, draft, next_token, input_pos, sampling, steps: Steps, out: Outputs,
                     block_size: int, tree_budget: int):
    """Draft + verify steps until every row is done. Returns the steps, and per row what each committed."""
    device, B = next_token.device, len(out.tokens)
    n_steps, acceptance_lengths, active_rows = 0, [[] for _ in range(B)], None
    while not all(out.done):
        rows_active = [not d for d in out.done]
        if rows_active != active_rows:
            active_rows, active = rows_active, torch.tensor(rows_active, device=device)
        if tree_budget:
            block, n_accepted, next_token, input_pos = steps.tree(target, draft, next_token, input_pos,
                                                                  active, sampling, block_size, tree_budget)
        else:
            block, n_accepted, next_token, input_pos = steps.speculative(target, draft, next_token, input_pos,
                                                                         active, sampling, block_size)
        next_token = next_token.clone()  # CUDA graphs reuse output memory
        # a finished row's frozen step must stay inside the cache; active rows never reach the clamp
        input_pos = input_pos.clamp(max=target.max_seq_length - step_span(block_size, tree_budget))
        rows = torch.cat([n_accepted[:, None], block], dim=1).tolist()  # the step's one host sync
        for row, (n, *block_tokens) in enumerate(rows):
            if not out.done[row]:
                acceptance_lengths[row].append(out.add(row, block_tokens[:n + 1]))
        n_steps += 1
    return n_steps, acceptance_lengths


def step_span(block_size: int, tree_budget: int) -> int:
    """Cache slots a speculative step writes from its anchor on: the block, or the tree's nodes."""
    return max(block_size, tree_budget)


@torch.no_grad()
def where_outputs_part(target: Transformer, prompt: list, ar_tokens: list, tokens: list) -> tuple:
    """(index of the first token where two greedy outputs differ, the gap between the target's two best logits
    there, recomputed after the prompt and the common tokens): a gap within rounding says the two parted at a
    near-tie, not at a bug (DESIGN.md section 10). Uses the target's caches."""
    index = next(i for i, (a, b) in enumerate(zip(ar_tokens + [None], tokens + [None])) if a != b)
    context = torch.tensor([prompt + ar_tokens[:index]], device=target.lm_head.weight.device)
    positions = torch.arange(context.shape[1], device=context.device)[None]
    logits, _ = target(context, positions, logits_at=positions[:, -1])
    best = logits[0, 0].float().topk(2).values
    return index, float(best[0] - best[1])


def weight_bytes_per_step(model: Transformer) -> int:
    """Weight bytes a decode step reads: all but an untied embedding; experts at their share (top-k of E)."""
    a, total = model.args, 0
    for name, p in model.named_parameters():
        if name == "embed_tokens.weight" and not a.tie_word_embeddings:
            continue
        share = a.num_experts_per_tok / a.num_experts if ".experts." in name else 1.0
        total += p.numel() * p.element_size() * share
    return int(total)


# ------------------------------------------------------------------------------------------------------------
# The command line

def argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="Hugging Face model folder (config.json, *.safetensors); default: the embedded demo "
                        "pair (demo/target with demo/dflare, compared with AR)")
    p.add_argument("--draft", default=None,
                   help="DFlare / DFlash draft folder: speculative decoding (without it: autoregressive)")
    p.add_argument("--block_size", type=int, default=None,
                   help="tokens per draft block, at most the draft's own (default: the draft's)")
    p.add_argument("--tree_budget", type=int, default=0,
                   help="verify a tree of this many nodes per step, the draft's most likely continuations, "
                        "instead of its one best guess per position (default: 0, the chain)")
    p.add_argument("--compare_ar", action="store_true",
                   help="also decode autoregressively in the same run and report the speedup")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for several prompts")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the chat format")
    p.add_argument("--interactive", action="store_true",
                   help="chat on the terminal, turn after turn (the chat format; Ctrl-D ends it)")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--thinking", choices=("on", "off"), default="on",
                   help="thinking mode for --chat, where the chat template has one (Qwen3)")
    p.add_argument("--reasoning_effort", choices=("low", "medium", "high"), default="medium",
                   help="GPT-OSS reasoning effort for --chat")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--batch_size", type=int, default=1,
                   help="sequences decoded together; a single prompt is repeated to fill the batch")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="KV cache length (default: longest prompt + max_new_tokens + block, rounded up to "
                        "256)")
    p.add_argument("--batch_invariant", action="store_true",
                   help="compute each token of a verify as a lone token is computed, so that greedy "
                        "speculative output equals autoregressive output bit for bit in any dtype (on CPU: "
                        "about a third fewer speculative tokens/s in bf16)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile prefill and step (CUDA graphs on GPU); compiling is untimed warm-up")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on cuda and for the embedded demo, float32 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    return p


def parse_args(argv=None):
    p = argument_parser()
    args = p.parse_args(argv)
    if args.checkpoint is None:
        args.checkpoint = demo_target(p, "--checkpoint MODEL_DIR")
        args.draft = args.draft or str(DEMO / "dflare")
        args.compare_ar = not args.interactive
        args.chat = True
        args.dtype = args.dtype or "bfloat16"  # on CPU too: twice fp32's speed with bf16 instructions
        args.prompt = args.prompt or [DEMO_PROMPT]
    checks = [(args.max_new_tokens < 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"),
              (args.temperature < 0, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"),
              (args.top_k < 0, f"--top_k must be >= 0 (0 = off), got {args.top_k}"),
              (not 0 < args.top_p <= 1, f"--top_p must be in (0, 1] (1 = off), got {args.top_p}"),
              (args.batch_size < 1, f"--batch_size must be >= 1, got {args.batch_size}"),
              (args.max_seq_len is not None and args.max_seq_len < 2,
               f"--max_seq_len must be >= 2, got {args.max_seq_len}"),
              (args.draft is None and (args.block_size is not None or args.compare_ar or args.tree_budget),
               "--block_size, --tree_budget and --compare_ar need --draft DRAFT_DIR"),
              (args.tree_budget == 1 or args.tree_budget < 0,
               f"--tree_budget must be 0 (the chain) or >= 2 (the root and a guess), got {args.tree_budget}"),
              (args.interactive and (args.compare_ar or args.json or args.batch_size > 1),
               "--interactive is one conversation: without --compare_ar, --json and --batch_size"),
              (args.block_size is not None and args.block_size < 2,
               f"--block_size must be >= 2 (the anchor and at least one drafted token), got "
               f"{args.block_size}")]
    for failed, message in checks:
        if failed:
            p.error(message)
    args.prompt = args.prompt or ["Hello, my name is"]
    if len(args.prompt) > 1 and args.batch_size > len(args.prompt):
        p.error(f"--batch_size {args.batch_size} exceeds the {len(args.prompt)} prompts given")
    return args


def encode_prompts(args, tokenizer) -> list:
    texts = args.prompt
    if args.chat:
        fmt = chat_format(args.checkpoint)
        check_chat_tokens(tokenizer, fmt)
        texts = [chat_prompt(([{"role": "system", "content": args.system}] if args.system else [])
                             + [{"role": "user", "content": t}], fmt, thinking=args.thinking == "on",
                             reasoning_effort=args.reasoning_effort) for t in texts]
    prompts = [tokenizer.encode(t) for t in texts]
    for text, ids in zip(args.prompt, prompts):
        if not ids:
            raise InputError(f"--prompt {text!r} encodes to no tokens: give a prompt with some text")
    return prompts


def cache_length(longest_prompt: int, max_new_tokens: int, max_seq_len: int | None,
                 max_position_embeddings: int, block_size: int = 0, tree_budget: int = 0) -> int:
    """KV cache length: prompt + new tokens (+ step_span, speculating); --max_seq_len if given, checked."""
    span = step_span(block_size, tree_budget)
    needed = longest_prompt + max_new_tokens + span
    block = (f" + tree budget ({span})" if span > block_size else f" + block size ({span})") if span else ""
    over = needed - max_position_embeddings
    if over > 0:
        fixes = ([f"lower --max_new_tokens to {max_new_tokens - over}"] if over < max_new_tokens else []) \
            + ([f"shorten the prompt by {over} tokens"] if over < longest_prompt else [])
        fix = " or ".join(fixes) or f"take {over} tokens off the prompt and --max_new_tokens together"
        raise InputError(f"prompt ({longest_prompt} tokens) + --max_new_tokens ({max_new_tokens}){block} = "
                         f"{needed} exceeds the model's context of {max_position_embeddings} tokens: {fix}")
    if max_seq_len is None:
        return max(needed, min(-(-needed // 256) * 256, max_position_embeddings))
    if longest_prompt > max_seq_len:
        raise InputError(f"prompt has {longest_prompt} tokens, longer than --max_seq_len {max_seq_len}: "
                         f"shorten the prompt or raise --max_seq_len")
    if needed > max_seq_len:
        raise InputError(f"prompt ({longest_prompt} tokens) + --max_new_tokens ({max_new_tokens}){block} "
                         f"exceeds --max_seq_len {max_seq_len}: raise --max_seq_len or lower "
                         f"--max_new_tokens")
    return max_seq_len


def acceptance_histogram(lengths: list, block_size: int) -> str:
    counts = [lengths.count(n) for n in range(1, block_size + 1)]
    scale = 40 / max(max(counts), 1)
    return "\n".join(f"{n:>4} | {'#' * round(c * scale):<40} {c}" for n, c in enumerate(counts, 1) if c)


def load_models(args, device, dtype, log):
    """The target, the draft if any, and the block size to draft (at most the draft's)."""
    t0 = time.perf_counter()
    model = load_checkpoint(args.checkpoint, device, dtype)
    model.batch_invariant = args.batch_invariant
    draft = load_draft(args.draft, model, device, dtype) if args.draft else None
    block_size = 0
    if draft is not None:
        block_size = args.block_size or draft.args.block_size
        if block_size > draft.args.block_size:
            raise InputError(f"--block_size {block_size} is larger than the draft's block size "
                             f"{draft.args.block_size}: use at most {draft.args.block_size}")
    log(f"loaded {args.checkpoint}{' + draft ' + str(args.draft) if draft else ''} ({model.args.model_type}, "
        f"{dtype}, {device}) in {time.perf_counter() - t0:.1f} s"
        + (f"; not used (text only): {model.not_used}" if model.not_used else ""))
    return model, draft, block_size


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = default_dtype(device, args.dtype)
    build_demo_folder(args.checkpoint)
    config = read_config(args.checkpoint)
    if is_draft(args.checkpoint):
        raise InputError(f"--checkpoint {args.checkpoint!r} is a draft: pass it as --draft, with its target "
                         f"model as --checkpoint")
    tokenizer = load_tokenizer(args.checkpoint)
    prompts = [] if args.interactive else encode_prompts(args, tokenizer)  # a bad prompt fails before loading
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    model, draft, block_size = load_models(args, device, dtype, log)
    stop_ids = stop_token_ids(args.checkpoint, config, tokenizer)
    steps = compile_steps(device) if args.compile else EAGER
    if args.interactive:
        return chat_loop(args, model, draft, tokenizer, stop_ids, block_size, steps, log)
    if len(prompts) == 1:
        prompts = prompts * args.batch_size
    batch_size = min(args.batch_size, len(prompts))
    max_seq_len = cache_length(max(map(len, prompts)), args.max_new_tokens, args.max_seq_len,
                               model.args.max_position_embeddings, block_size, args.tree_budget)
    model.setup_caches(batch_size, max_seq_len, step_span(block_size, args.tree_budget))
    if draft is not None:
        draft.setup_caches(batch_size, max_seq_len)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if args.compile:
        t0 = time.perf_counter()
        drafts = ([None] if draft is None or args.compare_ar else []) + ([draft] if draft is not None else [])
        for d in drafts:
            generate(model, prompts[:batch_size], 2, sampling, draft=d, block_size=block_size, steps=steps,
                     tree_budget=args.tree_budget)
        log(f"compiled in {time.perf_counter() - t0:.1f} s")
    torch.manual_seed(args.seed)
    totals = {"tokens": 0, "decode_s": 0.0, "ar_tokens": 0, "ar_decode_s": 0.0, "identical": 0, "rows": 0,
              "acceptance": [], "gaps": []}
    for start in range(0, len(prompts), batch_size):
        decode_batch(args, model, draft, tokenizer, prompts, start, batch_size, sampling, stop_ids, steps,
                     block_size, totals, log)
    if draft is not None:
        log_speculative_totals(totals, args, block_size, batch_size, sampling, log)


def decode_batch(args, model, draft, tokenizer, prompts, start: int, batch_size: int, sampling, stop_ids,
                 steps, block_size: int, totals: dict, log):
    """The prompts of one batch (the last padded with copies), printed as text or JSON, added to totals."""
    batch = prompts[start:start + batch_size]
    n_real = len(batch)
    batch = batch + [batch[-1]] * (batch_size - n_real)  # the caches have batch_size rows
    stream = batch_size == 1 and not args.json
    if args.compare_ar:
        ar_outputs, ar_stats = generate(model, batch, args.max_new_tokens, sampling, stop_ids, steps=steps)
    if stream:
        print(args.prompt[start] + "\n" if args.chat else tokenizer.decode(batch[0]), end="", flush=True)
    outputs, stats = generate(model, batch, args.max_new_tokens, sampling, stop_ids,
                              on_token=StreamPrinter(tokenizer, stop_ids) if stream else None, draft=draft,
                              block_size=block_size, steps=steps, tree_budget=args.tree_budget)
    for row in range(n_real):
        tokens = outputs[row]
        text = tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens)
        record = {"prompt": tokenizer.decode(batch[row]), "tokens": tokens, "text": text,
                  "tokens_per_s": (len(tokens) - 1) / stats["decode_s"], "prefill_s": stats["prefill_s"]}
        totals["tokens"] += len(tokens) - 1
        totals["rows"] += 1
        if draft is not None:
            lengths = stats["acceptance_lengths"][row]
            totals["acceptance"] += lengths
            record.update(acceptance_lengths=lengths, tau=sum(lengths) / len(lengths) if lengths else None)
        if args.compare_ar:
            ar_tokens = ar_outputs[row]
            record["ar_tokens_per_s"] = (len(ar_tokens) - 1) / ar_stats["decode_s"]
            record["speedup"] = record["tokens_per_s"] / max(record["ar_tokens_per_s"], 1e-9)
            if sampling.temperature == 0:
                record["identical_to_ar"] = ar_tokens == tokens
                totals["identical"] += ar_tokens == tokens
                if ar_tokens != tokens:
                    record["parts_at"], record["top2_logit_gap"] = where_outputs_part(model, batch[row],
                                                                                     ar_tokens, tokens)
                    totals["gaps"].append(record["top2_logit_gap"])
            totals["ar_tokens"] += len(ar_tokens) - 1
        if args.json:
            print(json.dumps(record), flush=True)
        elif not stream:
            print(f"--- prompt {start + row}\n{record['prompt']}{text}")
    totals["decode_s"] += stats["decode_s"]
    totals["ar_decode_s"] += ar_stats["decode_s"] if args.compare_ar else 0.0
    if stream:
        print(flush=True)
    if draft is None:
        log(f"prefill {stats['prefill_s'] * 1000:.1f} ms | decode {stats['tokens_per_s']:.1f} tokens/s "
            f"(batch {batch_size}) | {weight_bytes_per_step(model) * stats['steps_per_s'] / 1e9:.2f} GB/s of "
            f"weights")


def log_speculative_totals(totals: dict, args, block_size: int, batch_size: int, sampling, log):
    """tau, its histogram, tokens/s and, with --compare_ar, the speedup over AR and how many outputs match."""
    tokens_per_s = totals["tokens"] / max(totals["decode_s"], 1e-9)
    acceptance = totals["acceptance"]
    tau = sum(acceptance) / max(len(acceptance), 1)
    tree = f", trees of {args.tree_budget} nodes" if args.tree_budget else ""
    depth = f", mean accepted depth {tau - 1:.2f}" if args.tree_budget else ""
    log(f"speculative decoding, block {block_size}{tree}: tau {tau:.2f} tokens per draft+verify step "
        f"({len(acceptance)} steps{depth}) | {tokens_per_s:.1f} tokens/s (batch {batch_size})")
    log("tokens committed per step:\n" + acceptance_histogram(acceptance, block_size))
    if args.compare_ar:
        ar_tokens_per_s = totals["ar_tokens"] / max(totals["ar_decode_s"], 1e-9)
        same = (f" | greedy output identical to AR for {totals['identical']}/{totals['rows']} prompts"
                if sampling.temperature == 0 else "")
        if totals["gaps"]:
            same += (f"; the others part where the target's two best logits are at most "
                     f"{max(totals['gaps']):.3g} apart (rounding at a near-tie: --batch_invariant computes "
                     f"them alike)")
        log(f"autoregressive {ar_tokens_per_s:.1f} tokens/s | speedup "
            f"{tokens_per_s / max(ar_tokens_per_s, 1e-9):.2f}x{same}")


def chat_loop(args, model, draft, tokenizer, stop_ids, block_size: int, steps, log):
    """--interactive: a multi-turn chat on the terminal, each answer streamed, then its tokens/s (and tau).
    The caches grow only when the conversation needs more: a new cache length recompiles a compiled step."""
    fmt = chat_format(args.checkpoint)
    check_chat_tokens(tokenizer, fmt)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    log("chat: type a message and Enter; Ctrl-D ends")
    allocated = 0
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            print()
            return
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        ids = tokenizer.encode(chat_prompt(messages, fmt, thinking=args.thinking == "on",
                                           reasoning_effort=args.reasoning_effort))
        try:
            max_seq_len = cache_length(len(ids), args.max_new_tokens, args.max_seq_len,
                                       model.args.max_position_embeddings, block_size, args.tree_budget)
        except InputError as e:  # the conversation outgrew the context: say so, keep the session
            log(f"error: {e}")
            messages.pop()
            continue
        if max_seq_len > allocated:
            model.setup_caches(1, max_seq_len, step_span(block_size, args.tree_budget))
            if draft is not None:
                draft.setup_caches(1, max_seq_len)
            allocated = max_seq_len
        outputs, stats = generate(model, [ids], args.max_new_tokens, sampling, stop_ids,
                                  on_token=StreamPrinter(tokenizer, stop_ids), draft=draft,
                                  block_size=block_size, steps=steps, tree_budget=args.tree_budget)
        tokens = outputs[0]
        print(flush=True)
        answer = tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens
        messages.append({"role": "assistant", "content": tokenizer.decode(answer)})
        lengths = stats.get("acceptance_lengths", [[]])[0]
        log(f"[{stats['tokens_per_s']:.1f} tokens/s" + (f", tau {sum(lengths) / len(lengths):.2f}]" if lengths
                                                         else "]"))


class StreamPrinter:
    """Prints row 0's tokens as they come, holding back bytes of a character that is not complete yet."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids, self.ids, self.printed = tokenizer, set(stop_ids), [], 0

    def __call__(self, row, token):
        if row != 0 or token in self.stop_ids:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.printed:], end="", flush=True)
            self.printed = len(text)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
