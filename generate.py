"""Generate text with a target model, alone or sped up by a DFlare / DFlash draft (DESIGN.md section 4).

    python generate.py                                                              # the embedded demo pair
    python generate.py --checkpoint TARGET_DIR --prompt "..."                      # autoregressive
    python generate.py --checkpoint TARGET_DIR --draft DRAFT_DIR --prompt "..."    # speculative

Everything runs on static KV caches indexed by absolute position. Autoregressive: one compiled prefill, then one
compiled single-token step per token. Speculative: the prefill also caches the prompt's context rows in the draft;
then every step is one function on static shapes (compiled into one graph, CUDA graphs on GPU):

    draft block [anchor, MASK x bs-1] -> bs-1 guesses -> target verifies the bs tokens in one forward (capturing
    its hidden states) -> accept the longest agreeing prefix + one token of the target's -> the block's hidden
    states become draft context (rows past the accepted ones are masked by position, overwritten later)

With --tree_budget N the target verifies a tree instead: the N-1 continuations the draft finds most likely, in one
forward, each node seeing only its ancestors; the path the target's own choices take through it is committed.

The host reads the committed tokens and their count once per step. Prints the text (streamed for a single
sequence), decode tokens/s and, speculating, tau (tokens committed per step) with its histogram; --compare_ar
measures autoregressive decoding in the same run and reports the speedup.
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from draft import Draft
from model import InputError, Transformer, is_draft, load_checkpoint, read_config
from tokenizer import chat_format, chat_prompt, check_chat_tokens, load_tokenizer, stop_token_ids

DEMO = Path(__file__).resolve().parent / "demo"  # SmolLM2-135M-Instruct and the drafts demo.py trained for it
DEMO_PROMPT = "Explain in a few sentences why the sky is blue."  # not among the drafts' training prompts


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


def logits_to_probs(logits, s: Sampling):
    """Target distribution after temperature, top-k and top-p; [..., V] in fp32."""
    logits = logits.float() / max(s.temperature, 1e-5)
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= s.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits, s: Sampling):
    """Next token ids [...] from logits [..., V]. Exponential-race sampling needs no host sync."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, s)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def prefill(target: Transformer, tokens, input_pos, last, draft=None):
    """Run the prompt [B, S] through the target; with a draft, also cache the prompt's context rows in it.
    Returns the logits [B, V] at each row's last prompt token (index last [B] into S): no other position's."""
    logits, hidden = target(tokens, input_pos, capture=draft.args.target_layer_ids if draft is not None else (),
                            logits_at=last)
    if draft is not None:
        draft.write_context(hidden, input_pos)
    return logits[:, 0]


def decode_one_token(target: Transformer, token, input_pos, sampling: Sampling):
    """token, input_pos [B, 1] -> next token [B]."""
    logits, _ = target(token, input_pos)
    return sample(logits[:, -1], sampling)


def speculative_step(target: Transformer, draft: Draft, anchor_token, anchor_pos, active, sampling: Sampling,
                     block_size: int):
    """One draft-block + verify step for every row, on static shapes (DESIGN.md section 4).

    anchor_token, anchor_pos [B]: each row's last committed token (not yet seen by the target) and its position;
    active [B] bool: finished rows stay where they are. The draft's context cache must hold every position before
    the anchor. Returns tokens [B, bs] (the accepted draft tokens, then the target's own token), n_accepted [B]
    (the row commits tokens[:n_accepted + 1]), and each row's next anchor token and position.
    """
    bs = block_size
    positions = anchor_pos[:, None] + torch.arange(bs, device=anchor_pos.device)  # [B, bs]
    draft_logits = draft.block_logits(target, draft.noise_block(anchor_token, bs), anchor_pos)  # [B, bs-1, V]
    if sampling.temperature == 0:
        draft_tokens = draft_logits.argmax(-1)
    else:
        draft_probs = logits_to_probs(draft_logits, sampling)
        draft_tokens = (draft_probs / torch.empty_like(draft_probs).exponential_(1)).argmax(-1)
    block = torch.cat([anchor_token[:, None], draft_tokens], dim=1)
    logits, hidden = target(block, positions, capture=draft.args.target_layer_ids)  # [B, bs, V], [B, bs, T, H]
    # The block's rows become draft context; those past the accepted ones sit at positions >= the next anchor,
    # where they are masked until overwritten.
    draft.write_context(hidden, positions)
    if sampling.temperature == 0:
        # greedy: accepted drafts equal the target's argmax, so the target's tokens are the committed ones
        tokens = logits.argmax(-1)
        n_accepted = (draft_tokens == tokens[:, :-1]).long().cumprod(1).sum(1)
    else:
        tokens, n_accepted = speculative_sampling(draft_tokens, draft_probs, logits_to_probs(logits, sampling))
    next_token = tokens.gather(1, n_accepted[:, None])[:, 0]
    return (tokens, n_accepted, torch.where(active, next_token, anchor_token),
            anchor_pos + (n_accepted + 1) * active)


