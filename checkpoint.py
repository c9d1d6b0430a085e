"""Checkpoints: Hugging Face folders in, our networks out, drafts back, strictly (DESIGN.md sections 1, 3).
Every tensor is used and every numeric field honoured, or an InputError names the problem and the fix.
"""
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from draft import Draft, DraftArgs, default_target_layer_ids
from model import ModelArgs, Transformer

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "gpt_oss", "llama", "qwen3_5", "qwen3_5_moe")
HYBRID_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")  # Gated DeltaNet and gated attention (DESIGN.md section 11)


class InputError(Exception):
    """Bad input from the user (paths, checkpoints, flags): the message names the problem and the fix."""


def read_json(path, fix: str = "corrupt or incomplete download, download it again") -> dict:
    """A JSON file we did not write in this run; fix says how to replace one that does not parse."""
    try:
        return json.loads(Path(path).read_bytes())
    except ValueError:  # not JSON, or not UTF-8
        raise InputError(f"{path} is not valid JSON: {fix}") from None


def read_config(checkpoint_dir) -> dict:
    path = Path(checkpoint_dir)
    if path.is_file():
        raise InputError(f"{str(path)!r} is a file: pass the model's folder (the one holding config.json "
                         f"and the *.safetensors weights)")
    if not path.is_dir():
        raise InputError(f"checkpoint folder {str(path)!r} does not exist (pass a Hugging Face model folder)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{str(path)!r} has no config.json: is it a Hugging Face model folder?")
    return read_json(config_file)


def replace_atomically(path: Path, write):
    """write(temporary path), then rename it to path: a crash leaves the old file (or none), never half."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def write_json(path: Path, obj):
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def save_weights(path: Path, state: dict):
    """A safetensors file, written atomically with the mode a new file gets (safetensors creates it 0600)."""
    umask = os.umask(0)
    os.umask(umask)

    def write(tmp):
        save_file(state, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~umask)

    replace_atomically(path, write)


def save_folder(folder, state: dict, config: dict):
    """model.safetensors, then config.json (which marks the folder complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "model.safetensors", state)
    write_json(folder / "config.json", config)


