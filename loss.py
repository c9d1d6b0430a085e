"""The draft's training loss (DESIGN.md section 5): at anchor blocks, the weighted cross-entropy of its
guesses against the target's tokens ("ce"), or a loss against the target's distribution there, given by its
top-K logits: KL(target || draft) ("kl") or -log of the acceptance rate sum min(target, draft) ("lk")."""
from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    tokens: torch.Tensor
    anchors: torch.Tensor  # [B, nb]: block j of row b sits at anchors[b, j] + 0..bs-1
    weights: torch.Tensor  # [B, nb, bs-1]: label weights, 0 for padding and non-answer tokens
    hidden: torch.Tensor | None = None  # target's states [B, S, T, H]; None: block_loss runs the target
    # the target's top-K next-token (ids, logits) [B, S, K] at each position; None: block_loss runs the target
    top_k: tuple | None = None


LOSSES = ("ce", "kl", "lk")


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


def block_loss(draft, target, batch: Batch, loss: str = "ce", top_k: int = 0):
    """Sum of weight x loss, and counts [correct by position (bs-1) | labels by position (bs-1) | leading
    correct guesses | blocks]. draft: the Draft or its DDP wrapper (whose forward syncs gradients). "kl" and
    "lk" read the target's top_k logits at each label's position from batch.top_k (given with batch.hidden,
    from the cache), or run the target."""
    args = getattr(draft, "module", draft).args
    tokens, anchors, weights, hidden, target_top_k = batch
    if hidden is None:
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
            hidden, computed = target_states(target, tokens, args.target_layer_ids,
                                             top_k if loss != "ce" and target_top_k is None else 0)
        target_top_k = computed if target_top_k is None else target_top_k
    label_pos = anchors[:, :, None] + torch.arange(args.block_size, device=tokens.device)
    blocks = torch.full_like(label_pos, args.mask_token_id)
    blocks[:, :, 0] = tokens.gather(1, anchors)
    labels = tokens.gather(1, label_pos[:, :, 1:].flatten(1)).view_as(weights)
    soft = None
    if loss != "ce":  # the target's distribution over the token at label_pos: its logits one position before
        before = label_pos[:, :, :-1].flatten(1)[..., None].expand(-1, -1, target_top_k[0].shape[-1])
        soft = tuple(t.gather(1, before).flatten(0, 1) for t in target_top_k)  # ([N, K], [N, K])
    states = draft(hidden, blocks, anchors)
    ce, guesses = chunked_loss(target.lm_head, states.flatten(0, 2), labels.flatten(), soft, loss)
    ce, guesses = ce.view_as(labels), guesses.view_as(labels)
    with torch.no_grad():
        counted = weights > 0
        correct = (guesses == labels) & counted
        leading = correct.int().cumprod(-1).sum(-1)  # guesses a greedy verify would accept, per block
        stats = torch.cat([correct.sum((0, 1)), counted.sum((0, 1)),
                           torch.stack([leading.sum(), (weights[..., 0] > 0).sum()])]).double()
    return (ce * weights).sum(), stats


LOGITS_CHUNK_ELEMENTS = 2**26


def target_states(target, tokens, layer_ids, top_k: int):
    """The target's states [B, S, T, H] at layer_ids and, when top_k, its top_k next-token (ids, fp32 logits)
    [B, S, K] at every position (else None): the whole target then runs."""
    if not top_k:
        return target.hidden_states(tokens, layer_ids), None
    captured = sorted(set(layer_ids) | {target.args.num_hidden_layers - 1})
    states = target.hidden_states(tokens, captured)  # [B, S, len(captured), H]
    hidden = states[:, :, [captured.index(i) for i in layer_ids]]
    return hidden, top_k_logits(target, states[:, :, -1], top_k)


def top_k_logits(target, final_states, k: int) -> tuple:
    """The last layer's states [..., H] -> the target's k most likely next tokens (ids, fp32 logits) [..., k],
    a chunk of rows at a time (a row's logits are vocabulary-sized)."""
    rows = final_states.flatten(0, -2)
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // target.lm_head.out_features)
    tops = [target.lm_head(target.norm(part)).float().topk(k, dim=-1) for part in rows.split(chunk)]
    ids, logits = torch.cat([t.indices for t in tops]), torch.cat([t.values for t in tops])
    return ids.view(*final_states.shape[:-1], k), logits.view(*final_states.shape[:-1], k)