def speculative_sampling(draft_tokens, draft_probs, target_probs):
    """Accept draft token x with probability min(1, p(x) / q(x)); at the first rejection sample from
    normalise(max(0, p - q)); after bs-1 acceptances sample the bonus from p. The result is distributed exactly as
    the target's own samples. draft_tokens [B, bs-1], draft_probs q [B, bs-1, V], target_probs p [B, bs, V]."""
    B, n_draft = draft_tokens.shape
    p_x = target_probs[:, :-1].gather(-1, draft_tokens[..., None])[..., 0]
    q_x = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    accepted = torch.rand_like(q_x) * q_x < p_x  # u < p(x) / q(x), without dividing by q
    n_accepted = accepted.long().cumprod(1).sum(1)
    # sample a replacement at every position (static shapes), keep the one at n_accepted
    q_padded = torch.cat([draft_probs, draft_probs.new_zeros(B, 1, draft_probs.shape[-1])], dim=1)
    residual = (target_probs - q_padded).clamp(min=0)  # the last row is p itself
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target_probs)  # p == q up to rounding
    replacement = (residual / torch.empty_like(residual).exponential_(1)).argmax(-1)  # [B, bs]
    drafts_padded = torch.cat([draft_tokens, draft_tokens[:, :1]], dim=1)
    from_draft = torch.arange(n_draft + 1, device=draft_tokens.device) < n_accepted[:, None]
    return torch.where(from_draft, drafts_padded, replacement), n_accepted