def pick_device(name: str | None) -> torch.device:
    """--device as a torch.device (default: cuda if available, else cpu), refused if this machine lacks it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r} is not supported: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available here: use --device cpu")
    n = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= n:
        raise InputError(f"--device {name}: this machine has no such GPU: use cuda:0 to cuda:{n - 1}")
    return device


def default_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """--dtype, or by default bfloat16 on CUDA and float32 on CPU."""
    return getattr(torch, name or ("bfloat16" if device.type == "cuda" else "float32"))


# What transformers assumes for fields a config.json leaves out (DESIGN.md section 1)
CONFIG_DEFAULTS = {
    "qwen3": dict(rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, attention_bias=False,
                  head_dim=128, num_key_value_heads=32, max_position_embeddings=32768, sliding_window=4096),
    "qwen3_moe": dict(rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, attention_bias=False,
                      head_dim=None, num_key_value_heads=4, max_position_embeddings=32768,
                      sliding_window=4096),
    "gpt_oss": dict(rope_theta=150000.0, rms_norm_eps=1e-5, attention_bias=True, head_dim=64,
                    num_key_value_heads=8, max_position_embeddings=131072, sliding_window=128,
                    rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "truncate": False, "original_max_position_embeddings": 4096}),
    "llama": dict(rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, attention_bias=False,
                  head_dim=None, num_key_value_heads=None, max_position_embeddings=2048, sliding_window=None),
    "qwen3_5": dict(rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, attention_bias=False,
                    head_dim=256, num_key_value_heads=4, max_position_embeddings=32768, sliding_window=None,
                    partial_rotary_factor=0.25, linear_conv_kernel_dim=4, linear_key_head_dim=128,
                    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32),
}
CONFIG_DEFAULTS["qwen3_5_moe"] = {**CONFIG_DEFAULTS["qwen3_5"], "num_key_value_heads": 2}


# Keys each RoPE scaling needs besides rope_type (YaRN's factor may instead come from max_position_embeddings)
ROPE_TYPES = {"default": (), "linear": ("factor",), "yarn": ("original_max_position_embeddings",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


# Numeric config.json fields not implemented here, with their neutral values: others are refused, not ignored
UNSUPPORTED_FIELDS = {
    "output_multiplier": (None, 1, 1.0), "input_embedding_scale": (None, 1, 1.0),
    "final_logit_softcapping": (None, 0, 0.0), "attn_logit_softcapping": (None, 0, 0.0),
    "attention_sink_bias": (None, False), "partial_rotary_factor": (None, 1, 1.0),
    "hidden_act": (None, "silu"),
}


def require_fields(config: dict, names, where: str, hint: str = ""):
    missing = [k for k in names if k not in config]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)}{hint}")


def refuse_unsupported_fields(config: dict, where: str, supported=()):
    sections = [config, config.get("dflash_config") or {}, config.get("rope_scaling") or {},
                config.get("rope_parameters") or {}]
    found = sorted({f"{name}={section[name]!r}" for section in sections for name, neutral in
                    UNSUPPORTED_FIELDS.items()
                    if name in section and section[name] not in neutral and name not in supported})
    if found:
        raise InputError(f"{where} sets {', '.join(found)}, which this implementation does not support "
                         f"(it would compute something else than the model was trained with)")


def rope_settings(config: dict, model_type: str):
    """(rope_theta, rope_scaling: None or a dict with its rope_type) as transformers reads them:
    rope_scaling (released) over rope_parameters (transformers 5.x), a rope_theta inside over the top one."""
    defaults = CONFIG_DEFAULTS[model_type]
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or defaults["rope_scaling"] or {})
    theta = rope.get("rope_theta", config.get("rope_theta", defaults["rope_theta"]))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise InputError(f"config.json asks for RoPE type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type in ("yarn", "llama3"):  # pretraining context: a top-level field wins, else the model's
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
    hybrid = model_type in HYBRID_MODEL_TYPES
    if config.get("layer_types"):
        kinds, known = tuple(config["layer_types"]), ("full_attention", "linear_attention" if hybrid
                                                      else "sliding_attention")
        if len(kinds) != n_layers or not set(kinds) <= set(known):
            raise InputError(f"config.json's layer_types must name {' or '.join(known)} for "
                             f"each of its {n_layers} layers, got {list(kinds)}")
        return kinds
    if hybrid:  # transformers: every full_attention_interval-th layer is full attention
        interval = config.get("full_attention_interval", 4)
        return tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention"
                     for i in range(n_layers))
    if model_type == "gpt_oss":
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers))
    if not config.get("use_sliding_window"):
        return ("full_attention",) * n_layers
    window_from = 0 if model_type == "qwen3_moe" else config.get("max_window_layers", 28)
    return tuple("sliding_attention" if i >= window_from else "full_attention" for i in range(n_layers))


def sliding_window_size(config: dict, model_type: str) -> int:
    """Keys a sliding layer sees (0: no window); Qwen3 configs have one only with use_sliding_window."""
    if model_type in ("qwen3", "qwen3_moe") and not config.get("use_sliding_window"):
        return 0
    return config.get("sliding_window", CONFIG_DEFAULTS[model_type]["sliding_window"]) or 0


def language_model_config(config: dict) -> dict:
    """The language model's config: a multimodal Qwen3.5 config.json's text_config (its model_type the
    family's), a text-only one's with the family's model_type; any other as it is."""
    model_type = config.get("model_type")
    if model_type in HYBRID_MODEL_TYPES and isinstance(config.get("text_config"), dict):
        text = config["text_config"]
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return {**text, "model_type": model_type, "tie_word_embeddings": tied}
    if model_type in ("qwen3_5_text", "qwen3_5_moe_text"):
        return {**config, "model_type": model_type.removesuffix("_text")}
    return config


def model_args(config: dict) -> ModelArgs:
    """The ModelArgs of a target's config.json, read strictly (DESIGN.md sections 1 and 11)."""
    config = language_model_config(config)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"config.json has model_type {model_type!r}; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    require_fields(config, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"),
                   "config.json", f": is this a {model_type} checkpoint?")
    refuse_unsupported_fields(config, "config.json",
                              ("partial_rotary_factor",) if model_type in HYBRID_MODEL_TYPES else ())
    quantization = (config.get("quantization_config") or {}).get("quant_method")
    if quantization not in (None, "mxfp4") or (quantization == "mxfp4" and model_type != "gpt_oss"):
        raise InputError(f"config.json says the weights are quantized with {quantization!r}, which this "
                         f"implementation does not read: use the unquantized (bf16) checkpoint")
    defaults = CONFIG_DEFAULTS[model_type]
    n_heads = config["num_attention_heads"]
    rope_theta, rope_scaling = rope_settings(config, model_type)
    eos = config.get("eos_token_id")
    args = ModelArgs(
        model_type=model_type, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=n_heads,
        num_key_value_heads=config.get("num_key_value_heads", defaults["num_key_value_heads"]) or n_heads,
        head_dim=config.get("head_dim", defaults["head_dim"]) or config["hidden_size"] // n_heads,
        intermediate_size=config.get("intermediate_size", 0),
        rms_norm_eps=config.get("rms_norm_eps", defaults["rms_norm_eps"]), rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=config.get("max_position_embeddings", defaults["max_position_embeddings"]),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        attention_bias=config.get("attention_bias", defaults["attention_bias"]),
        layer_types=attention_layer_types(config, model_type),
        sliding_window=sliding_window_size(config, model_type),
        eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)))
    set_family_fields(args, config)
    if "sliding_attention" in args.layer_types and not args.sliding_window:
        raise InputError("config.json has sliding_attention layers but no sliding_window: add the window "
                         "size (keys a sliding layer sees) to config.json")
    return args


