"""Target models: Qwen3 dense, Qwen3-MoE, GPT-OSS and Llama in one small Transformer.

Configured from a Hugging Face `config.json` and loaded straight from its safetensors files (DESIGN.md section 1).
Static KV caches indexed by absolute position, so a compiled decode step never changes shape, and the outputs of
chosen decoder layers (`capture`) can be returned for the draft model.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.nn.attention.flex_attention import AuxRequest, flex_attention
from safetensors.torch import save_file

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "gpt_oss", "llama")


class InputError(Exception):
    """Bad input from the user (paths, checkpoints, flags): the message names the problem and the fix."""


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
    rope_scaling: dict | None = None  # {rope_type: linear / yarn / llama3, its parameters}, None for plain RoPE
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False  # Llama: biases on the dense MLP's projections
    qk_norm: bool = True  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    attention_sinks: bool = False  # GPT-OSS: a learned per-head logit joins the softmax denominator
    layer_types: tuple = ()  # "full_attention" / "sliding_attention" per layer
    sliding_window: int = 0  # keys a sliding layer sees, the current one included
    moe_layers: tuple = ()  # indices of the layers whose MLP is a mixture of experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    moe_bias: bool = False  # GPT-OSS: router and expert biases
    swiglu_limit: float = 0.0  # GPT-OSS clamped SwiGLU when > 0, plain SiLU gating otherwise
    swiglu_alpha: float = 1.702
    eos_token_id: list = field(default_factory=list)

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InputError(
                f"config.json has model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if k not in config]
        if missing:
            raise InputError(f"config.json lacks {', '.join(missing)}: is this a {model_type} checkpoint?")
        refuse_unsupported_fields(config, "config.json")
        quantization = (config.get("quantization_config") or {}).get("quant_method")
        if quantization not in (None, "mxfp4") or (quantization == "mxfp4" and model_type != "gpt_oss"):
            raise InputError(f"config.json says the weights are quantized with {quantization!r}, which this "
                             f"implementation does not read: use the unquantized (bf16) checkpoint")
        defaults = CONFIG_DEFAULTS[model_type]
        n_layers = config["num_hidden_layers"]
        n_heads = config["num_attention_heads"]
        rope_theta, rope_scaling = rope_settings(config, model_type)
        eos = config.get("eos_token_id")
        args = cls(
            model_type=model_type,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=config.get("num_key_value_heads", defaults["num_key_value_heads"]) or n_heads,
            head_dim=config.get("head_dim", defaults["head_dim"]) or config["hidden_size"] // n_heads,
            intermediate_size=config.get("intermediate_size", 0),
            rms_norm_eps=config.get("rms_norm_eps", defaults["rms_norm_eps"]),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", defaults["max_position_embeddings"]),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=config.get("attention_bias", defaults["attention_bias"]),
            layer_types=attention_layer_types(config, model_type),
            sliding_window=sliding_window_size(config, model_type),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )
        if model_type == "llama":  # Qwen3 without the q/k norm
            args.qk_norm = False
            args.mlp_bias = config.get("mlp_bias", False)
        if model_type == "qwen3_moe":
            step = config.get("decoder_sparse_step", 1)
            dense_layers = set(config.get("mlp_only_layers", []))
            args.moe_layers = tuple(i for i in range(n_layers) if i not in dense_layers and (i + 1) % step == 0)
            args.num_experts = config.get("num_experts") or config["num_local_experts"]
            args.num_experts_per_tok = config["num_experts_per_tok"]
            args.moe_intermediate_size = config["moe_intermediate_size"]
            args.norm_topk_prob = config.get("norm_topk_prob", False)
        if model_type == "gpt_oss":
            args.qk_norm = False
            args.attention_sinks = True
            args.moe_layers = tuple(range(n_layers))
            args.num_experts = config.get("num_local_experts") or config["num_experts"]
            args.num_experts_per_tok = config.get("num_experts_per_tok") or config["experts_per_token"]
            args.moe_intermediate_size = config["intermediate_size"]
            args.norm_topk_prob = True  # softmax over the top-k logits
            args.moe_bias = True
            args.swiglu_limit = config.get("swiglu_limit", 7.0)
            args.swiglu_alpha = config.get("swiglu_alpha", 1.702)
        if "sliding_attention" in args.layer_types and not args.sliding_window:
            raise InputError("config.json has sliding_attention layers but no sliding_window: add the window size "
                             "(keys a sliding layer sees) to config.json")
        return args


# What transformers assumes for fields a config.json leaves out (the reference implementations read configs through
# transformers, so a missing field must mean the same here).
CONFIG_DEFAULTS = {
    "qwen3": dict(rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, attention_bias=False, head_dim=128,
                  num_key_value_heads=32, max_position_embeddings=32768, sliding_window=4096),
    "qwen3_moe": dict(rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, attention_bias=False,
                      head_dim=None, num_key_value_heads=4, max_position_embeddings=32768, sliding_window=4096),
    "gpt_oss": dict(rope_theta=150000.0, rms_norm_eps=1e-5, attention_bias=True, head_dim=64, num_key_value_heads=8,
                    max_position_embeddings=131072, sliding_window=128,
                    rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "truncate": False, "original_max_position_embeddings": 4096}),
    "llama": dict(rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, attention_bias=False, head_dim=None,
                  num_key_value_heads=None, max_position_embeddings=2048, sliding_window=None),
}

# Keys each RoPE scaling needs besides rope_type (YaRN's factor may instead come from max_position_embeddings)
ROPE_TYPES = {"default": (), "linear": ("factor",), "yarn": ("original_max_position_embeddings",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}

# config.json fields that change the numerics and that this implementation does not have, with their neutral
# values: any other value is refused rather than ignored (checked at the top level and in dflash_config)
UNSUPPORTED_FIELDS = {
    "output_multiplier": (None, 1, 1.0), "input_embedding_scale": (None, 1, 1.0),
    "final_logit_softcapping": (None, 0, 0.0), "attn_logit_softcapping": (None, 0, 0.0),
    "attention_sink_bias": (None, False), "partial_rotary_factor": (None, 1, 1.0), "hidden_act": (None, "silu"),
}


def refuse_unsupported_fields(config: dict, where: str):
    sections = [config, config.get("dflash_config") or {}, config.get("rope_scaling") or {},
                config.get("rope_parameters") or {}]
    found = sorted({f"{name}={section[name]!r}" for section in sections for name, neutral in
                    UNSUPPORTED_FIELDS.items() if name in section and section[name] not in neutral})
    if found:
        raise InputError(f"{where} sets {', '.join(found)}, which this implementation does not support (it would "
                         f"compute something else than the model was trained with)")


def rope_settings(config: dict, model_type: str):
    """(rope_theta, rope_scaling) of a config.json, read as transformers reads it: rope_scaling (released
    checkpoints) replaces rope_parameters (transformers 5.x) when both are there, and a rope_theta inside it wins
    over the top-level one. rope_scaling comes back None for plain RoPE, else as a dict with its rope_type."""
    defaults = CONFIG_DEFAULTS[model_type]
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or defaults["rope_scaling"] or {})
    theta = rope.get("rope_theta", config.get("rope_theta", defaults["rope_theta"]))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise InputError(f"config.json asks for RoPE type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type in ("yarn", "llama3"):  # the pretraining context: a top-level field wins, else the model's own
        rope["original_max_position_embeddings"] = config.get("original_max_position_embeddings") or rope.get(
            "original_max_position_embeddings") or config.get("max_position_embeddings",
                                                               defaults["max_position_embeddings"])
    missing = [k for k in ROPE_TYPES[rope_type] if rope.get(k) is None]
    if missing:
        raise InputError(f"config.json's {rope_type} RoPE scaling lacks {', '.join(missing)}")
    return float(theta), ({**rope, "rope_type": rope_type} if rope_type != "default" else None)


def attention_layer_types(config: dict, model_type: str) -> tuple:
    """"full_attention" / "sliding_attention" per layer, derived as transformers derives them when absent."""
    n_layers = config["num_hidden_layers"]
    if config.get("layer_types"):
        kinds = tuple(config["layer_types"])
        if len(kinds) != n_layers or not set(kinds) <= {"full_attention", "sliding_attention"}:
            raise InputError(f"config.json's layer_types must name full_attention or sliding_attention for each of "
                             f"its {n_layers} layers, got {list(kinds)}")
        return kinds
    if model_type == "gpt_oss":
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers))
    if not config.get("use_sliding_window"):
        return ("full_attention",) * n_layers
    window_from = 0 if model_type == "qwen3_moe" else config.get("max_window_layers", 28)  # Qwen3-MoE: every layer
    return tuple("sliding_attention" if i >= window_from else "full_attention" for i in range(n_layers))


def sliding_window_size(config: dict, model_type: str) -> int:
    """Keys a sliding layer sees (0: no window). Qwen3 configs have a window only with use_sliding_window."""
    if model_type in ("qwen3", "qwen3_moe") and not config.get("use_sliding_window"):
        return 0
    return config.get("sliding_window", CONFIG_DEFAULTS[model_type]["sliding_window"]) or 0


def read_json(path, fix: str = "corrupt or incomplete download, download it again") -> dict:
    """A JSON file we did not write in this run (a model folder's, prepared data's): one that does not parse is
    damaged, and the message says how to get a good one."""
    try:
        return json.loads(Path(path).read_bytes())
    except ValueError:  # not JSON, or not UTF-8
        raise InputError(f"{path} is not valid JSON: {fix}") from None


def read_config(checkpoint_dir) -> dict:
    path = Path(checkpoint_dir)
    if path.is_file():
        raise InputError(f"{str(path)!r} is a file: pass the model's folder (the one holding config.json and the "
                         f"*.safetensors weights)")
    if not path.is_dir():
        raise InputError(f"checkpoint folder {str(path)!r} does not exist (pass a Hugging Face model folder)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{str(path)!r} has no config.json: is it a Hugging Face model folder?")
    return read_json(config_file)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(args, max_seq_length: int, head_dim: int | None = None):
    """cos and sin of every (position, frequency) pair, [max_seq_length, head_dim // 2] in fp32. args: ModelArgs or
    DraftArgs (rope_theta, rope_scaling, max_position_embeddings)."""
    dim = head_dim or args.head_dim
    wavelength_base = args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / wavelength_base
    rs, scale = args.rope_scaling or {"rope_type": "default"}, 1.0
    if rs["rope_type"] == "linear":  # positions divided by factor
        inv_freq = inv_freq / rs["factor"]
    elif rs["rope_type"] == "llama3":  # Llama 3.1: slow frequencies / factor, fast ones kept, a smooth blend between
        original_len, factor = rs["original_max_position_embeddings"], rs["factor"]
        low, high = rs["low_freq_factor"], rs["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        smooth = (original_len / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelength < original_len / high, inv_freq,
                               torch.where(wavelength > original_len / low, inv_freq / factor, blended))
    elif rs["rope_type"] == "yarn":  # interpolate the slow frequencies, keep the fast ones, scale the attention
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
    """x [B, S, n_heads, head_dim]; cos/sin [B, S, head_dim // 2]. Rotates the two halves of each head."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch_size, n_kv_heads, max_seq_length, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v):
        """Write k/v [B, H, S, D] at each row's own slots [B, S] (absolute positions, except for a token tree's
        nodes); return the caches."""
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
        self.q_proj = nn.Linear(args.hidden_size, n_heads * hd, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, n_kv * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, n_kv * hd, bias=args.attention_bias)
        self.o_proj = nn.Linear(n_heads * hd, args.hidden_size, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, args.rms_norm_eps)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps)
        if args.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(n_heads))
        self.kv_cache = None

    def forward(self, x, cache_pos, cos, sin, mask, cached: bool):
        """x [B, S, H] cached at slots cache_pos [B, S] (their positions, except in a tree) and rotated by cos/sin;
        mask [B, 1, rep * S, L] in the folded query order of `attention`. cached: the keys are the KV cache's
        (L = max_seq_length), else the S tokens' own."""
        B, S, _ = x.shape
        hd = self.args.head_dim
        q = self.q_proj(x).view(B, S, -1, hd)
        k = self.k_proj(x).view(B, S, -1, hd)
        v = self.v_proj(x).view(B, S, -1, hd)
        if self.args.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if cached:
            k, v = self.kv_cache.update(cache_pos, k, v)  # [B, H_kv, max_seq_length, D]
        if self.args.attention_sinks:
            y = attention_with_sinks(q, k, v, mask, self.sinks)
        else:
            y = attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


