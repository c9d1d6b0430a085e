"""Mixture-of-experts layers as one operator, dflare::moe_experts (DESIGN.md section 9): the (token, expert)
pairs are grouped by expert and every routed expert runs once over its rows, its weights read once, bf16 or
MXFP4 as released (decoded where they are used: in registers on a GPU, an expert at a time on CPU).

    y[n] = sum_j w[n, j] * down_e(swiglu(gate_up_e(x[n])))      e = expert_ids[n, j], j < k

A Triton kernel on CUDA (and under TRITON_INTERPRET=1), a PyTorch reference on CPU."""
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from fuse_kernel import HAVE_TRITON, on_device, use_kernel

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

BLOCK_M = 16  # rows of one expert a program multiplies: tl.dot's smallest tile
BLOCK_N, BLOCK_K = 64, 64  # outputs a program computes, inputs a step of its loop reads
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@functools.cache
def mxfp4_tables(device: torch.device) -> tuple:
    """pairs [256] int64: a byte's two e2m1 values as two fp32, low nibble first; powers [256] fp32: the e8m0
    scales 2^(s - 127), computed in fp32 as transformers computes them."""
    values = torch.tensor(FP4_VALUES)
    pairs = torch.stack([values.repeat(16), values.repeat_interleave(16)], dim=-1)  # [256, 2]
    powers = torch.ldexp(torch.ones(256), torch.arange(256) - 127)
    return pairs.view(torch.int64).flatten().to(device), powers.to(device)


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., G, 16] uint8 (two e2m1 values a byte) and scales [..., G] uint8 (2^(s - 127) per 32
    values) -> [..., G * 32] in fp32, exact: a table lookup per byte, a multiply per value."""
    pairs, powers = mxfp4_tables(blocks.device)
    values = pairs.index_select(0, blocks.flatten().int()).view(torch.float32).view(*scales.shape, 32)
    return values.mul_(powers[scales.int()][..., None]).flatten(-2)


def swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """[..., 2I] with gate and up interleaved -> [..., I]: GPT-OSS's clamped form when limit > 0, else
    silu(gate) * up."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return gate * torch.sigmoid(alpha * gate) * (up + 1)
    return F.silu(gate) * up


def expert_weight(weight, scales, e: int) -> torch.Tensor:
    """Expert e's weight [out, in]: as stored, or decoded from MXFP4 to fp32 (exactly; fp32 matmuls are the
    fast ones on CPUs without bf16 instructions)."""
    return weight[e] if scales is None else decode_mxfp4(weight[e], scales[e])


def product(rows, weight, bias, rows_apart: bool):
    """F.linear(rows, weight, bias), or one row at a time (each weight decoded once all the same)."""
    if rows_apart:
        return torch.cat([F.linear(row[None], weight, bias) for row in rows])
    return F.linear(rows, weight, bias)