def set_family_fields(args: ModelArgs, config: dict):
    """What Llama, Qwen3-MoE and GPT-OSS add to or take from the Qwen3 layer."""
    n_layers = args.num_hidden_layers
    if args.model_type == "llama":
        args.qk_norm = False
        args.mlp_bias = config.get("mlp_bias", False)
    if args.model_type == "qwen3_moe":
        step = config.get("decoder_sparse_step", 1)
        dense_layers = set(config.get("mlp_only_layers", []))
        args.moe_layers = tuple(i for i in range(n_layers) if i not in dense_layers and (i + 1) % step == 0)
        args.num_experts = config.get("num_experts") or config["num_local_experts"]
        args.num_experts_per_tok = config["num_experts_per_tok"]
        args.moe_intermediate_size = config["moe_intermediate_size"]
        args.norm_topk_prob = config.get("norm_topk_prob", False)
    if args.model_type == "gpt_oss":
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
        args.mxfp4_experts = (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"
        if args.mxfp4_experts and (args.hidden_size % 32 or args.moe_intermediate_size % 32):
            raise InputError(f"config.json's MXFP4 experts need hidden_size and intermediate_size in whole "
                             f"groups of 32 (it gives {args.hidden_size} and "
                             f"{args.moe_intermediate_size}): a damaged config.json")
    if args.model_type in HYBRID_MODEL_TYPES:
        set_hybrid_fields(args, config)


def set_hybrid_fields(args: ModelArgs, config: dict):
    """Qwen3.5's Gated DeltaNet, gated attention with partial RoPE, offset norms and (MoE) shared expert."""
    defaults = CONFIG_DEFAULTS[args.model_type]
    refused = [(config.get("attn_output_gate", True) is not True, "attn_output_gate"),
               (config.get("output_gate_type", "swish") != "swish", "output_gate_type"),
               (config.get("mamba_ssm_dtype", "float32") != "float32", "mamba_ssm_dtype"),
               (bool(config.get("mlp_only_layers")), "mlp_only_layers")]
    for bad, name in refused:
        if bad:
            raise InputError(f"config.json sets {name}={config[name]!r}, which this implementation does not "
                             f"support (Qwen3.5 gates every attention output with SiLU-gated norms and "
                             f"sigmoid gates, keeps fp32 recurrent states and has no dense layers in MoE)")
    args.attn_output_gate, args.norm_offset = True, 1.0
    for name in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_num_key_heads", "linear_num_value_heads"):
        setattr(args, name, config.get(name, defaults[name]))
    if args.linear_num_value_heads % args.linear_num_key_heads:
        raise InputError(f"config.json's linear_num_value_heads {args.linear_num_value_heads} is not a "
                         f"multiple of linear_num_key_heads {args.linear_num_key_heads}: a damaged "
                         f"config.json")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor",
                                                          defaults["partial_rotary_factor"]))
    args.rotary_dim = int(args.head_dim * factor)
    if args.rotary_dim % 2 or not 0 < args.rotary_dim <= args.head_dim:
        raise InputError(f"config.json's partial_rotary_factor {factor} turns {args.rotary_dim} of the "
                         f"{args.head_dim} dimensions of a head: it must be an even number, at least 2")
    if args.model_type == "qwen3_5_moe":
        args.moe_layers = tuple(range(args.num_hidden_layers))
        args.num_experts, args.num_experts_per_tok = config["num_experts"], config["num_experts_per_tok"]
        args.moe_intermediate_size = config["moe_intermediate_size"]
        args.shared_expert_intermediate_size = config["shared_expert_intermediate_size"]
        args.norm_topk_prob = True  # the top-k probabilities renormalised


