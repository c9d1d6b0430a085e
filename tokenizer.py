"""Tokenizers and chat formats of the supported targets.

`tokenizer.json` (byte-level BPE, as Qwen3, GPT-OSS and Llama-3 ship it) runs through tiktoken; `tokenizer.model`
through sentencepiece. Chat prompts are written exactly as the models' own templates write them: ChatML for
Qwen3 (thinking on or off) and harmony for GPT-OSS.
"""
import datetime
import unicodedata
from pathlib import Path

import numpy as np
import tiktoken

from model import InputError, read_json

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_level_alphabet() -> dict:
    """The printable character byte-level BPE writes for each byte: printable latin-1 stands for itself, the
    other bytes are shifted to 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of_byte, shift = {}, 0
    for b in range(256):
        if b in printable:
            char_of_byte[b] = chr(b)
        else:
            char_of_byte[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in char_of_byte.items()}


class BPETokenizer:
    """A byte-level BPE `tokenizer.json` run by tiktoken.

    tiktoken merges by the rank of the merged bytes; we rank tokens by their merge's position in `merges`, which
    gives the same splits, and map tiktoken's ranks back to the file's ids.
    """

    def __init__(self, path):
        spec = read_json(path)
        bpe = spec.get("model") or {}
        if bpe.get("type") != "BPE" or bpe.get("byte_fallback"):
            raise InputError(f"{path} is not a byte-level BPE tokenizer (use its tokenizer.model instead)")
        self.pattern = self._pattern(spec.get("pre_tokenizer"), path)
        normalizer = (spec.get("normalizer") or {}).get("type")
        if normalizer not in (None, "NFC"):
            raise InputError(f"{path}: unsupported normalizer {normalizer!r}")
        self.nfc = normalizer == "NFC"
        # each character to its byte's latin-1 character, then latin-1 bytes: str.translate instead of a lookup per
        # character loads GPT-OSS's ~1M tokens and merges in 1.2 s instead of 1.6 s; a character outside the
        # alphabet becomes U+FFFF, which latin-1 refuses
        to_byte = byte_level_alphabet()
        table = {ord(c): b for c, b in to_byte.items()} | {b: 0xFFFF for b in range(256) if chr(b) not in to_byte}

        def as_bytes(token: str) -> bytes:
            try:
                return token.translate(table).encode("latin-1")
            except UnicodeEncodeError:
                raise InputError(f"{path}: token {token!r} is not in the byte-level alphabet (is this a byte-level "
                                 f"BPE tokenizer.json?)") from None

        added = spec.get("added_tokens", [])
        # tiktoken matches added tokens exactly, anywhere: the tokenizers library's whitespace-stripping and
        # whole-word options would silently give other ids
        flagged = [t["content"] for t in added if t.get("lstrip") or t.get("rstrip") or t.get("single_word")]
        if flagged:
            raise InputError(f"{path}: added tokens {flagged[:3]} set lstrip/rstrip/single_word, which this tokenizer "
                             f"does not support")
        # where one added token starts another, tiktoken picks one by its hash-map order (the tokenizers library takes
        # the longest); sorted, such a pair sits side by side
        contents = sorted(t["content"] for t in added)
        overlap = [(a, b) for a, b in zip(contents, contents[1:]) if b.startswith(a)]
        if overlap:
            raise InputError(f"{path}: added token {overlap[0][0]!r} starts added token {overlap[0][1]!r}, which this "
                             f"tokenizer cannot match as the tokenizers library does")
        self.special_tokens = {t["content"]: t["id"] for t in added}
        vocab = {as_bytes(t): i for t, i in bpe["vocab"].items() if t not in self.special_tokens}
        ranks = {bytes([b]): b for b in range(256)}
        missing = [b for b in ranks if b not in vocab]
        if missing:
            raise InputError(f"{path}: the vocabulary lacks {len(missing)} of the 256 byte tokens")
        for merge in bpe.get("merges", []):
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            ranks.setdefault(as_bytes(left) + as_bytes(right), len(ranks))
        for token in vocab:  # tokens no merge builds can still match a whole pre-tokenized piece
            ranks.setdefault(token, len(ranks))
        specials_rank = {t: len(ranks) + j for j, t in enumerate(self.special_tokens)}
        self.id_of_rank = np.zeros(len(ranks) + len(specials_rank), dtype=np.int64)
        for token, rank in ranks.items():
            self.id_of_rank[rank] = vocab.get(token, -1)
        for token, rank in specials_rank.items():
            self.id_of_rank[rank] = self.special_tokens[token]
        self.bytes_of_id = {i: t for t, i in vocab.items()}
        self.bytes_of_id.update({i: t.encode("utf-8") for t, i in self.special_tokens.items()})
        self.encoding = tiktoken.Encoding(name=str(path), pat_str=self.pattern, mergeable_ranks=ranks,
                                          special_tokens=specials_rank)
        self.vocab_size = max(self.bytes_of_id) + 1

    @staticmethod
    def _pattern(pre_tokenizer, path) -> str:
        steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
        patterns = []
        for step in steps:
            if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
                patterns.append(step["pattern"]["Regex"])
            elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
            elif step.get("type") not in ("ByteLevel", None):
                raise InputError(f"{path}: unsupported pre-tokenizer {step.get('type')!r}")
        if len(patterns) != 1:
            raise InputError(f"{path}: expected one pre-tokenizer regex, found {len(patterns)}")
        return patterns[0]

    def encode(self, text: str) -> list:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ranks = self.encoding.encode(text, allowed_special="all")
        return self.id_of_rank[ranks].tolist()

    def decode(self, ids) -> str:
        return b"".join(self.bytes_of_id.get(int(i), b"") for i in ids).decode("utf-8", errors="replace")

    def token_id(self, text: str):
        return self.special_tokens.get(text)


class SentencePieceTokenizer:
    def __init__(self, path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_id(self, text: str):
        i = self.sp.piece_to_id(text)
        return None if i == self.sp.unk_id() and text != self.sp.id_to_piece(i) else i


def load_tokenizer(checkpoint_dir):
    folder = Path(checkpoint_dir)
    if (folder / "tokenizer.json").is_file():
        return BPETokenizer(folder / "tokenizer.json")
    if (folder / "tokenizer.model").is_file():
        return SentencePieceTokenizer(folder / "tokenizer.model")
    raise InputError(f"{str(folder)!r} has neither tokenizer.json nor tokenizer.model (download the tokenizer "
                     f"files with the weights)")


def stop_token_ids(checkpoint_dir, config: dict, tokenizer) -> list:
    """End-of-turn tokens: generation_config.json's and config.json's eos ids, plus the chat format's own."""
    ids = []
    gen_file = Path(checkpoint_dir) / "generation_config.json"
    for source in (read_json(gen_file) if gen_file.is_file() else {}, config):
        eos = source.get("eos_token_id")
        ids += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for text in ("<|im_end|>", "<|endoftext|>", "<|return|>", "<|call|>"):
        if tokenizer.token_id(text) is not None:
            ids.append(tokenizer.token_id(text))
    return sorted(set(ids))


