"""DFlare layer fusion in one Triton kernel, its backward, and the plain PyTorch reference (DESIGN.md section 2).

    out[n, d] = rmsnorm(sum_t softmax(W[d])_t * X[n, t]) * gamma        X [N, T, H], W [D, T], out [N, D, H]

Every draft layer d reads its own softmax mixture of the T captured target layers, normalised by the shared
hidden_norm (gamma). One program computes one (draft layer, token) row over the whole hidden size, so the RMS needs
no second pass; programs of the same token run next to each other and share X[n] through the L2 cache.
X is the frozen target's: the backward returns gradients for W and gamma only.

`python fuse_kernel.py` benchmarks the kernel against the reference and torch.compile of the reference.
"""
import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # Triton has no wheels for macOS and Windows: the PyTorch fusion runs there
    HAVE_TRITON = False


def fuse_layers_reference(x, fusion_logits, gamma, eps):
    """x [N, T, H], fusion_logits [D, T], gamma [H] -> [N, D, H] in x's dtype; computed in fp32 (or fp64)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    weights = torch.softmax(fusion_logits.to(compute), dim=-1)  # [D, T]
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
        """sum_t softmax(w)_t * X[t, :] over the [T, H] rows at x_ptr, as a [BLOCK_H] fp32 vector. Each weight is a
        scalar load of its logit: picking it out of a [BLOCK_T] vector would be a block-wide reduction per t."""
        offs_h = tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for t in range(T):
            w_t = tl.exp(tl.load(w_ptr + t).to(tl.float32) - w_max) / w_sum
            acc += w_t * tl.load(x_ptr + t * H + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        return acc

    # Of the ints only H's divisibility by 16 changes the code (vector loads): no recompiles for new N, T or D
    @triton.jit(do_not_specialize=["T", "D"])
    def _fuse_forward_kernel(x_ptr, w_ptr, gamma_ptr, out_ptr, T, H, D, eps,
                             BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        # program n * D + d (see launch_config); 64-bit, as n * T * H passes 2^31 from N = 14,564 at T=36, H=4096
        pid = tl.program_id(0).to(tl.int64)
        n, d = pid // D, pid % D
        offs_h = tl.arange(0, BLOCK_H)
        w_max, w_sum = _softmax_stats(w_ptr + d * T, T, BLOCK_T)
        mixed = _mix(x_ptr + n * T * H, w_ptr + d * T, w_max, w_sum, T, H, BLOCK_H)
        rstd = 1.0 / tl.sqrt(tl.sum(mixed * mixed, axis=0) / H + eps)
        gamma = tl.load(gamma_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        out = mixed * rstd * gamma
        tl.store(out_ptr + pid * H + offs_h, out.to(out_ptr.dtype.element_ty), mask=offs_h < H)  # out[n, d]

    @triton.jit(do_not_specialize=["N", "T", "D"])
    def _fuse_backward_kernel(x_ptr, w_ptr, gamma_ptr, grad_out_ptr, grad_mix_ptr, grad_gamma_ptr,
                              N, T, H, D, eps, TOKENS_PER_PROGRAM,
                              BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        """For draft layer d and a chunk of tokens: partial sums over the chunk of
        dL/d(mixture weight t) = <dL/dmixed, X[n, t]> and of dL/dgamma = grad_out * normed."""
        pid = tl.program_id(0).to(tl.int64)  # chunk * D + d, 64-bit as in the forward
        chunk, d = pid // D, pid % D
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
                g = tl.load(grad_out_ptr + (n * D + d) * H + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
                grad_gamma += g * mixed * rstd
                gy = g * gamma
                # RMSNorm backward: d mixed = rstd * (gy - mixed * <gy, mixed> * rstd^2 / H)
                grad_mixed = rstd * (gy - mixed * (tl.sum(gy * mixed, axis=0) * rstd * rstd / H))
                for t in range(T):
                    x = tl.load(x_n + t * H + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
                    grad_mix += tl.where(offs_t == t, tl.sum(grad_mixed * x, axis=0), 0.0)
        tl.store(grad_mix_ptr + pid * T + offs_t, grad_mix, mask=offs_t < T)  # grad_mix[chunk, d]
        tl.store(grad_gamma_ptr + pid * H + offs_h, grad_gamma, mask=offs_h < H)


TOKENS_PER_PROGRAM = 64


def launch_config(N, T, H, D):
    """(forward grid, backward grid, meta-parameters) of the kernels for x [N, T, H] and D draft layers; the tests
    compile exactly these. The (token or token chunk, draft layer) programs are flattened onto grid axis 0, which
    takes 2^31 - 1 programs (axis 1 stops at 65,535), with the draft layer fastest: programs of the same tokens run
    together and share their X rows through the L2 cache."""
    block_h = triton.next_power_of_2(H)
    meta = dict(BLOCK_T=triton.next_power_of_2(T), BLOCK_H=block_h, num_warps=min(max(block_h // 256, 1), 16))
    return (N * D,), (triton.cdiv(N, TOKENS_PER_PROGRAM) * D,), meta


def on_device(x):
    """Triton launches on the current CUDA device: make that x's (cuda:LOCAL_RANK, say), not cuda:0."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class FuseLayers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fusion_logits, gamma, eps):
        N, T, H = x.shape
        D = fusion_logits.shape[0]
        x, fusion_logits, gamma = x.contiguous(), fusion_logits.contiguous(), gamma.contiguous()
        out = torch.empty(N, D, H, dtype=x.dtype, device=x.device)
        grid, _, meta = launch_config(N, T, H, D)
        with on_device(x):
            _fuse_forward_kernel[grid](x, fusion_logits, gamma, out, T, H, D, eps, **meta)
        ctx.save_for_backward(x, fusion_logits, gamma)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, fusion_logits, gamma = ctx.saved_tensors
        N, T, H = x.shape
        D = fusion_logits.shape[0]
        chunks = triton.cdiv(N, TOKENS_PER_PROGRAM)
        grad_mix = torch.empty(chunks, D, T, dtype=torch.float32, device=x.device)
        grad_gamma = torch.empty(chunks, D, H, dtype=torch.float32, device=x.device)
        _, grid, meta = launch_config(N, T, H, D)
        with on_device(x):
            _fuse_backward_kernel[grid](x, fusion_logits, gamma, grad_out.contiguous(), grad_mix, grad_gamma,
                                        N, T, H, D, ctx.eps, TOKENS_PER_PROGRAM, **meta)
        grad_mix = grad_mix.sum(0)  # [D, T]
        weights = torch.softmax(fusion_logits.float(), dim=-1)
        grad_logits = weights * (grad_mix - (weights * grad_mix).sum(-1, keepdim=True))  # softmax backward
        return None, grad_logits.to(fusion_logits.dtype), grad_gamma.sum((0, 1)).to(gamma.dtype), None