class SafetensorsFolder:
    """Tensors of a checkpoint folder by name (single file or index + shards), read lazily via mmap."""

    def __init__(self, folder):
        folder = Path(folder)
        index_file = folder / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_bytes())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{index_file} is not a safetensors index: corrupt or incomplete download, "
                                 f"download it again") from None
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise InputError(f"{index_file} names shard {shard!r}, which is missing "
                                     f"from {str(folder)!r}")
            self.file_of = {name: folder / shard for name, shard in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise InputError(f"{str(folder)!r} has no *.safetensors weights "
                                 f"(download the model's weights)")
            self.file_of = {}
            for f in files:
                try:
                    with safe_open(f, "pt") as handle:
                        self.file_of.update({name: f for name in handle.keys()})
                except SafetensorError as e:
                    raise self.unreadable(f, e) from None
        self.handles = {}
        self.used = set()

    def __contains__(self, name):
        return name in self.file_of

    def get(self, name):
        self.used.add(name)
        f = self.file_of[name]
        try:  # safe_open checks the header, get_tensor can still refuse a tensor's data
            if f not in self.handles:
                self.handles[f] = safe_open(f, "pt")
            return self.handles[f].get_tensor(name)
        except SafetensorError as e:
            raise self.unreadable(f, e) from None

    @staticmethod
    def unreadable(f, e: SafetensorError) -> InputError:
        return InputError(f"{f} is unreadable ({e}): corrupt or incomplete download, download it again")

    def check_all_used(self, where: str, redundant=lambda name: name.endswith("rotary_emb.inv_freq")):
        """Refuse a checkpoint with tensors loading did not read, except redundant ones (RoPE tables)."""
        unused = sorted(name for name in set(self.file_of) - self.used if not redundant(name))
        if unused:
            shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
            raise InputError(f"{where} holds {len(unused)} tensors that its config.json does not describe "
                             f"({shown}): a different architecture or format than config.json says")


def hf_name(name: str, prefix: str = "model.") -> str:
    """The Hugging Face name of our parameter `name`: all but lm_head sit in model (or in a multimodal
    checkpoint's model.language_model)."""
    return name if name == "lm_head.weight" else prefix + name


# Parts of multimodal Qwen3.5 checkpoints that text generation does not use: loaded as not used, and said so
TEXT_ONLY_UNUSED = {"model.visual.": "the vision tower", "mtp.": "the multi-token prediction (MTP) head"}


def read_hf_tensor(ckpt: SafetensorsFolder, name: str, args: ModelArgs, checkpoint_dir, prefix="model."):
    """The tensor for our parameter `name`, read from its Hugging Face name(s) and converted to our layout."""
    hf = hf_name(name, prefix)

    def get(key):
        if key not in ckpt:
            raise InputError(f"checkpoint {str(checkpoint_dir)!r} lacks tensor {key!r} (config.json "
                             f"describes a model that needs it: wrong or incomplete download?)")
        return ckpt.get(key)

    prefix, _, leaf = hf.rpartition(".experts.")
    if args.model_type in ("qwen3_moe", "qwen3_5_moe"):
        if name.endswith(".mlp.router.weight"):
            return get(hf.replace(".router.", ".gate."))
        if leaf == "gate_up_proj" and hf in ckpt:  # transformers 5.x saves [E, 2I, H], gate above up
            return ckpt.get(hf).unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)  # interleaved, as GPT-OSS
        if leaf and hf not in ckpt:  # released checkpoints: one tensor per expert and projection
            projs = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
            return torch.stack([torch.stack([get(f"{prefix}.experts.{e}.{p}.weight") for p in projs], 1)
                                .flatten(0, 1) for e in range(args.num_experts)])  # [E, out, H], interleaved
    if args.model_type == "gpt_oss" and leaf in ("gate_up_proj", "down_proj"):
        return get(hf).transpose(1, 2).contiguous()  # transformers 5.x saves dense [E, in, out]
    return get(hf)