def attention(q, k, v, mask):
    """Softmax attention of q [B, H, S, D] over k, v [B, H_kv, L, D] under a boolean mask [B, 1, rep * S, L].

    The rep = H / H_kv query heads that share a key/value head are folded into the query length ([B, H_kv, rep * S,
    D]; row r * S + s is head g * rep + r at position s), so the fused SDPA kernels take the mask: with enable_gqa a
    masked call falls back to the math kernel on CUDA, and repeating K/V to every head would copy the cache."""
    B, H, S, D = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1] * S, D)
    # reshape: the memory-efficient kernel returns [B, H_kv, rep * S, D] in a [B, rep * S, H_kv, D] layout
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, H, S, D)


# flex_attention runs fused only when compiled (inside a compiled step it is simply inlined). One compiled function
# per caller, dynamic: each caller's variants must stay within Dynamo's recompile limit (8), past which flex would
# run uncompiled, holding every score
sinks_flex_attention = torch.compile(flex_attention, dynamic=True)


def attention_with_sinks(q, k, v, mask, sinks):
    """Softmax attention whose denominator also holds exp(sink) per head (GPT-OSS). Shapes as in `attention`.

    With the scores' log-sum-exp lse, adding exp(sink) to the denominator scales the output by sigmoid(lse - sink).
    On CUDA the compiled flex_attention returns lse without ever holding the scores; on CPU (where compiled
    flex_attention cannot return lse) the scores are computed in fp32, folded as in `attention` (no K/V copy)."""
    if q.is_cuda:
        return attention_with_sinks_by_lse(q, k, v, mask, sinks, sinks_flex_attention)
    B, H, S, D = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1] * S, D)
    scores = (q.float() @ k.float().transpose(-1, -2)) * D ** -0.5  # [B, H_kv, rep * S, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(k.shape[1], -1, 1).expand(-1, -1, S).reshape(1, k.shape[1], -1, 1)
    top = torch.maximum(scores.amax(-1, keepdim=True), sink)
    weights = torch.exp(scores - top)
    probs = weights / (weights.sum(-1, keepdim=True) + torch.exp(sink - top))
    return (probs @ v.float()).to(q.dtype).view(B, H, S, D)


