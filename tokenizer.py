"""Tokenizers and chat formats of the supported targets.

`tokenizer.json` (byte-level BPE) runs through tiktoken, `tokenizer.model` through sentencepiece. Chat prompts
are written exactly as the models' templates write them: ChatML, Llama-3 or harmony (DESIGN.md section 6).
"""
import datetime
import math
import re
import unicodedata
from pathlib import Path

import numpy as np
import tiktoken

from checkpoint import InputError, read_json

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_after_digits(individual: bool) -> str:
    """GPT2_PATTERN after the tokenizers library's Digits pre-tokenizer (SmolLM2's), as one regex: digits are
    pieces of their own (each or each run), and whitespace before a digit ends its piece whole."""
    digits = r"\p{N}" if individual else r"\p{N}+"
    return digits + r"""|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""


def byte_level_alphabet() -> dict:
    """Byte-level BPE's character -> byte: printable latin-1 is itself, other bytes shift to 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    char_of_byte, shift = {}, 0
    for b in range(256):
        if b in printable:
            char_of_byte[b] = chr(b)
        else:
            char_of_byte[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in char_of_byte.items()}


def byte_level_decoder(path):
    """as_bytes(token): the bytes a token of the byte-level alphabet stands for (else an InputError)."""
    # str.translate to latin-1 characters, then latin-1 bytes: GPT-OSS's ~1M tokens and merges load in 1.2 s,
    # not 1.6 s; a character outside the alphabet becomes U+FFFF, which latin-1 refuses
    to_byte = byte_level_alphabet()
    table = {ord(c): b for c, b in to_byte.items()} | {b: 0xFFFF for b in range(256) if chr(b) not in to_byte}

    def as_bytes(token: str) -> bytes:
        try:
            return token.translate(table).encode("latin-1")
        except UnicodeEncodeError:
            raise InputError(f"{path}: token {token!r} is not in the byte-level alphabet (is this a "
                             f"byte-level BPE tokenizer.json?)") from None

    return as_bytes