def load_checkpoint(checkpoint_dir, device="cpu", dtype=torch.bfloat16) -> Transformer:
    """Build the Transformer described by checkpoint_dir/config.json and load its safetensors weights."""
    args = model_args(read_config(checkpoint_dir))
    ckpt = SafetensorsFolder(checkpoint_dir)
    if args.tie_word_embeddings and "lm_head.weight" in ckpt and "model.embed_tokens.weight" in ckpt:
        # transformers unties them when the checkpoint holds both and they differ
        args.tie_word_embeddings = torch.equal(ckpt.get("lm_head.weight"),
                                               ckpt.get("model.embed_tokens.weight"))
    with torch.device("meta"):
        model = Transformer(args)
    prefix = "model.language_model." if "model.language_model.embed_tokens.weight" in ckpt else "model."
    state = {}
    for name, param in model.named_parameters():
        tensor = read_hf_tensor(ckpt, name, args, checkpoint_dir, prefix)
        if tuple(tensor.shape) != tuple(param.shape):
            raise InputError(f"tensor for {name!r} in {str(checkpoint_dir)!r} has shape "
                             f"{tuple(tensor.shape)}, but config.json implies {tuple(param.shape)}")
        state[name] = tensor.to(device, dtype if tensor.is_floating_point() else None)  # no copy
    text_only = TEXT_ONLY_UNUSED if args.model_type in HYBRID_MODEL_TYPES else {}
    ckpt.check_all_used(f"checkpoint {str(checkpoint_dir)!r}",
                        lambda n: n.endswith("rotary_emb.inv_freq") or n.startswith(tuple(text_only)))
    model.load_state_dict(state, strict=False, assign=True)
    counts = {part: sum(n.startswith(start) for n in ckpt.file_of) for start, part in text_only.items()}
    model.not_used = " and ".join(f"{part} ({n} tensors)" for part, n in counts.items() if n)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


# What a dflash_config may hold: draft fields, and training settings that leave its numerics alone
DFLASH_CONFIG_FIELDS = {"target_layer_ids", "mask_token_id", "mask_token", "block_size", "num_target_layers",
                        "num_anchors", "loss_decay_gamma", "attention_backend"}


