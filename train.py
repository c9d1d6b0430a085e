"""Train a DFlare (or DFlash) draft for a frozen target (DESIGN.md section 5).

    python prepare.py --target TARGET_DIR --data chats.jsonl --out data/ --regenerate
    torchrun --nproc_per_node 8 train.py --target TARGET_DIR --data data/ --out my-draft/
    python train.py --target TARGET_DIR --data data/ --out my-draft/            # one process
    python generate.py --checkpoint TARGET_DIR --draft my-draft/ --compare_ar --prompt "..."

A step, per sequence: the frozen target's hidden states at the draft's tapped layers (or --hidden_cache), up
to --num_anchors blocks [anchor token, MASK, ...] inside the answers through the draft in one forward, and the
weighted cross-entropy of its guesses (loss.block_loss). Anchors come from (seed, epoch, sample index) and the
loss is normalised by the whole batch's weight, so losses do not depend on the number of processes or
micro-batches and --resume continues exactly. --out holds the draft folder (for generate.py --draft) and
train_state.pt (fp32 weights, optimizer, step: for --resume).
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from checkpoint import (InputError, check_draft_target, default_dtype, is_draft, load_checkpoint, load_draft,
                        pick_device, replace_atomically, save_draft)
from data import HiddenStateCache, PackedData, output_folder
from draft import Draft, DraftArgs
from loss import LOSSES, Batch, anchor_rng, block_loss, make_batch, report, sample_anchors
from model import Transformer


@dataclass
class Run:
    """What every step reads: the models, the data and how samples become blocks, the processes."""
    model: torch.nn.Module  # the draft, or its DDP wrapper
    draft: Draft
    target: Transformer
    data: PackedData
    cache: HiddenStateCache | None
    args: argparse.Namespace  # block_size, num_anchors, max_seq_len, gamma, seed, micro_batch_size, ...
    autocast: torch.autocast
    device: torch.device
    rank: int = 0
    world: int = 1


def micro_batch(run: Run, indices, split: int, epoch: int) -> Batch:
    """The samples at indices, cut to --max_seq_len, with their anchors (and cached target hidden states, if
    any)."""
    a = run.args
    samples = [(t[:a.max_seq_len], m[:a.max_seq_len]) for t, m in (run.data[i] for i in indices)]
    anchors = [sample_anchors(m, a.block_size, a.num_anchors, anchor_rng(a.seed, split, epoch, i))
               for i, (_, m) in zip(indices, samples)]
    batch = make_batch(samples, anchors, a.block_size, a.gamma, run.device)
    if run.cache is None:
        return batch
    rows = [run.cache.get(i) for i in indices]  # past a sample's end: never context or labels, zeros
    hidden, top_k = (padded([r[k] for r in rows], batch.tokens.shape[1], run.device) for k in (0, 1))
    return batch._replace(hidden=hidden, top_k=top_k)


def padded(tensors, length: int, device):
    """Per-sample tensors [S_i, ...] (or tuples of them; None gives None) cut or zero-padded to
    [B, length, ...]."""
    if tensors[0] is None:
        return None
    if isinstance(tensors[0], tuple):
        return tuple(padded(list(column), length, device) for column in zip(*tensors))
    out = tensors[0].new_zeros(len(tensors), length, *tensors[0].shape[1:])
    for b, t in enumerate(tensors):
        out[b, :len(t)] = t[:length]
    return out.to(device)


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
def evaluate(run: Run, eval_indices) -> dict:
    """Loss, accuracy per block position and estimated tau (1 + mean accepted guesses) on held-out samples."""
    run.model.eval()
    stats = torch.zeros(2 * (run.args.block_size - 1) + 2, dtype=torch.float64, device=run.device)
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)
    mine, size = eval_indices[run.rank::run.world], run.args.micro_batch_size
    for start in range(0, len(mine), size):
        batch = micro_batch(run, mine[start:start + size], 1, 0)
        with run.autocast:
            loss_sum, s = block_loss(run.model, run.target, batch, run.args.loss, run.args.top_k)
        stats += s
        sums += torch.stack([loss_sum.double(), batch.weights.sum().double()])
    all_reduce_sum(stats)
    all_reduce_sum(sums)
    run.model.train()
    return {"loss": float(sums[0] / sums[1].clamp(min=1e-9)), **report(stats, run.args.block_size)}


def train_step(run: Run, optimizer, batch_indices, epoch: int, lr: float):
    """One optimizer step over the batch, accumulating this process's micro-batches. Returns the batch's loss
    sum and total weight, accuracy counts, gradient norm and tokens read."""
    size, world = run.args.micro_batch_size, run.world
    accumulation = run.args.batch_size // (world * size)
    starts = [(m * world + run.rank) * size for m in range(accumulation)]
    batches = [micro_batch(run, batch_indices[s:s + size], 0, epoch) for s in starts]
    # normalise by the whole batch's weight, known before any forward
    total_weight = all_reduce_sum(sum(b.weights.sum() for b in batches).double()).clamp(min=1e-9)
    for group in optimizer.param_groups:
        group["lr"] = lr
    stats = torch.zeros(2 * (run.args.block_size - 1) + 2, dtype=torch.float64, device=run.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for m, batch in enumerate(batches):
        sync = world == 1 or m == accumulation - 1
        with contextlib.nullcontext() if sync else run.model.no_sync():
            with run.autocast:
                part, s = block_loss(run.model, run.target, batch, run.args.loss, run.args.top_k)
            # DDP averages gradients over processes: scale by world to get the gradient of the batch's sum
            (part * (world / total_weight)).backward()
        loss_sum += part.detach().double()
        stats += s
    grad_norm = torch.nn.utils.clip_grad_norm_(run.draft.parameters(), run.args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, total_weight, stats, grad_norm, sum(b.tokens.numel() for b in batches) * world


def save_checkpoint(out: Path, draft: Draft, optimizer, step: int, args, dtype):
    """The draft folder, then train_state.pt (the resume point), each written whole or not at all, so a save
    cut short leaves the previous checkpoint whole."""
    save_draft(draft, out, dtype=dtype)
    state = {"step": step, "draft_args": asdict(draft.args), "draft": draft.state_dict(),
             "optimizer": optimizer.state_dict(), "args": vars(args)}
    replace_atomically(out / "train_state.pt", lambda tmp: torch.save(state, tmp))


# settings a resumed run may change; any other change would make it a different run
RUN_TIME_FLAGS = {"resume", "out", "device", "log_every", "eval_every", "save_every", "micro_batch_size",
                  "hidden_cache"}


def resume_state(out: Path, args):
    if not (out / "train_state.pt").is_file():
        raise InputError(f"--resume: {str(out)!r} has no train_state.pt to resume from")
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    changed = sorted(k for k, v in state["args"].items()
                     if k not in RUN_TIME_FLAGS and getattr(args, k, v) != v)
    if changed:
        raise InputError(f"--resume with other settings than the saved run ({', '.join(changed)}): use the "
                         f"original flags, or another --out for a new run")
    return state


# ------------------------------------------------------------------------------------------------------------
# The command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a DFlare / DFlash draft (launch with torchrun for several "
                                            "processes).")
    p.add_argument("--target", required=True, help="target checkpoint folder (frozen)")
    p.add_argument("--data", required=True, help="folder written by prepare.py")
    p.add_argument("--out", required=True, help="draft folder to write (checkpoints and train_state.pt)")
    p.add_argument("--init", help="start from this draft folder instead of a new draft")
    p.add_argument("--hidden_cache",
                   help="folder for the target's hidden states of --data (and its --top_k tokens for "
                        "--loss kl / lk), captured on first use and read back after (the target then runs "
                        "once, not every step; T x hidden size x 2 bytes per token in bfloat16)")
    p.add_argument("--fusion", choices=["layerwise", "linear"], default="layerwise",
                   help="layerwise = DFlare, linear = DFlash")
    p.add_argument("--num_layers", type=int, default=5, help="draft layers")
    p.add_argument("--target_layer_ids", type=int, nargs="+",
                   help="target layers to tap (default: 9 spread for DFlare, num_layers for DFlash)")
    p.add_argument("--block_size", type=int, default=16)
    p.add_argument("--mask_token_id", type=int, help="default: the last id of the target's vocabulary")
    p.add_argument("--num_anchors", type=int, default=512, help="blocks per sequence")
    p.add_argument("--loss", choices=LOSSES, default="ce",
                   help="ce: cross-entropy against the target's tokens; kl: KL(target || draft) over the "
                        "target's --top_k tokens; lk: -log of the acceptance rate sum min(target, draft) "
                        "over them (both run the whole target each step, unless --hidden_cache)")
    p.add_argument("--top_k", type=int, default=20, help="target tokens per position for --loss kl / lk")
    p.add_argument("--gamma", type=float, default=7.0,
                   help="loss weight of block position k: exp(-(k-1)/gamma)")
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
                 "eval_every", "save_every", "log_every", "top_k"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    if args.block_size < 2:
        raise InputError("--block_size must be at least 2 (the anchor and one guess)")
    if args.gamma <= 0 or args.lr <= 0 or not 0 <= args.warmup_ratio < 1:
        raise InputError("--gamma and --lr must be > 0, --warmup_ratio in [0, 1)")
    return args


def start_processes(args):
    """(rank, world, device): each torchrun process makes cuda:LOCAL_RANK current, where Triton kernels and
    NCCL run."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = pick_device(args.device).type == "cuda"
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def check_run(args, world: int):
    """--out and, with --resume, its saved state: checked before any work."""
    out = output_folder(args.out)
    if args.batch_size % (world * args.micro_batch_size):
        raise InputError(f"--batch_size {args.batch_size} must be a multiple of processes ({world}) x "
                         f"--micro_batch_size ({args.micro_batch_size})")
    if (out / "train_state.pt").is_file() and not args.resume:
        raise InputError(f"{str(out)!r} holds a training run: "
                         f"pass --resume to continue it, or use another --out")
    if is_draft(args.target):
        raise InputError(f"--target {args.target!r} is a draft, not a target model: "
                         f"pass the target model's folder")
    return out, resume_state(out, args) if args.resume else None