def chat_prompt(messages, model_type: str, thinking: bool = True, reasoning_effort: str = "medium",
                date: str | None = None) -> str:
    """The prompt string for a list of {"role", "content"} messages, ending where the assistant's answer starts."""
    return "".join(text for text, _ in chat_segments(messages, model_type, thinking, reasoning_effort, date))


CHAT_TOKENS = {"ChatML": ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
               "harmony": ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>")}


def check_chat_tokens(tokenizer, model_type: str):
    """Refuse a tokenizer that would spell the chat format's special tokens out as plain text (one that is not the
    model's own): the model would see a prompt unlike any it was trained on."""
    name = "harmony" if model_type == "gpt_oss" else "ChatML"
    missing = [t for t in CHAT_TOKENS[name] if len(tokenizer.encode(t)) != 1]
    if missing:
        raise InputError(f"tokenizer lacks the {name} special tokens {', '.join(missing)}: chat formatting needs the "
                         f"model's own tokenizer, which has them (or use raw prompts)")


def chat_segments(messages, model_type: str, thinking: bool = True, reasoning_effort: str = "medium",
                  date: str | None = None, generation_prompt: bool = True) -> list:
    """The chat as (text, is_answer) pieces whose concatenation is the rendered chat. is_answer marks what the
    assistant writes itself: everything after the generation prompt up to its end-of-turn token (the loss mask)."""
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise InputError(f"chat message {i} must have role system/user/assistant and string content: {m}")
    if model_type == "gpt_oss":
        return harmony_segments(messages, reasoning_effort, date or datetime.date.today().isoformat(),
                                generation_prompt)
    return chatml_segments(messages, thinking, generation_prompt)


EMPTY_THINK = "<think>\n\n</think>\n\n"


def chatml_segments(messages, thinking: bool, generation_prompt: bool) -> list:
    """Qwen3's ChatML. Earlier assistant turns lose their <think> part, except after the last user message.
    Without thinking the generation prompt holds an empty think block, so the answer starts after it."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    segments = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role != "assistant":
            segments.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
            continue
        reasoning = m.get("reasoning_content")
        if reasoning is None:
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        if i > last_user and (i == len(messages) - 1 or reasoning):
            content = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
        header = "<|im_start|>assistant\n"
        if not thinking and content.startswith(EMPTY_THINK):
            header, content = header + EMPTY_THINK, content[len(EMPTY_THINK):]
        segments += [(header, False), (content + "<|im_end|>", True), ("\n", False)]
    if generation_prompt:
        segments.append(("<|im_start|>assistant\n" + ("" if thinking else EMPTY_THINK), False))
    return segments


def harmony_segments(messages, reasoning_effort: str, date: str, generation_prompt: bool) -> list:
    """GPT-OSS's harmony format: system header, optional developer instructions, then the turns. An answer is
    written to the final channel; the last one ends with <|return|> (what the model emits), earlier ones <|end|>.

    A system message is developer instructions, written as the model's chat_template.jinja writes them (ending in
    "\n\n", which openai-harmony leaves out); an empty one writes none, as in the template. A system message after
    the first stays where it is, as developer instructions: the template would drop it silently."""
    segments = [("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                 f"Knowledge cutoff: 2024-06\nCurrent date: {date}\n\nReasoning: {reasoning_effort}\n\n"
                 "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>",
                 False)]
    for i, m in enumerate(messages):
        if m["role"] == "system":
            if m["content"]:
                segments.append((f"<|start|>developer<|message|># Instructions\n\n{m['content']}\n\n<|end|>", False))
        elif m["role"] == "user":
            segments.append((f"<|start|>user<|message|>{m['content']}<|end|>", False))
        else:
            end = "<|return|>" if i == len(messages) - 1 and not generation_prompt else "<|end|>"
            segments += [("<|start|>assistant", False), (f"<|channel|>final<|message|>{m['content']}{end}", True)]
    if generation_prompt:
        segments.append(("<|start|>assistant", False))
    return segments


# ---------------------------------------------------------------------------------------------------------------
# Training a byte-level BPE tokenizer (for the embedded demo model), written as a tokenizer.json

# GPT-2's pre-tokenizer in Python `re` syntax ([^\W\d_] = a letter), which tiktoken and tokenizers read the same way;
# the final \S makes sure every character lands in some piece (tiktoken drops what no alternative matches)
DEMO_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+|\S"""


