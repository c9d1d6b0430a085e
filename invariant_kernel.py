"""Batch-invariant operators for the decoding mode `Transformer.batch_invariant` (DESIGN.md section 10): a
linear layer and attention whose result for a row does not depend on how many rows are computed with it.

    dflare::invariant_linear     x [M, K] @ w[N, K]^T + b: tiles of fixed size whatever M, no split-K
    dflare::invariant_attention  softmax(q k^T / sqrt(D), mask, sinks) v: keys split in fixed chunks whatever
                                 the number of queries, the chunks combined in order

A row's reduction order is then fixed by the weight's or the cache's shape alone: a verify's row rounds as a
lone token's decode does. Elsewhere (CPU) the operators go one row, one query position, at a time."""
from typing import Optional

import torch
import torch.nn.functional as F

from attention import attention, attention_with_sinks, query_by_query
from fuse_kernel import HAVE_TRITON, on_device, use_kernel
from moe_kernel import BLOCK_K, BLOCK_M, BLOCK_N, dot_in_fp32

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    from moe_kernel import _expert_tile

BLOCK_QUERIES = 16  # query rows (query heads folded in) a program attends with
KEYS_PER_SPLIT = 256  # keys a program covers: the cache's length sets the split, never the query count


if HAVE_TRITON:
    @triton.jit(do_not_specialize=["M"])
    def _linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (i, j): rows i * BLOCK_M... of x times weight rows j * BLOCK_N..., K in one ordered
        loop."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask, col_mask = rows < M, cols < N
        acc = _expert_tile(x_ptr, rows.to(tl.int64), row_mask, w_ptr, w_ptr, cols.to(tl.int64), col_mask, K,
                           False, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])

    @triton.jit(do_not_specialize=["R"])
    def _attention_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, stats_ptr, R, L, D, H_KV,
                                mask_batch_stride, scale, DOT_FP32: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, KEYS_PER_SPLIT: tl.constexpr):
        """Program (i, b * H_KV + g, split): query rows i * BLOCK_R... of K/V head g against the split's keys,
        an online softmax over BLOCK_L keys at a time. Writes the unnormalised output [BLOCK_R, D] and the
        running max and sum of exp (fp32) per row; rows with no visible key there keep max -1e30, sum 0."""
        i, bg, split = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        b = bg // H_KV
        rows = i * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        row_mask, d_mask = rows < R, offs_d < D
        q = tl.load(q_ptr + (bg * R + rows)[:, None] * D + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        scale = tl.cast(scale, tl.float32)  # Inductor passes floats as fp64
        m_i = tl.full([BLOCK_R], -1e30, dtype=tl.float32)  # finite: a masked block changes nothing, exactly
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        dot_dtype = tl.float32 if DOT_FP32 else q.dtype
        for l0 in range(split * KEYS_PER_SPLIT, split * KEYS_PER_SPLIT + KEYS_PER_SPLIT, BLOCK_L):
            keys = l0 + tl.arange(0, BLOCK_L)
            kv_mask = (keys < L)[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + (bg * L + keys)[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + (bg * L + keys)[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            visible = tl.load(mask_ptr + b * mask_batch_stride + rows[:, None] * L + keys[None, :],
                              mask=row_mask[:, None] & (keys < L)[None, :], other=0)
            scores = tl.dot(q.to(dot_dtype), tl.trans(k.to(dot_dtype)), input_precision="ieee") * scale
            scores = tl.where(visible != 0, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(dot_dtype), v.to(dot_dtype), acc * alpha[:, None], input_precision="ieee")
            m_i = m_new
        n_splits = tl.num_programs(2)
        out_rows = (bg * n_splits + split) * R + rows  # partials [B * H_KV, splits, R, ...]
        tl.store(acc_ptr + out_rows[:, None] * D + offs_d[None, :], acc,
                 mask=row_mask[:, None] & d_mask[None, :])
        tl.store(stats_ptr + out_rows * 2, m_i, mask=row_mask)
        tl.store(stats_ptr + out_rows * 2 + 1, l_i, mask=row_mask)

    @triton.jit(do_not_specialize=["R", "S"])
    def _attention_combine_kernel(acc_ptr, stats_ptr, sinks_ptr, out_ptr, R, D, H_KV, S, N_SPLITS,
                                  HAS_SINKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (i, b * H_KV + g): the splits' partials of rows i * BLOCK_R... summed in split order,
        scaled to their common max; a GPT-OSS sink adds exp(sink) to the denominator. Row r * S + s of K/V
        head g is query head g * (H / H_KV) + r."""
        i, bg = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = i * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        row_mask, d_mask = rows < R, offs_d < D
        m_all = tl.full([BLOCK_R], -1e30, dtype=tl.float32)
        for split in range(N_SPLITS):
            m_all = tl.maximum(m_all, tl.load(stats_ptr + ((bg * N_SPLITS + split) * R + rows) * 2,
                                              mask=row_mask, other=-1e30))
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        out = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for split in range(N_SPLITS):
            part_rows = (bg * N_SPLITS + split) * R + rows
            m = tl.load(stats_ptr + part_rows * 2, mask=row_mask, other=-1e30)
            weight = tl.exp(m - m_all)
            total += weight * tl.load(stats_ptr + part_rows * 2 + 1, mask=row_mask, other=0.0)
            out += weight[:, None] * tl.load(acc_ptr + part_rows[:, None] * D + offs_d[None, :],
                                             mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if HAS_SINKS:
            head = (bg % H_KV) * (R // S) + rows // S
            sink = tl.load(sinks_ptr + head, mask=row_mask, other=float("-inf")).to(tl.float32)
            total += tl.exp(sink - m_all)
        total = tl.where(row_mask, total, 1.0)  # rows past R: no 0 / 0
        tl.store(out_ptr + (bg * R + rows)[:, None] * D + offs_d[None, :],
                 (out / total[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])


def launch_linear(x, weight, bias):
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, fp32 accumulation."""
    (M, K), N = x.shape, weight.shape[0]
    out = x.new_empty(M, N)
    # fp32 dots run on CUDA cores, not tensor cores: twice the warps keep their tiles in registers
    meta = dict(HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_K=BLOCK_K, num_warps=8 if x.dtype == torch.float32 else 4)
    with on_device(x):
        wrap_triton(_linear_kernel)[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
            x.contiguous(), weight.contiguous(), weight if bias is None else bias, out, M, N, K, **meta)
    return out


def launch_attention(q, k, v, mask, sinks, S: int):
    """q [B, H_KV, R, D] (query heads folded: R = rep * S), k, v [B, H_KV, L, D], mask [B, 1, R, L] boolean,
    sinks [H] or None -> [B, H_KV, R, D]: the split kernel over ceil(L / KEYS_PER_SPLIT) chunks of keys, then
    the combine kernel."""
    B, H_KV, R, D = q.shape
    L = k.shape[2]
    n_splits = triton.cdiv(L, KEYS_PER_SPLIT)
    partial_out = q.new_empty(B * H_KV, n_splits, R, D, dtype=torch.float32)
    stats = q.new_empty(B * H_KV, n_splits, R, 2, dtype=torch.float32)  # running max, sum of exp
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    mask = mask.expand(B, 1, R, L)
    if mask.stride(2) != L or mask.stride(3) != 1:
        mask = mask.contiguous()
    block_d = triton.next_power_of_2(D)
    # keys a step of the loop reads; fp32 tiles take twice the registers: half the keys, twice the warps
    block_keys, warps = (32, 8) if q.dtype == torch.float32 else (64, 4)
    with on_device(q):
        wrap_triton(_attention_split_kernel)[(triton.cdiv(R, BLOCK_QUERIES), B * H_KV, n_splits)](
            q.contiguous(), k.contiguous(), v.contiguous(), mask, partial_out, stats,
            R, L, D, H_KV, mask.stride(0), D ** -0.5, DOT_FP32=dot_in_fp32(q), BLOCK_R=BLOCK_QUERIES,
            BLOCK_L=block_keys, BLOCK_D=block_d, KEYS_PER_SPLIT=KEYS_PER_SPLIT, num_warps=warps)
        wrap_triton(_attention_combine_kernel)[(triton.cdiv(R, BLOCK_QUERIES), B * H_KV)](
            partial_out, stats, q if sinks is None else sinks, out, R, D, H_KV, S, n_splits,
            HAS_SINKS=sinks is not None, BLOCK_R=BLOCK_QUERIES, BLOCK_D=block_d)
    return out


def rows_one_by_one(x, weight, bias):
    """F.linear [..., K] -> [..., N] one row at a time: each row through the one-row product a lone token
    gets."""
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) == 1:
        return F.linear(x, weight, bias)
    out = torch.cat([F.linear(rows[i:i + 1], weight, bias) for i in range(rows.shape[0])])
    return out.view(*x.shape[:-1], -1)


def queries_one_by_one(q, k, v, mask, sinks):
    """attention.attention (or attention_with_sinks) a query position at a time, as a lone token attends."""
    attend, extra = (attention, ()) if sinks is None else (attention_with_sinks, (sinks,))
    return query_by_query(attend, q, k, v, mask, *extra)


if HAVE_TRITON:
    @torch.library.triton_op("dflare::invariant_linear", mutates_args=())
    def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x [..., K] -> [..., N]: the fixed-tile kernel on CUDA, rows one by one on CPU."""
        if not use_kernel(x):
            return rows_one_by_one(x, weight, bias)
        return launch_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], -1)

    @torch.library.triton_op("dflare::invariant_attention", mutates_args=())
    def invariant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            sinks: Optional[torch.Tensor]) -> torch.Tensor:
        """q [B, H, S, D], k, v [B, H_KV, L, D], mask [B, 1, rep * S, L] folded as in attention.attention,
        sinks [H] or None -> [B, H, S, D]: the fixed-split kernels on CUDA, a query position at a time on
        CPU."""
        if not use_kernel(q):
            return queries_one_by_one(q, k, v, mask, sinks)
        B, H, S, D = q.shape
        folded = q.reshape(B, k.shape[1], H // k.shape[1] * S, D)
        return launch_attention(folded, k, v, mask, sinks, S).view(B, H, S, D)
else:
    invariant_linear, invariant_attention = rows_one_by_one, queries_one_by_one


def batch_invariant_linear(x, weight, bias):
    """invariant_linear, but a plain call where no kernel runs: an operator's dispatch costs ~0.1 ms a call
    on CPU, a quarter of a demo decode step over its 211 linear layers."""
    return invariant_linear(x, weight, bias) if use_kernel(x) else rows_one_by_one(x, weight, bias)


def linear(layer, x, invariant: bool):
    """layer(x) [..., in] -> [..., out] for an nn.Linear; invariant: a row's result does not depend on how
    many come together (DESIGN.md section 10)."""
    return batch_invariant_linear(x, layer.weight, layer.bias) if invariant else layer(x)


def batch_invariant_attention(q, k, v, mask, sinks):
    """invariant_attention, likewise."""
    if use_kernel(q):
        return invariant_attention(q, k, v, mask, sinks)
    return queries_one_by_one(q, k, v, mask, sinks)
