#!/usr/bin/env python3
"""CPU training throughput of the Jetson-class CNN in PyTorch's Python API.

The reference for node/examples/throughput.rs: the same network, data shape, loss, gradient
clipping and AdamW settings, with the same per-step batch preparation (gather from an in-memory
u8 dataset, convert to float, normalise), so the two figures differ only in how the step is
driven. It prints one line of key=value fields:

    pytorch images_per_second=1234.5 threads=2 batch=128 channels_last=1 adam=fused ...
"""

import argparse
import time

import torch
from torch import nn
import torch.nn.functional as F

DATASET_LEN = 2048
CLASSES = 10
# The node's fixed normalisation (node/src/data/transform.rs).
MEAN, STD = 0.5, 0.25
# torch.optim.AdamW keyword arguments that select each implementation.
ADAM_VARIANTS = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "forloop": {"foreach": False},
}


class JetsonCnn(nn.Module):
    """node/src/model.rs's Jetson-class CNN, with the same parameter names."""

    def __init__(self, in_channels=3, classes=CLASSES):
        super().__init__()
        widths = [32, 64, 128]
        channels = in_channels
        for i, width in enumerate(widths, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(channels, width, 3, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(width))
            channels = width
        self.fc1 = nn.Linear(channels * 2 * 2, 256)
        self.fc2 = nn.Linear(256, classes)

    def forward(self, x):
        for i in (1, 2, 3):
            x = getattr(self, f"conv{i}")(x)
            x = F.relu(getattr(self, f"bn{i}")(x))
            x = F.max_pool2d(x, 2)
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        x = F.dropout(F.relu(self.fc1(x)), 0.5, self.training)
        return self.fc2(x)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="intra-op threads; 0: one per core")
    p.add_argument("--steps", type=int, default=60, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep weights and inputs in NHWC layout (the Rust node does)",
    )
    p.add_argument(
        "--adam",
        choices=sorted(ADAM_VARIANTS),
        default="fused",
        help="AdamW implementation",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("--steps and --batch-size must be at least 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    images = torch.randint(0, 256, (DATASET_LEN, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, CLASSES, (DATASET_LEN,))
    batch = min(args.batch_size, DATASET_LEN)

    model = JetsonCnn()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=1e-3,
        betas=(0.9, 0.999),
        weight_decay=5e-4,
        **ADAM_VARIANTS[args.adam],
    )

    # Epoch-wise shuffled batches, as the node's Batcher draws them.
    order = torch.randperm(DATASET_LEN)
    position = 0

    def step():
        nonlocal order, position
        if position + batch > DATASET_LEN:
            order = torch.randperm(DATASET_LEN)
            position = 0
        idx = order[position : position + batch]
        position += batch
        inputs = (images.index_select(0, idx).float() / 255.0 - MEAN) / STD
        inputs = inputs.contiguous(memory_format=memory_format)
        targets = labels.index_select(0, idx)
        # set_to_none (the default) skips zeroing gradient buffers: the fastest option.
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        # Reading the loss each step, as the node does to catch divergence.
        return loss.item()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    loss_sum = sum(step() for _ in range(args.steps))
    seconds = time.perf_counter() - start

    print(
        f"pytorch images_per_second={args.steps * batch / seconds:.1f} "
        f"threads={torch.get_num_threads()} batch={batch} "
        f"channels_last={int(args.channels_last)} adam={args.adam} steps={args.steps} "
        f"warmup={args.warmup} seconds={seconds:.3f} mean_loss={loss_sum / args.steps:.4f} "
        f"torch={torch.__version__}",
        flush=True,
    )


if __name__ == "__main__":
    main()