def train_bpe(text: str, vocab_size: int, special_tokens=(), pattern: str = DEMO_PATTERN) -> dict:
    """Learn vocab_size - 256 - len(special_tokens) merges on text; returns the tokenizer.json content.

    Pieces of the pre-tokenizer are counted once; each merge updates only the pieces that hold the merged pair."""
    import re
    from collections import Counter, defaultdict

    pieces = Counter(re.findall(pattern, text))
    words = [list(p.encode("utf-8")) for p in pieces]  # symbols: ids, bytes 0..255 then merges
    counts = list(pieces.values())
    pair_counts, where = Counter(), defaultdict(set)
    for w, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            where[pair].add(w)
    merges = []
    for new_id in range(256, vocab_size - len(special_tokens)):
        if not pair_counts:
            break
        best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
        merges.append(best)
        for w in where.pop(best):
            word, count = words[w], counts[w]
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= count
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            words[w] = merged
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += count
                where[pair].add(w)
        pair_counts = Counter({p: c for p, c in pair_counts.items() if c > 0})
    char_of_byte = {b: c for c, b in byte_level_alphabet().items()}
    strings = [char_of_byte[b] for b in range(256)]
    for a, b in merges:
        strings.append(strings[a] + strings[b])
    specials = [{"id": len(strings) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, t in enumerate(special_tokens)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {s: i for i, s in enumerate(strings)},
                      "merges": [[strings[a], strings[b]] for a, b in merges]}}
