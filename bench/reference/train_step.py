#!/usr/bin/env python3
"""PyTorch reference for bench/train_step: the same ViT and the same training step (forward,
cross-entropy with label smoothing 0.1, backward, gradient-norm clip at 1, AdamW update) on random
28x28 images, timed the same way.

`--preset vmoe-tiny` is the MoE-ViT of moevit's preset of that name: vit-tiny whose odd blocks
(1, 3, 5) hold an MoE layer of 8 GELU experts (hidden 128) with V-MoE routing (methods.md 2.1):
noisy top-2 token choice (noise std 1/E), capacity factor 1.05, C = ceil(N k c / E) slots per
expert per image, buffers filled rank by rank, importance and load losses weighted 0.005 added to
the loss. Dispatch and combine are index-based (gathers and index_add over the kept (token,
choice) pairs) and all experts run as one batched matmul over an (E, B*C, D) buffer.

PyTorch is not a dependency of moevit; Debian's python3-torch serves (run it with /usr/bin/python3
where another python3 comes first on PATH). With --device cuda the step runs on the GPU (the
clock stops after torch.cuda.synchronize()), and --compile wraps the model in torch.compile, as a
user would (PyTorch >= 2.0; the MoE layer's data-dependent indexing may split the graph), in the
mode --mode names. --bf16 runs the forward and the loss under torch.autocast(dtype=bfloat16), the
PyTorch user's mixed precision (products on bfloat16 inputs; the routers stay float32 here, as in
moevit's --bf16). Current PyTorch goes into a virtual environment (docs/benchmarks.md). Usage:
  python3 bench/reference/train_step.py --preset vit-tiny --batch 128 --threads 2 --steps 20
  python3 bench/reference/train_step.py --preset vmoe-tiny --threads 2
  python3 bench/reference/train_step.py --preset vmoe-tiny --device cuda --compile
  venv/bin/python bench/reference/train_step.py --preset vmoe-tiny --compile --mode max-autotune
  venv/bin/python bench/reference/train_step.py --preset vmoe-tiny --bf16
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # image, channels, patch, dim, depth, heads, mlp (models/vit.cpp)
    "vit-tiny": (28, 1, 4, 64, 6, 4, 128),
    "vit-small": (28, 1, 4, 128, 6, 4, 256),
    "vmoe-tiny": (28, 1, 4, 64, 6, 4, 128),
}
MOE = {  # experts, k, expert hidden, capacity factor (training), placement
    "vmoe-tiny": dict(experts=8, k=2, hidden=128, capacity=1.05, placement="every-2"),
}


def cv_squared(v):
    """v: (G, E) -> mean over groups of var/mean^2 (population variance), V-MoE's balance loss."""
    return (v.var(1, unbiased=False) / v.mean(1) ** 2).mean()


