"""Attention over the static KV cache, query heads folded into the query length (DESIGN.md section 1): plain
(SDPA), with GPT-OSS's sinks, and one query position at a time (the batch-invariant mode's CPU path)."""
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, flex_attention


def attention(q, k, v, mask):
    """q [B, H, S, D], k, v [B, H_kv, L, D], boolean mask [B, 1, rep * S, L] -> [B, H, S, D]. Query heads
    fold into the query length: row r * S + s of K/V head g is head g * rep + r at s (DESIGN.md section 1)."""
    B, H, S, D = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1] * S, D)
    # reshape, not view: the memory-efficient kernel returns a [B, rep * S, H_kv, D] layout
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, H, S, D)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled with dynamic shapes, on first use (eager flex_attention holds every score).
    Inside a compiled step call flex_attention itself (Dynamo inlines it)."""
    return torch.compile(flex_attention, dynamic=True)


def attention_with_sinks(q, k, v, mask, sinks):
    """`attention` whose softmax denominator also holds exp(sink) per head (GPT-OSS; DESIGN.md section 1)."""
    if q.is_cuda:
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
        return attention_with_sinks_by_lse(q, k, v, mask, sinks, flex)
    B, H, S, D = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1] * S, D)
    scores = (q.float() @ k.float().transpose(-1, -2)) * D ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(k.shape[1], -1, 1).expand(-1, -1, S).reshape(1, k.shape[1], -1, 1)
    top = torch.maximum(scores.amax(-1, keepdim=True), sink)
    weights = torch.exp(scores - top)
    probs = weights / (weights.sum(-1, keepdim=True) + torch.exp(sink - top))
    return (probs @ v.float()).to(q.dtype).view(B, H, S, D)


def attention_with_sinks_by_lse(q, k, v, mask, sinks, flex=flex_attention):
    """attention_with_sinks via flex_attention's log-sum-exp lse: output x sigmoid(lse - sink). The CUDA path;
    eager flex runs it on CPU too."""
    B, H, S, D = q.shape
    rep = H // k.shape[1]

    def masked(score, b, h, q_idx, kv_idx):
        return torch.where(mask[b, 0, h % rep * S + q_idx, kv_idx], score, float("-inf"))

    out, aux = flex(q, k, v, score_mod=masked, enable_gqa=True, return_aux=AuxRequest(lse=True))
    return (out.float() * torch.sigmoid(aux.lse - sinks.float()[:, None])[..., None]).to(q.dtype)


def query_by_query(attend, q, k, v, mask, *extra):
    """attend(q, k, v, mask, *extra) one query position at a time, as a single token attends (the kernels
    split their reductions by query length). q [B, H, S, D], mask [B, 1, rep * S, L] folded as in
    `attention`."""
    B, H, S, _ = q.shape
    if S == 1:
        return attend(q, k, v, mask, *extra)
    masks = mask.reshape(B, 1, H // k.shape[1], S, -1)  # [B, 1, rep, S, L]
    return torch.cat([attend(q[:, :, s:s + 1], k, v, masks[:, :, :, s], *extra) for s in range(S)], dim=2)