class BPETokenizer:
    """A byte-level BPE `tokenizer.json` run by tiktoken: tokens ranked by their merge's position in `merges`
    give the same splits, and tiktoken's ranks are mapped back to the file's ids.
    """

    def __init__(self, path):
        spec = read_json(path)
        bpe = spec.get("model") or {}
        if bpe.get("type") != "BPE" or bpe.get("byte_fallback"):
            raise InputError(f"{path} is not a byte-level BPE tokenizer (use its tokenizer.model instead)")
        if bpe.get("continuing_subword_prefix") or bpe.get("end_of_word_suffix"):
            raise InputError(f"{path}: BPE with a continuing_subword_prefix or end_of_word_suffix is not "
                             f"supported")
        self.pattern = self._pattern(spec.get("pre_tokenizer"), path)
        normalizer = (spec.get("normalizer") or {}).get("type")
        if normalizer not in (None, "NFC"):
            raise InputError(f"{path}: unsupported normalizer {normalizer!r}")
        self.nfc = normalizer == "NFC"
        as_bytes = byte_level_decoder(path)
        self.special_tokens = self._special_tokens(spec.get("added_tokens", []), path)
        vocab = {as_bytes(t): i for t, i in bpe["vocab"].items() if t not in self.special_tokens}
        self.missing = bytes(b for b in range(256) if bytes([b]) not in vocab)  # encode leaves them out
        if self.missing and bpe.get("unk_token") is not None:
            raise InputError(f"{path}: the vocabulary lacks {len(self.missing)} of the 256 byte tokens and "
                             f"writes unk_token {bpe['unk_token']!r} for them, which this tokenizer does not "
                             f"support")
        self.ranks = self._ranks(bpe.get("merges", []), vocab, as_bytes)  # for tiktoken and _merge
        self._set_up_encoding(path, vocab)

    @staticmethod
    def _special_tokens(added: list, path) -> dict:
        """{content: id} of the added tokens, refused where tiktoken would match them unlike the library."""
        # tiktoken matches added tokens exactly, anywhere: the library's lstrip/rstrip/single_word differ
        flagged = [t["content"] for t in added if t.get("lstrip") or t.get("rstrip") or t.get("single_word")]
        if flagged:
            raise InputError(f"{path}: added tokens {flagged[:3]} set lstrip/rstrip/single_word, which this "
                             f"tokenizer does not support")
        # where one starts another, tiktoken picks by hash-map order (the library: the longest); sorted, such
        # a pair sits side by side
        contents = sorted(t["content"] for t in added)
        overlap = [(a, b) for a, b in zip(contents, contents[1:]) if b.startswith(a)]
        if overlap:
            raise InputError(f"{path}: added token {overlap[0][0]!r} starts added token {overlap[0][1]!r}, "
                             f"which this tokenizer cannot match as the tokenizers library does")
        return {t["content"]: t["id"] for t in added}

    @staticmethod
    def _ranks(merges: list, vocab: dict, as_bytes) -> dict:
        """tiktoken's mergeable ranks: the 256 bytes, then each merge's bytes, then the other tokens."""
        ranks = {bytes([b]): b for b in range(256)}  # tiktoken needs every byte, the missing ones too
        for merge in merges:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            ranks.setdefault(as_bytes(left) + as_bytes(right), len(ranks))
        for token in vocab:  # tokens no merge builds can still match a whole pre-tokenized piece
            ranks.setdefault(token, len(ranks))
        return ranks

    def _set_up_encoding(self, path, vocab: dict):
        """The tiktoken encoding of self.ranks and the special tokens, and the maps of ids and ranks."""
        ranks = self.ranks
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
        alternatives = "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True))
        self.specials_regex = re.compile(f"({alternatives or '(?!)'})")  # (?!) matches nothing
        self.vocab_size = max(self.bytes_of_id) + 1

    @staticmethod
    def _pattern(pre_tokenizer, path) -> str:
        steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
        patterns, digits = [], None
        for step in steps:
            if step.get("type") == "Digits" and not patterns:
                digits = step.get("individual_digits", False)
            elif step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
                patterns.append(step["pattern"]["Regex"])
            elif step.get("type") == "ByteLevel":
                if step.get("add_prefix_space"):
                    raise InputError(f"{path}: a ByteLevel pre-tokenizer with add_prefix_space is not "
                                     f"supported")
                if step.get("use_regex", True):
                    patterns.append(GPT2_PATTERN if digits is None else gpt2_after_digits(digits))
            elif step.get("type") is not None:
                raise InputError(f"{path}: unsupported pre-tokenizer {step.get('type')!r}")
        if len(patterns) != 1:
            raise InputError(f"{path}: expected one pre-tokenizer regex, found {len(patterns)}")
        if digits is not None and patterns[0] != gpt2_after_digits(digits):
            raise InputError(f"{path}: a Digits pre-tokenizer is supported only before ByteLevel's own regex")
        return patterns[0]

    def encode(self, text: str) -> list:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self.missing:
            data = text.encode("utf-8", "surrogatepass")
            if len(data.translate(None, self.missing)) != len(data):
                return self._encode_without_missing_bytes(text)
        ranks = self.encoding.encode(text, allowed_special="all")
        return self.id_of_rank[ranks].tolist()

    def _encode_without_missing_bytes(self, text: str) -> list:
        """Text with bytes the vocabulary lacks: each piece, split by `regex`, merged without them, as the
        tokenizers library does and tiktoken cannot (DESIGN.md section 6)."""
        import regex

        ids = []
        for i, chunk in enumerate(self.specials_regex.split(text)):
            if i % 2:  # split's odd items: the special tokens it split at
                ids.append(self.special_tokens[chunk])
                continue
            for piece in regex.findall(self.pattern, chunk):
                data = piece.encode("utf-8", "surrogatepass").translate(None, self.missing)
                ids += self._merge(data) if data else []
        return ids

    def _merge(self, data: bytes) -> list:
        """tiktoken's BPE of one piece: a token stays whole; else, from single bytes, the adjacent pair of
        lowest rank (the leftmost of equals) merges until no pair is a token."""
        parts = [data] if data in self.ranks else [data[i:i + 1] for i in range(len(data))]
        while len(parts) > 1:
            rank, i = min((self.ranks.get(a + b, math.inf), i)
                          for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [int(self.id_of_rank[self.ranks[part]]) for part in parts]

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
    raise InputError(f"{str(folder)!r} has neither tokenizer.json nor tokenizer.model (download the "
                     f"tokenizer files with the weights)")


def stop_token_ids(checkpoint_dir, config: dict, tokenizer) -> list:
    """End-of-turn tokens: generation_config.json's and config.json's eos ids, plus the chat format's own."""
    ids = []
    gen_file = Path(checkpoint_dir) / "generation_config.json"
    for source in (read_json(gen_file) if gen_file.is_file() else {}, config):
        eos = source.get("eos_token_id")
        ids += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for text in ("<|im_end|>", "<|endoftext|>", "<|return|>", "<|call|>", "<|eot_id|>", "<|eom_id|>",
                 "<|end_of_text|>"):
        if tokenizer.token_id(text) is not None:
            ids.append(tokenizer.token_id(text))
    return sorted(set(ids))


# A chat format: {"name": "ChatML", "thinking": the template knows Qwen3's <think> blocks, "system": its
# default system message or None}, {"name": "Llama-3", "system": Llama 3.1-3.3's system preamble or None
# (Llama 3.0)}, or {"name": "harmony"}
QWEN3_CHAT = {"name": "ChatML", "thinking": True, "system": None}
MODEL_TYPE_CHAT = {"qwen3": QWEN3_CHAT, "qwen3_moe": QWEN3_CHAT, "gpt_oss": {"name": "harmony"}}


def read_chat_template(checkpoint_dir):
    """The model's Jinja chat template or None, as transformers reads it: chat_template.jinja, else
    tokenizer_config.json's chat_template (of several, the "default")."""
    folder = Path(checkpoint_dir)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    template = read_json(config).get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template


def chat_format(checkpoint_dir) -> dict:
    """A model folder's chat format, told by its chat template, else by its model_type."""
    template = read_chat_template(checkpoint_dir)
    if template is not None:
        return template_chat_format(template, repr(str(checkpoint_dir)))
    config = Path(checkpoint_dir) / "config.json"
    model_type = read_json(config).get("model_type") if config.is_file() else None
    if model_type not in MODEL_TYPE_CHAT:
        raise InputError(f"{str(checkpoint_dir)!r} has no chat template (chat_template.jinja or "
                         f"tokenizer_config.json's chat_template): add the model's own, or use raw prompts")
    return MODEL_TYPE_CHAT[model_type]


def template_chat_format(template: str, where: str = "the model") -> dict:
    """The chat format a Jinja chat template writes, read from its text (we render it ourselves)."""
    if "<|start|>" in template and "<|message|>" in template:
        return {"name": "harmony"}
    if "<|start_header_id|>" in template:
        return {"name": "Llama-3", "system": llama3_system_preamble(template, where)}
    if "<|im_start|>" in template:
        # a default system message is a string literal of the template, opened by its header: SmolLM2's
        # '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n'
        default = re.search(r"""(['"])<\|im_start\|>system(?:\n|\\n)((?:(?!\1)[^\\]|\\.)*?)<\|im_end\|>""",
                            template)
        system = None if default is None else re.sub(
            r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), default[2])
        return {"name": "ChatML", "thinking": "enable_thinking" in template or "<think>" in template,
                "system": system}
    raise InputError(f"the chat template of {where} is none of ChatML, Llama-3 or harmony (the chat formats "
                     f"supported): use raw prompts")


