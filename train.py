"""Train a DFlare (or DFlash) draft for a frozen target (DESIGN.md section 5).

    python prepare.py --target TARGET_DIR --data chats.jsonl --out data/ --regenerate
    torchrun --nproc_per_node 8 train.py --target TARGET_DIR --data data/ --out my-draft/
    python train.py --target TARGET_DIR --data data/ --out my-draft/            # one process
    python generate.py --checkpoint TARGET_DIR --draft my-draft/ --compare_ar --prompt "..."

A step, for each sequence of the batch:
  1. the frozen target runs the sequence and captures the hidden states of the draft's target layers (online), or
     they are read from --hidden_cache, where a first run captured them for the whole data set;
  2. up to --num_anchors positions inside the assistant's answers, each with a whole block after it, become block
     anchors; block j is [token at anchor_j, MASK, ..., MASK] at positions anchor_j .. anchor_j + bs - 1;
  3. every block of the sequence goes through the draft in one forward under one attention mask: a block's
     queries see the context positions before its anchor and their own block (Draft.forward);
  4. loss: cross-entropy of block position k (1..bs-1) against the token at anchor_j + k, weighted by
     exp(-(k-1)/gamma) and by the label's loss mask, summed and divided by the batch's total weight; the logits
     (through the target's lm_head) are computed a chunk of labels at a time, forward and backward.

Data parallel with DDP (nccl on CUDA, gloo on CPU), AdamW on fp32 weights with bf16 autocast compute (on CUDA),
warmup + cosine schedule, gradient clipping and accumulation. Each sample's anchors are drawn from (seed, epoch,
sample index) and the loss is normalised by the weight of the whole batch, so a run gives the same losses whatever
the number of processes and micro-batches, and --resume continues exactly where the last checkpoint was.
Checkpoints in --out: the draft folder (config.json + model.safetensors, what generate.py --draft loads), then
train_state.pt (fp32 weights, optimizer, step; what --resume reads), each written to a temporary file and renamed.
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from draft import Draft, DraftArgs
from generate import pick_device
from model import InputError, is_draft, load_checkpoint, read_json
from prepare import PackedData, Progress, output_folder, save_npy, write_json


# ---------------------------------------------------------------------------------------------------------------
# Blocks, loss and accuracy

def sample_anchors(mask, block_size: int, num_anchors: int, rng) -> np.ndarray:
    """Sorted distinct anchors: answer tokens with a whole block after them inside the sequence."""
    candidates = np.flatnonzero(mask[:len(mask) - block_size + 1])
    if len(candidates) > num_anchors:
        candidates = np.sort(rng.choice(candidates, num_anchors, replace=False))
    return candidates


def anchor_rng(seed: int, split: int, epoch: int, index: int):
    """The random stream of one sample in one epoch: independent of processes, micro-batches and resumption."""
    return np.random.default_rng([seed, split, epoch, int(index)])


def micro_batch(data, indices, args, split: int, epoch: int, device, cache=None):
    """The samples at indices (cut to --max_seq_len) with their anchors, as make_batch's tensors, and their target
    hidden states [B, S, T, H] from the cache (None without one: block_loss runs the target)."""
    samples = [(t[:args.max_seq_len], m[:args.max_seq_len]) for t, m in (data[i] for i in indices)]
    anchors = [sample_anchors(m, args.block_size, args.num_anchors, anchor_rng(args.seed, split, epoch, i))
               for i, (_, m) in zip(indices, samples)]
    tokens, anchor_pos, weights = make_batch(samples, anchors, args.block_size, args.gamma, device)
    hidden = None
    if cache is not None:  # rows past a sample's end are never context (anchors lie inside it): zeros
        rows = [cache.get(i)[:args.max_seq_len] for i in indices]
        hidden = rows[0].new_zeros(len(rows), tokens.shape[1], *rows[0].shape[1:])
        for b, r in enumerate(rows):
            hidden[b, :len(r)] = r
        hidden = hidden.to(device)
    return tokens, anchor_pos, weights, hidden


def make_batch(samples, anchors, block_size: int, gamma: float, device):
    """Pad a micro-batch. Returns tokens [B, S], anchors [B, nb] and the label weights [B, nb, bs-1]
    (loss mask of the label x exp(-(k-1)/gamma); 0 for padding blocks, which sit at position 0)."""
    B, nb = len(samples), max(1, max(len(a) for a in anchors))
    S = max(block_size, max(len(t) for t, _ in samples))  # padding blocks at 0 fit too
    tokens = np.zeros((B, S), dtype=np.int64)
    loss_mask = np.zeros((B, S), dtype=np.float32)
    anchor_pos = np.zeros((B, nb), dtype=np.int64)
    block_valid = np.zeros((B, nb), dtype=np.float32)
    for i, ((t, m), a) in enumerate(zip(samples, anchors)):
        tokens[i, :len(t)], loss_mask[i, :len(m)] = t, m
        anchor_pos[i, :len(a)], block_valid[i, :len(a)] = a, 1.0
    label_pos = anchor_pos[:, :, None] + np.arange(1, block_size)  # [B, nb, bs-1], inside S by construction
    decay = np.exp(-np.arange(block_size - 1) / gamma)
    weights = np.take_along_axis(loss_mask, label_pos.reshape(B, -1), 1).reshape(label_pos.shape)
    weights = weights * block_valid[:, :, None] * decay
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return as_tensor(tokens), as_tensor(anchor_pos), as_tensor(weights.astype(np.float32))


def block_loss(model, draft: Draft, target, tokens, anchors, weights, hidden, autocast):
    """Sum over the micro-batch of weight x cross-entropy, and the accuracy counts
    [correct by position (bs-1) | labels by position (bs-1) | leading correct guesses summed | blocks].
    hidden: the target's states of tokens [B, S, T, H] from a HiddenStateCache, or None to capture them now."""
    bs = draft.args.block_size
    if hidden is None:
        with torch.no_grad():
            hidden = target.hidden_states(tokens, draft.args.target_layer_ids)  # [B, S, T, H]
    label_pos = anchors[:, :, None] + torch.arange(bs, device=tokens.device)  # [B, nb, bs]
    blocks = torch.full_like(label_pos, draft.args.mask_token_id)
    blocks[:, :, 0] = tokens.gather(1, anchors)
    labels = tokens.gather(1, label_pos[:, :, 1:].flatten(1)).view_as(weights)  # [B, nb, bs-1]
    with autocast:
        states = model(target, hidden, blocks, anchors)  # [B, nb, bs-1, H]
        ce, guesses = chunked_cross_entropy(target.lm_head, states.flatten(0, 2), labels.flatten())
    ce, guesses = ce.view_as(labels), guesses.view_as(labels)
    with torch.no_grad():
        counted = weights > 0
        correct = (guesses == labels) & counted
        leading = correct.int().cumprod(-1).sum(-1)  # guesses a greedy verify would accept, per block
        stats = torch.cat([correct.sum((0, 1)), counted.sum((0, 1)),
                           torch.stack([leading.sum(), (weights[..., 0] > 0).sum()])]).double()
    return (ce * weights).sum(), stats


