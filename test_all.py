"""Tests. Tiny random models in the real on-disk formats, checked against independent references:
transformers for logits, generation, MXFP4 decoding and chat templates; the tokenizers library for tokenization.

Run: TRITON_INTERPRET=1 python -m pytest -q test_all.py
"""
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors in the interpreter

import pytest
import torch
from safetensors.torch import load_file, save_file

import generate
from model import InputError, dequantize_mxfp4, load_checkpoint
from tokenizer import BPETokenizer, chat_prompt, load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = open(os.path.join(os.path.dirname(json.__file__), "decoder.py"), encoding="utf-8").read() + (
    "héllo wörld ñandú 日本語のテキスト 🙂 emoji Ünïcödé\n\n  spaces\ttabs 1234567 3.14 café ")
UNICODE_SAMPLES = [CORPUS[:2000], "<|im_start|>user\nhéllo 🙂 wörld<|im_end|>\n", "e\u0301 (combining) café",
                   "  leading   and trailing  \n\n\n", "numbers 1234567 3.14", "日本語 🙂🙂 <think>x</think>"]


def train_tokenizer(path, style="qwen", vocab_size=400):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if style == "qwen":  # Qwen3 / GPT-OSS layout: NFC, a Split regex, then byte-level without its own regex
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # GPT-2 layout: byte-level with its built-in regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(path))
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Tiny random checkpoints, saved as transformers saves them (GPT-OSS experts re-packed as real MXFP4)