def attention_with_sinks_by_lse(q, k, v, mask, sinks, flex=flex_attention):
    """attention_with_sinks through flex_attention's log-sum-exp (the CUDA path; eager flex runs it on CPU too)."""
    B, H, S, D = q.shape
    rep = H // k.shape[1]

    def masked(score, b, h, q_idx, kv_idx):
        return torch.where(mask[b, 0, h % rep * S + q_idx, kv_idx], score, float("-inf"))

    out, aux = flex(q, k, v, score_mod=masked, enable_gqa=True, return_aux=AuxRequest(lse=True))
    return (out.float() * torch.sigmoid(aux.lse - sinks.float()[:, None])[..., None]).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All experts of one layer as stacked weights; gate_up_proj holds [gate; up] (not interleaved)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, H, I = args.num_experts, args.hidden_size, args.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        if args.moe_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
            self.down_proj_bias = nn.Parameter(torch.zeros(E, H))


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.router = nn.Linear(args.hidden_size, args.num_experts, bias=args.moe_bias)
        self.experts = Experts(args)

    def activation(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        limit = self.args.swiglu_limit
        if limit > 0:  # GPT-OSS clamped SwiGLU
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            return gate * torch.sigmoid(self.args.swiglu_alpha * gate) * (up + 1)
        return F.silu(gate) * up

    def forward(self, x):
        B, S, H = x.shape
        x = x.reshape(-1, H)  # [N, H]
        N, k, E = x.shape[0], self.args.num_experts_per_tok, self.args.num_experts
        router_logits = self.router(x).float()
        top_logits, top_idx = torch.topk(router_logits, k, dim=-1)  # [N, k]
        if self.args.norm_topk_prob:
            weights = torch.softmax(top_logits, dim=-1)
        else:
            weights = torch.softmax(router_logits, dim=-1).gather(-1, top_idx)
        weights = weights.to(x.dtype)
        ex = self.experts
        has_bias = self.args.moe_bias
        if N * k <= E:
            # Few tokens (decode, verify): read only the routed experts' weights.
            h = torch.einsum("nh,nkih->nki", x, ex.gate_up_proj[top_idx])  # [N, k, 2I]
            if has_bias:
                h = h + ex.gate_up_proj_bias[top_idx]
            out = torch.einsum("nki,nkhi->nkh", self.activation(h), ex.down_proj[top_idx])  # [N, k, H]
            if has_bias:
                out = out + ex.down_proj_bias[top_idx]
            y = torch.einsum("nkh,nk->nh", out, weights)
        else:
            # Many tokens (prefill): every expert on every token, weighted by zero off each token's top-k.
            dense_weights = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter(1, top_idx, weights)
            h = torch.einsum("nh,eih->nei", x, ex.gate_up_proj)  # [N, E, 2I]
            if has_bias:
                h = h + ex.gate_up_proj_bias
            out = torch.einsum("nei,ehi->neh", self.activation(h), ex.down_proj)  # [N, E, H]
            if has_bias:
                out = out + ex.down_proj_bias
            y = torch.einsum("neh,ne->nh", out, dense_weights)
        return y.view(B, S, H)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.sliding = args.layer_types[layer_id] == "sliding_attention"
        self.self_attn = Attention(args, self.sliding)
        self.mlp = (MoE(args) if layer_id in args.moe_layers
                    else MLP(args.hidden_size, args.intermediate_size, args.mlp_bias))
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cache_pos, cos, sin, mask, cached: bool):
        x = x + self.self_attn(self.input_layernorm(x), cache_pos, cos, sin, mask, cached)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.max_batch_size = 0
        self.max_seq_length = 0

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the static KV caches and RoPE tables; positions must stay below max_seq_length."""
        if max_seq_length > self.args.max_position_embeddings:
            raise InputError(f"max_seq_len {max_seq_length} exceeds the model's max_position_embeddings "
                             f"{self.args.max_position_embeddings}")
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        a = self.args
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch_size, a.num_key_value_heads, max_seq_length, a.head_dim,
                                               dtype, device)
        cos, sin = rope_tables(a, max_seq_length)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, tokens, input_pos, capture: tuple = (), logits_at=None, tree=None):
        """tokens, input_pos [B, S] (each row at its own absolute positions), through the KV caches.

        Returns logits and, when capture lists layer ids, those layers' outputs [B, S, T, H] (layer i's output =
        transformers' hidden_states[i + 1]), else None. Logits are [B, S, V], or with logits_at [B] (an index into
        S per row, e.g. a prompt's last token) [B, 1, V]: a long prompt's other positions need none.

        tree = (slots [B, S], visible [B, S, L]) verifies a token tree (generate.tree_step): token s sits at position
        input_pos[:, s] (its RoPE, and what sliding windows measure) but is cached at slot slots[:, s], and sees
        the cache slots visible[:, s] only (its context and its ancestors); L = max_seq_length.
        """
        x, hidden = self.run_layers(tokens, input_pos, self.rope_cos[input_pos], self.rope_sin[input_pos],
                                    torch.arange(self.max_seq_length, device=tokens.device), capture, cached=True,
                                    tree=tree)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]
        return self.lm_head(self.norm(x)), hidden

    def move_cached(self, source, dest):
        """Copy every layer's cached keys/values at slots source [B, n] to slots dest [B, n] (tree verification
        moves the accepted path's entries to their positions)."""
        for layer in self.layers:
            cache = layer.self_attn.kv_cache
            index = source[:, None, :, None].expand(-1, cache.k_cache.shape[1], -1, cache.k_cache.shape[3])
            cache.update(dest, cache.k_cache.gather(2, index), cache.v_cache.gather(2, index))

    def hidden_states(self, tokens, layer_ids):
        """Training: the outputs of layers layer_ids [B, S, T, H] for whole sequences at positions 0..S-1. The tokens
        attend to each other (no KV cache is read or written) and only the layers up to the deepest of layer_ids run
        (no logits)."""
        S = tokens.shape[1]
        positions = torch.arange(S, device=tokens.device)
        cos, sin = (t.to(tokens.device)[None] for t in rope_tables(self.args, S))
        return self.run_layers(tokens, positions.expand(tokens.shape[0], -1), cos, sin, positions, layer_ids,
                               cached=False, n_layers=max(layer_ids) + 1)[1]

    def run_layers(self, tokens, input_pos, cos, sin, key_pos, capture, cached: bool, n_layers=None, tree=None):
        """The first n_layers decoder layers (all by default) on tokens at input_pos [B, S], keys at key_pos [L]
        (the KV caches' positions when cached, else the tokens'); tree: see forward. Returns the last hidden states
        and the captured ones (or None)."""
        x = self.embed_tokens(tokens)
        rep = self.args.num_attention_heads // self.args.num_key_value_heads
        query_pos = input_pos.repeat(1, rep)[:, None, :, None]  # [B, 1, rep * S, 1]: `attention`'s folded order
        cache_pos = input_pos
        if tree is None:
            visible = key_pos <= query_pos  # [B, 1, rep * S, L]; stale entries beyond a row's position are masked
        else:
            cache_pos, tree_visible = tree
            key_pos = key_pos.expand(len(tokens), -1).scatter(1, cache_pos, input_pos)[:, None, None, :]  # [B,1,1,L]
            visible = tree_visible.repeat(1, rep, 1)[:, None]  # [B, 1, rep * S, L]
        sliding = (visible & (key_pos > query_pos - self.args.sliding_window)  # only built for models that use it
                   if "sliding_attention" in self.args.layer_types else None)
        captured = []
        for i, layer in enumerate(self.layers[:n_layers]):
            x = layer(x, cache_pos, cos, sin, sliding if layer.sliding else visible, cached)
            if i in capture:
                captured.append(x)
        return x, (torch.stack(captured, dim=2) if capture else None)