# Logits the loss holds at a time, rows x vocabulary (256 MB in fp32; 441 rows at Qwen3's 151,936 tokens): all
# labels' at once are [anchors x (bs-1), V], 4.7 GB per 3072-token sequence at 512 anchors
LOGITS_CHUNK_ELEMENTS = 2**26


def chunked_cross_entropy(lm_head, states, labels):
    """Cross-entropy [N] and argmax [N] of the logits lm_head(states) for states [N, H] and labels [N], a chunk of
    rows at a time (LinearCrossEntropy)."""
    rows = max(1, LOGITS_CHUNK_ELEMENTS // lm_head.out_features)
    return LinearCrossEntropy.apply(states, lm_head.weight, labels, rows)


class LinearCrossEntropy(torch.autograd.Function):
    """The cross-entropy of states @ weight.T against labels, with the gradient for states worked out in the
    forward, chunk by chunk: the logits are never all held at once, nor computed twice (a checkpointed loss would
    recompute them in the backward; on a CPU the logits are most of a small draft's work). weight is the target's
    frozen lm_head: it gets no gradient."""

    @staticmethod
    def forward(ctx, states, weight, labels, rows):
        with_grad = ctx.needs_input_grad[0]
        chunks = [chunk_cross_entropy(s, weight, l, with_grad) for s, l in zip(states.split(rows), labels.split(rows))]
        ce, guesses = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        if with_grad:
            ctx.save_for_backward(torch.cat([c[2] for c in chunks]))
        ctx.mark_non_differentiable(guesses)
        return ce, guesses

    @staticmethod
    def backward(ctx, grad_ce, grad_guesses):
        (grad_states,) = ctx.saved_tensors  # d ce_i / d states_i
        return grad_states * grad_ce[:, None].to(grad_states.dtype), None, None, None


def chunk_cross_entropy(states, weight, labels, with_grad: bool):
    """One chunk: cross-entropy and argmax of the logits (in fp32), and with_grad, d ce_i / d states_i =
    (softmax_i - onehot(label_i)) @ weight."""
    logits = (states @ weight.T).float()
    lse = logits.logsumexp(-1, keepdim=True)
    ce = (lse - logits.gather(1, labels[:, None]))[:, 0]
    guesses = logits.argmax(-1)
    if not with_grad:
        return ce, guesses, None
    probs = logits.sub_(lse).exp_()  # the softmax, in place of the logits
    probs[torch.arange(len(labels), device=labels.device), labels] -= 1
    return ce, guesses, (probs.to(weight.dtype) @ weight).to(states.dtype)


def report(stats, block_size: int) -> dict:
    n = block_size - 1
    correct, counted, leading, blocks = stats[:n], stats[n:2 * n], stats[2 * n], stats[2 * n + 1]
    by_position = (correct / counted.clamp(min=1)).tolist()
    return {"accuracy": float(correct.sum() / counted.sum().clamp(min=1)), "accuracy_by_position": by_position,
            "tau": 1.0 + float(leading / blocks.clamp(min=1))}


# ---------------------------------------------------------------------------------------------------------------
# The target's hidden states, captured once (--hidden_cache)

class HiddenStateCache:
    """The target's captured hidden states of every sample of a prepared folder, kept on disk: with it the target
    runs once over the data instead of at every step of every epoch of every draft trained on it (on a CPU the
    target's forward is about a quarter of a small draft's step). Per data shard NAME, NAME.hidden.npy holds
    [tokens of the shard, T, H] in the target's dtype (bfloat16 as its uint16 bits); hidden.json names the target
    layers and dtype. A draft reads any subset of the cached layers."""

    def __init__(self, folder, data: PackedData, layer_ids, dtype: torch.dtype):
        self.folder, self.data, self.dtype = Path(folder), data, dtype
        meta = read_json(self.folder / "hidden.json", f"delete {folder} to capture again")
        dtype_name = str(dtype).removeprefix("torch.")
        if not set(layer_ids) <= set(meta["target_layer_ids"]) or meta["dtype"] != dtype_name:
            raise InputError(f"--hidden_cache {str(folder)!r} holds target layers {meta['target_layer_ids']} in "
                             f"{meta['dtype']}; this draft reads layers {list(layer_ids)} in {dtype_name}: use "
                             f"another --hidden_cache folder")
        self.columns = [meta["target_layer_ids"].index(i) for i in layer_ids]
        self.shards = []
        for shard in data.index["shards"]:
            path = self.folder / f"{shard['name']}.hidden.npy"
            try:
                self.shards.append(np.load(path, mmap_mode="r") if shard["samples"] else None)
            except (OSError, ValueError, EOFError):
                raise InputError(f"{path} is missing or corrupt: delete it, and train.py captures it again") from None

    @staticmethod
    def capture(folder, data: PackedData, target, layer_ids, can_write: bool, log):
        """Capture what is missing (the shards are written one at a time, so an interrupted run continues). A new
        cache holds layer_ids; an existing one keeps its layers."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = target.embed_tokens.weight.dtype
        meta = {"target_layer_ids": list(layer_ids), "dtype": str(dtype).removeprefix("torch."),
                "data": data.index["settings"]}
        if (folder / "hidden.json").is_file():  # the first run's layers stay (HiddenStateCache checks the subset)
            before = read_json(folder / "hidden.json", f"delete {folder} to capture again")
            if before["data"] != meta["data"]:
                raise InputError(f"--hidden_cache {str(folder)!r} was captured from other data: use another folder, "
                                 f"or delete it to capture again")
            meta = before
        else:
            write_json(folder / "hidden.json", meta)
        device = target.embed_tokens.weight.device
        todo = [(k, s) for k, s in enumerate(data.index["shards"])
                if s["samples"] and not (folder / f"{s['name']}.hidden.npy").is_file()]
        if todo and not can_write:
            raise InputError(f"--hidden_cache {str(folder)!r} is not complete: capture it with one process first "
                             f"(the same command without torchrun)")
        for k, shard in todo:
            start = int(data.starts[k])
            progress = Progress(f"capturing the target's hidden states, {shard['name']}", shard["samples"])
            rows = []
            for j in range(shard["samples"]):
                tokens = torch.from_numpy(data[start + j][0])[None].to(device)
                with torch.no_grad():
                    rows.append(target.hidden_states(tokens, meta["target_layer_ids"])[0].cpu())  # [S, T, H]
                progress(j + 1)
            states = torch.cat(rows)
            save_npy(folder / f"{shard['name']}.hidden.npy",
                     (states.view(torch.uint16) if dtype == torch.bfloat16 else states).numpy())
        if todo:
            log(f"captured the target's hidden states of {len(todo)} shards in {folder}")

    def get(self, i) -> torch.Tensor:
        """Sample i's hidden states [S, T, H] of the draft's layers."""
        shard, start, end = self.data.locate(i)
        rows = torch.from_numpy(np.array(self.shards[shard][start:end]))  # a copy: the map is read-only
        return (rows.view(torch.bfloat16) if self.dtype == torch.bfloat16 else rows)[:, self.columns]


# ---------------------------------------------------------------------------------------------------------------
# Reductions over processes, schedule, evaluation

def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def learning_rate(step: int, total_steps: int, args) -> float:
    """Linear warmup over warmup_ratio of the steps, then cosine to 0. step counts from 0."""
    warmup = max(1, round(args.warmup_ratio * total_steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


@torch.no_grad()
def evaluate(model, draft, target, data, cache, eval_indices, args, rank, world, autocast, device):
    """Loss, accuracy per block position and estimated tau (1 + mean accepted guesses) on the held-out samples."""
    model.eval()
    stats = torch.zeros(2 * (args.block_size - 1) + 2, dtype=torch.float64, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    mine = eval_indices[rank::world]
    for start in range(0, len(mine), args.micro_batch_size):
        batch = micro_batch(data, mine[start:start + args.micro_batch_size], args, 1, 0, device, cache)
        loss_sum, s = block_loss(model, draft, target, *batch, autocast)
        stats += s
        sums += torch.stack([loss_sum.double(), batch[2].sum().double()])
    all_reduce_sum(stats)
    all_reduce_sum(sums)
    model.train()
    return {"loss": float(sums[0] / sums[1].clamp(min=1e-9)), **report(stats, args.block_size)}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(out: Path, draft: Draft, optimizer, step: int, args, dtype):
    """The draft folder first, then train_state.pt (the resume point); every file goes through a rename, so a
    save cut short leaves the previous checkpoint's files whole."""
    draft.save_pretrained(out, dtype=dtype)
    state = {"step": step, "draft_args": asdict(draft.args), "draft": draft.state_dict(),
             "optimizer": optimizer.state_dict(), "args": vars(args)}
    torch.save(state, out / "train_state.pt.tmp")
    os.replace(out / "train_state.pt.tmp", out / "train_state.pt")


# settings a resumed run may change; any other change would make it a different run
RUN_TIME_FLAGS = {"resume", "out", "device", "log_every", "eval_every", "save_every", "micro_batch_size",
                  "hidden_cache"}


def resume_state(out: Path, args):
    if not (out / "train_state.pt").is_file():
        raise InputError(f"--resume: {str(out)!r} has no train_state.pt to resume from")
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    changed = sorted(k for k, v in state["args"].items() if k not in RUN_TIME_FLAGS and getattr(args, k, v) != v)
    if changed:
        raise InputError(f"--resume with other settings than the saved run ({', '.join(changed)}): use the "
                         f"original flags, or another --out for a new run")
    return state


# ---------------------------------------------------------------------------------------------------------------
# The command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a DFlare / DFlash draft (launch with torchrun for several "
                                            "processes).")
    p.add_argument("--target", required=True, help="target checkpoint folder (frozen)")
    p.add_argument("--data", required=True, help="folder written by prepare.py")
    p.add_argument("--out", required=True, help="draft folder to write (checkpoints and train_state.pt)")
    p.add_argument("--init", help="start from this draft folder instead of a new draft")
    p.add_argument("--hidden_cache", help="folder for the target's hidden states of --data, captured on first use "
                                          "and read back after (the target then runs once, not every step; "
                                          "T x hidden size x 2 bytes per token in bfloat16)")
    p.add_argument("--fusion", choices=["layerwise", "linear"], default="layerwise",
                   help="layerwise = DFlare, linear = DFlash")
    p.add_argument("--num_layers", type=int, default=5, help="draft layers")
    p.add_argument("--target_layer_ids", type=int, nargs="+",
                   help="target layers to tap (default: 9 spread for DFlare, num_layers for DFlash)")
    p.add_argument("--block_size", type=int, default=16)
    p.add_argument("--mask_token_id", type=int, help="default: the last id of the target's vocabulary")
    p.add_argument("--num_anchors", type=int, default=512, help="blocks per sequence")
    p.add_argument("--gamma", type=float, default=7.0, help="loss weight of block position k: exp(-(k-1)/gamma)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: --epochs decide)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per optimizer step, all processes")
    p.add_argument("--micro_batch_size", type=int, default=1, help="sequences per forward in one process")
    p.add_argument("--max_seq_len", type=int, default=3072, help="longer samples are cut")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup_ratio", type=float, default=0.04)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--eval_samples", type=int, default=64, help="samples held out (the last of the data)")
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--save_every", type=int, default=500)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="compute dtype (weights stay fp32); default bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    for name in ("num_layers", "num_anchors", "epochs", "batch_size", "micro_batch_size", "max_seq_len",
                 "eval_every", "save_every", "log_every"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    if args.block_size < 2:
        raise InputError("--block_size must be at least 2 (the anchor and one guess)")
    if args.gamma <= 0 or args.lr <= 0 or not 0 <= args.warmup_ratio < 1:
        raise InputError("--gamma and --lr must be > 0, --warmup_ratio in [0, 1)")
    return args


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = pick_device(args.device).type == "cuda"  # each process then takes cuda:LOCAL_RANK
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:  # Triton kernels and NCCL run on the current device: this rank's, not cuda:0 for every rank
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dtype = getattr(torch, args.dtype or ("bfloat16" if use_cuda else "float32"))
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    out = output_folder(args.out)
    accumulation = args.batch_size // (world * args.micro_batch_size)
    if accumulation * world * args.micro_batch_size != args.batch_size:
        raise InputError(f"--batch_size {args.batch_size} must be a multiple of processes ({world}) x "
                         f"--micro_batch_size ({args.micro_batch_size})")
    if (out / "train_state.pt").is_file() and not args.resume:
        raise InputError(f"{str(out)!r} holds a training run: pass --resume to continue it, or use another --out")
    state = resume_state(out, args) if args.resume else None

    if is_draft(args.target):
        raise InputError(f"--target {args.target!r} is a draft, not a target model: pass the target model's folder")
    target = load_checkpoint(args.target, device, dtype)
    target.requires_grad_(False)
    data = PackedData(args.data)
    if data.index["settings"]["vocab_size"] > target.args.vocab_size:
        raise InputError(f"--data was tokenized for a vocabulary of {data.index['settings']['vocab_size']}, larger "
                         f"than the target's {target.args.vocab_size}: prepare it with this target")
    n_train = len(data) - args.eval_samples
    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch < 1:
        raise InputError(f"{len(data)} samples leave {n_train} for training after --eval_samples "
                         f"{args.eval_samples}: fewer than one --batch_size {args.batch_size}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    torch.manual_seed(args.seed)
    if state is not None:
        draft = Draft(DraftArgs(**state["draft_args"]))
        draft.load_state_dict(state["draft"])
    elif args.init:
        draft = Draft.from_pretrained(args.init, dtype=torch.float32)
    else:
        draft = Draft.for_target(target.args, args.num_layers, args.fusion, args.target_layer_ids, args.block_size,
                                 args.mask_token_id)
    draft.check_target(target.args)
    if draft.args.block_size != args.block_size:
        raise InputError(f"--block_size {args.block_size} differs from the --init draft's {draft.args.block_size}")
    draft = draft.to(device, torch.float32)  # fp32 master weights; autocast computes in dtype
    model = DistributedDataParallel(draft, device_ids=[local_rank] if use_cuda else None) if world > 1 else draft
    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=args.weight_decay)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    eval_indices = np.arange(n_train, len(data))

    kind = "DFlare" if draft.args.fusion == "layerwise" else "DFlash"
    log(f"target {args.target} ({target.args.model_type}, {target.args.num_hidden_layers} layers) | {kind} draft: "
        f"{draft.args.num_hidden_layers} layers, taps {list(draft.args.target_layer_ids)}, block "
        f"{draft.args.block_size} | {n_train} training / {len(eval_indices)} eval samples | batch {args.batch_size} = "
        f"{world} processes x {args.micro_batch_size} x {accumulation} accumulated | {total_steps} steps "
        f"({steps_per_epoch} per epoch) | {device}, {dtype}")
    if state is not None:
        log(f"resumed from {out / 'train_state.pt'} at step {step}")
    cache = None
    if args.hidden_cache:
        HiddenStateCache.capture(args.hidden_cache, data, target, draft.args.target_layer_ids, world == 1, log)
        cache = HiddenStateCache(args.hidden_cache, data, draft.args.target_layer_ids, dtype)

    def run_eval():
        if len(eval_indices):
            r = evaluate(model, draft, target, data, cache, eval_indices, args, rank, world, autocast, device)
            log(f"eval step {step}: loss {r['loss']:.4f} | accuracy {r['accuracy']:.3f} | estimated tau "
                f"{r['tau']:.2f} | accuracy by block position "
                + " ".join(f"{a:.2f}" for a in r["accuracy_by_position"]))

    if step == 0:
        run_eval()
    model.train()
    t0, tokens_seen = time.perf_counter(), 0
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        order = np.random.default_rng([args.seed, 0, epoch]).permutation(n_train)
        batch = order[position * args.batch_size:(position + 1) * args.batch_size]
        starts = [(m * world + rank) * args.micro_batch_size for m in range(accumulation)]
        micro_batches = [micro_batch(data, batch[s:s + args.micro_batch_size], args, 0, epoch, device, cache)
                         for s in starts]
        # the loss is a sum over the whole batch divided by its total weight (known before any forward)
        total_weight = all_reduce_sum(sum(b[2].sum() for b in micro_batches).double()).clamp(min=1e-9)
        lr = learning_rate(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = torch.zeros(2 * (args.block_size - 1) + 2, dtype=torch.float64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for m, (tokens, anchor_pos, weights, hidden) in enumerate(micro_batches):
            sync = world == 1 or m == accumulation - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                part, s = block_loss(model, draft, target, tokens, anchor_pos, weights, hidden, autocast)
                # DDP averages gradients over processes: scale by world to get the gradient of the batch's sum
                (part * (world / total_weight)).backward()
            loss_sum += part.detach().double()
            stats += s
            tokens_seen += tokens.numel() * world
        grad_norm = torch.nn.utils.clip_grad_norm_(draft.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0 or step == 1 or step == total_steps:
            all_reduce_sum(loss_sum)
            all_reduce_sum(stats)
            r = report(stats, args.block_size)
            elapsed = time.perf_counter() - t0
            log(f"step {step}/{total_steps} | loss {float(loss_sum / total_weight):.6f} | accuracy "
                f"{r['accuracy']:.3f} | lr {lr:.2e} | grad norm {float(grad_norm):.3f} | "
                f"{tokens_seen / elapsed:.0f} tokens/s")
        if step % args.eval_every == 0 or step == total_steps:
            run_eval()
        if step % args.save_every == 0 or step == total_steps:
            if rank == 0:
                save_checkpoint(out, draft, optimizer, step, args, dtype)
            log(f"saved step {step} to {out}")
    if world > 1:
        dist.barrier()  # rank 0 may have been saving
        # Everything is saved: leave without tearing down. Freeing DDP's reducer destroys gloo's process group, whose
        # destructor joins a worker thread that may still wait for the GIL the freeing thread holds (a deadlock, 1
        # run in 5 here), or aborts ("terminate called without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def interrupted(out: Path) -> str:
    """What a Ctrl-C leaves: the checkpoint on disk, which --resume reads, or none yet."""
    if not (out / "train_state.pt").is_file():
        return (f"interrupted before the first checkpoint: nothing in {str(out)!r} to --resume from yet (checkpoints "
                f"come every --save_every steps)")
    try:
        step = torch.load(out / "train_state.pt", map_location="cpu", mmap=True, weights_only=True)["step"]
    except Exception:  # cut short by this very Ctrl-C, or damaged: still one line, no traceback
        return f"interrupted: the checkpoint in {str(out)!r} is unreadable; start again without --resume"
    return (f"interrupted: the last checkpoint (step {step}) is in {str(out)!r}; the same command with --resume "
            f"continues from it")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun forwards the Ctrl-C once more: finish this
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every process gets the Ctrl-C: one line
            print(interrupted(Path(parse_args().out)), file=sys.stderr, flush=True)
        # 128 + SIGINT, as for a process killed by Ctrl-C. os._exit skips the C++ teardown, which can abort
        # ("terminate called without an active exception") after a backward cut short under DDP.
        os._exit(130)
