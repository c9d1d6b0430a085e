"""DFlare layer fusion in one Triton kernel, its backward, and the PyTorch reference (DESIGN.md section 2):

    out[n, d] = rmsnorm(sum_t softmax(W[d])_t * X[n, t]) * gamma      X [N, T, H], W [D, T], out [N, D, H]

The entry point is the operator dflare::fuse_layers; gpu_check.part_fusion times it against the reference."""
import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
    HAVE_TRITON = True
except ImportError:  # Triton has no wheels for macOS and Windows: the PyTorch fusion runs there
    HAVE_TRITON = False


def fuse_layers_reference(x, fusion_logits, gamma, eps):
    """x [N, T, H], fusion_logits [D, T], gamma [H] -> [N, D, H] in x's dtype; computed in fp32 (or fp64)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    weights = torch.softmax(fusion_logits.to(compute), dim=-1)
    mixed = torch.einsum("dt,nth->ndh", weights, x.to(compute))
    normed = mixed * torch.rsqrt(mixed.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * gamma.to(compute)).to(x.dtype)


if HAVE_TRITON:
    @triton.jit
    def _softmax_stats(w_ptr, T, BLOCK_T: tl.constexpr):
        """Max and sum of exp(w - max) over the T logits at w_ptr: softmax(w)_t = exp(w_t - max) / sum."""
        offs_t = tl.arange(0, BLOCK_T)
        w = tl.load(w_ptr + offs_t, mask=offs_t < T, other=float("-inf")).to(tl.float32)
        w_max = tl.max(w, axis=0)
        return w_max, tl.sum(tl.exp(w - w_max), axis=0)

    @triton.jit
    def _mix(x_ptr, w_ptr, w_max, w_sum, T, H, BLOCK_H: tl.constexpr):
        """sum_t softmax(w)_t * X[t, :] over the [T, H] rows at x_ptr -> a [BLOCK_H] fp32 vector."""
        offs_h = tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for t in range(T):
            w_t = tl.exp(tl.load(w_ptr + t).to(tl.float32) - w_max) / w_sum
            acc += w_t * tl.load(x_ptr + t * H + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        return acc

    # only H's divisibility by 16 changes the code (vector loads): no recompiles for new N, T or D
    @triton.jit(do_not_specialize=["T", "D"])
    def _fuse_forward_kernel(x_ptr, w_ptr, gamma_ptr, out_ptr, T, H, D, eps,
                             BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        # program n * D + d (launch_config); 64-bit, as n * T * H can pass 2^31 (DESIGN.md section 2)
        pid = tl.program_id(0).to(tl.int64)
        n, d = pid // D, pid % D
        eps = tl.cast(eps, tl.float32)  # Inductor passes a float as fp64 (DESIGN.md section 8)
        offs_h = tl.arange(0, BLOCK_H)
        w_max, w_sum = _softmax_stats(w_ptr + d * T, T, BLOCK_T)
        mixed = _mix(x_ptr + n * T * H, w_ptr + d * T, w_max, w_sum, T, H, BLOCK_H)
        rstd = 1.0 / tl.sqrt(tl.sum(mixed * mixed, axis=0) / H + eps)
        gamma = tl.load(gamma_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        out = mixed * rstd * gamma
        tl.store(out_ptr + pid * H + offs_h, out.to(out_ptr.dtype.element_ty), mask=offs_h < H)

    @triton.jit(do_not_specialize=["N", "T", "D"])
    def _fuse_backward_kernel(x_ptr, w_ptr, gamma_ptr, grad_out_ptr, grad_mix_ptr, grad_gamma_ptr,
                              N, T, H, D, eps, TOKENS_PER_PROGRAM,
                              BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        """For draft layer d and a chunk of tokens: partial sums over the chunk of
        dL/d(mixture weight t) = <dL/dmixed, X[n, t]> and of dL/dgamma = grad_out * normed."""
        pid = tl.program_id(0).to(tl.int64)
        chunk, d = pid // D, pid % D
        eps = tl.cast(eps, tl.float32)  # as in the forward
        offs_h = tl.arange(0, BLOCK_H)
        offs_t = tl.arange(0, BLOCK_T)
        w_max, w_sum = _softmax_stats(w_ptr + d * T, T, BLOCK_T)
        gamma = tl.load(gamma_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        grad_mix = tl.zeros([BLOCK_T], dtype=tl.float32)
        grad_gamma = tl.zeros([BLOCK_H], dtype=tl.float32)
        for i in range(TOKENS_PER_PROGRAM):
            n = chunk * TOKENS_PER_PROGRAM + i
            if n < N:
                x_n = x_ptr + n * T * H
                mixed = _mix(x_n, w_ptr + d * T, w_max, w_sum, T, H, BLOCK_H)
                rstd = 1.0 / tl.sqrt(tl.sum(mixed * mixed, axis=0) / H + eps)
                g = tl.load(grad_out_ptr + (n * D + d) * H + offs_h, mask=offs_h < H,
                            other=0.0).to(tl.float32)
                grad_gamma += g * mixed * rstd
                gy = g * gamma
                grad_mixed = rstd * (gy - mixed * (tl.sum(gy * mixed, axis=0) * rstd * rstd / H))
                for t in range(T):
                    x = tl.load(x_n + t * H + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
                    grad_mix += tl.where(offs_t == t, tl.sum(grad_mixed * x, axis=0), 0.0)
        tl.store(grad_mix_ptr + pid * T + offs_t, grad_mix, mask=offs_t < T)
        tl.store(grad_gamma_ptr + pid * H + offs_h, grad_gamma, mask=offs_h < H)


TOKENS_PER_PROGRAM = 64


def launch_config(N, T, H, D):
    """(forward grid, backward grid, meta-parameters) for x [N, T, H] and D draft layers, as the tests compile
    them; programs (token or chunk, draft layer) on axis 0, draft layer fastest (DESIGN.md section 2)."""
    block_h = triton.next_power_of_2(H)
    meta = dict(BLOCK_T=triton.next_power_of_2(T), BLOCK_H=block_h, num_warps=min(max(block_h // 256, 1), 16))
    return (N * D,), (triton.cdiv(N, TOKENS_PER_PROGRAM) * D,), meta


def on_device(x):
    """Triton launches on the current CUDA device: make that x's (cuda:LOCAL_RANK, say), not cuda:0."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def launch_forward(x, fusion_logits, gamma, eps):
    """The forward kernel on x [N, T, H]: out [N, D, H] in x's dtype."""
    N, T, H = x.shape
    D = fusion_logits.shape[0]
    out = x.new_empty(N, D, H)
    grid, _, meta = launch_config(N, T, H, D)
    with on_device(x):
        wrap_triton(_fuse_forward_kernel)[grid](x.contiguous(), fusion_logits.contiguous(),
                                                gamma.contiguous(), out, T, H, D, eps, **meta)
    return out