def draft_args(config: dict, fusion: str) -> DraftArgs:
    """A published draft's config.json: the draft's own fields from dflash_config first, the top level
    second; the rest as transformers' Qwen3Config reads it, whatever model_type says (DESIGN.md section 3)."""
    refuse_unsupported_fields(config, "draft config.json")
    dflash = config.get("dflash_config") or {}
    unknown = sorted(set(dflash) - DFLASH_CONFIG_FIELDS - set(UNSUPPORTED_FIELDS))
    if unknown:
        raise InputError(f"draft config.json's dflash_config sets {', '.join(unknown)}, which this "
                         f"implementation does not know: a newer draft design than it supports")
    require_fields(config, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
                   "draft config.json")
    field = lambda name, default=None: dflash.get(name, config.get(name, default))  # noqa: E731
    if field("mask_token_id") is None:
        raise InputError("draft config.json has no mask_token_id (in dflash_config or at the top level): "
                         "add the id of the mask token the draft was trained with")
    n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]
    num_target_layers, target_layer_ids = field("num_target_layers") or 0, field("target_layer_ids")
    if target_layer_ids is None:
        if not num_target_layers:
            raise InputError("draft config.json has neither target_layer_ids nor num_target_layers (in "
                             "dflash_config or at the top level): add the target layers the draft reads")
        target_layer_ids = default_target_layer_ids(num_target_layers, n_layers)
    layer_types = attention_layer_types(config, "qwen3")
    if fusion == "layerwise" and (set(layer_types) != {"full_attention"} or config.get("is_causal")):
        raise InputError(f"draft config.json asks for {'causal' if config.get('is_causal') else 'sliding'} "
                         f"draft layers, which the DFlare reference does not define: "
                         f"use full_attention layers")
    defaults = CONFIG_DEFAULTS["qwen3"]
    rope_theta, rope_scaling = rope_settings(config, "qwen3")
    return DraftArgs(
        hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=config.get("num_key_value_heads", defaults["num_key_value_heads"]) or n_heads,
        head_dim=config.get("head_dim", defaults["head_dim"]) or config["hidden_size"] // n_heads,
        vocab_size=config.get("vocab_size", 0), target_layer_ids=tuple(target_layer_ids),
        mask_token_id=field("mask_token_id"), num_target_layers=num_target_layers, fusion=fusion,
        block_size=int(field("block_size", 16)),
        rms_norm_eps=config.get("rms_norm_eps", defaults["rms_norm_eps"]),
        rope_theta=rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=config.get("max_position_embeddings", defaults["max_position_embeddings"]),
        attention_bias=config.get("attention_bias", defaults["attention_bias"]),
        layer_types=layer_types if set(layer_types) != {"full_attention"} else (),
        sliding_window=sliding_window_size(config, "qwen3"), is_causal=config.get("is_causal"))


def draft_config(args: DraftArgs) -> dict:
    """config.json in the published draft format (Qwen3 fields plus block_size and dflash_config)."""
    skip = ("target_layer_ids", "mask_token_id", "fusion", "rope_scaling", "layer_types", "is_causal")
    fields = {k: v for k, v in asdict(args).items() if k not in skip}
    return {"architectures": ["DFlareDraftModel" if args.fusion == "layerwise" else "DFlashDraftModel"],
            "model_type": "qwen3", **fields, "tie_word_embeddings": False,
            **({"rope_scaling": args.rope_scaling} if args.rope_scaling else {}),
            **({"layer_types": list(args.layer_types)} if args.layer_types else {}),
            **({"is_causal": args.is_causal} if args.is_causal is not None else {}),
            "use_sliding_window": bool(args.layer_types and args.sliding_window),
            "dflash_config": {"target_layer_ids": list(args.target_layer_ids),
                              "mask_token_id": args.mask_token_id}}


