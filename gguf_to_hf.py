"""GGUF files: a small reader that dequantizes F32, F16, Q4_1 and Q8_0 tensors, and the conversion of a
Llama GGUF to a Hugging Face folder, for the demo target (DESIGN.md section 7)."""
import json
import struct
from pathlib import Path

import numpy as np
import torch

from checkpoint import save_folder


# GGUF metadata value types -> struct format (8: string, 9: array)
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

# ggml tensor types this reader dequantizes: type -> (values per block, bytes per block)
GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 3: (32, 20), 8: (32, 34)}  # F32, F16, Q4_1, Q8_0


class GGUFFile:
    """A GGUF file (version 2 or 3): metadata, and tensors dequantized to fp32 numpy arrays in their
    Hugging Face shape (GGUF lists dimensions fastest first)."""

    def __init__(self, data: bytes):
        self.data = np.frombuffer(data, dtype=np.uint8)
        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError("not a GGUF file")
        self.pos = 4
        version, n_tensors, n_kv = self.read("I"), self.read("Q"), self.read("Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader knows 2 and 3)")
        self.metadata = {}
        for _ in range(n_kv):
            key = self.read_string()
            self.metadata[key] = self.read_value(self.read("I"))
        self.tensors = {}
        for _ in range(n_tensors):
            name = self.read_string()
            dims = [self.read("Q") for _ in range(self.read("I"))]
            self.tensors[name] = (dims[::-1], self.read("I"), self.read("Q"))  # shape, type, offset
        alignment = self.metadata.get("general.alignment", 32)
        self.data_start = -(-self.pos // alignment) * alignment

    def read(self, fmt):
        size = struct.calcsize("<" + fmt)
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def read_string(self):
        n = self.read("Q")
        text = bytes(self.data[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return text

    def read_value(self, kind):
        if kind == 8:
            return self.read_string()
        if kind == 9:
            item_kind, n = self.read("I"), self.read("Q")
            return [self.read_value(item_kind) for _ in range(n)]
        return self.read(GGUF_SCALARS[kind])

    def tensor(self, name):
        shape, kind, offset = self.tensors[name]
        if kind not in GGML_BLOCKS:
            raise ValueError(f"tensor {name}: ggml type {kind} is not one this reader dequantizes")
        per_block, block_bytes = GGML_BLOCKS[kind]
        n = int(np.prod(shape))
        start = self.data_start + offset
        raw = self.data[start:start + n // per_block * block_bytes]
        if kind == 0:
            values = raw.view(np.float32)
        elif kind == 1:
            values = raw.view(np.float16).astype(np.float32)
        else:
            blocks = raw.reshape(-1, block_bytes)
            scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1]
            if kind == 8:  # Q8_0: scale * int8
                values = scale * blocks[:, 2:].copy().view(np.int8).astype(np.float32)
            else:  # Q4_1: scale * nibble + min; low nibbles are values 0..15, high ones 16..31
                low = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
                q = blocks[:, 4:]
                nibbles = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32)
                values = scale * nibbles + low
        return values.reshape(shape)


# GGUF tensor names -> Hugging Face Llama names
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def unpermute(w, n_heads):
    """llama.cpp stores q/k rows of each head as the two RoPE halves interleaved; Hugging Face as halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_folder_from_gguf(gguf: GGUFFile):
    """(config.json, state dict of fp32 tensors under Hugging Face names) of a Llama GGUF."""
    m = gguf.metadata
    if m.get("general.architecture") != "llama":
        raise ValueError(f"GGUF architecture {m.get('general.architecture')!r}: this converter reads llama")
    heads, kv_heads = m["llama.attention.head_count"], m["llama.attention.head_count_kv"]
    hidden = m["llama.embedding_length"]
    tied = "output.weight" not in gguf.tensors
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": m["llama.feed_forward_length"],
              "num_hidden_layers": m["llama.block_count"],
              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "head_dim": m.get("llama.rope.dimension_count", hidden // heads),
              "max_position_embeddings": m["llama.context_length"],
              "rms_norm_eps": m["llama.attention.layer_norm_rms_epsilon"],
              "rope_theta": m.get("llama.rope.freq_base", 10000.0),
              "vocab_size": len(m["tokenizer.ggml.tokens"]),
              "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
              "bos_token_id": m["tokenizer.ggml.bos_token_id"],
              "eos_token_id": m["tokenizer.ggml.eos_token_id"],
              "torch_dtype": "float32"}
    state = {}
    for name in gguf.tensors:
        parts = name.split(".")
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        else:
            hf = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        w = gguf.tensor(name)
        if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            w = unpermute(w, heads if parts[2] == "attn_q" else kv_heads)
        state[hf] = torch.from_numpy(np.array(w, dtype=np.float32))
    return config, state


# llama.cpp's pre-tokenizer names -> the tokenizer.json pre-tokenizer the model was trained with
PRE_TOKENIZERS = {"smollm": {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}}


def tokenizer_json_from_gguf(gguf: GGUFFile) -> dict:
    """The byte-level BPE tokenizer.json of a GGUF's vocabulary; control tokens become added tokens."""
    m = gguf.metadata
    if m.get("tokenizer.ggml.model") != "gpt2" or m.get("tokenizer.ggml.pre") not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer {m.get('tokenizer.ggml.model')!r} / "
                         f"{m.get('tokenizer.ggml.pre')!r}: this converter writes byte-level BPE with the "
                         f"pre-tokenizers {', '.join(PRE_TOKENIZERS)}")
    tokens, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 3]  # 3: control
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": PRE_TOKENIZERS[m["tokenizer.ggml.pre"]], "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": [merge.split(" ") for merge in m["tokenizer.ggml.merges"]]}}


def write_llama_folder(gguf: GGUFFile, folder: Path):
    """The Hugging Face folder of a Llama GGUF, weights in fp32 (the dequantized values exactly)."""
    config, state = llama_folder_from_gguf(gguf)
    m = gguf.metadata
    tokens = m["tokenizer.ggml.tokens"]
    special = {name: tokens[m[f"tokenizer.ggml.{name}_token_id"]]
               for name in ("bos", "eos", "unknown", "padding")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json_from_gguf(gguf), ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": m["tokenizer.chat_template"], "bos_token": special["bos"],
         "eos_token": special["eos"], "unk_token": special["unknown"], "pad_token": special["padding"],
         "add_bos_token": False}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": m["tokenizer.ggml.bos_token_id"], "eos_token_id": m["tokenizer.ggml.eos_token_id"],
         "pad_token_id": m["tokenizer.ggml.padding_token_id"]}, indent=2))
    save_folder(folder, state, config)  # last: config.json marks the folder complete