def llama3_system_preamble(template: str, where: str):
    """The "Cutting Knowledge Date" and "Today Date" lines opening Llama 3.1-3.3's system block, the date
    fixed (3.1, 3.3) or today's (3.2); None for Llama 3.0."""
    cutoff = re.search(r"""Cutting Knowledge Date: ([^'"\\\n]*)""", template)
    if cutoff is None:
        return None
    today = re.search(r"""strftime_now\(['"]([^'"]*)['"]\)""", template)
    fixed = re.search(r"""set date_string = ['"]([^'"]*)['"]""", template)
    if today is None and fixed is None:
        raise InputError(f"the Llama-3 chat template of {where} writes a date we cannot read: use raw "
                         f"prompts")
    date = datetime.datetime.now().strftime(today[1]) if today else fixed[1]
    return f"Cutting Knowledge Date: {cutoff[1]}\nToday Date: {date}\n\n"


def chat_prompt(messages, fmt: dict, thinking: bool = True, reasoning_effort: str = "medium",
                date: str | None = None) -> str:
    """The prompt for a list of {"role", "content"} messages, ending where the assistant's answer starts."""
    return "".join(text for text, _ in chat_segments(messages, fmt, thinking, reasoning_effort, date))


CHAT_TOKENS = {"ChatML": ("<|im_start|>", "<|im_end|>"),
               "Llama-3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               "harmony": ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>")}