def quantize_mxfp4(w):
    """w [..., K] (K a multiple of 32) -> blocks [..., K/32, 16] uint8, scales [..., K/32] uint8, nearest e2m1."""
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    groups = w.reshape(*w.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    code = (scaled.abs()[..., None] - table).abs().argmin(-1) + 8 * (scaled < 0)
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def make_target(folder, model_type, vocab_size, eos_id, seed=0):
    """Save a tiny random model of model_type with transformers; returns the transformers model."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, initializer_range=0.1, eos_token_id=eos_id, max_position_embeddings=512)
    if model_type == "qwen3":
        cfg = transformers.Qwen3Config(intermediate_size=96, num_hidden_layers=3, tie_word_embeddings=True,
                                       **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif model_type == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                          num_experts_per_tok=2, num_hidden_layers=3, mlp_only_layers=[1],
                                          norm_topk_prob=True, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                        num_hidden_layers=2, sliding_window=8, **common)
        model = transformers.GptOssForCausalLM(cfg)
    model = model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 2.0)  # large enough to matter in the softmax
    model.save_pretrained(folder)
    if model_type == "gpt_oss":
        # Re-pack the experts the way released GPT-OSS checkpoints store them, and give the transformers model
        # the exactly representable values (dequantized by transformers' own MXFP4 code).
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        state = load_file(os.path.join(folder, "model.safetensors"))
        for i, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                dense = getattr(layer.mlp.experts, proj)  # [E, in, out]
                blocks, scales = quantize_mxfp4(dense.data.transpose(1, 2).contiguous())
                key = f"model.layers.{i}.mlp.experts.{proj}"
                del state[key]
                state[key + "_blocks"], state[key + "_scales"] = blocks, scales
                with torch.no_grad():
                    dense.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        config = json.load(open(os.path.join(folder, "config.json")))
        config["quantization_config"] = {"quant_method": "mxfp4"}
        json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    return model


MODEL_TYPES = ["qwen3", "qwen3_moe", "gpt_oss"]


@pytest.fixture(scope="session")
def tok_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def targets(tmp_path_factory, tok_file):
    """{model_type: (folder, transformers model)} sharing one tokenizer; <|im_end|> is the eos."""
    tok = BPETokenizer(tok_file)
    out = {}
    for model_type in MODEL_TYPES:
        folder = tmp_path_factory.mktemp(model_type)
        hf = make_target(folder, model_type, tok.vocab_size, tok.token_id("<|im_end|>"))
        (folder / "tokenizer.json").write_bytes(tok_file.read_bytes())
        out[model_type] = (folder, hf)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Targets against transformers

@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_and_captured_layers_match_transformers(targets, model_type):
    folder, hf = targets[model_type]
    model = load_checkpoint(folder, dtype=torch.float32)
    B, S = 2, 24  # longer than GPT-OSS's sliding window of 8
    model.setup_caches(B, 64)
    tokens = torch.randint(0, model.args.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    capture = tuple(range(model.args.num_hidden_layers))
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        logits, hidden = model(tokens, torch.arange(S).expand(B, S), capture=capture)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4 * ref.logits.abs().max().item())
    assert hidden.shape == (B, S, len(capture), model.args.hidden_size)
    for t, layer in enumerate(capture[:-1]):  # the last entry of transformers' hidden_states is after the norm
        torch.testing.assert_close(hidden[:, :, t], ref.hidden_states[layer + 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_incremental_decode_equals_full_forward(targets, model_type):
    folder, _ = targets[model_type]
    model = load_checkpoint(folder, dtype=torch.float32)
    B, S = 2, 24
    model.setup_caches(B, 32)
    tokens = torch.randint(0, model.args.vocab_size, (B, S), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(tokens, torch.arange(S).expand(B, S))
        model.setup_caches(B, 32)
        steps = [model(tokens[:, :5], torch.arange(5).expand(B, 5))[0]]  # a prompt, then one token at a time
        for i in range(5, S):
            steps.append(model(tokens[:, i:i + 1], torch.full((B, 1), i))[0])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4 * full.abs().max().item())


def test_sharded_checkpoint_loads_like_single_file(targets, tmp_path):
    folder, hf = targets["qwen3_moe"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    tokens = torch.arange(10)[None]
    logits = []
    for f in (folder, tmp_path):
        model = load_checkpoint(f, dtype=torch.float32)
        model.setup_caches(1, 16)
        logits.append(model(tokens, torch.arange(10)[None])[0])
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_rows_at_different_positions_match_single_rows(targets):
    folder, _ = targets["gpt_oss"]
    model = load_checkpoint(folder, dtype=torch.float32)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22]]
    model.setup_caches(2, 64)
    batched, _ = generate.generate(model, prompts, 12, generate.Sampling())
    model.setup_caches(1, 64)
    singles = [generate.generate(model, [p], 12, generate.Sampling())[0][0] for p in prompts]
    assert batched == singles


def test_mxfp4_decoding_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 136, (3, 10, 4), dtype=torch.uint8, generator=g)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # back to [E, out, in]
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales, torch.float32), ref, rtol=0, atol=0)


def run_cli(capsys, *argv):
    generate.main([str(a) for a in argv])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_generate_matches_transformers(targets, capsys, model_type):
    folder, hf = targets[model_type]
    prompts = ["def decode(self, s):", "import re"]
    rows = run_cli(capsys, "--checkpoint", folder, "--prompt", prompts[0], "--prompt", prompts[1],
                   "--batch_size", 2, "--max_new_tokens", 20, "--json")
    tok = load_tokenizer(folder)
    for prompt, row in zip(prompts, rows):
        ids = torch.tensor([tok.encode(prompt)])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                          eos_token_id=tok.token_id("<|im_end|>"), pad_token_id=0)
        assert row["tokens"] == ref[0, ids.shape[1]:].tolist()
        assert row["text"] == tok.decode([t for t in row["tokens"] if t != tok.token_id("<|im_end|>")])
        assert row["tokens_per_s"] > 0


def test_compiled_matches_eager(targets, capsys):
    folder, _ = targets["qwen3_moe"]
    argv = ["--checkpoint", folder, "--prompt", "import json", "--max_new_tokens", 8, "--json"]
    eager = run_cli(capsys, *argv)
    compiled = run_cli(capsys, *argv, "--compile")
    assert compiled[0]["tokens"] == eager[0]["tokens"]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and chat format

@pytest.mark.parametrize("style", ["qwen", "gpt2"])
def test_tokenizer_matches_tokenizers_library(tmp_path, style):
    path = tmp_path / "tokenizer.json"
    ref = train_tokenizer(path, style)
    ours = BPETokenizer(path)
    for text in UNICODE_SAMPLES:
        ids = ref.encode(text).ids
        assert ours.encode(text) == ids, text[:40]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    assert ours.token_id("<|im_end|>") == ref.token_to_id("<|im_end|>")


def naive_bpe_merges(text, n_merges, pattern):
    """Reference BPE training: recount every pair of every piece before each merge."""
    from collections import Counter

    words = [[bytes([b]) for b in piece.encode()] for piece in re.findall(pattern, text)]
    merges = []
    for _ in range(n_merges):
        counts = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not counts:
            break
        # ties: the pair of the lowest ids (bytes first, then earlier merges), as train_bpe breaks them
        rank = {m: 256 + i for i, m in enumerate(merges)}
        ident = lambda t: t[0] if len(t) == 1 else rank[t]  # noqa: E731
        best = max(counts, key=lambda p: (counts[p], -ident(p[0]), -ident(p[1])))
        merges.append(best[0] + best[1])
        for w, word in enumerate(words):
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out
    return merges


def test_trained_bpe_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    from tokenizer import DEMO_PATTERN, train_bpe

    spec = train_bpe(CORPUS, 600, ["<|im_start|>", "<|im_end|>"])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    ours, reference = BPETokenizer(path), Tokenizer.from_file(str(path))
    assert ours.vocab_size == 600 and ours.token_id("<|im_end|>") == 599
    for text in UNICODE_SAMPLES + ["_private __dunder__ x_1 = a_b\n\tif x:\n        pass  "]:
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids and ours.decode(ids) == text
    # the merges are those of a plain recount-everything BPE
    to_byte = {c: b for c, b in __import__("tokenizer").byte_level_alphabet().items()}
    learned = [bytes(to_byte[c] for c in a + b) for a, b in spec["model"]["merges"][:120]]
    assert learned == naive_bpe_merges(CORPUS, 120, DEMO_PATTERN)


def test_sentencepiece_tokenizer_model(tmp_path):
    import sentencepiece

    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), vocab_size=300,
                                             model_prefix=str(tmp_path / "tokenizer"), minloglevel=2)
    ref = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ours = load_tokenizer(tmp_path)
    for text in UNICODE_SAMPLES[:4]:
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))


# Qwen3's template up to the assistant turn's content and reasoning (shared by the two templates below)
QWEN3_TEMPLATE_HEAD = """\
{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}
{%- for message in messages[::-1] %}{%- if message.role == 'user' and not ns.found %}{%- set ns.found = true %}\
{%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
  {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
  {%- elif message.role == 'assistant' %}
    {%- set content = message.content %}{%- set reasoning_content = '' %}
    {%- if '</think>' in content %}
      {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
"""
QWEN3_STYLE_TEMPLATE = QWEN3_TEMPLATE_HEAD + """\
    {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
      {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
    {%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}
    {{- '<|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}\
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nb"},
     {"role": "user", "content": "c"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "<think>r1</think>b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "<think>\nr2\n</think>\n\nd"}],
]


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_prompt_matches_transformers_template(tmp_path, tok_file, thinking):
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    hf_tok.chat_template = QWEN3_STYLE_TEMPLATE
    for messages in CONVERSATIONS:
        ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)
        assert chat_prompt(messages, "qwen3", thinking=thinking) == ref


def test_harmony_prompt_layout():
    text = chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                       "gpt_oss", reasoning_effort="low", date="2026-01-02")
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Current date: 2026-01-02\n\nReasoning: low\n\n" in text
    assert text.endswith("<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
                         "<|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_chat_cli_stops_on_end_of_turn(targets, capsys):
    folder, _ = targets["qwen3"]
    rows = run_cli(capsys, "--checkpoint", folder, "--prompt", "hi", "--chat", "--thinking", "off",
                   "--max_new_tokens", 5, "--json")
    assert rows[0]["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_sampling_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = generate.logits_to_probs(logits, generate.Sampling(1.0, top_k=2))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = generate.logits_to_probs(logits, generate.Sampling(1.0, top_p=0.9))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    draws = generate.sample(logits.expand(4000, 4), generate.Sampling(1.0, top_k=2))
    assert set(draws.tolist()) == {0, 1}


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, no traceback

def test_missing_folder_and_files(tmp_path, targets):
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(InputError, match="no config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": 8, "hidden_size": 8,
                                                      "num_hidden_layers": 1, "num_attention_heads": 1}))
    with pytest.raises(InputError, match="no \\*.safetensors"):
        load_checkpoint(tmp_path)
    with pytest.raises(InputError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="model_type 'llama'; supported: qwen3, qwen3_moe, gpt_oss"):
        load_checkpoint(tmp_path)


def copy_checkpoint(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_missing_tensor_and_shape_mismatch(targets, tmp_path):
    src, _ = targets["qwen3"]
    broken = copy_checkpoint(src, tmp_path / "missing", lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(InputError, match="lacks tensor 'model.layers.1.self_attn.k_proj.weight'"):
        load_checkpoint(broken)

    def shrink(state):
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:10]

    broken = copy_checkpoint(src, tmp_path / "shape", shrink)
    with pytest.raises(InputError, match=r"'layers.0.mlp.up_proj.weight'.*shape \(10, 64\).*implies \(96, 64\)"):
        load_checkpoint(broken)


def test_prompt_longer_than_cache(targets, capsys):
    folder, _ = targets["qwen3"]
    with pytest.raises(InputError, match="longer than --max_seq_len 4"):
        generate.main(["--checkpoint", str(folder), "--prompt", "def decode(self, s): return s", "--max_seq_len", "4"])
    with pytest.raises(InputError, match="exceeds --max_seq_len 64"):
        generate.main(["--checkpoint", str(folder), "--max_new_tokens", "100", "--max_seq_len", "64"])


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top_p", "0"], "--top_p must be in \\(0, 1\\]"),
    (["--top_k", "-2"], "--top_k must be >= 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
])
def test_invalid_sampling_flags(capsys, flags, message):
    with pytest.raises(SystemExit):
        generate.parse_args(["--checkpoint", "x", *flags])
    assert re.search(message, capsys.readouterr().err)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), "--checkpoint", str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint folder {str(tmp_path / 'x')!r} does not exist (pass a Hugging Face model folder)"]


# ---------------------------------------------------------------------------------------------------------------
# The DFlare fusion kernel (Triton, run by the interpreter on CPU) against the PyTorch reference

from draft import Draft, default_target_layer_ids, draft_block_logits  # noqa: E402
from fuse_kernel import FuseLayers, fuse_layers_reference  # noqa: E402


@pytest.mark.parametrize("N,T,H,D,dtype", [(7, 3, 48, 2, torch.float32), (9, 5, 100, 3, torch.float32),
                                           (6, 4, 64, 2, torch.bfloat16)])
def test_fuse_kernel_matches_reference(N, T, H, D, dtype):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, T, H, generator=g).to(dtype)
    logits = torch.randn(D, T, generator=g).requires_grad_()
    gamma = (1 + torch.randn(H, generator=g)).to(dtype).requires_grad_()
    grad_out = torch.randn(N, D, H, generator=g).to(dtype)
    out = FuseLayers.apply(x, logits, gamma, 1e-6)
    grads = torch.autograd.grad(out, (logits, gamma), grad_out)
    ref = fuse_layers_reference(x, logits, gamma, 1e-6)
    ref_grads = torch.autograd.grad(ref, (logits, gamma), grad_out)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    for ours, theirs in [(out, ref), *zip(grads, ref_grads)]:
        scale = theirs.float().abs().max().item()
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=rtol, atol=rtol * scale)


def test_fuse_reference_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    logits = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, gm: fuse_layers_reference(x, w, gm, 1e-6), (logits, gamma))


# ---------------------------------------------------------------------------------------------------------------
# The draft

FUSIONS = ["layerwise", "linear"]


@pytest.fixture(scope="session")
def target32(targets):
    return load_checkpoint(targets["qwen3"][0], dtype=torch.float32)


def make_draft(target, fusion, block_size=4, seed=0):
    """A random 2-layer draft tapping every target layer."""
    torch.manual_seed(seed)
    draft = Draft.for_target(target.args, num_layers=2, fusion=fusion, block_size=block_size,
                             target_layer_ids=tuple(range(target.args.num_hidden_layers)))
    with torch.no_grad():  # larger than the default init so that every input visibly matters
        for p in draft.parameters():
            if p.dim() == 2 and p is not getattr(draft, "layer_fusion_weights", None):
                p.normal_(0, 0.2)
    return draft


def test_default_target_layers():
    assert default_target_layer_ids(32, 5) == (1, 8, 15, 22, 29)
    assert len(default_target_layer_ids(36, 9)) == 9
    assert default_target_layer_ids(3, 5) == (1,)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_cached_step_matches_reference(target32, fusion):
    draft = make_draft(target32, fusion)
    bs, T, H = 4, 3, target32.args.hidden_size
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 40, T, H, generator=g)  # captured states of every position, per row
    tokens = torch.randint(0, target32.args.vocab_size, (2, 40), generator=g)
    schedules = [[1, 4, 2, 1, 3], [4, 4, 1, 3, 2]]  # committed tokens per step, per row
    prompt = torch.tensor([5, 7])
    draft.setup_caches(2, 48)
    with torch.no_grad():
        draft.write_context(hidden[:, :7], torch.arange(7).expand(2, 7))  # prefill (row 0's extra rows are stale)
        anchor = prompt.clone()
        for step in range(5):
            block = draft.noise_block(tokens[torch.arange(2), anchor])
            ours = draft.block_logits(target32, block, anchor)
            for row in range(2):
                p = int(anchor[row])
                ref = draft_block_logits(draft, target32, hidden[row:row + 1, :p], block[row:row + 1], p)
                torch.testing.assert_close(ours[row:row + 1], ref, rtol=1e-4, atol=1e-4)
            # commit: the rows of positions anchor .. anchor + n - 1 become context; the rest of the padded bs
            # rows hold garbage at positions >= the next anchor
            committed = torch.tensor([schedules[0][step], schedules[1][step]])
            positions = anchor[:, None] + torch.arange(bs)
            new_rows = hidden[torch.arange(2)[:, None], positions].clone()
            new_rows[torch.arange(bs)[None] >= committed[:, None]] = 100.0
            draft.write_context(new_rows, positions)
            anchor = anchor + committed


@pytest.mark.parametrize("fusion", FUSIONS)
def test_training_forward_matches_blocks_and_masks(target32, fusion):
    draft = make_draft(target32, fusion)
    bs, T, H = 4, 3, target32.args.hidden_size
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 20, T, H, generator=g)
    blocks = torch.randint(0, target32.args.vocab_size, (1, 3, bs), generator=g)
    anchors = torch.tensor([[3, 9, 14]])
    with torch.no_grad():
        logits = draft(target32, hidden, blocks, anchors)
        for j in range(3):  # equals each block on its own
            p = int(anchors[0, j])
            ref = draft_block_logits(draft, target32, hidden[:, :p], blocks[:, j], p)
            torch.testing.assert_close(logits[:, j], ref, rtol=1e-4, atol=1e-4)
        changed = blocks.clone()
        changed[0, 2, 1] = (changed[0, 2, 1] + 1) % target32.args.vocab_size  # a token of block 2
        other = draft(target32, hidden, changed, anchors)
        torch.testing.assert_close(other[:, :2], logits[:, :2], rtol=0, atol=0)  # other blocks: unchanged
        assert not torch.allclose(other[0, 2, 0], logits[0, 2, 0])  # block position 0 sees position 1 ...
        assert not torch.allclose(other[0, 2, 2], logits[0, 2, 2])  # ... and so does position 3 (bidirectional)
        later = hidden.clone()
        later[:, 9:] += 1.0  # context rows at or after block 1's anchor
        moved = draft(target32, later, blocks, anchors)
        torch.testing.assert_close(moved[:, :2], logits[:, :2], rtol=0, atol=0)
        assert not torch.allclose(moved[:, 2], logits[:, 2])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_draft_save_and_reload(target32, fusion, tmp_path):
    draft = make_draft(target32, fusion)
    draft.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = Draft.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.args == draft.args
    for (name, a), (_, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dflash_config"] == {"target_layer_ids": [0, 1, 2], "mask_token_id": draft.args.mask_token_id}
    assert config["block_size"] == 4 and config["num_target_layers"] == 3


def published_draft_folder(folder, fusion, H=64, I=96, D=2, T=3, heads=4, kv=2, hd=16, vocab=400, prefix=""):
    """A draft folder written from SPEC section 3's key list (z-lab DFlash / AngelSlim DFlare names)."""
    g = torch.Generator().manual_seed(5)
    shapes = {"norm.weight": (H,), "hidden_norm.weight": (H,)}
    for i in range(D):
        a = f"layers.{i}."
        shapes.update({a + "self_attn.q_proj.weight": (heads * hd, H), a + "self_attn.k_proj.weight": (kv * hd, H),
                       a + "self_attn.v_proj.weight": (kv * hd, H), a + "self_attn.o_proj.weight": (H, heads * hd),
                       a + "self_attn.q_norm.weight": (hd,), a + "self_attn.k_norm.weight": (hd,),
                       a + "input_layernorm.weight": (H,), a + "post_attention_layernorm.weight": (H,),
                       a + "mlp.gate_proj.weight": (I, H), a + "mlp.up_proj.weight": (I, H),
                       a + "mlp.down_proj.weight": (H, I)})
        if fusion == "layerwise":
            shapes.update({a + "self_attn.k_proj_target.weight": (kv * hd, H),
                           a + "self_attn.v_proj_target.weight": (kv * hd, H)})
    shapes.update({"layer_fusion_weights": (D, T)} if fusion == "layerwise" else {"fc.weight": (H, T * H)})
    folder.mkdir(exist_ok=True)
    save_file({prefix + k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()},
              folder / "model.safetensors")
    config = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": H,
              "intermediate_size": I, "num_hidden_layers": D, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
              "vocab_size": vocab, "block_size": 16, "num_target_layers": 3,
              "dflash_config": {"target_layer_ids": [0, 1, 2], "mask_token_id": 5}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, shapes


@pytest.mark.parametrize("fusion", FUSIONS)
def test_published_draft_format_loads(target32, fusion, tmp_path):
    folder, shapes = published_draft_folder(tmp_path / "d", fusion, vocab=target32.args.vocab_size)
    draft = Draft.from_pretrained(folder, dtype=torch.float32)
    assert draft.args.fusion == fusion and draft.args.mask_token_id == 5 and draft.args.block_size == 16
    assert set(draft.state_dict()) == set(shapes)
    draft.check_target(target32.args)
    raw = load_file(folder / "model.safetensors")
    torch.testing.assert_close(draft.state_dict()["layers.1.mlp.down_proj.weight"],
                               raw["layers.1.mlp.down_proj.weight"])


def test_draft_errors(target32, tmp_path):
    folder, _ = published_draft_folder(tmp_path / "missing", "layerwise", vocab=target32.args.vocab_size)
    state = load_file(folder / "model.safetensors")
    del state["layers.1.self_attn.v_proj_target.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(InputError, match="lacks tensor 'layers.1.self_attn.v_proj_target.weight'"):
        Draft.from_pretrained(folder)
    folder, _ = published_draft_folder(tmp_path / "shape", "linear", vocab=target32.args.vocab_size)
    state = load_file(folder / "model.safetensors")
    state["fc.weight"] = state["fc.weight"][:, :64].contiguous()
    save_file(state, folder / "model.safetensors")
    with pytest.raises(InputError, match=r"'fc.weight'.*shape \(64, 64\).*implies \(64, 192\)"):
        Draft.from_pretrained(folder)
    folder, _ = published_draft_folder(tmp_path / "wide", "layerwise", H=128, vocab=7)
    with pytest.raises(InputError, match="hidden size 128 != target's 64.*vocab size 7 != target's"):
        Draft.from_pretrained(folder).check_target(target32.args)
    folder, _ = published_draft_folder(tmp_path / "v2", "linear", vocab=target32.args.vocab_size)
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="uses sliding_attention: a newer DFlash draft design"):
        Draft.from_pretrained(folder)
    draft = make_draft(target32, "layerwise")
    draft.args.target_layer_ids = (0, 5)
    with pytest.raises(InputError, match=r"target_layer_ids \[5\] are beyond the target's 3 layers"):
        draft.check_target(target32.args)


# ---------------------------------------------------------------------------------------------------------------
# Speculative decoding: lossless against autoregressive decoding, exact sampling, the static step vs a plain loop

import torch.nn.functional as F  # noqa: E402

from model import ModelArgs, Transformer  # noqa: E402

SPEC_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42], [50]]