def load_data(args, target: Transformer):
    """The prepared samples and how many train (the last --eval_samples are held out)."""
    data = PackedData(args.data)
    if data.index["settings"]["vocab_size"] > target.args.vocab_size:
        raise InputError(f"--data was tokenized for a vocabulary of {data.index['settings']['vocab_size']}, "
                         f"larger than the target's {target.args.vocab_size}: prepare it with this target")
    n_train = len(data) - args.eval_samples
    if n_train < args.batch_size:
        raise InputError(f"{len(data)} samples leave {n_train} for training after --eval_samples "
                         f"{args.eval_samples}: fewer than one --batch_size {args.batch_size}")
    return data, n_train


def make_draft(args, target: Transformer, state) -> Draft:
    """The draft to train: resumed, from --init, or new; bound to the target, fp32 master weights."""
    torch.manual_seed(args.seed)
    if state is not None:
        draft = Draft(DraftArgs(**state["draft_args"]))
        draft.load_state_dict(state["draft"])
    elif args.init:
        draft = load_draft(args.init, target, "cpu", torch.float32)
    else:
        draft = Draft.for_target(target.args, args.num_layers, args.fusion, args.target_layer_ids,
                                 args.block_size, args.mask_token_id)
    check_draft_target(draft.args, target.args)
    if draft.args.block_size != args.block_size:
        raise InputError(f"--block_size {args.block_size} differs from the --init draft's "
                         f"{draft.args.block_size}")
    return draft.to(target.embed_tokens.weight.device, torch.float32).bind(target)


