"""Target models: Qwen3 dense, Qwen3-MoE, GPT-OSS, Llama and the hybrid Qwen3.5 / Qwen3.5-MoE in one small
Transformer (DESIGN.md sections 1 and 11), with static KV caches indexed by absolute position, recurrent
states for the Gated DeltaNet layers, and `capture` of chosen layers' outputs for the draft."""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import attention, attention_with_sinks
from deltanet import GatedDeltaNet, Recurrence
from invariant_kernel import batch_invariant_attention, linear
from moe_kernel import moe_experts


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (Qwen3) / expert width (GPT-OSS)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None  # {rope_type: linear / yarn / llama3, parameters}; None: plain RoPE
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False  # Llama: biases on the dense MLP's projections
    qk_norm: bool = True  # Qwen3: RMSNorm on each head of q and k before RoPE
    attention_sinks: bool = False  # GPT-OSS: a learned logit per head in the softmax denominator
    layer_types: tuple = ()
    sliding_window: int = 0  # keys a sliding layer sees, the current one included
    moe_layers: tuple = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_bias: bool = False  # GPT-OSS: router and expert biases
    mxfp4_experts: bool = False  # released GPT-OSS: experts kept in MXFP4 as on disk
    swiglu_limit: float = 0.0  # > 0: GPT-OSS clamped SwiGLU; else SiLU gating
    swiglu_alpha: float = 1.702
    # Qwen3.5 (DESIGN.md section 11): Gated DeltaNet layers (layer_types "linear_attention", deltanet.py)
    rotary_dim: int = 0  # RoPE turns the first rotary_dim of each head (0: all of it)
    attn_output_gate: bool = False  # q_proj also gives each head a gate: output * sigmoid(gate)
    norm_offset: float = 0.0  # RMSNorms scale by offset + weight (Qwen3.5 stores weight - 1)
    linear_conv_kernel_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen3.5-MoE: an expert every token takes, gated
    eos_token_id: list = field(default_factory=list)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight.float() + self.offset if self.offset else self.weight.float()
        return (xf * weight).to(x.dtype)