@pytest.fixture
def reference_fusion(monkeypatch):
    """Decode with the PyTorch fusion: the interpreted Triton kernel takes ~0.3 s a call (tested above)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="session")
def targets32(targets):
    return {model_type: load_checkpoint(folder, dtype=torch.float32) for model_type, (folder, _) in targets.items()}


def decode(target, prompts, max_new_tokens, draft=None, block_size=0, stop_ids=(), sampling=None, steps=None):
    """generate.generate on caches exactly as long as generate.py makes them at least."""
    max_seq_len = max(map(len, prompts)) + max_new_tokens + block_size
    target.setup_caches(len(prompts), max_seq_len)
    if draft is not None:
        draft.setup_caches(len(prompts), max_seq_len)
    return generate.generate(target, prompts, max_new_tokens, sampling or generate.Sampling(), stop_ids,
                             draft=draft, block_size=block_size, steps=steps or generate.EAGER)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_speculative_greedy_is_lossless(targets32, model_type, fusion, reference_fusion):
    target = targets32[model_type]
    for batch in ([p] for p in SPEC_PROMPTS), [SPEC_PROMPTS]:
        for prompts in batch:
            expected, _ = decode(target, prompts, 24)
            for seed, block_size in [(0, 2), (1, 5), (2, 8)]:
                draft = make_draft(target, fusion, block_size=8, seed=seed)
                tokens, stats = decode(target, prompts, 24, draft, block_size)
                assert tokens == expected, (seed, block_size)
                assert [sum(lengths) for lengths in stats["acceptance_lengths"]] == [len(t) - 1 for t in tokens]


class ScriptedDraft(Draft):
    """Proposes each row's true continuation (an oracle) with one guess made wrong, so that a step anchored at
    position p accepts exactly accepted[row, p] drafts."""

    def block_logits(self, target, block_tokens, anchor_pos):
        B, bs = block_tokens.shape
        positions = (anchor_pos[:, None] + torch.arange(1, bs)).clamp(max=self.continuation.shape[1] - 1)
        guesses = self.continuation.gather(1, positions)  # [B, bs-1]
        wrong = torch.arange(bs - 1)[None] == self.accepted.gather(1, anchor_pos[:, None])
        guesses = torch.where(wrong, (guesses + 1) % target.args.vocab_size, guesses)
        return F.one_hot(guesses, target.args.vocab_size).float() * 20


def scripted_draft(target, prompts, expected, block_size, length=64):
    """A ScriptedDraft whose steps accept 0, 1, ..., bs-1, 0, 1, ... drafts (row r starts the cycle at r)."""
    draft = ScriptedDraft.for_target(target.args, num_layers=1, block_size=block_size,
                                     target_layer_ids=(target.args.num_hidden_layers - 1,))
    draft.continuation = torch.tensor([p + e + [0] * (length - len(p) - len(e)) for p, e in zip(prompts, expected)])
    draft.accepted = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        anchor, n = len(prompt), row % block_size
        while anchor < length:
            draft.accepted[row, anchor] = n
            anchor, n = anchor + n + 1, (n + 1) % block_size
    return draft


def scripted_acceptance(draft, row, prompt_len, n_new):
    """Tokens each step commits under a ScriptedDraft, until n_new tokens (the first comes from the prefill)."""
    lengths, anchor, left = [], prompt_len, n_new - 1
    while left > 0:
        lengths.append(min(int(draft.accepted[row, anchor]) + 1, left))
        anchor, left = anchor + lengths[-1], left - lengths[-1]
    return lengths


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_speculative_with_oracle_proposals_covers_every_acceptance_length(targets32, model_type, reference_fusion):
    target = targets32[model_type]
    prompts = SPEC_PROMPTS[:3]
    expected, _ = decode(target, prompts, 30)
    # a stop token that the target emits mid-way in row 0 (and maybe elsewhere): ends rows inside a block
    stop = expected[0][9]
    stopped, _ = decode(target, prompts, 30, stop_ids=[stop])
    assert len(stopped[0]) == expected[0].index(stop) + 1 < 30
    seen = set()
    for block_size in (2, 4, 7):
        for stop_ids, reference in [((), expected), ([stop], stopped)]:
            draft = scripted_draft(target, prompts, reference, block_size)
            tokens, stats = decode(target, prompts, 30, draft, block_size, stop_ids=stop_ids)
            assert tokens == reference
            for row, lengths in enumerate(stats["acceptance_lengths"]):
                assert lengths == scripted_acceptance(draft, row, len(prompts[row]), len(reference[row]))
                seen |= {(block_size, n) for n in lengths}
    assert {(7, n) for n in range(1, 8)} <= seen  # 0..6 drafts accepted, plus the target's token


def test_finished_rows_stay_inside_the_cache(targets32, reference_fusion):
    target = targets32["qwen3"]
    prompts = [[50], SPEC_PROMPTS[2]]
    stop = decode(target, prompts, 1)[0][0][0]  # row 0 ends with its first token ...
    expected, _ = decode(target, prompts, 30, stop_ids=[stop])
    assert len(expected[0]) == 1 and len(expected[1]) > 10
    draft = scripted_draft(target, prompts, decode(target, prompts, 60)[0], 7, length=80)
    draft.accepted[0], draft.accepted[1] = 6, 0  # ... and would run 7 positions a step; row 1 goes 1 a step
    tokens, _ = decode(target, prompts, 30, draft, 7, stop_ids=[stop])
    assert tokens == expected
    # the longest row reaches max_new_tokens inside a block of 7 (6 tokens past its end) while the other runs on
    prompts = prompts[::-1]
    expected, _ = decode(target, prompts, 30)
    draft = scripted_draft(target, prompts, decode(target, prompts, 60)[0], 7, length=120)
    draft.accepted[0], draft.accepted[1] = 6, 0
    tokens, _ = decode(target, prompts, 30, draft, 7)
    assert tokens == expected


@pytest.mark.parametrize("model_type,fusion", [("gpt_oss", "layerwise"), ("qwen3_moe", "linear")])
def test_speculative_compiled_is_lossless(targets32, model_type, fusion, reference_fusion):
    target = targets32[model_type]
    steps = generate.compile_steps(torch.device("cpu"))
    prompts = SPEC_PROMPTS
    expected, _ = decode(target, prompts, 20)
    draft = scripted_draft(target, prompts, expected, 4)
    tokens, stats = decode(target, prompts, 20, draft, 4, steps=steps)
    assert tokens == expected
    assert stats["acceptance_lengths"][1] == scripted_acceptance(draft, 1, len(prompts[1]), 20)
    draft = make_draft(target, fusion, block_size=4)
    assert decode(target, prompts, 20, draft, 4, steps=steps)[0] == expected


def tiny_target(vocab_size=16, seed=0):
    """A small random Qwen3 with a tiny vocabulary: drafts and samplers are easy to check on it."""
    torch.manual_seed(seed)
    args = ModelArgs(model_type="qwen3", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                     max_position_embeddings=128, layer_types=("full_attention",) * 2)
    target = Transformer(args)
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)  # distributions neither flat nor one-hot
    return target.eval()


@pytest.mark.parametrize("fusion,seed", [("layerwise", 2), ("linear", 1)])
def test_static_step_matches_a_plain_loop(fusion, seed, reference_fusion):
    target = tiny_target(vocab_size=4)  # small enough that random drafts are often right
    draft = make_draft(target, fusion, block_size=5, seed=seed)
    prompts, n_new, bs = [[1, 2, 3, 0, 1, 0, 1], [3, 2, 1]], 30, 5
    tokens, stats = decode(target, prompts, n_new, draft, bs)
    capture = draft.args.target_layer_ids
    target.setup_caches(1, 96)
    for row, prompt in enumerate(prompts):
        # the loop recomputes the whole sequence every step: no caches, no padding, no masks by position
        with torch.no_grad():
            seq = prompt + [int(target(torch.tensor([prompt]), torch.arange(len(prompt))[None])[0][0, -1].argmax())]
            lengths = []
            while len(seq) - len(prompt) < n_new:
                anchor = len(seq) - 1
                _, hidden = target(torch.tensor([seq[:anchor]]), torch.arange(anchor)[None], capture=capture)
                block = torch.tensor([[seq[anchor]] + [draft.args.mask_token_id] * (bs - 1)])
                guesses = draft_block_logits(draft, target, hidden, block, anchor)[0].argmax(-1).tolist()
                logits, _ = target(torch.tensor([seq + guesses]), torch.arange(len(seq) + bs - 1)[None])
                choices = logits[0, anchor:].argmax(-1).tolist()
                n = 0
                while n < bs - 1 and guesses[n] == choices[n]:
                    n += 1
                committed = choices[:n + 1][:n_new - (len(seq) - len(prompt))]
                seq += committed
                lengths.append(len(committed))
        assert tokens[row] == seq[len(prompt):]
        assert stats["acceptance_lengths"][row] == lengths
    assert len(set(sum(stats["acceptance_lengths"], []))) >= 3  # drafts were accepted, in runs of several lengths


class FixedDraft(Draft):
    """Proposes from fixed logits per block position; context is ignored (and not computed)."""

    def write_context(self, hidden, positions):
        pass

    def block_logits(self, target, block_tokens, anchor_pos):
        return self.proposal_logits.expand(block_tokens.shape[0], -1, -1)


def chi_square_p_value(counts, probs, n):
    """p-value of observed counts against expected n * probs; cells expected below 5 are pooled."""
    expected = probs * n
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


@pytest.mark.parametrize("sampling", [generate.Sampling(1.0), generate.Sampling(0.7, top_k=3),
                                      generate.Sampling(1.0, top_p=0.8)], ids=["t1", "top_k", "top_p"])
def test_speculative_sampling_matches_the_target_distribution(sampling):
    V, N, prompt = 8, 24000, [1, 5, 2]
    target = tiny_target(vocab_size=V, seed=3)
    # exact probability of every 3-token continuation under the target (with the same temperature/top-k/top-p)
    with torch.no_grad():
        target.setup_caches(V * V, 8)
        grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [V*V, 2]
        seqs = torch.cat([torch.tensor(prompt).expand(V * V, -1), grid], 1)
        probs = generate.logits_to_probs(target(seqs, torch.arange(5).expand(V * V, -1))[0], sampling)
    p1, p2 = probs[0, 2], probs[torch.arange(0, V * V, V), 3]  # [V], [V(t1), V]
    p3 = probs[:, 4].view(V, V, V)  # [t1, t2, t3]
    exact = (p1[:, None, None] * p2[:, :, None] * p3).flatten()
    good = torch.stack([p2.log()[probs[0, 2].argmax()], p3.log()[p1.argmax(), p2[p1.argmax()].argmax()]])
    bad = torch.randn(2, V, generator=torch.Generator().manual_seed(0)) * 3  # unrelated to the target
    for proposal in (None, good, bad):
        draft = None
        if proposal is not None:
            draft = FixedDraft.for_target(target.args, num_layers=1, block_size=3, target_layer_ids=(1,))
            draft.proposal_logits = proposal.clamp(min=-30)[None]
        torch.manual_seed(1)
        tokens, stats = decode(target, [prompt] * N, 3, draft, 3, sampling=sampling)
        cells = torch.tensor(tokens) @ torch.tensor([V * V, V, 1])
        counts = torch.bincount(cells, minlength=V ** 3).float()
        assert counts[exact == 0].sum() == 0  # top-k / top-p: nothing outside the allowed set
        assert chi_square_p_value(counts, exact, N) > 1e-3
        if proposal is not None:  # the good draft is accepted far more often than the bad one
            tau = sum(map(sum, stats["acceptance_lengths"])) / sum(map(len, stats["acceptance_lengths"]))
            assert tau > 1.5 if proposal is good else tau < 1.5


# ---------------------------------------------------------------------------------------------------------------
# Speculative decoding from the command line

@pytest.fixture(scope="session")
def draft_folder(targets32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("draft")
    make_draft(targets32["qwen3"], "layerwise", block_size=8).save_pretrained(folder)
    return folder


def test_cli_speculative_json_and_report(targets, draft_folder, capsys, reference_fusion):
    folder, _ = targets["qwen3"]
    argv = ["--checkpoint", folder, "--prompt", "def f(x):", "--prompt", "import os", "--prompt", "class A",
            "--batch_size", 2, "--max_new_tokens", 16]
    ar = run_cli(capsys, *argv, "--json")
    rows = run_cli(capsys, *argv, "--json", "--draft", draft_folder, "--block_size", 4, "--compare_ar")
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ar]
    for row in rows:
        assert sum(row["acceptance_lengths"]) == len(row["tokens"]) - 1
        assert row["tau"] == pytest.approx(sum(row["acceptance_lengths"]) / len(row["acceptance_lengths"]))
        assert row["identical_to_ar"] and row["ar_tokens_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / row["ar_tokens_per_s"])
    generate.main([str(a) for a in argv + ["--draft", draft_folder, "--compare_ar"]])
    err = capsys.readouterr().err
    assert re.search(r"block 8: tau [\d.]+ tokens per draft\+verify step", err)
    assert re.search(r"\n +1 \| #+ +\d+", err)  # the histogram
    assert re.search(r"autoregressive [\d.]+ tokens/s \| speedup [\d.]+x \| greedy output identical to AR for 3/3",
                     err)


def test_cli_speculative_errors(targets, draft_folder, tmp_path, capsys):
    folder, _ = targets["qwen3"]
    with pytest.raises(InputError, match="--block_size 9 is larger than the draft's block size 8"):
        generate.main(["--checkpoint", str(folder), "--draft", str(draft_folder), "--block_size", "9"])
    with pytest.raises(InputError, match=r"\+ --max_new_tokens \(50\) \+ block size \(8\) exceeds --max_seq_len 60"):
        generate.main(["--checkpoint", str(folder), "--draft", str(draft_folder), "--max_new_tokens", "50",
                       "--max_seq_len", "60"])
    wide, _ = published_draft_folder(tmp_path / "wide", "layerwise", H=128)
    with pytest.raises(InputError, match="draft does not fit this target: hidden size 128 != target's 64"):
        generate.main(["--checkpoint", str(folder), "--draft", str(wide)])
    with pytest.raises(InputError, match="is not a draft folder"):
        generate.main(["--checkpoint", str(folder), "--draft", str(tmp_path)])
    for flags, message in [(["--compare_ar"], "need --draft"), (["--draft", "d", "--block_size", "1"], ">= 2")]:
        with pytest.raises(SystemExit):
            generate.parse_args(["--checkpoint", "x", *flags])
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# bench.py

import bench  # noqa: E402


def test_bench_prompt_sets(targets, draft_folder, tmp_path, capsys, reference_fusion):
    folder, _ = targets["qwen3"]
    tok = load_tokenizer(folder)
    for path in bench.DEFAULT_SETS:  # the shipped sets parse, as raw prompts or chats
        assert len(bench.read_prompt_set(path, tok, "qwen3", thinking=False)) >= 8
    chats = tmp_path / "mine.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n\n"
                     + json.dumps({"prompt": "import os"}) + "\n")
    results = bench.main(["--checkpoint", str(folder), "--draft", str(draft_folder), "--sets", str(chats),
                          "--max_new_tokens", "12", "--block_size", "4"])
    rows = results["mine"]
    assert [r["decoder"] for r in rows] == ["autoregressive", "DFlare 2L (draft0)"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["tau"] == 1.0
    assert rows[1]["identical_to_ar"] == 2 and rows[1]["tau"] >= 1.0
    out = capsys.readouterr().out
    assert "== mine: 2 prompts ==" in out and re.search(r"DFlare 2L \(draft0\) +[\d.]+ +[\d.]+ +[\d.]+x  2/2", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n{not json\n")
    with pytest.raises(InputError, match="bad.jsonl:2: expected a JSON object"):
        bench.read_prompt_set(bad, tok, "qwen3", thinking=False)


def test_bench_step_timings_run_on_cpu(capsys, reference_fusion):
    args = ModelArgs(model_type="qwen3", vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, intermediate_size=64, layer_types=("full_attention",) * 4)
    results = bench.bench_steps(args, draft_layers=(1, 2), device="cpu", dtype=torch.float32, compile=False,
                                context=16, block_size=4, iters=2)
    assert {"ar_ms", "DFlash 1L", "DFlare 1L", "DFlare 2L"} <= set(results)
    assert results["DFlare 2L"]["projected_speedup"] == pytest.approx(6.5 * results["ar_ms"]
                                                                      / results["DFlare 2L"]["step_ms"])
    assert "projected speedup at tau 6.5" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# prepare.py

import numpy as np  # noqa: E402

import prepare  # noqa: E402
import train  # noqa: E402

# QWEN3_STYLE_TEMPLATE for training: the same text, with transformers' {% generation %} marking what the assistant
# writes after the generation prompt (the empty think block belongs to the prompt when thinking is off)
QWEN3_TRAINING_TEMPLATE = QWEN3_TEMPLATE_HEAD + """\
    {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
      {%- set content = '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') %}
    {%- endif %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is false and content.startswith('<think>\\n\\n</think>\\n\\n') %}
      {{- '<think>\\n\\n</think>\\n\\n' }}{%- set content = content[19:] %}
    {%- endif %}
    {%- generation %}{{- content + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}
  {%- endif %}
{%- endfor %}"""

TRAINING_CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, héllo 🙂"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "\n4\n\n"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nb"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "  d  "}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "<think>r1</think>b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "<think>\nr2\n</think>\n\nd"}],
]


@pytest.mark.parametrize("thinking", [True, False])
def test_prepare_loss_mask_matches_the_chat_template(tok_file, thinking):
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    tok = BPETokenizer(tok_file)
    chat = {"model_type": "qwen3", "thinking": thinking, "reasoning_effort": "medium", "date": None}
    for messages in TRAINING_CONVERSATIONS:
        # the rendered text is the inference template's, and the mask is transformers' assistant mask
        text = hf_tok.apply_chat_template(messages, tokenize=False, chat_template=QWEN3_STYLE_TEMPLATE,
                                          enable_thinking=thinking)
        ref = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                         chat_template=QWEN3_TRAINING_TEMPLATE, enable_thinking=thinking)
        ids, mask = prepare.tokenize_conversation(tok, prepare.token_byte_lengths(tok), messages, chat)
        assert tok.decode(ids) == text
        assert ids.tolist() == ref["input_ids"]
        assert mask.tolist() == ref["assistant_masks"]
        assert tok.decode(ids[mask == 1]).count("<|im_end|>") == sum(m["role"] == "assistant" for m in messages)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_records(n, sharegpt_every=3):
    records = []
    for i in range(n):
        turns = [("user", f"question {i}?"), ("assistant", f"answer {i} " * (i % 4 + 1))]
        if i % sharegpt_every == 0:
            names = {"user": "human", "assistant": "gpt"}
            records.append({"conversations": [{"from": names[r], "value": c} for r, c in turns]})
        else:
            records.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    return records


def test_prepare_shards_round_trip_shuffle_and_resume(targets, tmp_path, capsys):
    folder, _ = targets["qwen3"]
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(11))
    argv = ["--target", str(folder), "--data", str(data), "--shard_size", "4", "--thinking", "off"]
    prepare.main(argv + ["--out", str(tmp_path / "a")])
    assert "prepared 11 samples in 3 shards" in capsys.readouterr().out
    tok = BPETokenizer(folder / "tokenizer.json")
    conversations, problems = prepare.read_conversations([data], regenerate=False)
    assert not problems and conversations[0][0] == {"role": "user", "content": "question 0?"}  # ShareGPT read
    order = np.random.default_rng(0).permutation(11)
    chat = {"model_type": "qwen3", "thinking": False, "reasoning_effort": "medium", "date": None}
    packed = prepare.PackedData(tmp_path / "a")
    assert len(packed) == 11
    for j, i in enumerate(order):
        ids, mask = prepare.tokenize_conversation(tok, prepare.token_byte_lengths(tok), conversations[i], chat)
        assert packed[j][0].tolist() == ids.tolist() and packed[j][1].tolist() == mask.tolist()
    assert packed.index["trained_tokens"] == sum(int(packed[j][1].sum()) for j in range(11))
    # resume: a complete shard is kept as it is, a missing one is written again, identically
    shard1 = (tmp_path / "a" / "shard_00001.tokens.npy").read_bytes()
    (tmp_path / "a" / "shard_00001.json").unlink()
    (tmp_path / "a" / "shard_00001.tokens.npy").write_bytes(b"half-written")
    prepare.main(argv + ["--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert "shard_00000: already written, skipped" in err and "shard_00001: already" not in err
    assert (tmp_path / "a" / "shard_00001.tokens.npy").read_bytes() == shard1
    with pytest.raises(InputError, match=r"prepared with other settings \(max_seq_len\)"):
        prepare.main(argv + ["--out", str(tmp_path / "a"), "--max_seq_len", "64"])
    # another seed, another order of the same samples
    packed = prepare.PackedData(tmp_path / "a")
    prepare.main(argv + ["--out", str(tmp_path / "b"), "--seed", "1"])
    other = prepare.PackedData(tmp_path / "b")
    first = sorted(packed[j][0].tolist() for j in range(11))
    assert sorted(other[j][0].tolist() for j in range(11)) == first
    assert [other[j][0].tolist() for j in range(11)] != [packed[j][0].tolist() for j in range(11)]
    # cut to --max_seq_len, and counted
    prepare.main(argv + ["--out", str(tmp_path / "c"), "--max_seq_len", "36"])
    assert max(len(prepare.PackedData(tmp_path / "c")[j][0]) for j in range(11)) == 36
    assert re.search(r"cut to --max_seq_len: [1-9]", capsys.readouterr().out)
    with pytest.raises(InputError, match="none has answer tokens within --max_seq_len"):
        prepare.main(argv + ["--out", str(tmp_path / "d"), "--max_seq_len", "20"])


def test_prepare_bad_input_is_reported_by_line(targets, tmp_path, capsys):
    folder, _ = targets["qwen3"]
    good = chat_records(3)
    data = write_jsonl(tmp_path / "chats.jsonl", [good[0], "{not json", good[1],
                                                  {"messages": [{"role": "robot", "content": "beep"}]},
                                                  {"messages": [{"role": "user", "content": "no answer"}]},
                                                  {"text": "plain"}, "", good[2], {"prompt": "x"},
                                                  {"prompt": "def f(", "completion": "x):"}])
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    argv = ["--target", str(folder), "--data", str(data), str(empty), "--out", str(tmp_path / "out")]
    with pytest.raises(InputError, match="6 bad lines or files in --data"):
        prepare.main(argv + ["--bad_lines", "error"])
    err = capsys.readouterr().err
    for expected in ["chats.jsonl:2: not valid JSON", "chats.jsonl:4: turn 0: unknown role 'robot'",
                     "chats.jsonl:5: no assistant turn to train on",
                     'chats.jsonl:6: expected an object with "messages", "conversations" or "prompt"',
                     'chats.jsonl:9: no "completion" to train on', "empty.jsonl: empty file"]:
        assert expected in err
    assert not (tmp_path / "out" / "index.json").exists()
    prepare.main(argv)  # skip (the default): the four good lines are kept
    assert "prepared 4 samples" in capsys.readouterr().out
    tok = BPETokenizer(folder / "tokenizer.json")
    raw = [prepare.PackedData(tmp_path / "out")[j] for j in range(4)]
    raw = [(ids, mask) for ids, mask in raw if ids.tolist() == tok.encode("def f(") + tok.encode("x):")]
    assert len(raw) == 1 and raw[0][1].tolist() == [0] * len(tok.encode("def f(")) + [1] * len(tok.encode("x):"))
    with pytest.raises(InputError, match="does not exist"):
        prepare.main(["--target", str(folder), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")])
    with pytest.raises(InputError, match="no usable conversation"):
        prepare.main(["--target", str(folder), "--data", str(empty), "--out", str(tmp_path / "y")])
    with pytest.raises(InputError, match="has no index.json: prepare the data with prepare.py first"):
        prepare.PackedData(tmp_path / "y")


def test_prepare_regenerate_uses_the_targets_own_answers(targets, targets32, tmp_path, reference_fusion):
    folder, _ = targets["qwen3"]
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "replaced"}]},
               {"conversations": [{"from": "human", "value": "import os"}]}, {"prompt": "def f(x):"}]
    data = write_jsonl(tmp_path / "prompts.jsonl", records)
    prepare.main(["--target", str(folder), "--data", str(data), "--out", str(tmp_path / "out"), "--regenerate",
                  "--max_new_tokens", "12", "--batch_size", "2", "--seed", "3"])
    tok = BPETokenizer(folder / "tokenizer.json")
    packed = prepare.PackedData(tmp_path / "out")
    order = np.random.default_rng(3).permutation(3)
    chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "import os"}]]
    for j, i in enumerate(order):
        prompt = tok.encode("def f(x):" if i == 2 else chat_prompt(chats[i], "qwen3"))
        answer, _ = decode(targets32["qwen3"], [prompt], 12, stop_ids=[tok.token_id("<|im_end|>")])
        ids, mask = packed[j]
        assert ids.tolist() == prompt + answer[0] and mask.tolist() == [0] * len(prompt) + [1] * len(answer[0])


# ---------------------------------------------------------------------------------------------------------------
# train.py

def run_train(argv, env=None, nproc=1):
    """train.py in a fresh process (torchrun for nproc > 1); returns stdout."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    result = subprocess.run(launcher + [os.path.join(HERE, "train.py"), *map(str, argv)], capture_output=True,
                            text=True, env={**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1",
                                            **(env or {})}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def step_losses(stdout):
    return {int(s): float(loss) for s, loss in re.findall(r"^step (\d+)/\d+ \| loss ([\d.]+)", stdout, re.M)}


@pytest.fixture(scope="session")
def train_data(targets, tmp_path_factory):
    folder, _ = targets["qwen3"]
    out = tmp_path_factory.mktemp("train_data")
    data = write_jsonl(out / "chats.jsonl", chat_records(40))
    prepare.main(["--target", str(folder), "--data", str(data), "--out", str(out / "data"), "--shard_size", "16",
                  "--thinking", "off"])
    return out / "data"


def train_argv(targets, train_data, out, *extra):
    return ["--target", targets["qwen3"][0], "--data", train_data, "--out", out, "--num_layers", 2,
            "--block_size", 4, "--num_anchors", 8, "--batch_size", 4, "--eval_samples", 8, "--lr", 3e-3,
            "--log_every", 1, "--eval_every", 1000, *extra]


def test_train_loss_falls_and_the_draft_decodes_losslessly(targets, train_data, tmp_path, capsys, reference_fusion):
    out = tmp_path / "draft"
    # bf16 autocast over fp32 weights
    stdout = run_train(train_argv(targets, train_data, out, "--max_steps", 12, "--micro_batch_size", 2,
                                  "--dtype", "bfloat16"))
    losses = step_losses(stdout)
    assert len(losses) == 12 and losses[12] < 0.6 * losses[1], losses
    evals = re.findall(r"eval step (\d+): loss ([\d.]+) \| accuracy ([\d.]+) \| estimated tau ([\d.]+) \| accuracy "
                       r"by block position ([\d. ]+)", stdout)
    assert [e[0] for e in evals] == ["0", "12"] and float(evals[1][1]) < float(evals[0][1])
    assert len(evals[1][4].split()) == 3  # block positions 1..3
    assert "saved step 12" in stdout and json.loads((out / "config.json").read_text())["block_size"] == 4
    folder, _ = targets["qwen3"]
    rows = run_cli(capsys, "--checkpoint", folder, "--draft", out, "--prompt", "question 3?", "--prompt", "hi",
                   "--chat", "--thinking", "off", "--max_new_tokens", 16, "--compare_ar", "--json")
    assert all(r["identical_to_ar"] for r in rows)


def test_training_step_runs_the_fusion_kernel(targets32, train_data, monkeypatch):
    """The training forward and backward go through the Triton kernel (interpreted here), as fast as the reference."""
    target = targets32["qwen3"]
    data = prepare.PackedData(train_data)
    samples = [data[0], data[1]]
    anchors = [train.sample_anchors(m, 4, 8, np.random.default_rng(i)) for i, (_, m) in enumerate(samples)]
    batch = train.make_batch(samples, anchors, 4, 7.0, "cpu")
    results = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        draft = make_draft(target, "layerwise", block_size=4)
        calls = []
        monkeypatch.setattr(FuseLayers, "apply", lambda *a, real=FuseLayers.apply: calls.append(1) or real(*a))
        loss, stats = train.block_loss(draft, draft, target, *batch, torch.autocast("cpu", enabled=False))
        loss.backward()
        assert len(calls) == (interpret == "1")
        results.append((loss.detach(), stats, {n: p.grad for n, p in draft.named_parameters()}))
    (loss, stats, grads), (ref_loss, ref_stats, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(stats, ref_stats)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5)


def test_train_two_processes_give_the_losses_of_one(targets, train_data, tmp_path):
    argv = train_argv(targets, train_data, tmp_path / "one", "--max_steps", 4)
    one = step_losses(run_train(argv))
    # one process accumulates 4 micro-batches of 1; two processes run one micro-batch of 2 each
    two = step_losses(run_train(train_argv(targets, train_data, tmp_path / "two", "--max_steps", 4,
                                           "--micro_batch_size", 2), nproc=2))
    assert len(one) == 4 and one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)


