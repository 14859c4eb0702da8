"""Training-step throughput and peak memory of DiffusionRigModel alone (no data loading, no diffusion schedule).

One step: encode the clean image, predict eps for x_t, MSE loss, backward, gradient clipping
at norm 1.0 (as the official training), fused AdamW step.
Compare variants, e.g. on one GPU at the official 256² settings, batch 32:

    python benchmarks/model_step.py --precision fp32
    python benchmarks/model_step.py --precision bf16 --channels-last --compile
    python benchmarks/model_step.py --precision bf16 --channels-last --compile --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from diffrig.models import DiffusionRigModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-channels", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    model = DiffusionRigModel(image_size=args.image_size, num_channels=args.num_channels).to(device).train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def step(noisy, t, buffers, image, target):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.mse_loss(model(noisy, t, buffers, image=image).float(), target)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    run = torch.compile(step) if args.compile else step
    b, s = args.batch_size, args.image_size

    def batch():
        make = lambda c: torch.randn(b, c, s, s, device=device).contiguous(memory_format=memory_format)  # noqa: E731
        return make(3), torch.randint(0, 1000, (b,), device=device), make(9), make(3).clamp(-1, 1), make(3)

    data = [batch() for _ in range(4)]
    for i in range(args.warmup):
        run(*data[i % 4])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        loss = run(*data[i % 4])
    loss.item()
    elapsed = time.perf_counter() - start
    result = {
        **vars(args),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "images_per_s": round(args.steps * b / elapsed, 2),
        "step_ms": round(1000 * elapsed / args.steps, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