def experts_one_by_one(x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
                       gate_up: torch.Tensor, gate_up_scales: Optional[torch.Tensor],
                       gate_up_bias: Optional[torch.Tensor], down: torch.Tensor,
                       down_scales: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
                       swiglu_limit: float, swiglu_alpha: float, rows_apart: bool = False) -> torch.Tensor:
    """The experts in PyTorch, one routed expert at a time over its rows: the pairs sorted by expert, their
    tokens gathered once, the outputs weighted, put back in pair order and summed over k, in fp32.
    rows_apart: each row multiplied alone, as a lone token's is (`Transformer.batch_invariant`)."""
    N, k = expert_ids.shape
    order = expert_ids.flatten().argsort(stable=True)  # pairs n * k + j, grouped by expert
    counts = torch.bincount(expert_ids.flatten(), minlength=gate_up.shape[0]).tolist()
    dtype = torch.float32 if gate_up_scales is not None else x.dtype
    rows = x.to(dtype)[order // k]  # [N * k, H]
    outputs, first = [], 0
    for e, count in enumerate(counts):
        if count:
            h = product(rows[first:first + count], expert_weight(gate_up, gate_up_scales, e),
                        None if gate_up_bias is None else gate_up_bias[e].to(dtype), rows_apart)
            outputs.append(product(swiglu(h, swiglu_limit, swiglu_alpha), expert_weight(down, down_scales, e),
                                   None if down_bias is None else down_bias[e].to(dtype), rows_apart))
            first += count
    weighted = torch.cat(outputs).float() * routing_weights.flatten()[order, None].float()  # [N * k, H]
    by_pair = torch.empty_like(weighted).index_copy_(0, order, weighted)
    return by_pair.view(N, k, -1).sum(1).to(x.dtype)


# an operator of its own: the loop's length depends on the routing, which a compiled graph may not look into
moe_experts_reference = torch.library.custom_op("dflare::moe_experts_reference", mutates_args=())(
    experts_one_by_one)


@moe_experts_reference.register_fake
def _(x, *args):
    return torch.empty_like(x)


def max_tiles(num_pairs: int, num_experts: int) -> int:
    """Tiles of BLOCK_M rows that any routing of num_pairs pairs fills: each expert's rows end in at most one
    partial tile, and at most min(E, pairs) experts have rows."""
    return (num_pairs + min(num_experts, num_pairs) * (BLOCK_M - 1) + BLOCK_M - 1) // BLOCK_M


def group_by_expert(expert_ids: torch.Tensor, num_experts: int):
    """The grouped layout, in static shapes: every expert's pairs on consecutive rows, padded to whole tiles.
    Returns row_pair [P] (the pair n * k + j on each row; N * k on padding), tile_expert [P / BLOCK_M] (E past
    the last tile) and pair_row [N * k] (each pair's row); P = max_tiles * BLOCK_M."""
    flat = expert_ids.flatten()
    R = flat.numel()
    experts, order = flat.sort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tiles.cumsum(0)  # [E]: one past each expert's last tile
    first_row = (tile_end - tiles) * BLOCK_M
    first_pair = counts.cumsum(0) - counts
    rows = first_row[experts] + torch.arange(R, device=flat.device) - first_pair[experts]  # [R], sorted order
    num_tiles = max_tiles(R, num_experts)
    row_pair = flat.new_full((num_tiles * BLOCK_M,), R).scatter_(0, rows, order)
    tile_expert = torch.searchsorted(tile_end, torch.arange(num_tiles, device=flat.device), right=True)
    pair_row = torch.empty_like(rows).scatter_(0, order, rows)
    return row_pair, tile_expert, pair_row


if HAVE_TRITON:
    @triton.jit
    def _e2m1(code, scale):
        """e2m1 codes and e8m0 scales (int32) -> code's value * 2^(scale - 127) in fp32, from their bits (the
        reference's table holds the same fp32 products)."""
        e, m = (code >> 1) & 3, code & 1
        # fp32 bits of the magnitude: 0.5 * m when e == 0, else (1 + m / 2) * 2^(e - 1)
        bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))
        magnitude = bits.to(tl.float32, bitcast=True)
        value = tl.where(code >= 8, -magnitude, magnitude)
        power = tl.where(scale == 0, 1 << 22, scale << 23).to(tl.float32, bitcast=True)  # 2^-127 is subnormal
        return value * power

    @triton.jit
    def _expert_tile(a_ptr, a_rows, a_mask, w_ptr, scale_ptr, w_rows, w_mask, K,
                     MXFP4: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """a[a_rows] [BLOCK_M, K] times w[w_rows] [BLOCK_N, K] transposed -> [BLOCK_M, BLOCK_N] in fp32; w
        holds rows of K values, or of K / 2 bytes and K / 32 scales (MXFP4). DOT_FP32: multiply in fp32 (fp32
        models, and the interpreter, whose bf16 arithmetic is wrong), else in a's dtype."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        a_ptrs = a_ptr + a_rows[:, None] * K
        if MXFP4:
            offs = tl.arange(0, BLOCK_K // 2)  # bytes; the even values in the low nibbles, the odd ones high
            for k0 in range(0, K, BLOCK_K):
                k_mask = k0 // 2 + offs < K // 2
                w_tile_mask = w_mask[:, None] & k_mask[None, :]
                byte = tl.load(w_ptr + w_rows[:, None] * (K // 2) + k0 // 2 + offs[None, :], mask=w_tile_mask,
                               other=0).to(tl.int32)
                scale = tl.load(scale_ptr + w_rows[:, None] * (K // 32) + (k0 // 2 + offs[None, :]) // 16,
                                mask=w_tile_mask, other=127).to(tl.int32)
                a_tile_mask = a_mask[:, None] & k_mask[None, :]
                a_even = tl.load(a_ptrs + k0 + 2 * offs[None, :], mask=a_tile_mask, other=0.0)
                a_odd = tl.load(a_ptrs + k0 + 2 * offs[None, :] + 1, mask=a_tile_mask, other=0.0)
                dot_dtype = tl.float32 if DOT_FP32 else a_even.dtype
                w_even = _e2m1(byte & 15, scale).to(dot_dtype)
                w_odd = _e2m1(byte >> 4, scale).to(dot_dtype)
                acc = tl.dot(a_even.to(dot_dtype), tl.trans(w_even), acc, input_precision="ieee")
                acc = tl.dot(a_odd.to(dot_dtype), tl.trans(w_odd), acc, input_precision="ieee")
        else:
            offs = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                k_mask = k0 + offs < K
                a = tl.load(a_ptrs + k0 + offs[None, :], mask=a_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_ptr + w_rows[:, None] * K + k0 + offs[None, :],
                            mask=w_mask[:, None] & k_mask[None, :], other=0.0)
                dot_dtype = tl.float32 if DOT_FP32 else a.dtype
                acc = tl.dot(a.to(dot_dtype), tl.trans(w.to(dot_dtype)), acc, input_precision="ieee")
        return acc

    @triton.jit(do_not_specialize=["num_pairs", "top_k"])
    def _moe_kernel(a_ptr, row_pair_ptr, tile_expert_ptr, w_ptr, scale_ptr, bias_ptr, routing_ptr, out_ptr,
                    K, N_OUT, num_pairs, num_experts, top_k, swiglu_limit, swiglu_alpha,
                    GATE_UP: tl.constexpr, MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr,
                    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        """Program (tile, j): one tile's rows (pairs of one expert) times outputs j * BLOCK_N... of that
        expert.
        GATE_UP: rows are the pairs' tokens in a (x [N, K]); weight rows 2n and 2n + 1 are output n's gate and
        up; out [P, N_OUT] gets their SwiGLU. Else: rows are a's own (the activations [P, K]); out [P, N_OUT]
        (fp32) gets the outputs times the pair's routing weight."""
        tile = tl.program_id(0)
        e = tl.load(tile_expert_ptr + tile).to(tl.int64)
        if e < num_experts:  # tiles past the last expert's hold no rows
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            pair = tl.load(row_pair_ptr + rows)
            valid = pair < num_pairs
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N_OUT
            if GATE_UP:
                tokens = tl.where(valid, pair // top_k, 0).to(tl.int64)
                gate_rows = e * 2 * N_OUT + 2 * offs_n
                gate = _expert_tile(a_ptr, tokens, valid, w_ptr, scale_ptr, gate_rows, n_mask, K,
                                    MXFP4, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)
                up = _expert_tile(a_ptr, tokens, valid, w_ptr, scale_ptr, gate_rows + 1, n_mask, K,
                                  MXFP4, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)
                if HAS_BIAS:
                    gate += tl.load(bias_ptr + gate_rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                    up += tl.load(bias_ptr + gate_rows + 1, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                limit = tl.cast(swiglu_limit, tl.float32)  # Inductor passes floats as fp64
                if limit > 0:  # GPT-OSS
                    gate = tl.minimum(gate, limit)
                    up = tl.minimum(tl.maximum(up, -limit), limit)
                    out = gate * tl.sigmoid(tl.cast(swiglu_alpha, tl.float32) * gate) * (up + 1)
                else:
                    out = gate * tl.sigmoid(gate) * up
            else:
                out = _expert_tile(a_ptr, rows.to(tl.int64), valid, w_ptr, scale_ptr, e * N_OUT + offs_n,
                                   n_mask, K, MXFP4, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + e * N_OUT + offs_n, mask=n_mask, other=0.0)
                    out += bias.to(tl.float32)[None, :]
                out *= tl.load(routing_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * N_OUT + offs_n[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=n_mask[None, :])



def dot_in_fp32(x: torch.Tensor) -> bool:
    """Multiply in fp32: fp32 models, and the interpreter (whose bf16 arithmetic is wrong)."""
    return x.dtype == torch.float32 or x.device.type == "cpu"


def launch_moe(x, expert_ids, routing_weights, gate_up, gate_up_scales, gate_up_bias, down, down_scales,
               down_bias, swiglu_limit, swiglu_alpha, rows_apart=False):
    """The kernel twice, gate_up then down, over the grouped layout; each pair's row summed back to its
    token. Its fixed tiles compute each row alike whatever the others: rows_apart changes nothing."""
    (N, H), k, E = x.shape, expert_ids.shape[1], gate_up.shape[0]
    mxfp4 = gate_up_scales is not None
    inner = down_scales.shape[-1] * 32 if mxfp4 else down.shape[-1]
    row_pair, tile_expert, pair_row = group_by_expert(expert_ids, E)
    P = row_pair.numel()
    act = x.new_empty(P, inner)
    out_rows = x.new_empty(P, H, dtype=torch.float32)
    fp32 = x.dtype == torch.float32
    # fp32 dots run on CUDA cores, not tensor cores: twice the warps keep their tiles in registers
    meta = dict(MXFP4=mxfp4, HAS_BIAS=gate_up_bias is not None, DOT_FP32=dot_in_fp32(x),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=8 if fp32 else 4)
    routing = routing_weights.contiguous()
    with on_device(x):
        for a, w, scales, bias, out, K, n_out, gate_up_step in (
                (x.contiguous(), gate_up, gate_up_scales, gate_up_bias, act, H, inner, True),
                (act, down, down_scales, down_bias, out_rows, inner, H, False)):
            grid = (P // BLOCK_M, triton.cdiv(n_out, BLOCK_N))
            wrap_triton(_moe_kernel)[grid](a, row_pair, tile_expert, w, w if scales is None else scales,
                                           w if bias is None else bias, routing, out, K, n_out, N * k, E, k,
                                           swiglu_limit, swiglu_alpha, GATE_UP=gate_up_step, **meta)
    return out_rows[pair_row].view(N, k, H).sum(1).to(x.dtype)


if HAVE_TRITON:
    @torch.library.triton_op("dflare::moe_experts", mutates_args=())
    def moe_experts(x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
                    gate_up: torch.Tensor, gate_up_scales: Optional[torch.Tensor],
                    gate_up_bias: Optional[torch.Tensor], down: torch.Tensor,
                    down_scales: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
                    swiglu_limit: float, swiglu_alpha: float, rows_apart: bool = False) -> torch.Tensor:
        """x [N, H], expert_ids and routing_weights [N, k] -> [N, H]: the kernel on CUDA, the reference on
        CPU.
        gate_up [E, 2I, H] (gate and up rows interleaved), down [E, H, I]; MXFP4: blocks [E, out, in / 32, 16]
        with scales [E, out, in / 32]; biases [E, out] or None; rows_apart: see experts_one_by_one."""
        args = (x, expert_ids, routing_weights, gate_up, gate_up_scales, gate_up_bias, down, down_scales,
                down_bias, swiglu_limit, swiglu_alpha, rows_apart)
        return launch_moe(*args) if use_kernel(x) else moe_experts_reference(*args)
else:
    moe_experts = moe_experts_reference
