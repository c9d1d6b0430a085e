"""The draft's training loss (DESIGN.md section 5): weighted cross-entropy of its guesses at anchor blocks."""
from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    tokens: torch.Tensor
    anchors: torch.Tensor  # [B, nb]: block j of row b sits at anchors[b, j] + 0..bs-1
    weights: torch.Tensor  # [B, nb, bs-1]: label weights, 0 for padding and non-answer tokens
    hidden: torch.Tensor | None = None  # target's states [B, S, T, H]; None: block_loss runs the target


def sample_anchors(mask, block_size: int, num_anchors: int, rng) -> np.ndarray:
    """Sorted distinct anchors: answer tokens with a whole block after them inside the sequence."""
    candidates = np.flatnonzero(mask[:len(mask) - block_size + 1])
    if len(candidates) > num_anchors:
        candidates = np.sort(rng.choice(candidates, num_anchors, replace=False))
    return candidates


def anchor_rng(seed: int, split: int, epoch: int, index: int):
    """One sample's random stream in one epoch: independent of processes, micro-batches and resumption."""
    return np.random.default_rng([seed, split, epoch, int(index)])


def make_batch(samples, anchors, block_size: int, gamma: float, device) -> Batch:
    """Padded micro-batch of samples [(tokens, loss mask)] and anchors; padding blocks at 0 with weight 0."""
    B, nb = len(samples), max(1, max(len(a) for a in anchors))
    S = max(block_size, max(len(t) for t, _ in samples))
    tokens = np.zeros((B, S), dtype=np.int64)
    loss_mask = np.zeros((B, S), dtype=np.float32)
    anchor_pos = np.zeros((B, nb), dtype=np.int64)
    block_valid = np.zeros((B, nb), dtype=np.float32)
    for i, ((t, m), a) in enumerate(zip(samples, anchors)):
        tokens[i, :len(t)], loss_mask[i, :len(m)] = t, m
        anchor_pos[i, :len(a)], block_valid[i, :len(a)] = a, 1.0
    label_pos = anchor_pos[:, :, None] + np.arange(1, block_size)
    decay = np.exp(-np.arange(block_size - 1) / gamma)
    weights = np.take_along_axis(loss_mask, label_pos.reshape(B, -1), 1).reshape(label_pos.shape)
    weights = weights * block_valid[:, :, None] * decay
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return Batch(as_tensor(tokens), as_tensor(anchor_pos), as_tensor(weights.astype(np.float32)))


def block_loss(draft, target, batch: Batch):
    """Sum of weight x cross-entropy, and counts [correct by position (bs-1) | labels by position (bs-1) |
    leading correct guesses | blocks]. draft: the Draft or its DDP wrapper (whose forward syncs gradients)."""
    args = getattr(draft, "module", draft).args
    tokens, anchors, weights, hidden = batch
    if hidden is None:
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
            hidden = target.hidden_states(tokens, args.target_layer_ids)
    label_pos = anchors[:, :, None] + torch.arange(args.block_size, device=tokens.device)
    blocks = torch.full_like(label_pos, args.mask_token_id)
    blocks[:, :, 0] = tokens.gather(1, anchors)
    labels = tokens.gather(1, label_pos[:, :, 1:].flatten(1)).view_as(weights)
    states = draft(hidden, blocks, anchors)
    ce, guesses = chunked_cross_entropy(target.lm_head, states.flatten(0, 2), labels.flatten())
    ce, guesses = ce.view_as(labels), guesses.view_as(labels)
    with torch.no_grad():
        counted = weights > 0
        correct = (guesses == labels) & counted
        leading = correct.int().cumprod(-1).sum(-1)  # guesses a greedy verify would accept, per block
        stats = torch.cat([correct.sum((0, 1)), counted.sum((0, 1)),
                           torch.stack([leading.sum(), (weights[..., 0] > 0).sum()])]).double()
    return (ce * weights).sum(), stats


LOGITS_CHUNK_ELEMENTS = 2**26


def chunked_cross_entropy(lm_head, states, labels):
    """states [N, H], labels [N] -> cross-entropy [N] and argmax [N] of lm_head(states), a chunk at a time."""
    rows = max(1, LOGITS_CHUNK_ELEMENTS // lm_head.out_features)
    return LinearCrossEntropy.apply(states, lm_head.weight, labels, rows)


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of states @ weight.T; states' gradient computed in the forward (DESIGN.md section 5)."""

    @staticmethod
    def forward(ctx, states, weight, labels, rows):
        with_grad = ctx.needs_input_grad[0]
        chunks = [chunk_cross_entropy(s, weight, l, with_grad)
                  for s, l in zip(states.split(rows), labels.split(rows))]
        ce, guesses = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        if with_grad:
            ctx.save_for_backward(torch.cat([c[2] for c in chunks]))
        ctx.mark_non_differentiable(guesses)
        return ce, guesses

    @staticmethod
    def backward(ctx, grad_ce, grad_guesses):
        (grad_states,) = ctx.saved_tensors
        return grad_states * grad_ce[:, None].to(grad_states.dtype), None, None, None


def chunk_cross_entropy(states, weight, labels, with_grad: bool):
    """One chunk's cross-entropy, argmax (fp32 logits) and, with_grad, (softmax - onehot(label)) @ weight."""
    logits = (states @ weight.T).float()
    lse = logits.logsumexp(-1, keepdim=True)
    ce = (lse - logits.gather(1, labels[:, None]))[:, 0]
    guesses = logits.argmax(-1)
    if not with_grad:
        return ce, guesses, None
    probs = logits.sub_(lse).exp_()
    probs[torch.arange(len(labels), device=labels.device), labels] -= 1
    return ce, guesses, (probs.to(weight.dtype) @ weight).to(states.dtype)


def report(stats, block_size: int) -> dict:
    n = block_size - 1
    correct, counted, leading, blocks = stats[:n], stats[n:2 * n], stats[2 * n], stats[2 * n + 1]
    by_position = (correct / counted.clamp(min=1)).tolist()
    return {"accuracy": float(correct.sum() / counted.sum().clamp(min=1)),
            "accuracy_by_position": by_position, "tau": 1.0 + float(leading / blocks.clamp(min=1))}
