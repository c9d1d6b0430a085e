"""The block-diffusion draft: DFlare (layer-wise fusion) and DFlash (linear fusion); DESIGN.md 2, 3.

Entry points, all through `Draft.run_layers`: `draft_block_logits` (stateless reference), `write_context` +
`block_logits` (cached context, decoding), `forward` (training)."""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask
from torch.utils.checkpoint import checkpoint

from fuse_kernel import fuse_layers
from attention import attention, compiled_flex_attention
from model import MLP, KVCache, ModelArgs, RMSNorm, apply_rope, rope_tables

ATTENTION_CHUNK_SCORES = 2**24  # per chunk of blocks in Draft.forward on CPU: 64 MB of fp32 scores


@dataclass
class DraftArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    target_layer_ids: tuple
    mask_token_id: int
    num_target_layers: int  # decoder layers of the target the draft was made for (0: not recorded)
    fusion: str = "layerwise"  # "layerwise" (DFlare) or "linear" (DFlash)
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    rope_scaling: dict | None = None
    attention_bias: bool = False  # on q/k/v/o and k/v_proj_target
    layer_types: tuple = ()
    sliding_window: int = 0
    is_causal: bool | None = None  # None: sliding layers are causal inside the block, full ones bidirectional

    def layer_attention(self) -> list:
        """(causal, window) per layer, as z-lab's DFlash reads layer_types, is_causal, sliding_window."""
        kinds = self.layer_types or ("full_attention",) * self.num_hidden_layers
        return [(kind == "sliding_attention" if self.is_causal is None else self.is_causal,
                 self.sliding_window if kind == "sliding_attention" else 0) for kind in kinds]