class MoE(nn.Module):
    """V-MoE layer: noisy top-k routing per image, capacity C, experts as one batched matmul."""

    def __init__(self, dim, experts, k, hidden, capacity, aux_weight=0.005):
        super().__init__()
        self.E, self.k, self.capacity, self.aux_weight = experts, k, capacity, aux_weight
        self.router = nn.Parameter(torch.empty(dim, experts))  # z = x W_r, no bias
        self.w1 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(experts, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(experts, dim))
        nn.init.trunc_normal_(self.router, std=math.sqrt(2 / (dim + experts)))
        for w in (self.w1, self.w2):
            nn.init.trunc_normal_(w, std=math.sqrt(2 / (dim + hidden)))
        self.aux = None

    def forward(self, x):  # x: (B, N, D), one routing group per image
        B, N, D = x.shape
        E, k = self.E, self.k
        std = 1.0 / E
        with torch.autocast(x.device.type, enabled=False):  # routing in float32, as V-MoE (and moevit)
            z = x.float() @ self.router  # (B, N, E) clean logits
        zn = z + torch.randn_like(z) * std if self.training else z
        gates = zn.softmax(-1)
        gate, expert = gates.topk(k, -1)  # (B, N, k), rank 0 = best
        C = min(math.ceil(N * k * self.capacity / E), N)
        # Slot of each (token, rank) in its expert's buffer, rank-major: every rank-0 choice of the
        # image before any rank-1 choice, tokens in order within a rank (a cumsum over (k*N)).
        onehot = F.one_hot(expert.transpose(1, 2).reshape(B, k * N), E)  # (B, k*N, E)
        pos = ((onehot.cumsum(1) - 1) * onehot).sum(-1).view(B, k, N).transpose(1, 2)  # (B, N, k)
        keep = pos < C  # a choice whose buffer is full is dropped
        img = torch.arange(B, device=x.device).view(B, 1, 1)
        slot = ((expert * B + img) * C + pos)[keep]  # into the (E, B, C) buffer, flattened
        tok = (img * N + torch.arange(N, device=x.device).view(1, N, 1)).expand(B, N, k)[keep]  # into (B*N)
        w = gate[keep]
        xf = x.reshape(B * N, D)
        buf = xf.new_zeros(E * B * C, D).index_copy(0, slot, xf[tok])
        h = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), buf.view(E, B * C, D), self.w1),
                   approximate="tanh")
        y = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2).view(E * B * C, D)
        out = xf.new_zeros(B * N, D).index_add(0, tok, y[slot] * w.unsqueeze(1))
        self.aux = None
        if self.training:
            # importance on the clean probabilities; load: P = Phi((z - t) / std), t the token's
            # k-th largest noisy logit.
            l_imp = cv_squared(z.softmax(-1).sum(1))
            t = zn.gather(-1, expert[..., k - 1:k])
            p = 0.5 * (1 + torch.erf((z - t) / (std * math.sqrt(2))))
            self.aux = self.aux_weight * (l_imp + cv_squared(p.mean(1)))
        return out.view(B, N, D)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp, moe=None):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
        if moe:
            self.moe = MoE(dim, moe["experts"], moe["k"], moe["hidden"], moe["capacity"])
        else:
            self.moe = None
            self.fc1 = nn.Linear(dim, mlp)
            self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if hasattr(F, "scaled_dot_product_attention"):  # PyTorch >= 2.0
            a = F.scaled_dot_product_attention(q, k, v)
        else:  # Debian 12's 1.13
            a = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v
        a = a.transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        if self.moe is not None:
            return x + self.moe(self.ln2(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class ViT(nn.Module):
    def __init__(self, image, channels, patch, dim, depth, heads, mlp, classes=10, moe=None):
        super().__init__()
        self.patch = patch
        tokens = (image // patch) ** 2 + 1
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        # every-2: the odd blocks 1, 3, 5, ... hold the MoE layers
        self.blocks = nn.ModuleList([Block(dim, heads, mlp, moe if moe and i % 2 == 1 else None)
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        B, C, H, W = x.shape
        p = self.patch
        x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        x = self.embed(x)
        x = torch.cat([self.cls.expand(B, -1, -1), x], 1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, 0])

    def aux_loss(self):
        """The MoE layers' weighted auxiliary losses of the last forward, summed, or None."""
        terms = [b.moe.aux for b in self.blocks if b.moe is not None and b.moe.aux is not None]
        return sum(terms) if terms else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="vit-tiny", choices=PRESETS)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                    help="torch.compile's mode")
    ap.add_argument("--bf16", action="store_true", help="forward and loss under torch.autocast(bfloat16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image, channels = PRESETS[args.preset][:2]
    model = ViT(*PRESETS[args.preset], moe=MOE.get(args.preset)).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    run = torch.compile(model, mode=args.mode) if args.compile else model
    x = torch.randn(args.batch, channels, image, image, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(run(x), y, label_smoothing=0.1)
            aux = model.aux_loss()
            if aux is not None:
                loss = loss + aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    mode = f"{args.device}{', compiled ' + args.mode if args.compile else ''}{', autocast bf16' if args.bf16 else ''}"
    print(f"pytorch {torch.__version__} {args.preset} ({mode}) batch {args.batch} threads {args.threads}: "
          f"median step {med * 1e3:.1f} ms over {args.steps} steps after {args.warmup} warm-up, "
          f"{args.batch / med:.0f} images/s; {params} parameters")


if __name__ == "__main__":
    main()
