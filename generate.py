"""Generate text with a target model: `python generate.py --checkpoint HF_MODEL_DIR --prompt "..."`.

Autoregressive decoding on static KV caches: one compiled prefill, then one compiled single-token step per new
token. Prints the text (streamed for a single sequence), prefill time, decode tokens/s and the weight bandwidth
that speed implies, like gpt-fast.
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch

from model import InputError, Transformer, load_checkpoint, read_config
from tokenizer import chat_prompt, load_tokenizer, stop_token_ids


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


def logits_to_probs(logits, s: Sampling):
    """Target distribution after temperature, top-k and top-p; [..., V] in fp32."""
    logits = logits.float() / max(s.temperature, 1e-5)
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= s.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits, s: Sampling):
    """Next token ids [...] from logits [..., V]. Exponential-race sampling needs no host sync."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, s)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def prefill(model: Transformer, tokens, input_pos, s: Sampling):
    logits, _ = model(tokens, input_pos)
    return logits


def decode_one_token(model: Transformer, token, input_pos, s: Sampling):
    """token, input_pos [B, 1] -> next token [B]."""
    logits, _ = model(token, input_pos)
    return sample(logits[:, -1], s)


def compile_fns(device: torch.device):
    """Compiled prefill (dynamic prompt length) and decode step (static shapes: CUDA graphs on GPU)."""
    mode = "max-autotune" if device.type == "cuda" else None
    return (torch.compile(prefill, fullgraph=True, dynamic=True),
            torch.compile(decode_one_token, mode=mode, fullgraph=True))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, sampling: Sampling, stop_ids=(),
             on_token=None, fns=(prefill, decode_one_token)):
    """Autoregressive decoding of a batch of token-id prompts (each row at its own positions).

    Returns the new tokens per row (ending with the stop token when one was hit) and timing stats.
    on_token(row, token_id) is called for every token kept.
    """
    prefill_fn, decode_fn = fns
    device = model.embed_tokens.weight.device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(B, max(len(p) for p in prompts), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    # shorter prompts are right-padded; the padding's cache entries are overwritten before any query sees them
    positions = torch.arange(tokens.shape[1], device=device)[None].expand(B, -1)

    synchronize(device)
    t0 = time.perf_counter()
    logits = prefill_fn(model, tokens, positions, sampling)
    next_token = sample(logits[torch.arange(B, device=device), lengths - 1], sampling)
    outputs, done = [[] for _ in range(B)], [False] * B
    stop = set(stop_ids)

    def keep(new_tokens):
        for row, t in enumerate(new_tokens):
            if not done[row]:
                outputs[row].append(t)
                done[row] = t in stop or len(outputs[row]) == max_new_tokens
                if on_token:
                    on_token(row, t)

    keep(next_token.tolist())
    synchronize(device)
    t1 = time.perf_counter()
    input_pos = lengths[:, None].clone()
    steps = 0
    while not all(done):
        next_token = decode_fn(model, next_token[:, None].clone(), input_pos, sampling)
        input_pos += 1
        steps += 1
        keep(next_token.tolist())
    t2 = time.perf_counter()
    decode_time = max(t2 - t1, 1e-9)
    stats = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": steps,
             "tokens_per_s": sum(len(o) - 1 for o in outputs) / decode_time, "steps_per_s": steps / decode_time}
    return outputs, stats


