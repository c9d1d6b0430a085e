"""The block-diffusion draft: DFlare (layer-wise fusion) and DFlash (one shared linear fusion); DESIGN.md 2, 3.

A draft is D Qwen3-style decoder layers and a final RMSNorm, with no embedding or LM head of its own: it embeds with
the target's `embed_tokens` and reads logits through the target's `lm_head`. For a block at anchor position p it sees
  - noise tokens [anchor, MASK, ..., MASK] at positions p .. p+bs-1 (queries, and keys/values of the block), and
  - context: the target's captured hidden states X [B, C, T, H] of every position < p, fused into one input per
    draft layer and projected into keys/values (RoPE at their own positions).
Block queries see all context positions < p and the whole block (no causal mask inside it; the causal or sliding
window layers of some z-lab drafts see less, `Draft.layer_masks`). Positions 1..bs-1 of the output are the guesses
for tokens p+1 .. p+bs-1.

Three ways to run it, all through `Draft.run_layers`:
  - `draft_block_logits`: stateless reference, a whole context and one block;
  - `Draft.write_context` + `Draft.block_logits`: static context K/V caches indexed by absolute position, for
    decoding (static shapes, compilable; `generate.speculative_step` drives them);
  - `Draft.forward` (training): all blocks of a sequence together, block-sparse attention (flex_attention) on CUDA,
    dense masks over a chunk of blocks at a time on CPU; it returns hidden states, whose logits train.block_loss
    reads a chunk at a time.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from fuse_kernel import fuse_layers
from model import CONFIG_DEFAULTS, MLP, UNSUPPORTED_FIELDS, InputError, KVCache, ModelArgs, RMSNorm, \
    SafetensorsFolder, apply_rope, attention, attention_layer_types, read_config, refuse_unsupported_fields, \
    rope_settings, rope_tables, save_folder, sliding_window_size

# Draft.forward on CPU runs a chunk of blocks at a time, of about this many attention scores (heads x queries x
# context length; 64 MB in fp32): the dense masked attention over all blocks would hold gigabytes of them
ATTENTION_CHUNK_SCORES = 2**24

# flex_attention is fused only when compiled; dynamic, and its own compiled function, so that the variants training
# asks for (layer kinds, with and without grad, sequence and block counts) stay within Dynamo's recompile limit
training_flex_attention = torch.compile(flex_attention, dynamic=True)


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
    rope_scaling: dict | None = None  # as in ModelArgs: None for plain RoPE
    attention_bias: bool = False  # biases on q/k/v/o (and k/v_proj_target)
    layer_types: tuple = ()  # per layer "full_attention" (the default) or "sliding_attention"
    sliding_window: int = 0  # keys a sliding layer sees; 0: no window
    is_causal: bool | None = None  # None: sliding layers are causal inside the block, full ones bidirectional

    def to_config(self) -> dict:
        """config.json in the published draft format (Qwen3 fields plus block_size and dflash_config)."""
        skip = ("target_layer_ids", "mask_token_id", "fusion", "rope_scaling", "layer_types", "is_causal")
        fields = {k: v for k, v in asdict(self).items() if k not in skip}
        return {"architectures": ["DFlareDraftModel" if self.fusion == "layerwise" else "DFlashDraftModel"],
                "model_type": "qwen3", **fields, "tie_word_embeddings": False,
                **({"rope_scaling": self.rope_scaling} if self.rope_scaling else {}),
                **({"layer_types": list(self.layer_types)} if self.layer_types else {}),
                **({"is_causal": self.is_causal} if self.is_causal is not None else {}),
                "use_sliding_window": bool(self.layer_types and self.sliding_window),
                "dflash_config": {"target_layer_ids": list(self.target_layer_ids),
                                  "mask_token_id": self.mask_token_id}}

    @classmethod
    def from_config(cls, config: dict, fusion: str) -> "DraftArgs":
        """A published draft's config.json. block_size, mask_token_id, target_layer_ids and num_target_layers come
        from dflash_config first, the top level second; every other field as transformers' Qwen3Config reads it,
        whatever model_type says: the reference classes (z-lab's DFlashDraftModel, AngelSlim's
        QwenDFlareDraftModel) load their configs as Qwen3Config. (z-lab's gpt-oss-20b-DFlash says gpt_oss; read as
        GptOssConfig it would get alternating sliding layers that its own loader does not build.)"""
        refuse_unsupported_fields(config, "draft config.json")
        dflash = config.get("dflash_config") or {}
        unknown = sorted(set(dflash) - DFLASH_CONFIG_FIELDS - set(UNSUPPORTED_FIELDS))
        if unknown:
            raise InputError(f"draft config.json's dflash_config sets {', '.join(unknown)}, which this implementation "
                             f"does not know: a newer draft design than it supports")

        def draft_field(name, default=None):
            return dflash.get(name, config.get(name, default))

        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
                   if k not in config]
        if missing:
            raise InputError(f"draft config.json lacks {', '.join(missing)}")
        mask_token_id = draft_field("mask_token_id")
        if mask_token_id is None:
            raise InputError("draft config.json has no mask_token_id (in dflash_config or at the top level): add the "
                             "id of the mask token the draft was trained with")
        n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]
        num_target_layers = draft_field("num_target_layers") or 0
        target_layer_ids = draft_field("target_layer_ids")
        if target_layer_ids is None:
            if not num_target_layers:
                raise InputError("draft config.json has neither target_layer_ids nor num_target_layers (in "
                                 "dflash_config or at the top level): add the target layers the draft reads")
            target_layer_ids = default_target_layer_ids(num_target_layers, n_layers)
        layer_types = attention_layer_types(config, "qwen3")
        if fusion == "layerwise" and (set(layer_types) != {"full_attention"} or config.get("is_causal")):
            raise InputError(f"draft config.json asks for {'causal' if config.get('is_causal') else 'sliding'} "
                             f"draft layers, which the DFlare reference does not define: use full_attention layers")
        defaults = CONFIG_DEFAULTS["qwen3"]
        rope_theta, rope_scaling = rope_settings(config, "qwen3")
        return cls(hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
                   num_hidden_layers=n_layers, num_attention_heads=n_heads,
                   num_key_value_heads=config.get("num_key_value_heads", defaults["num_key_value_heads"]) or n_heads,
                   head_dim=config.get("head_dim", defaults["head_dim"]) or config["hidden_size"] // n_heads,
                   vocab_size=config.get("vocab_size", 0), target_layer_ids=tuple(target_layer_ids),
                   mask_token_id=mask_token_id, num_target_layers=num_target_layers, fusion=fusion,
                   block_size=int(draft_field("block_size", 16)),
                   rms_norm_eps=config.get("rms_norm_eps", defaults["rms_norm_eps"]), rope_theta=rope_theta,
                   max_position_embeddings=config.get("max_position_embeddings", defaults["max_position_embeddings"]),
                   rope_scaling=rope_scaling, attention_bias=config.get("attention_bias", defaults["attention_bias"]),
                   layer_types=layer_types if set(layer_types) != {"full_attention"} else (),
                   sliding_window=sliding_window_size(config, "qwen3"), is_causal=config.get("is_causal"))

    def layer_attention(self) -> list:
        """(causal, window) per draft layer, as z-lab's DFlash reads layer_types / is_causal / sliding_window."""
        kinds = self.layer_types or ("full_attention",) * self.num_hidden_layers
        return [(kind == "sliding_attention" if self.is_causal is None else self.is_causal,
                 self.sliding_window if kind == "sliding_attention" else 0) for kind in kinds]