def launch_backward(x, fusion_logits, gamma, grad_out, eps):
    """The backward kernel's per-chunk sums, added up: dL/d(mixture weights) [D, T], dL/dgamma [H] in fp32."""
    N, T, H = x.shape
    D = fusion_logits.shape[0]
    chunks = triton.cdiv(N, TOKENS_PER_PROGRAM)
    grad_mix = x.new_empty(chunks, D, T, dtype=torch.float32)
    grad_gamma = x.new_empty(chunks, D, H, dtype=torch.float32)
    _, grid, meta = launch_config(N, T, H, D)
    with on_device(x):
        wrap_triton(_fuse_backward_kernel)[grid](x.contiguous(), fusion_logits.contiguous(),
                                                 gamma.contiguous(), grad_out.contiguous(), grad_mix,
                                                 grad_gamma, N, T, H, D, eps, TOKENS_PER_PROGRAM, **meta)
    return grad_mix.sum(0), grad_gamma.sum((0, 1))


def backward_reference(x, fusion_logits, gamma, grad_out, eps):
    """What launch_backward computes, in PyTorch (fp32, or fp64 for fp64 inputs)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x = x.to(compute)
    weights = torch.softmax(fusion_logits.to(compute), dim=-1)
    mixed = torch.einsum("dt,nth->ndh", weights, x)
    rstd = torch.rsqrt(mixed.pow(2).mean(-1, keepdim=True) + eps)
    g = grad_out.to(compute)
    gy = g * gamma.to(compute)
    grad_mixed = rstd * (gy - mixed * (gy * mixed).sum(-1, keepdim=True) * rstd.pow(2) / x.shape[-1])
    return torch.einsum("ndh,nth->dt", grad_mixed, x), (g * mixed * rstd).sum((0, 1))


def use_kernel(x) -> bool:
    """The Triton kernels run on CUDA tensors, and on CPU ones under TRITON_INTERPRET=1 (the tests) outside
    compiled graphs (the interpreter needs real data)."""
    return x.is_cuda or (triton_interpreted() and not torch.compiler.is_compiling())


if HAVE_TRITON:
    @torch.library.triton_op("dflare::fuse_layers", mutates_args=())
    def fuse_layers(x: torch.Tensor, fusion_logits: torch.Tensor, gamma: torch.Tensor,
                    eps: float) -> torch.Tensor:
        """The fusion [N, T, H] -> [N, D, H] as one operator: kernel on CUDA, reference on CPU."""
        if use_kernel(x):
            return launch_forward(x, fusion_logits, gamma, eps)
        return fuse_layers_reference(x, fusion_logits, gamma, eps)

    @torch.library.triton_op("dflare::fuse_layers_backward", mutates_args=())
    def fuse_layers_backward(x: torch.Tensor, fusion_logits: torch.Tensor, gamma: torch.Tensor,
                             grad_out: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """fuse_layers' dL/d(mixture weights) [D, T] and dL/dgamma [H]."""
        if use_kernel(x):
            return launch_backward(x, fusion_logits, gamma, grad_out, eps)
        return backward_reference(x, fusion_logits, gamma, grad_out, eps)

    def save_inputs(ctx, inputs, output):
        x, fusion_logits, gamma, eps = inputs
        ctx.save_for_backward(x, fusion_logits, gamma)
        ctx.eps = eps

    def fuse_layers_grad(ctx, grad_out):
        """X is the frozen target's: gradients for the fusion logits and gamma only."""
        x, fusion_logits, gamma = ctx.saved_tensors
        grad_weights, grad_gamma = fuse_layers_backward(x, fusion_logits, gamma, grad_out, ctx.eps)
        weights = torch.softmax(fusion_logits.to(grad_weights.dtype), dim=-1)
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True))
        return None, grad_logits.to(fusion_logits.dtype), grad_gamma.to(gamma.dtype), None

    fuse_layers.register_autograd(fuse_layers_grad, setup_context=save_inputs)
else:
    fuse_layers = fuse_layers_reference


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