def test_train_resume_after_a_kill_reproduces_the_run(targets, train_data, tmp_path):
    full = step_losses(run_train(train_argv(targets, train_data, tmp_path / "full", "--max_steps", 40)))
    argv = train_argv(targets, train_data, tmp_path / "killed", "--max_steps", 40, "--save_every", 3)
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *map(str, argv)],
                               stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"})
    for line in process.stdout:
        if line.startswith("saved step"):
            process.kill()
            break
    process.wait()
    assert not (tmp_path / "killed" / "config.json").read_text() == ""
    resumed = run_train(argv + ["--resume"])
    start = int(re.search(r"resumed from .* at step (\d+)", resumed).group(1))
    assert 3 <= start < 40
    losses = step_losses(resumed)
    assert min(losses) == start + 1 and max(losses) == 40
    for step, loss in losses.items():
        assert loss == pytest.approx(full[step], rel=1e-6), step


def test_interrupted_save_leaves_the_last_checkpoint(targets, train_data, tmp_path, monkeypatch, reference_fusion):
    out = tmp_path / "run"
    run_train(train_argv(targets, train_data, out, "--max_steps", 2))
    before = {name: (out / name).read_bytes() for name in ("config.json", "model.safetensors", "train_state.pt")}
    draft = Draft.from_pretrained(out, dtype=torch.float32)
    state = torch.load(out / "train_state.pt", weights_only=True)
    optimizer = torch.optim.AdamW(draft.parameters())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(1.0)  # what a later step would save

    def killed_while_writing(real):
        def write(obj, path, *args, **kwargs):
            open(path, "wb").write(b"partial")
            raise KeyboardInterrupt

        return write

    import model as model_module

    for module, name in [(model_module, "save_file"), (train.torch, "save")]:
        with monkeypatch.context() as m:
            m.setattr(module, name, killed_while_writing(getattr(module, name)))
            with pytest.raises(KeyboardInterrupt):
                train.save_checkpoint(out, draft, optimizer, 3, train.parse_args(["--target", "t", "--data", "d",
                                                                                  "--out", str(out)]), torch.float32)
        assert (out / "train_state.pt").read_bytes() == before["train_state.pt"]
        assert torch.load(out / "train_state.pt", weights_only=True)["step"] == state["step"] == 2
    # the draft folder is whole: the old files, or (cut in train_state.pt) the complete new ones
    reloaded = Draft.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(reloaded.norm.weight, draft.norm.weight)
    assert "at step 2" in run_train(train_argv(targets, train_data, out, "--max_steps", 2, "--resume"))