def draft_tree(draft_logits, budget: int):
    """The tree of the budget - 1 continuations of the anchor that the draft finds most likely, on static shapes.

    draft_logits [B, D, V] are the draft's guesses for depths 1..D, each position on its own, so a prefix x_1..x_d
    scores sum_k log q_k(x_k) (the surrogate of DDTree). A prefix scores at least as high as its extensions, so the
    best prefixes form a tree, and the best budget - 1 of one depth all extend the best budget - 1 of the depth
    before: a beam of that width per depth, then the best budget - 1 over all depths are the tree.

    Returns node tokens [B, N], depths [B, N] and parents [B, N] (N <= budget; node 0 is the root, the anchor:
    depth 0, parent -1, token left to the caller), nodes ordered by depth, so a parent precedes its children."""
    B, D, V = draft_logits.shape
    width = budget - 1
    top_logp, top_tokens = torch.log_softmax(draft_logits.float(), dim=-1).topk(min(width, V), dim=-1)  # [B, D, K]
    K = top_logp.shape[-1]
    scores, parents, tokens = [top_logp[:, 0]], [None], [top_tokens[:, 0]]  # beam of depth 1: [B, K] each
    for d in range(1, D):
        candidates = (scores[-1][:, :, None] + top_logp[:, d, None, :]).flatten(1)  # [B, beam * K]
        score, index = candidates.topk(min(width, candidates.shape[1]), dim=-1)
        scores.append(score)
        parents.append(index // K)  # into the beam of depth d
        tokens.append(top_tokens[:, d].gather(1, index % K))
    # candidates of all depths in one row: C = sum of beam widths; parent C stands for the root
    starts = [0]
    for score in scores:
        starts.append(starts[-1] + score.shape[1])
    C = starts[-1]
    device = draft_logits.device
    depth_of = torch.cat([torch.full((s.shape[1],), d + 1, device=device) for d, s in enumerate(scores)])  # [C]
    parent_of = torch.cat([torch.full((B, K), C, device=device)]
                          + [starts[d - 1] + p for d, p in enumerate(parents) if p is not None], dim=1)  # [B, C]
    # A prefix never scores below its extensions (log q <= 0, and rounding is monotone) and comes first in the row,
    # so a stable sort ranks it first at a tie too (a certain guess adds 0; -inf ties -inf): the best n are a tree
    n = min(width, C)
    ranked = torch.sort(torch.cat(scores, dim=1), dim=-1, descending=True, stable=True).indices[:, :n]
    chosen = ranked.sort(dim=-1).values  # [B, n] in candidate order, which is by depth
    node_of = torch.zeros(B, C + 1, dtype=torch.long, device=device).scatter(
        1, chosen, torch.arange(1, n + 1, device=device).expand(B, -1))  # candidate -> node; the root (C) -> 0
    root = torch.zeros(B, 1, dtype=torch.long, device=device)
    return (torch.cat([root, torch.cat(tokens, dim=1).gather(1, chosen)], dim=1),
            torch.cat([root, depth_of[chosen]], dim=1),
            torch.cat([root - 1, node_of.gather(1, parent_of.gather(1, chosen))], dim=1))


def tree_step(target: Transformer, draft: Draft, anchor_token, anchor_pos, active, sampling: Sampling,
              block_size: int, budget: int):
    """One draft + tree-verify step on static shapes (DESIGN.md section 4): the target checks the draft's best
    tree of `budget` nodes in one forward and the walk from the root follows the target's own choices.

    Nodes are cached at scratch slots anchor_pos + 0..N-1 (node 0, the root, is the anchor at its own position),
    rotated by their real positions anchor_pos + depth, and each sees the context and its ancestors only. At each
    node of the walk the target picks its next token (argmax, or a sample of its distribution: every committed
    token is then one of the target's own samples); the walk moves to the child holding that token while there is
    one. The path's cache entries and draft context rows are then moved to their positions. Arguments and returns
    as speculative_step.
    """
    bs = block_size
    draft_logits = draft.block_logits(target, draft.noise_block(anchor_token, bs), anchor_pos)  # [B, bs-1, V]
    tokens, depth, parent = draft_tree(draft_logits, budget)  # [B, N] each
    tokens[:, 0] = anchor_token
    B, N = tokens.shape
    slots, visible = tree_layout(parent, anchor_pos, target.max_seq_length, bs - 1)
    logits, hidden = target(tokens, anchor_pos[:, None] + depth, capture=draft.args.target_layer_ids,
                            tree=(slots, visible))  # [B, N, V], [B, N, T, H]
    choice = sample(logits, sampling)  # [B, N]: the target's next token after each node
    is_parent = parent[:, None, :] == torch.arange(N, device=tokens.device)[:, None]  # [B, i, j]: i is j's parent
    chosen_child = is_parent & (tokens[:, None, :] == choice[:, :, None])  # [B, i, j]: j holds i's choice
    has_child, child = chosen_child.any(-1), chosen_child.int().argmax(-1)  # [B, N]
    node, path = tokens.new_zeros(B), []
    for _ in range(bs):
        path.append(node)
        node = torch.where(has_child.gather(1, node[:, None])[:, 0], child.gather(1, node[:, None])[:, 0], node)
    path = torch.stack(path, dim=1)  # [B, bs]: root, the accepted nodes, then the last one repeated
    n_accepted = depth.gather(1, path[:, -1:])[:, 0]
    committed = choice.gather(1, path)  # the path's tokens after the root, then the target's own
    positions = anchor_pos[:, None] + torch.arange(bs, device=tokens.device)
    target.move_cached(slots.gather(1, path), positions)
    draft.write_context(hidden.gather(1, path[:, :, None, None].expand(-1, -1, *hidden.shape[2:])), positions)
    next_token = committed.gather(1, n_accepted[:, None])[:, 0]
    return (committed, n_accepted, torch.where(active, next_token, anchor_token),
            anchor_pos + (n_accepted + 1) * active)


def tree_layout(parent, anchor_pos, cache_length: int, max_depth: int):
    """Where a tree's nodes are cached and what each sees: slots [B, N] = anchor_pos + node (scratch slots past
    the committed tokens; the root's is its own position) and visible [B, N, cache_length]: the slots before the
    anchor and those of the node's ancestors and itself. parent [B, N] as draft_tree returns it."""
    B, N = parent.shape
    nodes = torch.arange(N, device=parent.device)
    ancestors = torch.eye(N, dtype=torch.bool, device=parent.device).expand(B, N, N)  # i sees j: j is i or above
    for _ in range(max_depth):
        ancestors = ancestors | ancestors.gather(1, parent.clamp(min=0)[:, :, None].expand(B, N, N))
    slots = anchor_pos[:, None] + nodes
    key_slots = torch.arange(cache_length, device=parent.device)
    in_tree = torch.zeros(B, N, cache_length, dtype=torch.bool, device=parent.device).scatter(
        2, slots[:, None, :].expand(B, N, N), ancestors)
    return slots, (key_slots < anchor_pos[:, None, None]) | in_tree


class Steps(NamedTuple):
    prefill: Callable
    decode: Callable
    speculative: Callable
    tree: Callable


EAGER = Steps(prefill, decode_one_token, speculative_step, tree_step)


def compile_steps(device: torch.device, autotune: bool = True, backend: str = "inductor") -> Steps:
    """Compiled prefill (dynamic prompt length) and steps (static shapes: CUDA graphs on GPU, with
    max-autotune's search over GEMM kernels when autotune). The steps stay static: a second block size or tree
    budget gets a graph of its own, rather than one where the size is symbolic (a symbolic tree budget, top-k
    of a symbolic k, compiled for minutes). backend: another torch.compile backend (tests count graphs)."""
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
    """New tokens per row. A row ends at its first stop token or at max_new_tokens, where the target alone ends."""

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
    """Decode a batch of token-id prompts (each row at its own positions): autoregressive without a draft,
    speculative with one (block_size tokens per step, at most the draft's block size), verifying a tree of
    tree_budget nodes per step instead of the chain if tree_budget > 0.

    Returns the new tokens per row (ending with the stop token when one was hit) and stats; with a draft the stats
    hold "acceptance_lengths": per row, the tokens committed by each draft+verify step.
    on_token(row, token_id) is called for every token kept.
    """
    device = target.embed_tokens.weight.device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(B, max(len(p) for p in prompts), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    # shorter prompts are right-padded; the padding's cache entries are overwritten before any query sees them
    positions = torch.arange(tokens.shape[1], device=device)[None].expand(B, -1)

    synchronize(device)
    t0 = time.perf_counter()
    next_token = sample(steps.prefill(target, tokens, positions, lengths - 1, draft), sampling)
    out = Outputs(B, max_new_tokens, stop_ids, on_token)
    for row, t in enumerate(next_token.tolist()):
        out.add(row, [t])
    synchronize(device)
    t1 = time.perf_counter()
    n_steps, acceptance_lengths, active_rows = 0, [[] for _ in range(B)], None
    input_pos = lengths.clone()  # the position of next_token in each row
    while not all(out.done):
        if draft is None:
            next_token = steps.decode(target, next_token[:, None].clone(), input_pos[:, None].clone(), sampling)
            input_pos = input_pos + 1
            for row, t in enumerate(next_token.tolist()):
                out.add(row, [t])
        else:
            rows_active = [not d for d in out.done]
            if rows_active != active_rows:  # a new device tensor only when a row has finished
                active_rows, active = rows_active, torch.tensor(rows_active, device=device)
            if tree_budget:
                block, n_accepted, next_token, input_pos = steps.tree(target, draft, next_token, input_pos, active,
                                                                      sampling, block_size, tree_budget)
            else:
                block, n_accepted, next_token, input_pos = steps.speculative(target, draft, next_token, input_pos,
                                                                             active, sampling, block_size)
            next_token = next_token.clone()  # CUDA graphs reuse output memory
            # a row that ended inside its last block sits up to bs-1 positions past its end; frozen there, its
            # block (or tree) would run past a cache sized prompt + max_new_tokens + step_span(...). Active rows
            # are never moved by this.
            input_pos = input_pos.clamp(max=target.max_seq_length - step_span(block_size, tree_budget))
            rows = torch.cat([n_accepted[:, None], block], dim=1).tolist()  # the step's one host sync
            for row, (n, *block_tokens) in enumerate(rows):
                if not out.done[row]:
                    acceptance_lengths[row].append(out.add(row, block_tokens[:n + 1]))
        n_steps += 1
    synchronize(device)
    decode_time = max(time.perf_counter() - t1, 1e-9)
    stats = {"prefill_s": t1 - t0, "decode_s": decode_time, "decode_steps": n_steps,
             "tokens_per_s": sum(len(o) - 1 for o in out.tokens) / decode_time,
             "steps_per_s": n_steps / decode_time}
    if draft is not None:
        stats["acceptance_lengths"] = acceptance_lengths
    return out.tokens, stats


def step_span(block_size: int, tree_budget: int) -> int:
    """Cache slots a speculative step writes from its anchor on: the block, or the tree's nodes."""
    return max(block_size, tree_budget)


def weight_bytes_per_step(model: Transformer) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (unless it is the tied lm_head),
    and only the routed share (top-k of E) of the experts."""
    a, total = model.args, 0
    for name, p in model.named_parameters():
        if name == "embed_tokens.weight" and not a.tie_word_embeddings:
            continue
        share = a.num_experts_per_tok / a.num_experts if ".experts." in name else 1.0
        total += p.numel() * p.element_size() * share
    return int(total)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="Hugging Face model folder (config.json, *.safetensors); default: the embedded demo pair "
                        "(demo/target with demo/dflare, compared with AR)")
    p.add_argument("--draft", default=None,
                   help="DFlare / DFlash draft folder: speculative decoding (without it: autoregressive)")
    p.add_argument("--block_size", type=int, default=None,
                   help="tokens per draft block, at most the draft's own (default: the draft's)")
    p.add_argument("--tree_budget", type=int, default=0,
                   help="verify a tree of this many nodes per step, the draft's most likely continuations, instead "
                        "of its one best guess per position (default: 0, the chain)")
    p.add_argument("--compare_ar", action="store_true",
                   help="also decode autoregressively in the same run and report the speedup")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for several prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat format")
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
                   help="KV cache length (default: longest prompt + max_new_tokens + block, rounded up to 256)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile prefill and step (CUDA graphs on GPU); compiling is untimed warm-up")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on cuda and for the embedded demo, float32 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    args = p.parse_args(argv)
    if args.checkpoint is None:  # the embedded demo: SmolLM2-135M-Instruct with its DFlare draft, a chat
        if not (DEMO / "dflare" / "config.json").is_file():
            p.error(f"pass --checkpoint MODEL_DIR (the embedded demo's drafts in {DEMO} are missing: python demo.py "
                    f"builds them)")
        args.checkpoint, args.draft = str(DEMO / "target"), args.draft or str(DEMO / "dflare")
        args.compare_ar = not args.interactive
        args.chat = True
        args.dtype = args.dtype or "bfloat16"  # on CPU too: twice fp32's speed where the CPU has bf16 instructions
        args.prompt = args.prompt or [DEMO_PROMPT]
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        p.error(f"--top_k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        p.error(f"--max_seq_len must be >= 2, got {args.max_seq_len}")
    if args.draft is None and (args.block_size is not None or args.compare_ar or args.tree_budget):
        p.error("--block_size, --tree_budget and --compare_ar need --draft DRAFT_DIR")
    if args.tree_budget == 1 or args.tree_budget < 0:
        p.error(f"--tree_budget must be 0 (the chain) or >= 2 (the root and a guess), got {args.tree_budget}")
    if args.interactive and (args.compare_ar or args.json or args.batch_size > 1):
        p.error("--interactive is one conversation: without --compare_ar, --json and --batch_size")
    if args.block_size is not None and args.block_size < 2:
        p.error(f"--block_size must be >= 2 (the anchor and at least one drafted token), got {args.block_size}")
    if args.prompt is None:
        args.prompt = ["Hello, my name is"]
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
        if not ids:  # nothing to prefill, and no last token to continue from
            raise InputError(f"--prompt {text!r} encodes to no tokens: give a prompt with some text")
    return prompts


def pick_device(name: str | None) -> torch.device:
    """--device as a torch.device (default: cuda if available, else cpu), refused if this machine lacks it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r} is not supported: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available here: use --device cpu")
    n = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= n:
        raise InputError(f"--device {name}: this machine has no such GPU: use cuda:0 to cuda:{n - 1}")
    return device


def cache_length(args, longest_prompt: int, max_position_embeddings: int, block_size: int = 0,
                 tree_budget: int = 0) -> int:
    """KV cache length: the prompt, the new tokens and, when speculating, the slots a step writes past the last one
    (step_span: the block, or the tree)."""
    span = step_span(block_size, tree_budget)
    needed = longest_prompt + args.max_new_tokens + span
    block = (f" + tree budget ({span})" if span > block_size else f" + block size ({span})") if span else ""
    over = needed - max_position_embeddings
    if over > 0:
        fixes = ([f"lower --max_new_tokens to {args.max_new_tokens - over}"] if over < args.max_new_tokens else []) \
            + ([f"shorten the prompt by {over} tokens"] if over < longest_prompt else [])
        raise InputError(f"prompt ({longest_prompt} tokens) + --max_new_tokens ({args.max_new_tokens}){block} = "
                         f"{needed} exceeds the model's context of {max_position_embeddings} tokens: "
                         + (" or ".join(fixes) or f"take {over} tokens off the prompt and --max_new_tokens together"))
    if args.max_seq_len is None:
        return max(needed, min(-(-needed // 256) * 256, max_position_embeddings))
    if longest_prompt > args.max_seq_len:
        raise InputError(f"prompt has {longest_prompt} tokens, longer than --max_seq_len {args.max_seq_len}: "
                         f"shorten the prompt or raise --max_seq_len")
    if needed > args.max_seq_len:
        raise InputError(f"prompt ({longest_prompt} tokens) + --max_new_tokens ({args.max_new_tokens}){block} "
                         f"exceeds --max_seq_len {args.max_seq_len}: raise --max_seq_len or lower --max_new_tokens")
    return args.max_seq_len


def load_draft(folder, target: Transformer, device, dtype) -> Draft:
    if not Path(folder, "config.json").is_file():
        raise InputError(f"--draft {str(folder)!r} is not a draft folder (no config.json)")
    if not is_draft(folder):
        raise InputError(f"--draft {str(folder)!r} is a target model, not a draft: pass a DFlash / DFlare draft "
                         f"folder as --draft, and the target as --checkpoint")
    draft = Draft.from_pretrained(folder, device, dtype)
    draft.check_target(target.args)
    return draft


def acceptance_histogram(lengths: list, block_size: int) -> str:
    counts = [lengths.count(n) for n in range(1, block_size + 1)]
    scale = 40 / max(max(counts), 1)
    return "\n".join(f"{n:>4} | {'#' * round(c * scale):<40} {c}" for n, c in enumerate(counts, 1) if c)


def build_demo_target(checkpoint):
    """The demo's target folder is built from its GGUF on first use, and its random-weight twin (offline) from
    the committed config and tokenizer: once each, git-ignored. The twin is for timings only: say so."""
    folder = Path(checkpoint).resolve()
    if folder == DEMO / "target" and not (folder / "config.json").is_file():
        import demo

        demo.build_target(folder)
    if folder == DEMO / "twin":
        if not (folder / "model.safetensors").is_file():
            import demo

            demo.build_twin(folder)
        print(f"note: {folder} has random weights: its text is noise and tau means nothing there (no draft "
              f"guess is accepted); its step times are real", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    build_demo_target(args.checkpoint)
    config = read_config(args.checkpoint)
    if is_draft(args.checkpoint):
        raise InputError(f"--checkpoint {args.checkpoint!r} is a draft: pass it as --draft, with its target model "
                         f"as --checkpoint")
    tokenizer = load_tokenizer(args.checkpoint)
    prompts = [] if args.interactive else encode_prompts(args, tokenizer)  # before loading: a bad prompt fails fast
    t0 = time.perf_counter()
    model = load_checkpoint(args.checkpoint, device, dtype)
    draft = load_draft(args.draft, model, device, dtype) if args.draft else None
    block_size = 0
    if draft is not None:
        block_size = args.block_size or draft.args.block_size
        if block_size > draft.args.block_size:
            raise InputError(f"--block_size {block_size} is larger than the draft's block size "
                             f"{draft.args.block_size}: use at most {draft.args.block_size}")
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"loaded {args.checkpoint}{' + draft ' + str(args.draft) if draft else ''} ({model.args.model_type}, "
        f"{dtype}, {device}) in {time.perf_counter() - t0:.1f} s")
    stop_ids = stop_token_ids(args.checkpoint, config, tokenizer)
    steps = compile_steps(device) if args.compile else EAGER
    if args.interactive:
        return chat_loop(args, model, draft, tokenizer, stop_ids, block_size, steps, log)
    if len(prompts) == 1:
        prompts = prompts * args.batch_size
    batch_size = min(args.batch_size, len(prompts))
    max_seq_len = cache_length(args, max(map(len, prompts)), model.args.max_position_embeddings, block_size,
                               args.tree_budget)
    model.setup_caches(batch_size, max_seq_len)
    if draft is not None:
        draft.setup_caches(batch_size, max_seq_len)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    run_ar = draft is None or args.compare_ar
    if args.compile:
        t0 = time.perf_counter()
        for d in ([None] if run_ar else []) + ([draft] if draft is not None else []):
            generate(model, prompts[:batch_size], 2, sampling, draft=d, block_size=block_size, steps=steps,
                     tree_budget=args.tree_budget)
        log(f"compiled in {time.perf_counter() - t0:.1f} s")
    torch.manual_seed(args.seed)
    stream = batch_size == 1 and not args.json
    bytes_per_step = weight_bytes_per_step(model)
    totals = {"tokens": 0, "decode_s": 0.0, "ar_tokens": 0, "ar_decode_s": 0.0, "identical": 0, "rows": 0}
    all_acceptance = []

    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        n_real = len(batch)
        batch = batch + [batch[-1]] * (batch_size - n_real)  # the caches have batch_size rows
        if args.compare_ar:
            ar_outputs, ar_stats = generate(model, batch, args.max_new_tokens, sampling, stop_ids, steps=steps)
        printer = StreamPrinter(tokenizer, stop_ids) if stream else None
        if stream:  # a chat shows the user's text, a raw prompt itself
            print(args.prompt[start] + "\n" if args.chat else tokenizer.decode(batch[0]), end="", flush=True)
        outputs, stats = generate(model, batch, args.max_new_tokens, sampling, stop_ids, on_token=printer,
                                  draft=draft, block_size=block_size, steps=steps, tree_budget=args.tree_budget)
        for row in range(n_real):
            tokens = outputs[row]
            text = tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens)
            record = {"prompt": tokenizer.decode(batch[row]), "tokens": tokens, "text": text,
                      "tokens_per_s": (len(tokens) - 1) / stats["decode_s"], "prefill_s": stats["prefill_s"]}
            totals["tokens"] += len(tokens) - 1
            totals["rows"] += 1
            if draft is not None:
                lengths = stats["acceptance_lengths"][row]
                all_acceptance += lengths
                record.update(acceptance_lengths=lengths, tau=sum(lengths) / len(lengths) if lengths else None)
            if args.compare_ar:
                ar_tokens = ar_outputs[row]
                record["ar_tokens_per_s"] = (len(ar_tokens) - 1) / ar_stats["decode_s"]
                record["speedup"] = record["tokens_per_s"] / max(record["ar_tokens_per_s"], 1e-9)
                if sampling.temperature == 0:
                    record["identical_to_ar"] = ar_tokens == tokens
                    totals["identical"] += ar_tokens == tokens
                totals["ar_tokens"] += len(ar_tokens) - 1
            if args.json:
                print(json.dumps(record), flush=True)
            elif not stream:
                print(f"--- prompt {start + row}\n{record['prompt']}{text}")
        totals["decode_s"] += stats["decode_s"]
        if args.compare_ar:
            totals["ar_decode_s"] += ar_stats["decode_s"]
        if stream:
            print(flush=True)
        if draft is None:
            log(f"prefill {stats['prefill_s'] * 1000:.1f} ms | decode {stats['tokens_per_s']:.1f} tokens/s "
                f"(batch {batch_size}) | {bytes_per_step * stats['steps_per_s'] / 1e9:.2f} GB/s of weights")
    if draft is not None:
        tokens_per_s = totals["tokens"] / max(totals["decode_s"], 1e-9)
        tau = sum(all_acceptance) / max(len(all_acceptance), 1)
        tree = f", trees of {args.tree_budget} nodes" if args.tree_budget else ""
        depth = f", mean accepted depth {tau - 1:.2f}" if args.tree_budget else ""
        log(f"speculative decoding, block {block_size}{tree}: tau {tau:.2f} tokens per draft+verify step "
            f"({len(all_acceptance)} steps{depth}) | {tokens_per_s:.1f} tokens/s (batch {batch_size})")
        log("tokens committed per step:\n" + acceptance_histogram(all_acceptance, block_size))
        if args.compare_ar:
            ar_tokens_per_s = totals["ar_tokens"] / max(totals["ar_decode_s"], 1e-9)
            same = (f" | greedy output identical to AR for {totals['identical']}/{totals['rows']} prompts"
                    if sampling.temperature == 0 else "")
            log(f"autoregressive {ar_tokens_per_s:.1f} tokens/s | speedup "
                f"{tokens_per_s / max(ar_tokens_per_s, 1e-9):.2f}x{same}")


def chat_loop(args, model, draft, tokenizer, stop_ids, block_size: int, steps, log):
    """--interactive: a multi-turn chat on the terminal. Every answer streams, then its tokens/s (and tau). The
    caches grow only when the conversation needs more (a new cache length recompiles a compiled step)."""
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
            max_seq_len = cache_length(args, len(ids), model.args.max_position_embeddings, block_size,
                                       args.tree_budget)
        except InputError as e:  # the conversation outgrew the context: say so, keep the session
            log(f"error: {e}")
            messages.pop()
            continue
        if max_seq_len > allocated:
            model.setup_caches(1, max_seq_len)
            if draft is not None:
                draft.setup_caches(1, max_seq_len)
            allocated = max_seq_len
        outputs, stats = generate(model, [ids], args.max_new_tokens, sampling, stop_ids,
                                  on_token=StreamPrinter(tokenizer, stop_ids), draft=draft, block_size=block_size,
                                  steps=steps, tree_budget=args.tree_budget)
        tokens = outputs[0]
        print(flush=True)
        messages.append({"role": "assistant",
                         "content": tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens)})
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
