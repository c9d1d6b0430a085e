"""Chat data -> tokenized training shards for train.py (DESIGN.md section 5).

    python prepare.py --target TARGET_DIR --data chats.jsonl [more.jsonl ...] --out data/
    python prepare.py --target TARGET_DIR --data chats.jsonl --out data/ --regenerate  # target's own answers

Input: JSONL, one conversation a line: {"messages": [{"role": "system"|"user"|"assistant", "content"}]} or
ShareGPT's {"conversations": [{"from": "system"|"human"|"gpt", "value"}]}, tokenized whole in the target's
chat format (tokenizer.chat_segments), the loss mask on the assistant's answers. For base models, raw
{"prompt": text, "completion": text} lines, tokenized as generate.py does, the loss on the completion
(optional with --regenerate).

--regenerate replaces each last answer by the target's own (greedy unless --temperature), so the draft learns
the distribution it is verified against.

Output in --out: shards `shard_NNNNN.{tokens,mask,offsets}.npy` (uint32 samples back to back, uint8 loss
mask, int64 sample starts plus the end), each followed by `shard_NNNNN.json` once complete, and `index.json`.
Conversations are shuffled (--seed); rerunning the same command skips finished shards, so it resumes.
"""
import argparse
import datetime
import json
import sys
import unicodedata
from pathlib import Path

import numpy as np
import torch

from checkpoint import (InputError, default_dtype, is_draft, load_checkpoint, pick_device, read_config,
                        write_json)
from data import Progress, output_folder, write_shard
from generate import generate
from sampling import Sampling
from tokenizer import (BPETokenizer, chat_format, chat_prompt, chat_segments, check_chat_tokens,
                       load_tokenizer, stop_token_ids)

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant"}


# ------------------------------------------------------------------------------------------------------------
# Reading conversations

def parse_conversation(line: str, regenerate: bool):
    """One JSONL line -> [{"role", "content"}], or {"prompt", "completion"} for raw text; ValueError says
    what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if isinstance(record, dict) and "prompt" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record.get("completion", ""), str):
            raise ValueError('"prompt" and "completion" must be strings')
        if not regenerate and not record.get("completion"):
            raise ValueError('no "completion" to train on')
        return {"prompt": record["prompt"], "completion": record.get("completion", "")}
    if not isinstance(record, dict) or not ("messages" in record or "conversations" in record):
        raise ValueError('expected an object with "messages", "conversations" or "prompt"')
    sharegpt = "messages" not in record
    turns = record["conversations"] if sharegpt else record["messages"]
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f'"{"conversations" if sharegpt else "messages"}" must be a non-empty list')
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        if role not in ROLES:
            raise ValueError(f"turn {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(turn.get(content_key), str):
            raise ValueError(f"turn {i}: {content_key!r} must be a string")
        messages.append({"role": ROLES[role], "content": turn[content_key]})
    if regenerate:
        if not any(m["role"] == "user" for m in messages):
            raise ValueError("no user turn to answer")
    elif not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn to train on")
    return messages


def read_conversations(paths, regenerate: bool):
    """All conversations of the JSONL files, and the problems found ("file:line: what"), in file order."""
    conversations, problems = [], []
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"data file {str(path)!r} does not exist")
        n_before = len(conversations)
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad line, not a failed file
            if b"\0" in f.read(4096):  # JSON text never holds a NUL byte: weights, an archive, UTF-16...
                problems.append(f"{path}: binary data, not JSONL text")
                continue
            f.seek(0)
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    conversations.append(parse_conversation(line.decode("utf-8"), regenerate))
                except UnicodeDecodeError as e:
                    problems.append(f"{path}:{number}: not UTF-8 text (byte {line[e.start]:#04x} at column "
                                    f"{e.start + 1})")
                except ValueError as e:
                    problems.append(f"{path}:{number}: {e}")
        if len(conversations) == n_before and not any(p.startswith(f"{path}:") for p in problems):
            problems.append(f"{path}: empty file")
    return conversations, problems


# ------------------------------------------------------------------------------------------------------------
# Tokenizing

def token_byte_lengths(tokenizer: BPETokenizer) -> np.ndarray:
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i, b in tokenizer.bytes_of_id.items():
        lengths[i] = len(b)
    return lengths


def tokenize_conversation(tokenizer: BPETokenizer, byte_lengths, messages, chat: dict):
    """The rendered conversation tokenized whole -> (token ids, loss mask): a token is masked in when its
    bytes overlap an answer segment's. Raw {"prompt", "completion"}: each encoded alone, as at inference."""
    if isinstance(messages, dict):
        prompt, completion = tokenizer.encode(messages["prompt"]), tokenizer.encode(messages["completion"])
        return (np.array(prompt + completion, dtype=np.int64),
                np.array([0] * len(prompt) + [1] * len(completion), dtype=np.uint8))
    segments = chat_segments(messages, generation_prompt=False, **chat)
    if tokenizer.nfc:  # the tokenizer sees NFC text: measure the segments in the same bytes
        segments = [(unicodedata.normalize("NFC", text), is_answer) for text, is_answer in segments]
    ids = np.array(tokenizer.encode("".join(text for text, _ in segments)), dtype=np.int64)
    ends = np.cumsum(byte_lengths[ids])
    starts = ends - byte_lengths[ids]
    mask = np.zeros(len(ids), dtype=np.uint8)
    position = 0
    for text, is_answer in segments:
        # a byte the vocabulary lacks gets no token
        n = len(text.encode("utf-8").translate(None, tokenizer.missing))
        if is_answer:
            mask[(starts < position + n) & (ends > position)] = 1
        position += n
    assert position == ends[-1], "token bytes do not add up to the rendered text"
    return ids, mask