def weight_bytes_per_step(model: Transformer) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (unless it is the tied lm_head),
    and only the routed share (top-k of E) of the experts."""
    a, total = model.args, 0
    for name, p in model.named_parameters():
        if name == "embed_tokens.weight" and not a.tie_word_embeddings:
            continue
        share = a.num_experts_per_tok / a.num_experts if ".experts." in name else 1.0
        total += p.numel() * p.element_size() * share
    return int(total)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face model folder (config.json, *.safetensors)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for several prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat format")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--thinking", choices=("on", "off"), default="on", help="Qwen3 thinking mode for --chat")
    p.add_argument("--reasoning_effort", choices=("low", "medium", "high"), default="medium",
                   help="GPT-OSS reasoning effort for --chat")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--batch_size", type=int, default=1,
                   help="sequences decoded together; a single prompt is repeated to fill the batch")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="KV cache length (default: longest prompt + max_new_tokens, rounded up to 256)")
    p.add_argument("--compile", action="store_true", help="torch.compile prefill and decode step")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        p.error(f"--top_k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        p.error(f"--max_seq_len must be >= 2, got {args.max_seq_len}")
    if args.prompt is None:
        args.prompt = ["Hello, my name is"]
    if len(args.prompt) > 1 and args.batch_size > len(args.prompt):
        p.error(f"--batch_size {args.batch_size} exceeds the {len(args.prompt)} prompts given")
    return args


def encode_prompts(args, tokenizer, model_type: str) -> list:
    texts = args.prompt
    if args.chat:
        texts = [chat_prompt(([{"role": "system", "content": args.system}] if args.system else [])
                             + [{"role": "user", "content": t}], model_type, thinking=args.thinking == "on",
                             reasoning_effort=args.reasoning_effort) for t in texts]
    return [tokenizer.encode(t) for t in texts]


def cache_length(args, longest_prompt: int, max_position_embeddings: int) -> int:
    needed = longest_prompt + args.max_new_tokens
    if args.max_seq_len is None:
        return max(needed, min(-(-needed // 256) * 256, max_position_embeddings))
    if longest_prompt > args.max_seq_len:
        raise InputError(f"prompt has {longest_prompt} tokens, longer than --max_seq_len {args.max_seq_len}: "
                         f"shorten the prompt or raise --max_seq_len")
    if needed > args.max_seq_len:
        raise InputError(f"prompt ({longest_prompt} tokens) + --max_new_tokens ({args.max_new_tokens}) exceeds "
                         f"--max_seq_len {args.max_seq_len}: raise --max_seq_len or lower --max_new_tokens")
    return args.max_seq_len


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(args.seed)

    config = read_config(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    t0 = time.perf_counter()
    model = load_checkpoint(args.checkpoint, device, dtype)
    if not args.json:
        print(f"loaded {args.checkpoint} ({model.args.model_type}, {dtype}, {device}) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    stop_ids = stop_token_ids(args.checkpoint, config, tokenizer)
    prompts = encode_prompts(args, tokenizer, model.args.model_type)
    if len(prompts) == 1:
        prompts = prompts * args.batch_size
    batch_size = min(args.batch_size, len(prompts))
    model.setup_caches(batch_size, cache_length(args, max(map(len, prompts)), model.args.max_position_embeddings))
    fns = compile_fns(device) if args.compile else (prefill, decode_one_token)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    stream = batch_size == 1 and not args.json
    bytes_per_step = weight_bytes_per_step(model)

    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        n_real = len(batch)
        batch = batch + [batch[-1]] * (batch_size - n_real)  # the caches have batch_size rows
        printer = StreamPrinter(tokenizer, stop_ids) if stream else None
        if stream:
            print(tokenizer.decode(batch[0]), end="", flush=True)
        outputs, stats = generate(model, batch, args.max_new_tokens, sampling, stop_ids,
                                  on_token=printer, fns=fns)
        for row in range(n_real):
            tokens = outputs[row]
            text = tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens)
            if args.json:
                print(json.dumps({"prompt": tokenizer.decode(batch[row]), "tokens": tokens, "text": text,
                                  "tokens_per_s": (len(tokens) - 1) / max(stats["decode_s"], 1e-9),
                                  "prefill_s": stats["prefill_s"]}), flush=True)
            elif not stream:
                print(f"--- prompt {start + row}\n{tokenizer.decode(batch[row])}{text}")
        if not args.json:
            print(file=sys.stdout if stream else sys.stderr, flush=True)
            print(f"prefill {stats['prefill_s'] * 1000:.1f} ms | decode {stats['tokens_per_s']:.1f} tokens/s "
                  f"(batch {batch_size}) | {bytes_per_step * stats['steps_per_s'] / 1e9:.2f} GB/s of weights",
                  file=sys.stderr)


class StreamPrinter:
    """Prints row 0's tokens as they come, holding back bytes of a character that is not complete yet."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids, self.ids, self.printed = tokenizer, set(stop_ids), [], 0

    def __call__(self, row, token):
        if row != 0 or token in self.stop_ids:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.printed:], end="", flush=True)
            self.printed = len(text)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
