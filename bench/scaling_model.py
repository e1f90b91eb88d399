#!/usr/bin/env python3
"""A model of one training step of a ViT-S-like MoE-ViT on 8, 64 and 512 H100 GPUs with data and
expert parallelism: compute from the step's FLOPs, communication from the bytes each GPU must
move and published link bandwidths. A model, not a measurement (docs/distributed.md says what
was measured and what is assumed). Prints one table.

    python3 bench/scaling_model.py [--batch-per-gpu 128] [--mfu 0.4]
"""
import argparse
import math

p = argparse.ArgumentParser()
p.add_argument("--batch-per-gpu", type=int, default=128)
p.add_argument("--mfu", type=float, default=0.4, help="assumed share of the bf16 peak reached")
a = p.parse_args()

# The model: ViT-S-like, 32x32 images in 4x4 patches (T = 64 + CLS), MoE in every other block.
D, depth, T, E, k, moe_layers = 384, 12, 65, 32, 2, 6
H = 4 * D
b = a.batch_per_gpu

# FLOPs per token, forward: attention projections 8 D^2 and scores 4 T D per block, dense MLP
# 4 D H, an MoE layer k expert MLPs and its router 2 D E.
fwd_token = depth * (8 * D * D + 4 * T * D) + (depth - moe_layers) * 4 * D * H \
    + moe_layers * (k * 4 * D * H + 2 * D * E)
step_flops = 3 * fwd_token * T * b  # forward + backward (2x)
peak = 989e12                        # H100 SXM bf16 dense, NVIDIA's data sheet
compute_s = step_flops / (a.mfu * peak)
backward_s = compute_s * 2 / 3       # the gradient reduction can hide under the backward

dense_params = depth * (4 * D * D + 4 * D) + (depth - moe_layers) * (2 * D * H + H + D) \
    + moe_layers * D * E
expert_params = moe_layers * E * (2 * D * H + H + D)

# Links, each direction, at 80% of the published figure: NVLink 4 of an H100 SXM 450 GB/s;
# one InfiniBand NDR 400 Gb/s adapter per GPU 50 GB/s. Latency per message: 2 us / 5 us.
nvlink, ib = 0.8 * 450e9, 0.8 * 50e9
lat_nv, lat_ib = 2e-6, 5e-6
grad_bytes, act_bytes = 4, 2  # fp32 gradients, bf16 token rows
bucket = 25e6                  # bytes per gradient bucket (PyTorch DDP's default)


def all_reduce_s(params, gpus_in_node, nodes):
    """Hierarchical all-reduce of fp32 gradients in 25 MB buckets: reduce-scatter over NVLink in
    the node, then across the nodes on each GPU's 1/g share (every GPU has its own adapter),
    then all-gather over NVLink. Bandwidth as a ring, 2 (n-1)/n of the bytes; latency as a
    tree, 2 log2(n) messages per bucket (NCCL picks trees at large n for that reason)."""
    size = params * grad_bytes
    n_buckets = math.ceil(size / bucket)
    t = 0.0
    if gpus_in_node > 1:
        t += 2 * (gpus_in_node - 1) / gpus_in_node * size / nvlink
        t += 2 * math.log2(gpus_in_node) * lat_nv * n_buckets
    if nodes > 1:
        t += 2 * (nodes - 1) / nodes * (size / gpus_in_node) / ib
        t += 2 * math.log2(nodes) * lat_ib * n_buckets
    return t


def all_to_all_s(ep, gpus_per_node=8):
    """The token rows of every MoE layer, 4 exchanges a step (dispatch and combine, forward and
    backward); the rows for this GPU's own experts stay."""
    rows = b * T * k
    size = rows * D * act_bytes * 4 * moe_layers
    off = (ep - 1) / ep
    in_node = min(ep, gpus_per_node)
    off_node = (ep - in_node) / ep                 # share of rows whose expert is in another node
    t = size * (off - off_node) / nvlink + size * off_node / ib
    t += 4 * moe_layers * (ep - 1) * (lat_ib if ep > gpus_per_node else lat_nv)
    return t


print(f"ViT-S-like MoE: D {D}, depth {depth}, T {T}, E {E}, k {k}, {moe_layers} MoE layers; "
      f"{dense_params / 1e6:.1f}M shared and {expert_params / 1e6:.1f}M expert parameters; "
      f"{step_flops / b / 1e9:.1f} GFLOP per training image")
print(f"per GPU: batch {b}, compute {1e3 * compute_s:.2f} ms a step at {a.mfu:.0%} of the bf16 peak\n")
print("| GPUs | layout | weights + Adam a GPU | expert all-to-all | shared grads | expert grads | "
      "exposed comm | step | efficiency | images/s |")
print("|---|---|---|---|---|---|---|---|---|---|")
configs = [
    (8, "data parallel only (every GPU all 32 experts)", 1, 8, 1),
    (8, "EP 8 in the node (4 experts a GPU), DP 8", 8, 8, 1),
    (64, "EP 8 in each node, DP 8 over nodes", 8, 8, 8),
    (512, "EP 8 in each node, DP 64 over nodes", 8, 8, 64),
    (512, "EP 32 over 4 nodes (1 expert a GPU), DP 16", 32, 8, 64),
]
for gpus, what, ep, g_node, nodes in configs:
    a2a = all_to_all_s(ep) if ep > 1 else 0.0
    shared = all_reduce_s(dense_params, g_node, nodes)
    # Expert gradients: reduced over the replicas of each expert, GPUs in other EP groups.
    replicas = gpus // ep
    if ep == 1:
        experts = all_reduce_s(expert_params, g_node, nodes)
    elif ep <= g_node:
        experts = all_reduce_s(expert_params / ep, 1, replicas)   # one replica in each node
    else:
        experts = all_reduce_s(expert_params / ep, 1, replicas)   # one in each group of nodes
    exposed = a2a + max(0.0, shared + experts - backward_s)
    step = compute_s + exposed
    held = dense_params + expert_params / ep  # 16 bytes each: fp32 weight, gradient, 2 moments
    print(f"| {gpus} | {what} | {held * 16 / 1e9:.1f} GB | {1e3 * a2a:.2f} ms | {1e3 * shared:.2f} ms | {1e3 * experts:.2f} ms "
          f"| {1e3 * exposed:.2f} ms | {1e3 * step:.2f} ms | {compute_s / step:.0%} | "
          f"{gpus * b / step:,.0f} |")