def check_chat_tokens(tokenizer, fmt: dict):
    """Refuse a tokenizer that would spell the format's special tokens out as text (not the model's own): the
    model would see a prompt unlike any it was trained on."""
    tokens = CHAT_TOKENS[fmt["name"]] + (("<think>", "</think>") if fmt.get("thinking") else ())
    missing = [t for t in tokens if len(tokenizer.encode(t)) != 1]
    if missing:
        raise InputError(f"tokenizer lacks the {fmt['name']} special tokens {', '.join(missing)}: chat "
                         f"formatting needs the model's own tokenizer, which has them (or use raw prompts)")


def chat_segments(messages, fmt: dict, thinking: bool = True, reasoning_effort: str = "medium",
                  date: str | None = None, generation_prompt: bool = True) -> list:
    """The rendered chat as (text, is_answer) pieces; is_answer (the loss mask) marks what the assistant
    writes, through its end-of-turn token. thinking is Qwen3's; reasoning_effort and date are harmony's."""
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise InputError(f"chat message {i} must have role system/user/assistant and string content: {m}")
    if fmt["name"] == "harmony":
        return harmony_segments(messages, reasoning_effort, date or datetime.date.today().isoformat(),
                                generation_prompt)
    if fmt["name"] == "Llama-3":
        return llama3_segments(messages, fmt["system"], generation_prompt)
    return chatml_segments(messages, fmt, thinking, generation_prompt)


EMPTY_THINK = "<think>\n\n</think>\n\n"


def chatml_segments(messages, fmt: dict, thinking: bool, generation_prompt: bool) -> list:
    """ChatML, with the template's default system message if the chat opens without one. With Qwen3's
    thinking, assistant turns before the last user message lose their <think> part; without it the
    generation prompt holds an empty think block, so the answer starts after it."""
    segments = []
    if fmt["system"] is not None and messages and messages[0]["role"] != "system":
        segments.append((f"<|im_start|>system\n{fmt['system']}<|im_end|>\n", False))
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role != "assistant":
            segments.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
            continue
        header = "<|im_start|>assistant\n"
        if fmt["thinking"]:
            reasoning = m.get("reasoning_content")
            if reasoning is None:
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            if i > last_user and (i == len(messages) - 1 or reasoning):
                content = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
            if not thinking and content.startswith(EMPTY_THINK):
                header, content = header + EMPTY_THINK, content[len(EMPTY_THINK):]
        segments += [(header, False), (content + "<|im_end|>", True), ("\n", False)]
    if generation_prompt:
        segments.append(("<|im_start|>assistant\n"
                         + (EMPTY_THINK if fmt["thinking"] and not thinking else ""), False))
    return segments


def llama3_segments(messages, preamble, generation_prompt: bool) -> list:
    """Llama-3's headers, every message trimmed (the template's |trim). With a preamble (3.1-3.3) the chat
    opens with a system block: it and a first system message; 3.0 writes a system message as any turn."""
    segments = []
    if preamble is not None:
        system = ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        segments.append((f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{preamble}{system}"
                         "<|eot_id|>", False))
    for i, m in enumerate(messages):
        bos = "<|begin_of_text|>" if i == 0 and preamble is None else ""
        header = f"{bos}<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            segments += [(header, False), (m["content"].strip() + "<|eot_id|>", True)]
        else:
            segments.append((header + m["content"].strip() + "<|eot_id|>", False))
    if generation_prompt:
        segments.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segments


def harmony_segments(messages, reasoning_effort: str, date: str, generation_prompt: bool) -> list:
    """GPT-OSS's harmony: answers go to the final channel, the last ending in <|return|> (what the model
    emits). System messages are developer instructions as chat_template.jinja writes them (ending in "\n\n",
    unlike openai-harmony; none if empty), later ones in place (the template would drop them)."""
    segments = [("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                 f"Knowledge cutoff: 2024-06\nCurrent date: {date}\n\nReasoning: {reasoning_effort}\n\n"
                 "# Valid channels: analysis, commentary, final. Channel must be included for every "
                 "message.<|end|>", False)]
    for i, m in enumerate(messages):
        if m["role"] == "system":
            if m["content"]:
                segments.append((f"<|start|>developer<|message|># Instructions\n\n{m['content']}\n\n<|end|>",
                                 False))
        elif m["role"] == "user":
            segments.append((f"<|start|>user<|message|>{m['content']}<|end|>", False))
        else:
            end = "<|return|>" if i == len(messages) - 1 and not generation_prompt else "<|end|>"
            segments += [("<|start|>assistant", False),
                         (f"<|channel|>final<|message|>{m['content']}{end}", True)]
    if generation_prompt:
        segments.append(("<|start|>assistant", False))
    return segments
