"""The embedded demo: a small Qwen3-style code model trained here on the Python standard library, and DFlare and
DFlash drafts trained on its own outputs, all with this project's scripts, on CPU, offline.

    python demo.py               # rebuild demo/ from scratch (65 to 80 minutes on 2 CPU cores)
    python generate.py           # with no --checkpoint: the demo pair, speculative vs autoregressive

Steps (each skipped when its output exists, so an interrupted build continues):
  1. corpus: the standard library's .py files (tests left out), one file in ten held out for evaluation prompts;
  2. tokenizer: byte-level BPE trained on the corpus (tokenizer.train_bpe) -> demo/target/tokenizer.json;
  3. target: an 8-layer Qwen3 (hidden 192, 3.6M parameters) trained as a language model on the corpus, saved as a
     Hugging Face folder (config.json + model.safetensors) -> demo/target;
  4. prompts: code prefixes cut at line starts (train files -> draft data, held-out files -> prompts/demo.jsonl);
  5. drafts: prepare.py --regenerate (the target's greedy continuations), then train.py for a DFlare and a DFlash
     draft of 2 layers (demo/dflare, demo/dflash) and a 1-layer DFlare (demo/dflare-1l) for the depth comparison.
"""
import argparse
import json
import os
import re
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare
import train
from model import InputError, ModelArgs, Transformer, hf_name, save_folder
from tokenizer import BPETokenizer, train_bpe

DEMO = Path(__file__).resolve().parent / "demo"
PROMPTS = Path(__file__).resolve().parent / "prompts" / "demo.jsonl"
SPECIAL_TOKENS = ["<|endoftext|>", "<|mask|>"]  # ids 2046 and 2047: end of text (eos) and the drafts' mask token
TARGET_ARGS = ModelArgs(model_type="qwen3", vocab_size=2048, hidden_size=192, num_hidden_layers=8,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=48, intermediate_size=512,
                        rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=True,
                        layer_types=("full_attention",) * 8, eos_token_id=[2046])
# the drafts: name -> train.py flags (DFlash taps the default layers of DESIGN.md 2, DFlare every layer but the last)
DRAFTS = {"dflare": ["--fusion", "layerwise", "--num_layers", "2", "--target_layer_ids", *"0123456"],
          "dflash": ["--fusion", "linear", "--num_layers", "2"],
          "dflare-1l": ["--fusion", "layerwise", "--num_layers", "1", "--target_layer_ids", *"0123456"]}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def stdlib_files():
    """(training files, held-out files): the standard library's Python sources, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    held_out = [p for p in files if zlib.crc32(str(p.relative_to(root)).encode()) % 10 == 0]
    return [p for p in files if p not in held_out], held_out


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def init_weights(model: Transformer, std: float = 0.02):
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)


def pretrain_target(tokens: np.ndarray, args, seq_len: int = 256, batch_size: int = 16) -> Transformer:
    """Next-token training on random windows of the corpus; AdamW, warmup + cosine."""
    torch.manual_seed(0)
    model = Transformer(TARGET_ARGS)
    init_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.target_lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    positions = torch.arange(seq_len)[None].expand(batch_size, -1)
    schedule = argparse.Namespace(lr=args.target_lr, warmup_ratio=0.05)
    t0 = time.perf_counter()
    for step in range(args.target_steps):
        starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
        window = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        model.setup_caches(batch_size, seq_len)  # fresh caches: the graph of the last step is gone
        logits, _ = model(window[:, :-1], positions)
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = train.learning_rate(step, args.target_steps, schedule)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.target_steps - 1:
            elapsed = time.perf_counter() - t0
            log(f"target step {step + 1}/{args.target_steps} | loss {loss.item():.3f} | "
                f"{elapsed / (step + 1):.2f} s/step, {elapsed / (step + 1) * (args.target_steps - step - 1):.0f} s left")
    return model.eval().requires_grad_(False)


def save_target(model: Transformer, folder: Path):
    """A Hugging Face Qwen3 folder: config.json and model.safetensors (bf16) under transformers' names."""
    a = model.args
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": a.vocab_size,
              "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
              "num_hidden_layers": a.num_hidden_layers, "num_attention_heads": a.num_attention_heads,
              "num_key_value_heads": a.num_key_value_heads, "head_dim": a.head_dim, "hidden_act": "silu",
              "rms_norm_eps": a.rms_norm_eps, "rope_theta": a.rope_theta,
              "max_position_embeddings": a.max_position_embeddings, "tie_word_embeddings": a.tie_word_embeddings,
              "attention_bias": False, "eos_token_id": a.eos_token_id[0], "bos_token_id": a.eos_token_id[0],
              "torch_dtype": "bfloat16"}
    state = {hf_name(k): v.to(torch.bfloat16).contiguous()
             for k, v in model.state_dict().items() if not (a.tie_word_embeddings and k == "lm_head.weight")}
    save_folder(folder, state, config)