def rope_tables(args, max_seq_length: int, head_dim: int | None = None):
    """cos and sin [max_seq_length, head_dim // 2], fp32, for args (ModelArgs or DraftArgs)."""
    dim = head_dim or args.head_dim
    wavelength_base = args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / wavelength_base
    rs, scale = args.rope_scaling or {"rope_type": "default"}, 1.0
    if rs["rope_type"] == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif rs["rope_type"] == "llama3":
        original_len, factor = rs["original_max_position_embeddings"], rs["factor"]
        low, high = rs["low_freq_factor"], rs["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        smooth = (original_len / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelength < original_len / high, inv_freq,
                               torch.where(wavelength > original_len / low, inv_freq / factor, blended))
    elif rs["rope_type"] == "yarn":
        original_len = rs["original_max_position_embeddings"]
        factor = rs.get("factor") or args.max_position_embeddings / original_len

        def correction_dim(rotations):
            return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(args.rope_theta))

        low, high = correction_dim(rs.get("beta_fast") or 32), correction_dim(rs.get("beta_slow") or 1)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        kept = 1 - ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = 1.0 / (factor * wavelength_base) * (1 - kept) + inv_freq * kept

        def mscale(m=1.0):
            return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

        scale = rs.get("attention_factor") or (mscale(rs["mscale"]) / mscale(rs["mscale_all_dim"])
                                               if rs.get("mscale") and rs.get("mscale_all_dim") else mscale())
    angles = torch.outer(torch.arange(max_seq_length, dtype=torch.float32), inv_freq)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x, cos, sin):
    """x [B, S, n_heads, head_dim]; cos/sin [B, S, R // 2]. Rotates the two halves of each head's first R
    dimensions (R = head_dim, or less with partial RoPE); the rest pass."""
    rotary = 2 * cos.shape[-1]
    x1, x2 = x[..., :rotary].float().chunk(2, dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary:].float()], dim=-1).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch_size, n_kv_heads, max_seq_length, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v):
        """Write k/v [B, H, S, D] at slots [B, S] (positions, except in a tree); return the caches."""
        index = slots[:, None, :, None].expand(k.shape)
        self.k_cache.scatter_(2, index, k)
        self.v_cache.scatter_(2, index, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, sliding: bool):
        super().__init__()
        self.args = args
        self.sliding = sliding
        n_heads, n_kv, hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        q_size = n_heads * hd * (2 if args.attn_output_gate else 1)  # each head's query, then its gate
        self.q_proj = nn.Linear(args.hidden_size, q_size, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, n_kv * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, n_kv * hd, bias=args.attention_bias)
        self.o_proj = nn.Linear(n_heads * hd, args.hidden_size, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, args.rms_norm_eps, args.norm_offset)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps, args.norm_offset)
        if args.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(n_heads))
        self.kv_cache = None

    def forward(self, x, cache_pos, cos, sin, mask, cached: bool, invariant: bool = False):
        """x [B, S, H] -> [B, S, H], cached at slots cache_pos [B, S]; mask [B, 1, rep * S, L] as in
        `attention`. cached: keys from the KV cache (L = max_seq_length), else the S tokens'. invariant: each
        token computed apart (`batch_invariant`)."""
        B, S, _ = x.shape
        hd = self.args.head_dim
        q = linear(self.q_proj, x, invariant).view(B, S, -1, hd)
        if self.args.attn_output_gate:
            q, gate = q.unflatten(2, (-1, 2)).unbind(3)  # [B, S, n_heads, hd] each
        k = linear(self.k_proj, x, invariant).view(B, S, -1, hd)
        v = linear(self.v_proj, x, invariant).view(B, S, -1, hd)
        if self.args.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cached:
            k, v = self.kv_cache.update(cache_pos, k, v)
        sinks = self.args.attention_sinks
        if invariant:
            y = batch_invariant_attention(q, k, v, mask, self.sinks if sinks else None)
        else:
            attend, extra = (attention_with_sinks, (self.sinks,)) if sinks else (attention, ())
            y = attend(q, k, v, mask, *extra)
        y = y.transpose(1, 2).reshape(B, S, -1)
        if self.args.attn_output_gate:
            y = y * torch.sigmoid(gate.reshape(B, S, -1))
        return linear(self.o_proj, y, invariant)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x, invariant: bool = False):
        hidden = F.silu(linear(self.gate_proj, x, invariant)) * linear(self.up_proj, x, invariant)
        return linear(self.down_proj, hidden, invariant)


def packed_bytes(*shape) -> nn.Parameter:
    """A frozen uint8 parameter: MXFP4 blocks or scales as stored."""
    return nn.Parameter(torch.empty(*shape, dtype=torch.uint8), requires_grad=False)