# ---------------------------------------------------------------------------------------------------------------
# Loading a Hugging Face checkpoint folder

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks, scales, dtype=torch.bfloat16):
    """MXFP4 -> dtype. blocks [..., G, 16] uint8 (two e2m1 values a byte, low nibble first), scales [..., G]
    uint8 (e8m0: 2^(s-127) for each group of 32 values along the last dimension). Returns [..., G * 32]."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]], dim=-1)  # [..., G, 16, 2]
    values = torch.ldexp(values.flatten(-2), (scales.int() - 127)[..., None])  # [..., G, 32]
    return values.flatten(-2).to(dtype)


class SafetensorsFolder:
    """Tensors of a checkpoint folder by name (single file or index + shards), read lazily via mmap."""

    def __init__(self, folder):
        folder = Path(folder)
        index_file = folder / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_bytes())["weight_map"]
            except (ValueError, KeyError, TypeError):  # not JSON (ValueError), or JSON without a weight_map
                raise InputError(f"{index_file} is not a safetensors index: corrupt or incomplete download, "
                                 f"download it again") from None
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise InputError(f"{index_file} names shard {shard!r}, which is missing from {str(folder)!r}")
            self.file_of = {name: folder / shard for name, shard in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise InputError(f"{str(folder)!r} has no *.safetensors weights (download the model's weights)")
            self.file_of = {}
            for f in files:
                try:
                    with safe_open(f, "pt") as handle:
                        self.file_of.update({name: f for name in handle.keys()})
                except SafetensorError as e:
                    raise self.unreadable(f, e) from None
        self.handles = {}
        self.used = set()  # names read so far: loading checks that every tensor was used

    def __contains__(self, name):
        return name in self.file_of

    def get(self, name):
        self.used.add(name)
        f = self.file_of[name]
        try:  # safe_open checks the header against the file's size; get_tensor can still refuse a tensor's data
            if f not in self.handles:
                self.handles[f] = safe_open(f, "pt")
            return self.handles[f].get_tensor(name)
        except SafetensorError as e:
            raise self.unreadable(f, e) from None

    @staticmethod
    def unreadable(f, e: SafetensorError) -> InputError:
        return InputError(f"{f} is unreadable ({e}): corrupt or incomplete download, download it again")

    def check_all_used(self, where: str, redundant=lambda name: name.endswith("rotary_emb.inv_freq")):
        """Refuse a checkpoint with tensors loading did not read (except known-redundant ones, e.g. RoPE tables
        that are recomputed): ignoring them would silently compute another model."""
        unused = sorted(name for name in set(self.file_of) - self.used if not redundant(name))
        if unused:
            shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
            raise InputError(f"{where} holds {len(unused)} tensors that its config.json does not describe ({shown}): "
                             f"a different architecture or format than config.json says")


def is_draft(folder) -> bool:
    """Whether a model folder holds a DFlash / DFlare draft, not a target: its config.json says so, or its tensors
    (fusion weights, and no embedding table of its own)."""
    config = read_config(folder)
    architectures = str(config.get("architectures"))
    if "dflash_config" in config or "block_size" in config or "DFlash" in architectures or "DFlare" in architectures:
        return True
    names = {name.removeprefix("model.") for name in SafetensorsFolder(folder).file_of}
    return bool(names & {"layer_fusion_weights", "fc.weight"}) and "embed_tokens.weight" not in names


def save_folder(folder, state: dict, config: dict):
    """config.json + model.safetensors, each written to a temporary file and renamed into place, so that a crash
    leaves the previous files (or none), never a half-written one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json.tmp").write_text(json.dumps(config, indent=2))
    save_weights(folder / "model.safetensors", state)
    os.replace(folder / "config.json.tmp", folder / "config.json")