def regenerate_answers(target, tokenizer, conversations, chat: dict, stop_ids, args, progress):
    """Each conversation's last answer replaced by the target's: (prompt + generated ids, mask on the
    generated), None for a prompt too long. args: batch_size, max_seq_len, max_new_tokens, temperature."""
    samples = []
    for start in range(0, len(conversations), args.batch_size):
        batch = conversations[start:start + args.batch_size]
        # the target answers the last user turn: drop a trailing assistant turn
        prompts = [tokenizer.encode(m["prompt"] if isinstance(m, dict)
                                    else chat_prompt(m[:-1] if m[-1]["role"] == "assistant" else m, **chat))
                   for m in batch]
        keep = [i for i, p in enumerate(prompts) if len(p) < args.max_seq_len]
        samples += [None] * len(batch)  # None: prompt too long, counted in the summary
        if keep:
            target.setup_caches(len(keep), max(len(prompts[i]) for i in keep) + args.max_new_tokens)
            answers, _ = generate(target, [prompts[i] for i in keep], args.max_new_tokens,
                                  Sampling(args.temperature), stop_ids)
            for i, answer in zip(keep, answers):
                ids = np.array(prompts[i] + answer, dtype=np.int64)
                mask = np.zeros(len(ids), dtype=np.uint8)
                mask[len(prompts[i]):] = 1
                samples[start + i] = (ids, mask)
        progress(start + len(batch))
    return samples