class Experts(nn.Module):
    """All experts of one layer, stacked: gate_up_proj [E, 2I, H] with gate and up rows interleaved (GPT-OSS's
    layout), down_proj [E, H, I]. MXFP4 (released GPT-OSS): *_blocks [E, out, in / 32, 16] and *_scales
    [E, out, in / 32], uint8 as on disk, in their place."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, H, I = args.num_experts, args.hidden_size, args.moe_intermediate_size
        for name, (out_features, in_features) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
            if args.mxfp4_experts:
                setattr(self, name + "_blocks", packed_bytes(E, out_features, in_features // 32, 16))
                setattr(self, name + "_scales", packed_bytes(E, out_features, in_features // 32))
            else:
                setattr(self, name, nn.Parameter(torch.empty(E, out_features, in_features)))
            if args.moe_bias:
                setattr(self, name + "_bias", nn.Parameter(torch.zeros(E, out_features)))

    def weights(self, name: str) -> tuple:
        """(weight or blocks, scales or None, bias or None) of gate_up_proj or down_proj."""
        if hasattr(self, name + "_blocks"):
            weight, scales = getattr(self, name + "_blocks"), getattr(self, name + "_scales")
        else:
            weight, scales = getattr(self, name), None
        return weight, scales, getattr(self, name + "_bias", None)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.router = nn.Linear(args.hidden_size, args.num_experts, bias=args.moe_bias)
        self.experts = Experts(args)
        if args.shared_expert_intermediate_size:
            self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def forward(self, x, invariant: bool = False):
        """invariant: each row's result independent of the others (the CUDA kernel's tiles are; the CPU
        reference then multiplies row by row)."""
        B, S, H = x.shape
        x = x.reshape(-1, H)
        router_logits = linear(self.router, x, invariant).float()
        top_logits, expert_ids = torch.topk(router_logits, self.args.num_experts_per_tok, dim=-1)
        if self.args.norm_topk_prob:
            weights = torch.softmax(top_logits, dim=-1)
        else:
            weights = torch.softmax(router_logits, dim=-1).gather(-1, expert_ids)
        y = moe_experts(x, expert_ids, weights.to(x.dtype), *self.experts.weights("gate_up_proj"),
                        *self.experts.weights("down_proj"), self.args.swiglu_limit, self.args.swiglu_alpha,
                        invariant)
        if self.args.shared_expert_intermediate_size:
            shared_gate = torch.sigmoid(linear(self.shared_expert_gate, x, invariant))
            y = y + shared_gate * self.shared_expert(x, invariant)
        return y.view(B, S, H)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.sliding = args.layer_types[layer_id] == "sliding_attention"
        self.recurrent = args.layer_types[layer_id] == "linear_attention"
        if self.recurrent:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = Attention(args, self.sliding)
        self.mlp = (MoE(args) if layer_id in args.moe_layers
                    else MLP(args.hidden_size, args.intermediate_size, args.mlp_bias))
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_offset)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_offset)

    def forward(self, x, cache_pos, cos, sin, mask, cached: bool, invariant: bool = False,
                recurrence: Recurrence | None = None):
        h = self.input_layernorm(x)
        if self.recurrent:
            x = x + self.linear_attn(h, recurrence, invariant)
        else:
            x = x + self.self_attn(h, cache_pos, cos, sin, mask, cached, invariant)
        return x + self.mlp(self.post_attention_layernorm(x), invariant)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_offset)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.max_batch_size = 0
        self.max_seq_length = 0
        self.step_tokens = 0
        self.batch_invariant = False  # the decoding steps compute each token apart (DESIGN.md section 10)
        self.not_used = ""  # the parts of its checkpoint left out (a multimodal Qwen3.5's vision tower)

    def setup_caches(self, max_batch_size: int, max_seq_length: int, step_tokens: int = 1):
        """Allocate the static KV caches, recurrent states and RoPE tables; positions must stay below
        max_seq_length. Recurrent layers keep the state after each token of a decoding step of up to
        step_tokens tokens (a block or tree: generate.step_span)."""
        if max_seq_length > self.args.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_length} exceeds the model's max_position_embeddings "
                             f"{self.args.max_position_embeddings}")
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        self.step_tokens = step_tokens
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        a = self.args
        for layer in self.layers:
            if layer.recurrent:
                layer.linear_attn.cache = layer.linear_attn.make_cache(max_batch_size, step_tokens, dtype,
                                                                       device)
            else:
                layer.self_attn.kv_cache = KVCache(max_batch_size, a.num_key_value_heads, max_seq_length,
                                                   a.head_dim, dtype, device)
        cos, sin = rope_tables(a, max_seq_length, a.rotary_dim or a.head_dim)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, tokens, input_pos, capture: tuple = (), logits_at=None, tree=None, invariant=False):
        """tokens, input_pos [B, S] -> logits [B, S, V] ([B, 1, V] at logits_at [B], an index into S) and the
        outputs [B, S, T, H] of the layers in capture (else None). tree = (slots [B, S], visible [B, S, L]):
        token s is cached at slots[:, s] and sees the cache slots visible[:, s] (DESIGN.md section 4); a
        hybrid target's tree also gives parents [B, S]. invariant: every token computed as a lone token is,
        bit for bit (the decoding steps pass batch_invariant). Recurrent layers keep each row's state after
        its token at logits_at (else the last; a tree: none until `keep_states`)."""
        recurrence = None
        if any(layer.recurrent for layer in self.layers):
            last = tokens.new_full((tokens.shape[0],), tokens.shape[1] - 1)
            recurrence = Recurrence(restart=input_pos[:, 0] == 0, parent=tree[2] if tree else None,
                                    keep_at=None if tree else (last if logits_at is None else logits_at))
        x, hidden = self.run_layers(tokens, input_pos, self.rope_cos[input_pos], self.rope_sin[input_pos],
                                    torch.arange(self.max_seq_length, device=tokens.device), capture,
                                    cached=True, tree=tree and tree[:2], invariant=invariant,
                                    recurrence=recurrence)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]
        return linear(self.lm_head, self.norm(x), invariant), hidden

    def keep_states(self, index):
        """Recurrent layers: each row keeps its state after the last decoding step's token index [B] (the last
        accepted one)."""
        for layer in self.layers:
            if layer.recurrent:
                layer.linear_attn.cache.keep(index)

    def move_cached(self, source, dest):
        """Copy every layer's cached keys/values at slots source [B, n] to dest [B, n] (a tree's path)."""
        for layer in self.layers:
            if layer.recurrent:
                continue
            cache = layer.self_attn.kv_cache
            index = source[:, None, :, None].expand(-1, cache.k_cache.shape[1], -1, cache.k_cache.shape[3])
            cache.update(dest, cache.k_cache.gather(2, index), cache.v_cache.gather(2, index))

    def hidden_states(self, tokens, layer_ids):
        """Training: tokens [B, S] at 0..S-1 -> the outputs [B, S, T, H] of layers layer_ids; no KV cache, no
        logits, no layer past the deepest of layer_ids."""
        S = tokens.shape[1]
        positions = torch.arange(S, device=tokens.device)
        cos, sin = (t.to(tokens.device)[None]
                    for t in rope_tables(self.args, S, self.args.rotary_dim or self.args.head_dim))
        return self.run_layers(tokens, positions.expand(tokens.shape[0], -1), cos, sin, positions, layer_ids,
                               cached=False, n_layers=max(layer_ids) + 1)[1]

    def run_layers(self, tokens, input_pos, cos, sin, key_pos, capture, cached: bool, n_layers=None,
                   tree=None, invariant=False, recurrence=None):
        """The first n_layers (default all) on tokens at input_pos [B, S], keys at key_pos [L]; tree and
        recurrence: see forward. Returns the last hidden states and the captured ones (or None)."""
        x = self.embed_tokens(tokens)
        rep = self.args.num_attention_heads // self.args.num_key_value_heads
        query_pos = input_pos.repeat(1, rep)[:, None, :, None]  # [B, 1, rep * S, 1], folded as in `attention`
        cache_pos = input_pos
        if tree is None:
            visible = key_pos <= query_pos  # also masks stale entries past a row's position
        else:
            cache_pos, tree_visible = tree
            # [B, 1, 1, L]: each slot's real position
            key_pos = key_pos.expand(len(tokens), -1).scatter(1, cache_pos, input_pos)[:, None, None, :]
            visible = tree_visible.repeat(1, rep, 1)[:, None]
        sliding = (visible & (key_pos > query_pos - self.args.sliding_window)
                   if "sliding_attention" in self.args.layer_types else None)
        captured = []
        for i, layer in enumerate(self.layers[:n_layers]):
            x = layer(x, cache_pos, cos, sin, sliding if layer.sliding else visible, cached, invariant,
                      recurrence)
            if i in capture:
                captured.append(x)
        return x, (torch.stack(captured, dim=2) if capture else None)
