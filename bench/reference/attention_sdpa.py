"""PyTorch's scaled_dot_product_attention on the GPU, at the shapes `bench_cuda attention` times
for moevit's flash kernels: the library yardstick of issue 6 (attention forward + backward at
ViT shapes >= 0.7x of it).

Method, as bench_cuda's: the same packed input (qkv (B, T, 3D) seen as q, k, v of shape
(B, H, T, D/H), strided views, no copies), CUDA events around each call, the L2 cleared (a
256 MB memset) before every call, median of --reps calls after --warmup. FLOPs: 4 B T^2 D for the
forward (QK^T and PV), 2.5x that for the backward, as bench_cuda counts them. Each backend
PyTorch offers is forced in turn; one that refuses the inputs (flash and cuDNN attention take
fp16/bf16 only) prints "n/a". PyTorch >= 2.0 is needed (SDPA); the CUDA machine has it.

  python3 bench/reference/attention_sdpa.py [--dtype fp32|bf16|fp16] [--reps 20] [--warmup 3]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

CASES = [(50, 64, 4), (65, 64, 4), (197, 64, 4), (50, 192, 3), (65, 192, 3), (197, 192, 3)]  # T, D, H
B = 128


def backends():
    """(name, context factory) for every SDPA backend this PyTorch can force."""
    try:  # PyTorch >= 2.3
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = ["EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH"]
        return [(n.lower(), (lambda b=getattr(SDPBackend, n): sdpa_kernel(b))) for n in names if hasattr(SDPBackend, n)]
    except ImportError:  # 2.0 - 2.2
        flags = {"efficient_attention": dict(enable_mem_efficient=True), "flash_attention": dict(enable_flash=True),
                 "math": dict(enable_math=True)}
        base = dict(enable_flash=False, enable_math=False, enable_mem_efficient=False)
        return [(n, (lambda f=f: torch.backends.cuda.sdp_kernel(**{**base, **f}))) for n, f in flags.items()]


def median_ms(fn, reps, warmup, flush):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # the math backend's GEMMs in full FP32
    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.dtype}, B={B}, "
          f"median of {args.reps} after {args.warmup} warm-up, L2 cleared before each call")
    print(f"{'shape':<24} {'backend':<20} {'fwd ms':>9} {'fwd TFLOP/s':>12} {'bwd ms':>9} {'bwd TFLOP/s':>12}")
    for T, D, H in CASES:
        g = torch.Generator(device=dev).manual_seed(17)
        qkv = torch.randn(B, T, 3 * D, device=dev, dtype=dtype, generator=g).requires_grad_(True)
        dout = torch.randn(B, H, T, D // H, device=dev, dtype=dtype, generator=g)
        # (B, T, 3, H, Dh) -> 3 x (B, H, T, Dh): the layout moevit's kernel reads in place
        q, k, v = qkv.view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        flops = 4.0 * B * T * T * D
        shape = f"T={T} D={D} H={H}"
        for name, ctx in backends():
            try:
                with ctx():
                    fwd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.reps, args.warmup, flush)
                    out = F.scaled_dot_product_attention(q, k, v)
                    bwd = median_ms(lambda: torch.autograd.grad(out, qkv, dout, retain_graph=True),
                                    args.reps, args.warmup, flush)
            except RuntimeError as e:  # this backend does not take these inputs
                print(f"{shape:<24} {name:<20} {'n/a':>9}   ({str(e).splitlines()[0][:60]})")
                continue
            print(f"{shape:<24} {name:<20} {fwd:9.4f} {flops / fwd / 1e9:12.2f} {bwd:9.4f} "
                  f"{2.5 * flops / bwd / 1e9:12.2f}")


if __name__ == "__main__":
    main()