def save_weights(path: Path, state: dict):
    """A safetensors file written to a temporary file and renamed into place."""
    save_file(state, path.with_name(path.name + ".tmp"), metadata={"format": "pt"})
    # safetensors writes through a temporary file of its own, created 0600: give the weights the mode a new
    # file gets (0666 less the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path.with_name(path.name + ".tmp"), 0o666 & ~umask)
    os.replace(path.with_name(path.name + ".tmp"), path)


def deinterleave(w):
    """GPT-OSS stores gate/up interleaved along dim 1 (even = gate, odd = up); we keep [gate; up]."""
    return torch.cat([w[:, 0::2], w[:, 1::2]], dim=1)


def hf_name(name: str) -> str:
    """The Hugging Face name of our parameter `name` (before any layout conversion): all but lm_head sit in model."""
    return name if name == "lm_head.weight" else "model." + name


def read_hf_tensor(ckpt: SafetensorsFolder, name: str, args: ModelArgs, checkpoint_dir):
    """The tensor for our parameter `name`, read from its Hugging Face name(s) and converted to our layout."""
    hf = hf_name(name)

    def get(key):
        if key not in ckpt:
            raise InputError(f"checkpoint {str(checkpoint_dir)!r} lacks tensor {key!r} (config.json describes "
                             f"a model that needs it: wrong or incomplete download?)")
        return ckpt.get(key)

    prefix, _, leaf = hf.rpartition(".experts.")
    if args.model_type == "qwen3_moe":
        if name.endswith(".mlp.router.weight"):
            return get(hf.replace(".router.", ".gate."))
        if leaf and hf not in ckpt:  # released checkpoints: one tensor per expert and projection
            projs = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
            return torch.stack([torch.cat([get(f"{prefix}.experts.{e}.{p}.weight") for p in projs])
                                for e in range(args.num_experts)])
    if args.model_type == "gpt_oss" and leaf in ("gate_up_proj", "down_proj"):
        if hf in ckpt:  # transformers 5.x saves dense [E, in, out]
            w = ckpt.get(hf).transpose(1, 2)
        else:  # released checkpoints: MXFP4 blocks [E, out, in / 32, 16] and scales [E, out, in / 32]
            w = dequantize_mxfp4(get(hf + "_blocks"), get(hf + "_scales"), torch.float32)
        return deinterleave(w) if leaf == "gate_up_proj" else w
    if leaf == "gate_up_proj_bias":
        return deinterleave(get(hf))
    return get(hf)