def test_train_from_an_existing_draft(targets, train_data, draft_folder, tmp_path):
    argv = [str(a) for a in train_argv(targets, train_data, tmp_path / "run", "--init", draft_folder,
                                       "--max_steps", 1)]
    with pytest.raises(InputError, match="--block_size 4 differs from the --init draft's 8"):
        train.main(argv)
    run_train(argv + ["--block_size", "8"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dflash_config"] == \
        json.loads((draft_folder / "config.json").read_text())["dflash_config"]


def test_train_errors(targets, train_data, tmp_path):
    argv = train_argv(targets, train_data, tmp_path / "run")
    argv = [str(a) for a in argv]
    with pytest.raises(InputError, match="has no train_state.pt to resume from"):
        train.main(argv + ["--resume"])
    with pytest.raises(InputError, match=r"--batch_size 3 must be a multiple of processes \(1\) x --micro_batch_size"):
        train.main(argv + ["--batch_size", "3", "--micro_batch_size", "2"])
    with pytest.raises(InputError, match="fewer than one --batch_size 64"):
        train.main(argv + ["--batch_size", "64"])
    with pytest.raises(InputError, match="--block_size must be at least 2"):
        train.parse_args(argv + ["--block_size", "1"])
    with pytest.raises(InputError, match="has no index.json"):
        train.main([*argv, "--data", str(tmp_path)])
    run_train(argv + ["--max_steps", "1"])
    with pytest.raises(InputError, match="holds a training run: pass --resume"):
        train.main(argv)
    with pytest.raises(InputError, match=r"--resume with other settings than the saved run \(lr\)"):
        train.main(argv + ["--max_steps", "1", "--resume", "--lr", "1e-4"])


def counting_target(folder, tok_file):
    """A tiny Qwen3 trained (with transformers) to answer "count from d" by counting on from digit d: a greedy
    continuation that a draft can learn."""
    import transformers

    tok = BPETokenizer(tok_file)
    texts = [chat_prompt([{"role": "user", "content": f"count from {d}"}], "qwen3", thinking=False)
             + "".join(str((d + j) % 10) for j in range(40)) + "<|im_end|>" for d in range(10)]
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=tok.vocab_size, hidden_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, intermediate_size=128, num_hidden_layers=2,
                                   tie_word_embeddings=True, max_position_embeddings=512,
                                   eos_token_id=tok.token_id("<|im_end|>"))
    model = transformers.Qwen3ForCausalLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.tensor([tok.encode(t) for t in texts])
    for _ in range(150):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes(tok_file.read_bytes())


def test_trained_draft_reaches_high_tau_on_a_learnable_target(tok_file, tmp_path, capsys, reference_fusion):
    target = tmp_path / "target"
    counting_target(target, tok_file)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"messages": [{"role": "user", "content": f"count from {i % 10}"}]} for i in range(64)])
    prepare.main(["--target", str(target), "--data", str(prompts), "--out", str(tmp_path / "data"), "--regenerate",
                  "--thinking", "off", "--max_new_tokens", "40", "--batch_size", "32"])
    run_train(["--target", target, "--data", tmp_path / "data", "--out", tmp_path / "draft", "--num_layers", 2,
               "--block_size", 8, "--batch_size", 4, "--eval_samples", 8, "--epochs", 10, "--lr", 3e-3,
               "--eval_every", 1000])
    capsys.readouterr()
    rows = run_cli(capsys, "--checkpoint", target, "--draft", tmp_path / "draft", "--chat", "--thinking", "off",
                   "--prompt", "count from 4", "--prompt", "count from 7", "--max_new_tokens", 40, "--compare_ar",
                   "--json")
    for row, start in zip(rows, (4, 7)):
        assert row["identical_to_ar"] and row["text"] == "".join(str((start + j) % 10) for j in range(40))
        assert row["tau"] > 6.0, row["acceptance_lengths"]  # block 8: at most 8