def is_draft(folder) -> bool:
    """Whether a folder holds a draft: by its config.json, or its tensors (fusion weights, no embedding)."""
    config = read_config(folder)
    architectures = str(config.get("architectures"))
    if ("dflash_config" in config or "block_size" in config or "DFlash" in architectures
            or "DFlare" in architectures):
        return True
    names = {name.removeprefix("model.") for name in SafetensorsFolder(folder).file_of}
    return bool(names & {"layer_fusion_weights", "fc.weight"}) and "embed_tokens.weight" not in names


def check_draft_target(args: DraftArgs, target_args: ModelArgs):
    """Refuse a draft made for another target."""
    problems = []
    if args.hidden_size != target_args.hidden_size:
        problems.append(f"hidden size {args.hidden_size} != target's {target_args.hidden_size}")
    if args.vocab_size and args.vocab_size != target_args.vocab_size:
        problems.append(f"vocab size {args.vocab_size} != target's {target_args.vocab_size}")
    if not 0 <= args.mask_token_id < target_args.vocab_size:
        problems.append(f"mask_token_id {args.mask_token_id} is outside the target's vocabulary")
    bad = [i for i in args.target_layer_ids if not 0 <= i < target_args.num_hidden_layers]
    if bad:
        problems.append(f"target_layer_ids {bad} are beyond the target's "
                        f"{target_args.num_hidden_layers} layers")
    elif args.num_target_layers and args.num_target_layers != target_args.num_hidden_layers:
        problems.append(f"made for a target of {args.num_target_layers} layers, this one has "
                        f"{target_args.num_hidden_layers}")
    if problems:
        raise InputError("draft does not fit this target: " + "; ".join(problems)
                         + " (pass the target the draft was trained for)")


def load_draft(folder, target: Transformer, device="cpu", dtype=torch.bfloat16) -> Draft:
    """A draft folder (published or save_draft's) loaded strictly, bound to its target; fusion logits fp32."""
    if not Path(folder, "config.json").is_file():
        raise InputError(f"--draft {str(folder)!r} is not a draft folder (no config.json)")
    if not is_draft(folder):
        raise InputError(f"--draft {str(folder)!r} is a target model, not a draft: pass a DFlash / DFlare "
                         f"draft folder as --draft, and the target as --checkpoint")
    ckpt = SafetensorsFolder(folder)
    names = {name.removeprefix("model."): name for name in ckpt.file_of}
    fusion = "layerwise" if "layer_fusion_weights" in names else "linear"
    newer = sorted({n.split(".")[-2] for n in names if "candidate_selector" in n or "_conv." in n})
    if newer:
        raise InputError(f"draft {str(folder)!r} has {', '.join(newer)} tensors: a newer DFlash draft "
                         f"design (convolution layers, candidate selector) that this implementation "
                         f"does not support")
    args = draft_args(read_config(folder), fusion)
    with torch.device("meta"):
        draft = Draft(args)
    state = {}
    for name, param in draft.named_parameters():
        if name not in names:
            raise InputError(f"draft {str(folder)!r} lacks tensor {name!r} ({fusion} fusion, "
                             f"{args.num_hidden_layers} layers per its config.json)")
        tensor = ckpt.get(names[name])
        if tuple(tensor.shape) != tuple(param.shape):
            raise InputError(f"draft tensor {name!r} in {str(folder)!r} has shape "
                             f"{tuple(tensor.shape)}, but config.json implies {tuple(param.shape)}")
        state[name] = tensor.to(device, torch.float32 if name == "layer_fusion_weights" else dtype)
    ckpt.check_all_used(f"draft {str(folder)!r}")
    check_draft_target(args, target.args)
    draft.load_state_dict(state, assign=True)
    return draft.bind(target)


def save_draft(draft: Draft, folder, dtype: torch.dtype | None = None):
    """config.json + model.safetensors in the published format (tensors in dtype, default as they are)."""
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in draft.state_dict().items()}
    save_folder(folder, state, draft_config(draft.args))