def load_checkpoint(checkpoint_dir, device="cpu", dtype=torch.bfloat16) -> Transformer:
    """Build the Transformer described by checkpoint_dir/config.json and load its safetensors weights."""
    args = ModelArgs.from_hf_config(read_config(checkpoint_dir))
    ckpt = SafetensorsFolder(checkpoint_dir)
    if args.tie_word_embeddings and "lm_head.weight" in ckpt and "model.embed_tokens.weight" in ckpt:
        # transformers unties them when the checkpoint holds both and they differ; the same tensor stays tied
        args.tie_word_embeddings = torch.equal(ckpt.get("lm_head.weight"), ckpt.get("model.embed_tokens.weight"))
    with torch.device("meta"):
        model = Transformer(args)
    state = {}
    for name, param in model.named_parameters():  # tied lm_head is listed once, as embed_tokens
        tensor = read_hf_tensor(ckpt, name, args, checkpoint_dir)
        if tuple(tensor.shape) != tuple(param.shape):
            raise InputError(f"tensor for {name!r} in {str(checkpoint_dir)!r} has shape {tuple(tensor.shape)}, "
                             f"but config.json implies {tuple(param.shape)}")
        state[name] = tensor.to(device=device, dtype=dtype)
    ckpt.check_all_used(f"checkpoint {str(checkpoint_dir)!r}")
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)