def code_prompts(files, count: int, rng, max_chars: int = 600) -> list:
    """{"prompt": code prefix}: up to max_chars of a file ending at the start of a line, a definition's or any."""
    prompts = []
    texts = [t for t in (read(f) for f in files) if len(t) > 200]
    line_starts = [[m.start() + 1 for m in re.finditer(r"\n(?=[^\n])", t)] for t in texts]  # non-empty lines
    while len(prompts) < count:
        k = rng.integers(len(texts))
        text = texts[k]
        end = line_starts[k][rng.integers(len(line_starts[k]))]
        start = text.rfind("\n", 0, max(0, end - max_chars)) + 1
        if end - start >= 80:
            prompts.append({"prompt": text[start:end]})
    return prompts


def demo_prompts(train_files, held_out, draft_count):
    """(20 held-out evaluation prompts, draft_count draft-training prompts), drawn from one seeded generator in this
    order every time, so a rebuild draws the same draft prompts whether or not prompts/demo.jsonl exists."""
    rng = np.random.default_rng(0)
    return code_prompts(held_out, 20, rng), code_prompts(train_files, draft_count, rng)


def write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Rebuild the demo model pair in demo/ (CPU, offline).")
    p.add_argument("--target_steps", type=int, default=800, help="language-model training steps of the target")
    p.add_argument("--target_lr", type=float, default=3e-3)
    p.add_argument("--draft_prompts", type=int, default=4000, help="prompts the target answers for draft training")
    p.add_argument("--draft_epochs", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=128, help="length of the target's answers")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    target_dir = DEMO / "target"
    target_dir.mkdir(parents=True, exist_ok=True)
    train_files, held_out = stdlib_files()
    if not train_files:
        raise InputError("no standard library sources found (sysconfig's stdlib path has no .py files)")
    t0 = time.perf_counter()
    if not (target_dir / "tokenizer.json").is_file():
        text = "".join(read(f) for f in train_files[::4])  # a quarter of the files is plenty for 2048 tokens
        log(f"training the tokenizer on {len(text) / 1e6:.1f} M characters")
        spec = train_bpe(text, TARGET_ARGS.vocab_size, SPECIAL_TOKENS)
        (target_dir / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = BPETokenizer(target_dir / "tokenizer.json")
    if not (target_dir / "model.safetensors").is_file():
        eot = tokenizer.token_id(SPECIAL_TOKENS[0])
        tokens = np.concatenate([np.array(tokenizer.encode(read(f)) + [eot], dtype=np.uint16) for f in train_files])
        log(f"corpus: {len(train_files)} files, {len(tokens) / 1e6:.1f} M tokens")
        save_target(pretrain_target(tokens, args), target_dir)
    eval_prompts, draft_prompts = demo_prompts(train_files, held_out, args.draft_prompts)
    if not PROMPTS.is_file():
        write_jsonl(PROMPTS, eval_prompts)
    data = DEMO / "data"
    if not (data / "index.json").is_file():
        write_jsonl(DEMO / "draft_prompts.jsonl", draft_prompts)
        prepare.main(["--target", str(target_dir), "--data", str(DEMO / "draft_prompts.jsonl"), "--out", str(data),
                      "--regenerate", "--max_new_tokens", str(args.max_new_tokens), "--batch_size", "64",
                      "--shard_size", "1000"])
    for name, flags in DRAFTS.items():
        started = (DEMO / name / "train_state.pt").is_file()
        if started or not (DEMO / name / "config.json").is_file():
            train.main(["--target", str(target_dir), "--data", str(data), "--out", str(DEMO / name),
                        "--block_size", "16", "--num_anchors", "32", "--batch_size", "16",
                        "--epochs", str(args.draft_epochs), "--lr", "3e-3", "--eval_every", "100",
                        "--save_every", "100", "--log_every", "20", *flags] + ["--resume"] * started)
            (DEMO / name / "train_state.pt").unlink()  # the committed draft is the folder alone
    log(f"demo built in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