# ------------------------------------------------------------------------------------------------------------
# The command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Tokenize chat data into training shards for train.py.")
    p.add_argument("--target", required=True,
                   help="target checkpoint folder (tokenizer, chat format, weights)")
    p.add_argument("--data", required=True, nargs="+", help="JSONL files of conversations")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max_seq_len", type=int, default=3072, help="longer samples are cut to this many tokens")
    p.add_argument("--shard_size", type=int, default=10000, help="conversations per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed")
    p.add_argument("--bad_lines", choices=["skip", "error"], default="skip",
                   help="what to do with unreadable lines and files (they are reported either way)")
    p.add_argument("--thinking", choices=("on", "off"), default="on",
                   help="Qwen3 thinking mode chat format (as in generate.py --chat)")
    p.add_argument("--reasoning_effort", default="medium", choices=["low", "medium", "high"], help="GPT-OSS")
    p.add_argument("--regenerate", action="store_true", help="replace the last answers by the target's own")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="--regenerate: longest answer")
    p.add_argument("--temperature", type=float, default=0.0, help="--regenerate: 0 = greedy")
    p.add_argument("--batch_size", type=int, default=16, help="--regenerate: conversations per forward")
    p.add_argument("--device", default=None, help="--regenerate: cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="--regenerate: default bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    for name in ("max_seq_len", "shard_size", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    if args.temperature < 0:
        raise InputError("--temperature must be >= 0")
    return args


def read_input(args):
    """The conversations of --data, shuffled, and the bad lines or files found (reported here)."""
    conversations, problems = read_conversations(args.data, args.regenerate)
    for problem in problems[:20]:
        print(f"bad input: {problem}", file=sys.stderr)
    if len(problems) > 20:
        print(f"bad input: ... and {len(problems) - 20} more", file=sys.stderr)
    if problems and args.bad_lines == "error":
        raise InputError(f"{len(problems)} bad lines or files in --data (listed above): fix them, or pass "
                         f"--bad_lines skip to leave them out")
    if not conversations:
        raise InputError("no usable conversation in --data")
    order = np.random.default_rng(args.seed).permutation(len(conversations))
    return [conversations[i] for i in order], problems


def check_settings(out: Path, args, model_type: str, vocab_size: int) -> dict:
    """The run's settings, written to --out; a folder prepared with others is refused (resuming would mix)."""
    settings = {"target": str(Path(args.target).resolve()),
                "model_type": model_type, "vocab_size": vocab_size,
                "data": [[str(Path(p).resolve()), Path(p).stat().st_size] for p in args.data],
                **{k: getattr(args, k) for k in ("max_seq_len", "shard_size", "seed", "thinking",
                                                 "reasoning_effort", "regenerate")},
                **({"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
                   if args.regenerate else {})}
    if (out / "settings.json").is_file():
        before = json.loads((out / "settings.json").read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise InputError(f"{str(out)!r} holds shards prepared with other settings "
                             f"({', '.join(changed)}): use another --out, or delete it to start over")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "settings.json", settings)
    return settings


def write_shards(out: Path, conversations, tokenize, args) -> list:
    """Every shard not written yet (tokenize(conversations, progress, shard index) -> samples or None)."""
    shards, n_shards = [], (len(conversations) + args.shard_size - 1) // args.shard_size
    for k in range(n_shards):
        name = f"shard_{k:05d}"
        if (out / f"{name}.json").is_file():
            shards.append(json.loads((out / f"{name}.json").read_text()))
            print(f"{name}: already written, skipped", file=sys.stderr)
            continue
        batch = conversations[k * args.shard_size:(k + 1) * args.shard_size]
        tokenized = tokenize(batch, Progress(f"{name} ({k + 1}/{n_shards})", len(batch)), k)
        samples, counts = [], {"no_answer": 0, "truncated": 0}
        for sample in tokenized:
            if sample is None or not sample[1][:args.max_seq_len].any():
                counts["no_answer"] += 1
                continue
            counts["truncated"] += len(sample[0]) > args.max_seq_len
            samples.append((sample[0][:args.max_seq_len], sample[1][:args.max_seq_len]))
        shards.append(write_shard(out, name, samples, counts))
    return shards


def samples_maker(args, config: dict, tokenizer, chat: dict):
    """How a shard's conversations become samples: tokenized as they are, or (--regenerate) answered by the
    target, which is loaded here."""
    if not args.regenerate:
        byte_lengths = token_byte_lengths(tokenizer)

        def tokenize(batch, progress, k):
            samples = []
            for i, messages in enumerate(batch):
                samples.append(tokenize_conversation(tokenizer, byte_lengths, messages, chat))
                progress(i + 1)
            return samples

        return tokenize
    device = pick_device(args.device)
    target = load_checkpoint(args.target, device, default_dtype(device, args.dtype))
    stop_ids = stop_token_ids(args.target, config, tokenizer)

    def answer(batch, progress, k):
        torch.manual_seed(args.seed + k)  # sampled answers do not depend on where a run resumed
        return regenerate_answers(target, tokenizer, batch, chat, stop_ids, args, progress)

    return answer


def main(argv=None):
    args = parse_args(argv)
    out = output_folder(args.out)
    config = read_config(args.target)
    if is_draft(args.target):
        raise InputError(f"--target {args.target!r} is a draft, not a target model: "
                         f"pass the target model's folder")
    tokenizer = load_tokenizer(args.target)
    if not isinstance(tokenizer, BPETokenizer):
        raise InputError("prepare.py needs the target's tokenizer.json (byte-level BPE) "
                         "to place the loss mask")
    chat = {"thinking": args.thinking == "on", "reasoning_effort": args.reasoning_effort,
            "date": datetime.date.today().isoformat()}
    conversations, problems = read_input(args)
    if any(isinstance(c, list) for c in conversations):  # chats, not raw {"prompt", "completion"} records
        chat["fmt"] = chat_format(args.target)
        check_chat_tokens(tokenizer, chat["fmt"])
    settings = check_settings(out, args, config.get("model_type", ""), tokenizer.vocab_size)
    shards = write_shards(out, conversations, samples_maker(args, config, tokenizer, chat), args)
    n_samples, n_tokens, n_trained, no_answer, truncated = (
        sum(s[key] for s in shards)
        for key in ("samples", "tokens", "trained_tokens", "no_answer", "truncated"))
    if not n_samples:
        raise InputError("no sample kept: none has answer tokens within --max_seq_len (raise it)")
    write_json(out / "index.json", {"settings": settings, "shards": shards, "samples": n_samples,
                                    "tokens": n_tokens, "trained_tokens": n_trained})
    print(f"prepared {n_samples} samples in {len(shards)} shards in {str(out)!r}: {n_tokens} tokens "
          f"({n_tokens / max(n_samples, 1):.0f} per sample), {n_trained / max(n_tokens, 1):.1%} of them "
          f"trained on (assistant answers)")
    print(f"left out: {len(problems)} bad lines or files, {no_answer} samples without answer tokens within "
          f"--max_seq_len{' (or prompts too long to answer)' if args.regenerate else ''}; "
          f"cut to --max_seq_len: {truncated}")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