def default_target_layer_ids(num_target_layers: int, count: int) -> tuple:
    """`count` target layers spread evenly as DFlash does: round(1 + i * (N - 4) / (count - 1))."""
    count = max(1, min(count, num_target_layers - 3))
    if count == 1:
        return (num_target_layers // 2,)
    return tuple(sorted({round(1 + i * (num_target_layers - 4) / (count - 1)) for i in range(count)}))


class DraftAttention(nn.Module):
    def __init__(self, args: DraftArgs):
        super().__init__()
        self.args = args
        n_heads, n_kv, hd, H = (args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                                args.hidden_size)
        bias = args.attention_bias
        self.q_proj = nn.Linear(H, n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(H, n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(H, n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(n_heads * hd, H, bias=bias)
        self.q_norm = RMSNorm(hd, args.rms_norm_eps)
        self.k_norm = RMSNorm(hd, args.rms_norm_eps)
        if args.fusion == "layerwise":
            self.k_proj_target = nn.Linear(H, n_kv * hd, bias=bias)
            self.v_proj_target = nn.Linear(H, n_kv * hd, bias=bias)
        self.context_cache = None

    def keys_values(self, x, cos, sin, context: bool):
        """x [B, S, H] -> keys (k_norm, RoPE) and values, [B, n_kv, S, head_dim] each."""
        B, S, _ = x.shape
        layerwise = context and self.args.fusion == "layerwise"
        k = (self.k_proj_target if layerwise else self.k_proj)(x).view(B, S, -1, self.args.head_dim)
        v = (self.v_proj_target if layerwise else self.v_proj)(x).view(B, S, -1, self.args.head_dim)
        return apply_rope(self.k_norm(k), cos, sin).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, context_k, context_v, mask):
        """x [B, Q, H], context_k/v [B, n_kv, L, head_dim] -> [B, Q, H]; mask over [context | x] keys:
        boolean [B, 1, Q, L + Q] or a flex_attention BlockMask."""
        B, Q, _ = x.shape
        q = self.q_proj(x).view(B, Q, -1, self.args.head_dim)
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)
        k, v = self.keys_values(x, cos, sin, context=False)
        k, v = torch.cat([context_k, k], dim=2), torch.cat([context_v, v], dim=2)
        if isinstance(mask, BlockMask):
            y = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=True)
        else:  # repeated into attention's folded (kv head, query) order
            y = attention(q, k, v, mask.repeat(1, 1, q.shape[1] // k.shape[1], 1))
        return self.o_proj(y.transpose(1, 2).reshape(B, Q, -1))


class DraftLayer(nn.Module):
    def __init__(self, args: DraftArgs):
        super().__init__()
        self.self_attn = DraftAttention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, context_k, context_v, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context_k, context_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Draft(nn.Module):
    def __init__(self, args: DraftArgs):
        super().__init__()
        if args.fusion not in ("layerwise", "linear"):
            raise ValueError(f"fusion must be 'layerwise' (DFlare) or 'linear' (DFlash), "
                             f"got {args.fusion!r}")
        self.args = args
        T, D, H = len(args.target_layer_ids), args.num_hidden_layers, args.hidden_size
        self.layers = nn.ModuleList(DraftLayer(args) for _ in range(D))
        self.norm = RMSNorm(H, args.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, args.rms_norm_eps)
        if args.fusion == "layerwise":
            self.layer_fusion_weights = nn.Parameter(torch.zeros(D, T))
        else:
            self.fc = nn.Linear(T * H, H, bias=False)
        self.layer_attention = args.layer_attention()
        self.max_seq_length = 0
        self.fuse_layers = fuse_layers  # the Triton operator; bench_gpu swaps in the PyTorch fusion

    def bind(self, target):
        """Embed with the target's embed_tokens, read logits through its lm_head; set past nn.Module's
        registration, so they are no parameters of the draft (nor saved with it)."""
        object.__setattr__(self, "embed_tokens", target.embed_tokens)
        object.__setattr__(self, "lm_head", target.lm_head)
        return self

    @classmethod
    def for_target(cls, target_args: ModelArgs, num_layers: int = 5, fusion: str = "layerwise",
                   target_layer_ids=None, block_size: int = 16, mask_token_id: int | None = None) -> "Draft":
        """A new, initialised draft of the target's width; DFlash taps `num_layers` layers, DFlare 9."""
        n = target_args.num_hidden_layers
        if target_layer_ids is None:
            target_layer_ids = default_target_layer_ids(n, 9 if fusion == "layerwise" else num_layers)
        args = DraftArgs(hidden_size=target_args.hidden_size,
                         intermediate_size=target_args.intermediate_size or 4 * target_args.hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=target_args.num_attention_heads,
                         num_key_value_heads=target_args.num_key_value_heads, head_dim=target_args.head_dim,
                         vocab_size=target_args.vocab_size, target_layer_ids=tuple(target_layer_ids),
                         mask_token_id=target_args.vocab_size - 1 if mask_token_id is None else mask_token_id,
                         num_target_layers=n, fusion=fusion, block_size=block_size,
                         rms_norm_eps=target_args.rms_norm_eps, rope_theta=target_args.rope_theta,
                         rope_scaling=target_args.rope_scaling,
                         max_position_embeddings=target_args.max_position_embeddings)
        draft = cls(args)
        draft.reset_parameters()
        return draft

    def reset_parameters(self, std: float = 0.02):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.args.fusion == "layerwise":
            D, T = self.layer_fusion_weights.shape
            with torch.no_grad():
                self.layer_fusion_weights.zero_()
                for d in range(D):
                    self.layer_fusion_weights[d, d * T // D] = 2.0

    def fuse(self, hidden):
        """Captured target states [B, C, T, H] -> one context input per draft layer [B, C, D or 1, H]."""
        B, C, T, H = hidden.shape
        if self.args.fusion == "layerwise":
            fused = self.fuse_layers(hidden.reshape(B * C, T, H), self.layer_fusion_weights,
                                     self.hidden_norm.weight, self.args.rms_norm_eps)
            return fused.view(B, C, -1, H)
        return self.hidden_norm(self.fc(hidden.reshape(B, C, T * H)))[:, :, None]

    def context_keys_values(self, hidden, cos, sin):
        """hidden [B, C, T, H] -> per draft layer, keys and values [B, n_kv, C, head_dim]."""
        ctx = self.fuse(hidden)
        # DFlash: slot 0, shared by every layer
        return [layer.self_attn.keys_values(ctx[:, :, min(d, ctx.shape[2] - 1)], cos, sin, context=True)
                for d, layer in enumerate(self.layers)]

    def layer_masks(self, mask, context_pos, block_pos):
        """mask [B, 1, Q, L + Q] over [context | blocks] keys -> one per draft layer, narrowed for causal and
        sliding-window layers by the positions context_pos [L] and block_pos [B, Q]."""
        if set(self.layer_attention) == {(False, 0)}:
            return [mask] * len(self.layers)
        q = block_pos[:, None, :, None]
        k = torch.cat([context_pos.expand(block_pos.shape[0], -1), block_pos], dim=1)[:, None, None, :]
        masks = {kind: narrowed(mask, q, k, *kind) for kind in set(self.layer_attention)}
        return [masks[kind] for kind in self.layer_attention]

    def run_layers(self, noise_tokens, cos, sin, context_kv, masks):
        """noise_tokens [B, Q], one mask per layer -> the normed final hidden states [B, Q, H]."""
        x = self.embed_tokens(noise_tokens)
        for layer, (k, v), mask in zip(self.layers, context_kv, masks, strict=True):
            x = layer(x, cos, sin, k, v, mask)
        return self.norm(x)

    def noise_block(self, anchor_tokens, block_size: int | None = None):
        """[anchor, MASK, ..., MASK]: [B] -> [B, bs], bs the draft's block size unless given."""
        block = torch.full((anchor_tokens.shape[0], block_size or self.args.block_size),
                           self.args.mask_token_id, dtype=torch.long, device=anchor_tokens.device)
        block[:, 0] = anchor_tokens
        return block

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        a = self.args
        p = self.layers[0].self_attn.q_proj.weight
        for layer in self.layers:
            layer.self_attn.context_cache = KVCache(max_batch_size, a.num_key_value_heads, max_seq_length,
                                                    a.head_dim, p.dtype, p.device)
        cos, sin = rope_tables(a, max_seq_length)
        self.register_buffer("rope_cos", cos.to(p.device), persistent=False)
        self.register_buffer("rope_sin", sin.to(p.device), persistent=False)
        self.max_seq_length = max_seq_length

    def write_context(self, hidden, positions):
        """Fuse target states hidden [B, n, T, H] and write their context K/V at positions [B, n]."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for layer, (k, v) in zip(self.layers, self.context_keys_values(hidden, cos, sin)):
            layer.self_attn.context_cache.update(positions, k, v)

    def block_logits(self, block_tokens, anchor_pos):
        """block_tokens [B, bs] at anchor_pos [B] + 0..bs-1 and the cached context -> logits [B, bs-1, V]."""
        B, bs = block_tokens.shape
        positions = anchor_pos[:, None] + torch.arange(bs, device=block_tokens.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        key_pos = torch.arange(self.max_seq_length, device=block_tokens.device)
        context_mask = (key_pos < anchor_pos[:, None])[:, None, None, :].expand(B, 1, bs, -1)
        mask = torch.cat([context_mask, context_mask.new_ones(B, 1, bs, bs)], dim=-1)
        masks = self.layer_masks(mask, key_pos, positions)
        caches = [(l.self_attn.context_cache.k_cache, l.self_attn.context_cache.v_cache)
                  for l in self.layers]
        hidden = self.run_layers(block_tokens, cos, sin, caches, masks)[:, 1:]
        # 2-D rows: on this 3-D slice matmul would run a bmm that copies the lm_head weight every step
        return self.lm_head(hidden.flatten(0, 1)).view(B, bs - 1, -1)

    def forward(self, hidden, block_tokens, anchors):
        """Training: hidden [B, S, T, H] of whole sequences, block_tokens [B, nb, bs] at anchors [B, nb] ->
        normed hidden states of block positions 1..bs-1 [B, nb, bs-1, H] (logits: loss.py)."""
        B, S = hidden.shape[:2]
        nb, bs = block_tokens.shape[1:]
        cos, sin = (t.to(hidden.device) for t in rope_tables(self.args, S + bs))
        context_kv = self.context_keys_values(hidden, cos[:S].expand(B, S, -1), sin[:S].expand(B, S, -1))
        if hidden.is_cuda:
            x = self.run_blocks(block_tokens, anchors, cos, sin, context_kv, create_block_mask)
        else:
            n = max(1, ATTENTION_CHUNK_SCORES // (self.args.num_attention_heads * bs * S))
            x = torch.cat([checkpoint(self.run_blocks, block_tokens[:, j:j + n], anchors[:, j:j + n], cos,
                                      sin, context_kv, create_mask, use_reentrant=False)
                           for j in range(0, nb, n)], dim=1)
        return x.view(B, nb, bs, -1)[:, :, 1:]

    def run_blocks(self, block_tokens, anchors, cos, sin, context_kv, make_mask):
        """block_tokens [B, n, bs] at anchors [B, n] -> [B, n * bs, H], under masks from make_mask
        (create_mask or create_block_mask)."""
        B, n, bs = block_tokens.shape
        S = context_kv[0][0].shape[2]
        positions = (anchors[:, :, None] + torch.arange(bs, device=anchors.device)).flatten(1)
        masks = {kind: make_mask(training_mask_mod(anchors, S, bs, *kind), B, None, n * bs,
                                 S + n * bs, device=anchors.device)
                 for kind in set(self.layer_attention)}
        return self.run_layers(block_tokens.flatten(1), cos[positions], sin[positions], context_kv,
                               [masks[kind] for kind in self.layer_attention])


def narrowed(visible, q_pos, k_pos, causal: bool, window: int):
    """visible less what a causal and/or sliding-window layer does not see (as z-lab's DFlash masks), by the
    absolute positions of queries and keys (broadcastable shapes)."""
    if causal:
        visible = visible & (k_pos <= q_pos)
    if window:
        visible = visible & ((q_pos - k_pos < window) if causal else ((q_pos - k_pos).abs() < window))
    return visible


def training_mask_mod(anchors, context_len: int, block_size: int, causal: bool, window: int):
    """Draft.forward's flex_attention mask_mod for layers of one kind (causal, window). Query q is token
    q % bs of block q // bs; keys: the context (positions < context_len), then the blocks' tokens."""
    S, bs = context_len, block_size
    positions = (anchors[:, :, None] + torch.arange(bs, device=anchors.device)).flatten(1)
    key_pos = torch.cat([torch.arange(S, device=anchors.device).expand(len(anchors), -1), positions], dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        block = q_idx // bs
        own_block = (kv_idx >= S + block * bs) & (kv_idx < S + (block + 1) * bs)
        return narrowed((kv_idx < anchors[b, block]) | own_block, positions[b, q_idx], key_pos[b, kv_idx],
                        causal, window)

    return mask_mod


def draft_block_logits(draft: Draft, context_hidden, block_tokens, start_pos: int):
    """Stateless reference: context_hidden [B, C, T, H] at 0..C-1 and block_tokens [B, bs] at C = start_pos
    -> logits [B, bs-1, V]."""
    B, C = context_hidden.shape[:2]
    assert C == start_pos, "the context must hold exactly the positions before the block"
    bs = block_tokens.shape[1]
    cos, sin = (t.to(context_hidden.device)[None].expand(B, -1, -1)
                for t in rope_tables(draft.args, C + bs))
    context_kv = draft.context_keys_values(context_hidden, cos[:, :C], sin[:, :C])
    mask = torch.ones(B, 1, bs, C + bs, dtype=torch.bool, device=context_hidden.device)
    positions = torch.arange(C + bs, device=context_hidden.device)
    masks = draft.layer_masks(mask, positions[:C], positions[C:].expand(B, -1))
    return draft.lm_head(draft.run_layers(block_tokens, cos[:, C:], sin[:, C:], context_kv, masks)[:, 1:])