# ---------------------------------------------------------------------------------------------------------------
# The embedded demo pair (demo.py builds it; generate.py and bench.py use it when given no --checkpoint)

def test_demo_target_is_a_transformers_checkpoint():
    """demo.save_target writes a Hugging Face Qwen3 folder: transformers reads it and computes our logits."""
    import transformers

    folder = generate.DEMO / "target"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_checkpoint(folder, dtype=torch.float32)
    tokens = torch.tensor([load_tokenizer(folder).encode(generate.DEMO_PROMPT + "    with open(src) as f:\n")])
    ours.setup_caches(1, tokens.shape[1])
    logits, _ = ours(tokens, torch.arange(tokens.shape[1])[None])
    with torch.no_grad():
        torch.testing.assert_close(logits, hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_demo_runs_by_default_and_is_lossless(capsys, reference_fusion):
    rows = run_cli(capsys, "--json", "--max_new_tokens", 48)  # no --checkpoint: demo/target + demo/dflare vs AR
    assert len(rows) == 1 and rows[0]["identical_to_ar"] and rows[0]["tau"] > 2, rows
    folder = generate.DEMO / "target"
    tok = load_tokenizer(folder)
    prompts = bench.read_prompt_set(bench.HERE / "prompts" / "demo.jsonl", tok, "qwen3", thinking=False)[:4]
    target = load_checkpoint(folder, dtype=torch.float32)
    expected, _ = decode(target, prompts, 32)
    for name in ("dflare", "dflash", "dflare-1l"):
        draft = Draft.from_pretrained(generate.DEMO / name, dtype=torch.float32)
        tokens, stats = decode(target, prompts, 32, draft, draft.args.block_size)
        assert tokens == expected, name


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the demo's prompts were cut from Python 3.11.7's "
                    "standard library; another version's sources give other prompts")
def test_demo_rebuild_draws_the_committed_prompts():
    """demo.py draws the prompts the committed pair was built from: the held-out set in prompts/demo.jsonl and the
    draft-training prompts (pinned by their hash; demo/draft_prompts.jsonl is not committed)."""
    import hashlib

    import demo

    eval_prompts, draft_prompts = demo.demo_prompts(*demo.stdlib_files(), demo.parse_args([]).draft_prompts)
    assert eval_prompts == [json.loads(line) for line in demo.PROMPTS.read_text().splitlines()]
    text = "".join(json.dumps(r) + "\n" for r in draft_prompts)
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "e4d0d8adc7666111a1cd7e7954bb97e0a790c2be0df887c20d16efa859ebb4d0"