def describe(run: Run, n_train: int, total_steps: int, dtype) -> str:
    a, t, d = run.args, run.target.args, run.draft.args
    accumulation = a.batch_size // (run.world * a.micro_batch_size)
    return (f"target {a.target} ({t.model_type}, {t.num_hidden_layers} layers) | "
            f"{'DFlare' if d.fusion == 'layerwise' else 'DFlash'} draft: {d.num_hidden_layers} layers, taps "
            f"{list(d.target_layer_ids)}, block {d.block_size} | {n_train} training / "
            f"{len(run.data) - n_train} eval samples | batch {a.batch_size} = {run.world} processes x "
            f"{a.micro_batch_size} x {accumulation} accumulated | {total_steps} steps "
            f"({n_train // a.batch_size} per epoch) | loss {a.loss}"
            f"{f' over the target top {a.top_k}' if a.loss != 'ce' else ''} | {run.device}, {dtype}")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = start_processes(args)
    out, state = check_run(args, world)
    dtype = default_dtype(device, args.dtype)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    target = load_checkpoint(args.target, device, dtype)
    data, n_train = load_data(args, target)
    steps_per_epoch = n_train // args.batch_size
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    draft = make_draft(args, target, state)
    model = DistributedDataParallel(draft, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else draft
    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=args.weight_decay)
    step = 0 if state is None else state["step"]
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    cache = None
    if args.hidden_cache:
        top_k = args.top_k if args.loss != "ce" else 0
        HiddenStateCache.capture(args.hidden_cache, data, target, draft.args.target_layer_ids, top_k,
                                 world == 1, log)
        cache = HiddenStateCache(args.hidden_cache, data, draft.args.target_layer_ids, dtype, top_k)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    run = Run(model, draft, target, data, cache, args, autocast, device, rank, world)
    log(describe(run, n_train, total_steps, dtype))
    if state is not None:
        log(f"resumed from {out / 'train_state.pt'} at step {step}")
    if step == 0:
        log_eval(run, n_train, step, log)
    train(run, optimizer, out, step, total_steps, n_train, dtype, log)
    if world > 1:
        dist.barrier()  # rank 0 may have been saving
        # Everything is saved: skip teardown. Freeing DDP's reducer destroys gloo's process group, whose
        # destructor can deadlock on the GIL (1 run in 5 here) or abort.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def log_eval(run: Run, n_train: int, step: int, log):
    if len(run.data) > n_train:
        r = evaluate(run, np.arange(n_train, len(run.data)))
        log(f"eval step {step}: loss {r['loss']:.4f} | accuracy {r['accuracy']:.3f} | estimated tau "
            f"{r['tau']:.2f} | accuracy by block position "
            + " ".join(f"{a:.2f}" for a in r["accuracy_by_position"]))


