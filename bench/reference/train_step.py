#!/usr/bin/env python3
"""PyTorch reference for bench/train_step: the same ViT and the same training step (forward,
cross-entropy, backward, AdamW update) on random 28x28 images, timed the same way.

PyTorch is not a dependency of moevit; Debian's python3-torch serves. Usage:
  python3 bench/reference/train_step.py --preset vit-tiny --batch 128 --threads 2 --steps 20
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # image, channels, patch, dim, depth, heads, mlp (models/vit.cpp)
    "vit-tiny": (28, 1, 4, 64, 6, 4, 128),
    "vit-small": (28, 1, 4, 128, 6, 4, 256),
}


class Block(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
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
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class ViT(nn.Module):
    def __init__(self, image, channels, patch, dim, depth, heads, mlp, classes=10):
        super().__init__()
        self.patch = patch
        tokens = (image // patch) ** 2 + 1
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(depth)])
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="vit-tiny", choices=PRESETS)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image, channels = PRESETS[args.preset][:2]
    model = ViT(*PRESETS[args.preset])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(args.batch, channels, image, image)
    y = torch.randint(0, 10, (args.batch,))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    print(f"pytorch {torch.__version__} {args.preset} batch {args.batch} threads {args.threads}: "
          f"median step {med * 1e3:.1f} ms over {args.steps} steps after {args.warmup} warm-up, "
          f"{args.batch / med:.0f} images/s")


if __name__ == "__main__":
    main()