def fuse_layers(x, fusion_logits, gamma, eps):
    """The DFlare fusion [N, T, H] -> [N, D, H]: the Triton kernel on CUDA or under TRITON_INTERPRET=1 (when
    Triton is installed), the PyTorch reference otherwise. Inside torch.compile the reference is traced: Inductor
    fuses it into a kernel of its own, and the graph needs no opaque custom call."""
    if HAVE_TRITON and (x.is_cuda or triton_interpreted()) and not torch.compiler.is_compiling():
        return FuseLayers.apply(x, fusion_logits, gamma, eps)
    return fuse_layers_reference(x, fusion_logits, gamma, eps)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def benchmark(N=16384, T=36, H=4096, D=8, dtype=torch.bfloat16):
    """GB/s of the forward (X read once, out written once) for the kernel, the reference and compiled reference."""
    device = "cuda"
    x = torch.randn(N, T, H, dtype=dtype, device=device)
    w = torch.randn(D, T, device=device)
    gamma = torch.randn(H, dtype=dtype, device=device)
    compiled = torch.compile(fuse_layers_reference)
    moved = (x.numel() + N * D * H) * x.element_size()
    copy_bytes = 2 * x.numel() * x.element_size()
    ms_copy = triton.testing.do_bench(lambda: x.clone())
    print(f"N={N} T={T} H={H} D={D} {dtype}; copy bandwidth {copy_bytes / ms_copy / 1e6:.0f} GB/s")
    for name, fn in [("triton kernel", lambda: FuseLayers.apply(x, w, gamma, 1e-6)),
                     ("pytorch reference", lambda: fuse_layers_reference(x, w, gamma, 1e-6)),
                     ("torch.compile(reference)", lambda: compiled(x, w, gamma, 1e-6))]:
        ms = triton.testing.do_bench(fn)
        print(f"{name:26s} {ms:8.3f} ms  {moved / ms / 1e6:7.0f} GB/s")


if __name__ == "__main__":
    if not torch.cuda.is_available() or not HAVE_TRITON:
        raise SystemExit("error: the fusion benchmark needs a CUDA GPU and Triton (the tests check the kernel on CPU)")
    benchmark()
