"""Sampling from logits: greedy (temperature 0), or temperature with top-k / top-p (top_k 0, top_p 1: off),
drawn without a host sync."""
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def logits_to_probs(logits, s: Sampling):
    """logits [..., V] -> fp32 probabilities after temperature, top-k and top-p (nucleus)."""
    logits = logits.float() / max(s.temperature, 1e-5)
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= s.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits, s: Sampling):
    """logits [..., V] -> token ids [...] and the fp32 distribution p (None: greedy); argmax of p / Exp(1)."""
    if s.temperature == 0:
        return logits.argmax(-1), None
    probs = logits_to_probs(logits, s)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1), probs