def chunked_loss(lm_head, states, labels, soft=None, loss: str = "ce"):
    """states [N, H], labels [N] (soft: the target's top-K (ids, logits) [N, K]) -> the loss [N] and argmax
    [N] of lm_head(states), a chunk at a time."""
    rows = max(1, LOGITS_CHUNK_ELEMENTS // lm_head.out_features)
    ids, logits = soft if soft is not None else (None, None)
    return LinearLoss.apply(states, lm_head.weight, labels, ids, logits, loss, rows)


class LinearLoss(torch.autograd.Function):
    """A loss of the logits states @ weight.T; states' gradient computed in the forward (DESIGN.md
    section 5)."""

    @staticmethod
    def forward(ctx, states, weight, labels, soft_ids, soft_logits, loss, rows):
        with_grad = ctx.needs_input_grad[0]
        parts = [(None, None)] * len(labels.split(rows)) if soft_ids is None else \
            zip(soft_ids.split(rows), soft_logits.split(rows))
        chunks = [chunk_loss(s, weight, l, soft, loss, with_grad)
                  for s, l, soft in zip(states.split(rows), labels.split(rows), parts)]
        values, guesses = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        if with_grad:
            ctx.save_for_backward(torch.cat([c[2] for c in chunks]))
        ctx.mark_non_differentiable(guesses)
        return values, guesses

    @staticmethod
    def backward(ctx, grad_values, grad_guesses):
        (grad_states,) = ctx.saved_tensors
        return grad_states * grad_values[:, None].to(grad_states.dtype), None, None, None, None, None, None


def chunk_loss(states, weight, labels, soft: tuple, loss: str, with_grad: bool):
    """One chunk's loss, argmax (fp32 logits) and, with_grad, d(loss)/d(logits) @ weight. ce: against labels,
    gradient softmax - onehot(label); kl, lk: against p = softmax of the target's top-K logits (DESIGN.md
    section 5)."""
    logits = (states @ weight.T).float()
    lse = logits.logsumexp(-1, keepdim=True)
    guesses = logits.argmax(-1)
    rows = torch.arange(len(labels), device=labels.device)
    if loss == "ce":
        value = (lse - logits.gather(1, labels[:, None]))[:, 0]
        if not with_grad:
            return value, guesses, None
        grad = logits.sub_(lse).exp_()
        grad[rows, labels] -= 1
        return value, guesses, (grad.to(weight.dtype) @ weight).to(states.dtype)
    ids, target_logits = soft
    p = torch.softmax(target_logits.float(), dim=-1)  # [n, K]
    log_q = logits.gather(1, ids) - lse  # the draft's log-probabilities of those K tokens
    if loss == "kl":
        value = (p * (p.clamp(min=1e-30).log() - log_q)).sum(-1)
        weights = p  # d/d(logits) = softmax - p (p scattered to its ids)
        scale = None
    else:  # lk: alpha = sum_k min(p_k, q_k); d(-log alpha)/d(logits) = (q * S - m * q) / alpha
        q = log_q.exp()
        below = (q < p).float()  # m: where the draft's probability is the smaller
        alpha = torch.minimum(p, q).sum(-1).clamp(min=1e-30)
        value = -alpha.log()
        weights = below * q / alpha[:, None]
        scale = (below * q).sum(-1) / alpha  # S / alpha
    if not with_grad:
        return value, guesses, None
    grad = logits.sub_(lse).exp_()  # softmax
    if scale is not None:
        grad.mul_(scale[:, None])
    grad.scatter_add_(1, ids, -weights)
    return value, guesses, (grad.to(weight.dtype) @ weight).to(states.dtype)


def report(stats, block_size: int) -> dict:
    n = block_size - 1
    correct, counted, leading, blocks = stats[:n], stats[n:2 * n], stats[2 * n], stats[2 * n + 1]
    by_position = (correct / counted.clamp(min=1)).tolist()
    return {"accuracy": float(correct.sum() / counted.sum().clamp(min=1)),
            "accuracy_by_position": by_position, "tau": 1.0 + float(leading / blocks.clamp(min=1))}