# What a dflash_config may hold: the draft's own fields, and training settings that do not change its numerics
DFLASH_CONFIG_FIELDS = {"target_layer_ids", "mask_token_id", "mask_token", "block_size", "num_target_layers",
                        "num_anchors", "loss_decay_gamma", "attention_backend"}


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
        n_heads, n_kv, hd, H = args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.hidden_size
        bias = args.attention_bias
        self.q_proj = nn.Linear(H, n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(H, n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(H, n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(n_heads * hd, H, bias=bias)
        self.q_norm = RMSNorm(hd, args.rms_norm_eps)
        self.k_norm = RMSNorm(hd, args.rms_norm_eps)
        if args.fusion == "layerwise":  # DFlare: the context has projections of its own
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
        """x [B, Q, H] noise hidden states; context_k/v [B, n_kv, L, head_dim]; mask over [context | noise] keys:
        boolean [B, 1, Q, L + Q], or a flex_attention BlockMask of that shape (Draft.forward on CUDA)."""
        B, Q, _ = x.shape
        q = self.q_proj(x).view(B, Q, -1, self.args.head_dim)
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)
        k, v = self.keys_values(x, cos, sin, context=False)
        k, v = torch.cat([context_k, k], dim=2), torch.cat([context_v, v], dim=2)
        if isinstance(mask, BlockMask):  # only the tiles of keys the mask leaves visible are computed
            y = training_flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            y = attention(q, k, v, mask.repeat(1, 1, q.shape[1] // k.shape[1], 1))  # the mask in attention's order
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
            raise InputError(f"fusion must be 'layerwise' (DFlare) or 'linear' (DFlash), got {args.fusion!r}")
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

    # --- creating, loading, saving ---------------------------------------------------------------------------

    @classmethod
    def for_target(cls, target_args: ModelArgs, num_layers: int = 5, fusion: str = "layerwise",
                   target_layer_ids=None, block_size: int = 16, mask_token_id: int | None = None) -> "Draft":
        """A new, initialised draft of the target's width. DFlash taps `num_layers` target layers, DFlare 9."""
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
        draft.check_target(target_args)
        draft.reset_parameters()
        return draft

    def reset_parameters(self, std: float = 0.02):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.args.fusion == "layerwise":
            # each draft layer starts on its own target layer: zeros except W[d, floor(d * T / D)] = 2
            D, T = self.layer_fusion_weights.shape
            with torch.no_grad():
                self.layer_fusion_weights.zero_()
                for d in range(D):
                    self.layer_fusion_weights[d, d * T // D] = 2.0

    def check_target(self, target_args: ModelArgs):
        a = self.args
        problems = []
        if a.hidden_size != target_args.hidden_size:
            problems.append(f"hidden size {a.hidden_size} != target's {target_args.hidden_size}")
        if a.vocab_size and a.vocab_size != target_args.vocab_size:
            problems.append(f"vocab size {a.vocab_size} != target's {target_args.vocab_size}")
        if not 0 <= a.mask_token_id < target_args.vocab_size:
            problems.append(f"mask_token_id {a.mask_token_id} is outside the target's vocabulary")
        bad = [i for i in a.target_layer_ids if not 0 <= i < target_args.num_hidden_layers]
        if bad:
            problems.append(f"target_layer_ids {bad} are beyond the target's {target_args.num_hidden_layers} layers")
        elif a.num_target_layers and a.num_target_layers != target_args.num_hidden_layers:
            problems.append(f"made for a target of {a.num_target_layers} layers, this one has "
                            f"{target_args.num_hidden_layers}")
        if problems:
            raise InputError("draft does not fit this target: " + "; ".join(problems)
                             + " (pass the target the draft was trained for)")

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.bfloat16) -> "Draft":
        """Load a z-lab DFlash or AngelSlim DFlare draft folder (or one saved by save_pretrained). Strict: every
        tensor of the folder is used and every numeric config field honoured, or loading fails saying which."""
        config = read_config(folder)
        ckpt = SafetensorsFolder(folder)
        names = {name.removeprefix("model."): name for name in ckpt.file_of}
        fusion = "layerwise" if "layer_fusion_weights" in names else "linear"
        newer = sorted({n.split(".")[-2] for n in names if "candidate_selector" in n or "_conv." in n})
        if newer:
            raise InputError(f"draft {str(folder)!r} has {', '.join(newer)} tensors: a newer DFlash draft design "
                             f"(convolution layers, candidate selector) that this implementation does not support")
        with torch.device("meta"):  # no random init of weights that are about to be replaced
            draft = cls(DraftArgs.from_config(config, fusion))
        state = {}
        for name, param in draft.named_parameters():
            if name not in names:
                raise InputError(f"draft {str(folder)!r} lacks tensor {name!r} ({fusion} fusion, "
                                 f"{draft.args.num_hidden_layers} layers per its config.json)")
            tensor = ckpt.get(names[name])
            if tuple(tensor.shape) != tuple(param.shape):
                raise InputError(f"draft tensor {name!r} in {str(folder)!r} has shape {tuple(tensor.shape)}, "
                                 f"but config.json implies {tuple(param.shape)}")
            state[name] = tensor.to(device, torch.float32 if name == "layer_fusion_weights" else dtype)
        ckpt.check_all_used(f"draft {str(folder)!r}")
        draft.load_state_dict(state, assign=True)
        return draft

    def save_pretrained(self, folder, dtype: torch.dtype | None = None):
        """config.json + model.safetensors (tensors in dtype, default as they are), written atomically."""
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        save_folder(folder, state, self.args.to_config())

    # --- the forward ------------------------------------------------------------------------------------------

    def fuse(self, hidden):
        """Captured target states [B, C, T, H] -> one context input per draft layer [B, C, D or 1, H]."""
        B, C, T, H = hidden.shape
        if self.args.fusion == "layerwise":
            fused = fuse_layers(hidden.reshape(B * C, T, H), self.layer_fusion_weights, self.hidden_norm.weight,
                                self.args.rms_norm_eps)
            return fused.view(B, C, -1, H)
        return self.hidden_norm(self.fc(hidden.reshape(B, C, T * H)))[:, :, None]

    def context_keys_values(self, hidden, cos, sin):
        """Per draft layer, keys and values [B, n_kv, C, head_dim] of the context hidden [B, C, T, H]."""
        ctx = self.fuse(hidden)
        # DFlash has one shared context input (slot 0); DFlare one per layer
        return [layer.self_attn.keys_values(ctx[:, :, min(d, ctx.shape[2] - 1)], cos, sin, context=True)
                for d, layer in enumerate(self.layers)]

    def layer_masks(self, mask, context_pos, block_pos):
        """One attention mask per draft layer. mask [B, 1, Q, L + Q] over [context | blocks] keys is what a layer
        may see at most: the context before the block's anchor and the block itself. Causal and sliding-window
        layers see less, decided by absolute positions: context_pos [L] of the context keys, block_pos [B, Q] of
        the block tokens (the queries, and the other keys)."""
        if set(self.layer_attention) == {(False, 0)}:  # every layer full and bidirectional: nothing to narrow
            return [mask] * len(self.layers)
        q = block_pos[:, None, :, None]
        k = torch.cat([context_pos.expand(block_pos.shape[0], -1), block_pos], dim=1)[:, None, None, :]
        masks = {kind: narrowed(mask, q, k, *kind) for kind in set(self.layer_attention)}
        return [masks[kind] for kind in self.layer_attention]

    def run_layers(self, target, noise_tokens, cos, sin, context_kv, masks):
        """Noise tokens [B, Q] through the draft; masks: one per layer over [context | noise] keys (see
        DraftAttention.forward). Returns the final hidden states [B, Q, H], after the draft's norm: the target's
        lm_head turns them into logits."""
        x = target.embed_tokens(noise_tokens)
        for layer, (k, v), mask in zip(self.layers, context_kv, masks, strict=True):
            x = layer(x, cos, sin, k, v, mask)
        return self.norm(x)

    def noise_block(self, anchor_tokens, block_size: int | None = None):
        """[anchor, MASK, ..., MASK]: [B] -> [B, bs] (bs = the draft's block size unless a smaller one is given)."""
        block = torch.full((anchor_tokens.shape[0], block_size or self.args.block_size), self.args.mask_token_id,
                           dtype=torch.long, device=anchor_tokens.device)
        block[:, 0] = anchor_tokens
        return block

    # --- decoding with static context caches ------------------------------------------------------------------

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
        """Fuse captured target states hidden [B, n, T, H] and write their context K/V at positions [B, n].
        Rows past a sequence's committed length may hold anything: positions >= the next anchor are masked and
        later overwritten."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for layer, (k, v) in zip(self.layers, self.context_keys_values(hidden, cos, sin)):
            layer.self_attn.context_cache.update(positions, k, v)

    def block_logits(self, target, block_tokens, anchor_pos):
        """block_tokens [B, bs] at positions anchor_pos[:, None] + 0..bs-1, against the cached context of
        positions < anchor_pos. Returns the guesses for block positions 1..bs-1, [B, bs-1, V]."""
        B, bs = block_tokens.shape
        positions = anchor_pos[:, None] + torch.arange(bs, device=block_tokens.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        key_pos = torch.arange(self.max_seq_length, device=block_tokens.device)
        context_mask = (key_pos < anchor_pos[:, None])[:, None, None, :].expand(B, 1, bs, -1)
        mask = torch.cat([context_mask, context_mask.new_ones(B, 1, bs, bs)], dim=-1)
        masks = self.layer_masks(mask, key_pos, positions)
        caches = [(l.self_attn.context_cache.k_cache, l.self_attn.context_cache.v_cache) for l in self.layers]
        hidden = self.run_layers(target, block_tokens, cos, sin, caches, masks)[:, 1:]  # [B, bs-1, H]
        # lm_head on 2-D rows: on the 3-D slice (batch stride bs*H, not (bs-1)*H) matmul does not fold the batch
        # into one mm but runs a bmm that copies the whole lm_head weight, every step
        return target.lm_head(hidden.flatten(0, 1)).view(B, bs - 1, -1)

    # --- training -------------------------------------------------------------------------------------------

    def forward(self, target, hidden, block_tokens, anchors):
        """Training: many blocks of each sequence in one forward (train.py; DDP calls this).

        hidden [B, S, T, H] captured for the whole sequence; block_tokens [B, nb, bs]; anchors [B, nb] (block j
        sits at anchors[:, j] + 0..bs-1). A block's queries see context positions < its anchor and its own block.
        Returns the final hidden states (after the draft's norm) of block positions 1..bs-1, [B, nb, bs-1, H]: the
        logits of all of them at once would take gigabytes at a real vocabulary (train.chunked_cross_entropy).
        """
        B, S = hidden.shape[:2]
        nb, bs = block_tokens.shape[1:]
        cos, sin = (t.to(hidden.device) for t in rope_tables(self.args, S + bs))
        context_kv = self.context_keys_values(hidden, cos[:S].expand(B, S, -1), sin[:S].expand(B, S, -1))
        if hidden.is_cuda:  # block-sparse: flex_attention skips the tiles of keys no query of the tile sees
            x = self.run_blocks(target, block_tokens, anchors, cos, sin, context_kv, create_block_mask)
        else:  # dense, a chunk of blocks at a time; each chunk is recomputed in the backward rather than kept
            n = max(1, ATTENTION_CHUNK_SCORES // (self.args.num_attention_heads * bs * S))
            x = torch.cat([checkpoint(self.run_blocks, target, block_tokens[:, j:j + n], anchors[:, j:j + n], cos, sin,
                                      context_kv, create_mask, use_reentrant=False) for j in range(0, nb, n)], dim=1)
        return x.view(B, nb, bs, -1)[:, :, 1:]

    def run_blocks(self, target, block_tokens, anchors, cos, sin, context_kv, make_mask):
        """Blocks block_tokens [B, n, bs] at anchors [B, n] through the draft, against the context keys/values of
        positions 0..S-1 and under the masks make_mask builds from training_mask_mod (create_mask: boolean;
        create_block_mask: flex_attention's). cos, sin: RoPE tables covering the blocks' positions.
        Returns the final hidden states [B, n * bs, H]."""
        B, n, bs = block_tokens.shape
        S = context_kv[0][0].shape[2]
        positions = (anchors[:, :, None] + torch.arange(bs, device=anchors.device)).flatten(1)  # [B, n * bs]
        masks = {kind: make_mask(training_mask_mod(anchors, S, bs, *kind), B, None, n * bs, S + n * bs,
                                 device=anchors.device) for kind in set(self.layer_attention)}
        return self.run_layers(target, block_tokens.flatten(1), cos[positions], sin[positions], context_kv,
                               [masks[kind] for kind in self.layer_attention])


def narrowed(visible, q_pos, k_pos, causal: bool, window: int):
    """visible less what a causal and/or sliding-window draft layer does not see, as z-lab's DFlash masks it, by the
    absolute positions of queries and keys (any broadcastable shapes)."""
    if causal:
        visible = visible & (k_pos <= q_pos)
    if window:
        visible = visible & ((q_pos - k_pos < window) if causal else ((q_pos - k_pos).abs() < window))
    return visible


def training_mask_mod(anchors, context_len: int, block_size: int, causal: bool, window: int):
    """Draft.forward's attention mask for layers of one kind (causal, window), as a flex_attention mask_mod.

    Queries: the blocks at anchors [B, n], query q being block q // bs's token q % bs, at position
    anchors[b, q // bs] + q % bs. Keys: the context (key c at position c, c < context_len), then the blocks' tokens
    in the queries' order. A query sees the context before its anchor and its own block, narrowed for causal and
    sliding-window layers as Draft.layer_masks narrows."""
    S, bs = context_len, block_size
    positions = (anchors[:, :, None] + torch.arange(bs, device=anchors.device)).flatten(1)  # [B, n * bs]
    key_pos = torch.cat([torch.arange(S, device=anchors.device).expand(len(anchors), -1), positions], dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        block = q_idx // bs
        own_block = (kv_idx >= S + block * bs) & (kv_idx < S + (block + 1) * bs)
        return narrowed((kv_idx < anchors[b, block]) | own_block, positions[b, q_idx], key_pos[b, kv_idx], causal,
                        window)

    return mask_mod


def draft_block_logits(draft: Draft, target, context_hidden, block_tokens, start_pos: int):
    """Stateless reference: context rows at positions 0..C-1 (C = start_pos), one block at start_pos.
    context_hidden [B, C, T, H], block_tokens [B, bs] -> [B, bs-1, V]."""
    B, C = context_hidden.shape[:2]
    assert C == start_pos, "the context must hold exactly the positions before the block"
    bs = block_tokens.shape[1]
    cos, sin = (t.to(context_hidden.device)[None].expand(B, -1, -1) for t in rope_tables(draft.args, C + bs))
    context_kv = draft.context_keys_values(context_hidden, cos[:, :C], sin[:, :C])
    mask = torch.ones(B, 1, bs, C + bs, dtype=torch.bool, device=context_hidden.device)
    positions = torch.arange(C + bs, device=context_hidden.device)
    masks = draft.layer_masks(mask, positions[:C], positions[C:].expand(B, -1))
    return target.lm_head(draft.run_layers(target, block_tokens, cos[:, C:], sin[:, C:], context_kv, masks)[:, 1:])