def train(run: Run, optimizer, out: Path, step: int, total_steps: int, n_train: int, dtype, log):
    """The steps from `step` on: logs, evaluations and checkpoints at their intervals."""
    args, steps_per_epoch = run.args, n_train // run.args.batch_size
    run.model.train()
    t0, tokens_seen = time.perf_counter(), 0
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        order = np.random.default_rng([args.seed, 0, epoch]).permutation(n_train)
        lr = learning_rate(step, total_steps, args)
        loss_sum, total_weight, stats, grad_norm, tokens = train_step(
            run, optimizer, order[position * args.batch_size:(position + 1) * args.batch_size], epoch, lr)
        tokens_seen += tokens
        step += 1
        if step % args.log_every == 0 or step == 1 or step == total_steps:
            all_reduce_sum(loss_sum)
            all_reduce_sum(stats)
            r = report(stats, args.block_size)
            log(f"step {step}/{total_steps} | loss {float(loss_sum / total_weight):.6f} | accuracy "
                f"{r['accuracy']:.3f} | lr {lr:.2e} | grad norm {float(grad_norm):.3f} | "
                f"{tokens_seen / (time.perf_counter() - t0):.0f} tokens/s")
        if step % args.eval_every == 0 or step == total_steps:
            log_eval(run, n_train, step, log)
        if step % args.save_every == 0 or step == total_steps:
            if run.rank == 0:
                save_checkpoint(out, run.draft, optimizer, step, args, dtype)
            log(f"saved step {step} to {out}")


def interrupted(out: Path) -> str:
    """What a Ctrl-C leaves: the checkpoint on disk, which --resume reads, or none yet."""
    if not (out / "train_state.pt").is_file():
        return (f"interrupted before the first checkpoint: nothing in {str(out)!r} to --resume from yet "
                f"(checkpoints come every --save_every steps)")
    try:
        step = torch.load(out / "train_state.pt", map_location="cpu", mmap=True, weights_only=True)["step"]
    except Exception:  # cut short by this very Ctrl-C, or damaged: still one line, no traceback
        return f"interrupted: the checkpoint in {str(out)!r} is unreadable; start again without --resume"
    return (f"interrupted: the last checkpoint (step {step}) is in {str(out)!r}; the same command with "
            f"--resume continues from it")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun forwards the Ctrl-C once more: finish this
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every process gets the Ctrl-C: one line
            print(interrupted(Path(parse_args().out)), file=sys.stderr, flush=True)
        # 128 + SIGINT, as for a Ctrl-C kill; os._exit skips the C++ teardown, which can abort after a
        # backward cut short under DDP.
        os._exit(130)
