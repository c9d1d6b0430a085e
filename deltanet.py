"""Gated DeltaNet: the linear-attention layers of Qwen3.5 / Qwen3.6 targets (DESIGN.md section 11).

Such a layer keeps a state per row instead of a KV cache: the last K-1 inputs of its causal convolution and a
recurrent matrix per value head. A long input (a prefill) runs the chunked form of the gated delta rule; a
decoding step (a token, a block, a tree) runs the recurrence token by token, as autoregressive decoding does,
keeps the state after every token, and the step keeps the row's state after its last accepted token
(`RecurrentState.keep`)."""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from invariant_kernel import linear


class Recurrence(NamedTuple):
    """How a forward meets the recurrent state: restart [B] (rows at position 0 start from zero), keep_at [B]
    (the token whose state each row keeps; None: the caller picks later, as a tree step does) and parent
    [B, S] (a tree's: each token's predecessor, -1 for the committed state; None: a chain)."""
    restart: torch.Tensor
    keep_at: torch.Tensor | None
    parent: torch.Tensor | None


class RecurrentState(nn.Module):
    """A layer's committed state, conv [B, K-1, C] (model dtype) and state [B, Hv, Dk, Dv] (fp32), and the
    state after each token of the last decoding step, step_conv [B, N, K-1, C] and step_state [B, N, ...]."""

    def __init__(self, batch_size, conv_shape, state_shape, step_tokens, dtype, device=None):
        super().__init__()
        for name, shape, dt in (("conv", (batch_size, *conv_shape), dtype),
                                ("state", (batch_size, *state_shape), torch.float32),
                                ("step_conv", (batch_size, step_tokens, *conv_shape), dtype),
                                ("step_state", (batch_size, step_tokens, *state_shape), torch.float32)):
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device), persistent=False)

    def keep(self, index):
        """Make each row's state the one after its step token index [B]."""
        for name in ("conv", "state"):
            step = getattr(self, "step_" + name)
            picked = step.gather(1, index.view(-1, *[1] * (step.dim() - 1)).expand(-1, 1, *step.shape[2:]))
            getattr(self, name).copy_(picked[:, 0])


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output (no offset on the weight), times SiLU of the output gate."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, gate):
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (self.weight * normed * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        H, K = args.hidden_size, args.linear_conv_kernel_dim
        Hk, Hv = args.linear_num_key_heads, args.linear_num_value_heads
        Dk, Dv = args.linear_key_head_dim, args.linear_value_head_dim
        self.conv_dim = 2 * Hk * Dk + Hv * Dv
        self.in_proj_qkv = nn.Linear(H, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(H, Hv * Dv, bias=False)
        self.in_proj_b = nn.Linear(H, Hv, bias=False)
        self.in_proj_a = nn.Linear(H, Hv, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, K, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(Hv))
        self.A_log = nn.Parameter(torch.zeros(Hv))
        self.norm = GatedRMSNorm(Dv, args.rms_norm_eps)
        self.out_proj = nn.Linear(Hv * Dv, H, bias=False)
        self.cache = None

    def make_cache(self, batch_size, step_tokens, dtype, device):
        a = self.args
        return RecurrentState(batch_size, (a.linear_conv_kernel_dim - 1, self.conv_dim), self.state_shape(),
                              max(step_tokens, 1), dtype, device)

    def forward(self, x, recurrence: Recurrence | None, invariant: bool = False):
        """x [B, S, H] -> [B, S, H]. recurrence None: whole sequences from a zero state, nothing kept
        (training); else the state in self.cache is read and kept as recurrence says."""
        B, S, _ = x.shape
        a = self.args
        mixed = linear(self.in_proj_qkv, x, invariant)  # [B, S, C]: the convolution's inputs
        gate = linear(self.in_proj_z, x, invariant).view(B, S, a.linear_num_value_heads, -1)
        beta_in, decay_in = linear(self.in_proj_b, x, invariant), linear(self.in_proj_a, x, invariant)
        cache = self.cache if recurrence is not None else None
        if cache is None:
            history = mixed.new_zeros(B, a.linear_conv_kernel_dim - 1, self.conv_dim)
            state = mixed.new_zeros(B, *self.state_shape(), dtype=torch.float32)
        else:
            fresh = recurrence.restart.view(-1, 1, 1)
            history = torch.where(fresh, 0, cache.conv)
            state = torch.where(fresh[..., None], 0, cache.state)
        by_token = recurrence is not None and (recurrence.parent is not None or S <= cache.step_conv.shape[1])
        if by_token:
            windows, weight = conv_windows(history, mixed, recurrence.parent), self.conv1d.weight[:, 0]
            if invariant:  # each token's inputs apart, on tensors shaped as a lone token's: CPU kernels of
                # elementwise functions (softplus) round by the tensor's size, and the state would drift
                tokens = [self.token_inputs(convolve(windows[:, i].contiguous(), weight),
                                            beta_in[:, i].contiguous(), decay_in[:, i].contiguous())
                          for i in range(S)]
            else:
                inputs = self.token_inputs(convolve(windows, weight), beta_in, decay_in)
                tokens = list(zip(*(t.unbind(1) for t in inputs)))
            out, states = recurrent_delta_rule(tokens, state, recurrence.parent)
            cache.step_conv[:, :S] = windows[:, :, 1:]
            cache.step_state[:, :S] = states
            if recurrence.keep_at is not None:
                cache.keep(recurrence.keep_at)
        else:
            convolved = F.conv1d(torch.cat([history, mixed], 1).transpose(1, 2), self.conv1d.weight,
                                 groups=self.conv_dim)
            q, k, v, beta, decay = self.token_inputs(convolved.transpose(1, 2), beta_in, decay_in)
            if cache is not None:  # positions past each row's kept token leave the state as it is
                past = torch.arange(S, device=x.device) > recurrence.keep_at[:, None]
                beta, decay = beta.masked_fill(past[..., None], 0), decay.masked_fill(past[..., None], 0)
            out, state = chunked_delta_rule(q, k, v, beta, decay, state)
            if cache is not None:
                ends = recurrence.keep_at[:, None] + torch.arange(1, a.linear_conv_kernel_dim,
                                                                  device=x.device)
                inputs = torch.cat([history, mixed], 1)
                cache.conv.copy_(inputs.gather(1, ends[..., None].expand(-1, -1, self.conv_dim)))
                cache.state.copy_(state)
        y = self.norm(out.to(x.dtype), gate)  # [B, S, Hv, Dv]
        return linear(self.out_proj, y.flatten(2), invariant)

    def state_shape(self):
        a = self.args
        return a.linear_num_value_heads, a.linear_key_head_dim, a.linear_value_head_dim

    def token_inputs(self, convolved, beta_in, decay_in):
        """The delta rule's inputs, fp32: convolved [..., C] (before its SiLU), beta_in, decay_in [..., Hv]
        (in_proj_b's and in_proj_a's outputs)
        -> q, k [..., Hv, Dk] (L2-normed, q scaled, each shared by Hv / Hk value heads), v [..., Hv, Dv],
        beta and decay (the log of the state's decay, <= 0) [..., Hv]."""
        a = self.args
        q, k, v = F.silu(convolved).float().split([a.linear_num_key_heads * a.linear_key_head_dim] * 2
                                                  + [a.linear_num_value_heads * a.linear_value_head_dim], -1)
        rep = a.linear_num_value_heads // a.linear_num_key_heads
        q, k = (l2_normed(t.unflatten(-1, (a.linear_num_key_heads, -1))).repeat_interleave(rep, dim=-2)
                for t in (q, k))
        decay = -self.A_log.float().exp() * F.softplus(decay_in.float() + self.dt_bias)
        return (q * a.linear_key_head_dim ** -0.5, k, v.unflatten(-1, (a.linear_num_value_heads, -1)),
                beta_in.sigmoid().float(), decay)


def l2_normed(x, eps: float = 1e-6):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def conv_windows(history, new, parent):
    """The K inputs each new token's convolution reads, oldest first: history [B, K-1, C] (before the first
    token), new [B, S, C] -> [B, S, K, C]. parent [B, S] (a tree; -1: the history): a token's window runs
    through its ancestors; None: the tokens are a chain."""
    K, S = history.shape[1] + 1, new.shape[1]
    inputs = torch.cat([history, new], dim=1)  # [B, K-1+S, C]; token s at K-1+s
    if parent is None:
        return inputs.unfold(1, K, 1).transpose(2, 3)
    B, C = new.shape[0], new.shape[2]
    # each entry's predecessor in inputs: the history's is the one before it, a token's its parent's
    before = torch.cat([torch.arange(-1, K - 2, device=new.device).expand(B, -1), K - 1 + parent], dim=1)
    index = [K - 1 + torch.arange(S, device=new.device).expand(B, -1)]
    for _ in range(K - 1):
        index.insert(0, before.gather(1, index[0]))
    index = torch.stack(index, dim=2)  # [B, S, K]
    return inputs.gather(1, index.flatten(1)[..., None].expand(-1, -1, C)).view(B, S, K, C)


def convolve(windows, weight):
    """Depthwise convolution of windows [..., K, C] with weight [C, K], in fp32, multiply-adds in a fixed
    order."""
    acc = windows[..., 0, :].float() * weight[:, 0].float()
    for j in range(1, windows.shape[-2]):
        acc = acc + windows[..., j, :].float() * weight[:, j].float()
    return acc.to(windows.dtype)


def delta_step(state, q, k, v, beta, decay):
    """One token: state [B, Hv, Dk, Dv], q, k [B, Hv, Dk], v [B, Hv, Dv], beta, decay [B, Hv] -> the state
    after the token and its output [B, Hv, Dv]."""
    state = state * decay.exp()[..., None, None]
    recalled = (state * k[..., None]).sum(-2)  # what the state holds for k, [B, Hv, Dv]
    state = state + k[..., None] * ((v - recalled) * beta[..., None])[..., None, :]
    return state, (state * q[..., None]).sum(-2)


def recurrent_delta_rule(tokens, state, parent=None):
    """Token by token, as decoding runs: tokens, S tuples of delta_step's inputs (q, k, v, beta, decay), and
    the state before the first -> outputs [B, S, Hv, Dv] and the state after each token [B, S, Hv, Dk, Dv].
    parent [B, S]: a tree, each token continuing its parent's state (-1: the given one); None: a chain."""
    B, S = state.shape[0], len(tokens)
    states = state.new_empty(B, S + 1, *state.shape[1:])
    states[:, 0] = state
    outputs = []
    for i, inputs in enumerate(tokens):
        if parent is not None:
            index = (parent[:, i] + 1).view(B, 1, 1, 1, 1).expand(-1, 1, *state.shape[1:])
            state = states.gather(1, index)[:, 0]
        state, out = delta_step(state, *inputs)
        states[:, i + 1] = state
        outputs.append(out)
    return torch.stack(outputs, dim=1), states[:, 1:]


def chunked_delta_rule(q, k, v, beta, decay, state, chunk: int = 64):
    """Whole sequences, as recurrent_delta_rule computes them (but the state only at the end), a chunk of
    tokens at a time: within a chunk the tokens' updates solve one triangular system (DESIGN.md
    section 11)."""
    B, S, Hv, Dk = k.shape
    pad = -S % chunk
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    beta, decay = (F.pad(t, (0, 0, 0, pad)) for t in (beta, decay))  # padding: beta 0, decay 1
    n = (S + pad) // chunk
    # [B, Hv, n, chunk, D] and [B, Hv, n, chunk]
    q, k, v = (t.view(B, n, chunk, Hv, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))
    beta = beta.view(B, n, chunk, Hv).permute(0, 3, 1, 2)
    log_gamma = decay.view(B, n, chunk, Hv).permute(0, 3, 1, 2).cumsum(-1)  # decay since the chunk began
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    ratio = (log_gamma[..., :, None] - log_gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    system = (beta[..., None] * (k @ k.transpose(-1, -2)) * ratio).tril(-1)  # unit lower triangular, less I
    system = system + torch.eye(chunk, device=q.device)
    solve = lambda rhs: torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # noqa
    written_v = solve(beta[..., None] * v)  # the updates u = written_v - written_k @ (chunk's first state)
    written_k = solve((beta * log_gamma.exp())[..., None] * k)
    attend = (q @ k.transpose(-1, -2)) * ratio
    q_decayed = q * log_gamma.exp()[..., None]
    k_to_end = k * (log_gamma[..., -1:] - log_gamma).exp()[..., None]
    outputs = []
    for c in range(n):
        u = written_v[:, :, c] - written_k[:, :, c] @ state
        outputs.append(q_decayed[:, :, c] @ state + attend[:, :, c] @ u)
        state = state * log_gamma[:, :, c, -1:, None].exp() + k_to_end[:, :, c].transpose(-1, -2) @ u
    out = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :S]  # [B, Hv, S, Dv]
    return out.transpose(1, 2), state
