"""`atelier bench lora`: what switching LoRAs costs, merged into the weights or beside them.

Random weights in the real SD 1.x / 2.x architectures and a random LoRA of the usual shape (kohya's
default targets: every Linear and 1x1 convolution of the UNet's transformers and the text encoder's
attention and MLP) at a given rank. Prints:
- merge: the time to write original + delta into the weights in place (`LoraMerge.apply`) the
  first time (the originals are copied aside then) and when switching to another set, and the
  time to restore the originals (bit-exact), plus the memory the kept originals take;
- the low-rank path's cost instead: the extra time per UNet call of computing x @ down @ up beside
  every targeted layer (forward hooks here, for the measurement only), at a given latent size.
Switching merged LoRAs costs merge + restore once per batch whose LoRA set differs from the last;
the low-rank path costs its overhead on every UNet call of every step of every batch that uses one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from generation.engine_bench import randomise, sync
from models.families import SD1, SD2, Family
from models.lora import Lora, LoraMerge, LoraPatch, lora_targets
from models.stable_diffusion import StableDiffusion

FAMILIES: dict[str, Family] = {"sd1": SD1, "sd2": SD2}


def random_network(family: Family, device: torch.device, dtype: torch.dtype) -> StableDiffusion:
    """The architecture with random weights (speed does not depend on the values)."""
    with torch.device("meta"):
        network = StableDiffusion(family)
    randomise(network, device, dtype)
    return network.eval()


def random_lora(network: StableDiffusion, rank: int) -> Lora:
    """A LoRA on kohya's default targets of `network`, factors on the network's device."""
    params = dict(network.named_parameters())
    patches = []
    for name, target in lora_targets(network).items():
        if not (".attentions." in name or name.startswith("text_encoder.")) or "input_blocks" in name:
            continue
        weight = params[target.parameter]
        shape = weight[target.rows].shape if target.rows else weight.shape
        if len(shape) == 4 and shape[2:] != (1, 1):
            continue
        down = torch.randn(rank, shape[1], device=weight.device) / shape[1] ** 0.5
        up = torch.randn(shape[0], rank, device=weight.device) * 0.01
        patches.append(LoraPatch(target, down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, *shape[2:]), 1.0))
    return Lora("bench", tuple(patches))


def _low_rank_hooks(network: StableDiffusion, lora: Lora) -> list:
    """Forward hooks adding the low-rank path's output beside each targeted UNet layer."""
    modules = dict(network.named_modules())
    handles = []
    for patch in lora.patches:
        if not patch.target.parameter.startswith("model."):
            continue
        module = modules[patch.target.parameter.removesuffix(".weight")]
        down, up = patch.down.to(module.weight.dtype), patch.up.to(module.weight.dtype)

        def hook(m: nn.Module, args: tuple, out: torch.Tensor, down: torch.Tensor = down, up: torch.Tensor = up
                 ) -> torch.Tensor:
            if isinstance(m, nn.Conv2d):
                return out + F.conv2d(F.conv2d(args[0], down), up)
            return out + F.linear(F.linear(args[0], down), up)

        handles.append(module.register_forward_hook(hook))
    return handles


def unet_flops(family: Family, rank: int, size: int, batch: int) -> tuple[int, int]:
    """(FLOPs of one guided UNet call at `size` pixels, the low-rank path's extra FLOPs), counted
    on the meta device (no memory, no time, deterministic)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        network = StableDiffusion(family)
        lora = random_lora(network, rank)
        side = size // 8
        x, t = torch.empty(2 * batch, 4, side, side), torch.empty(2 * batch)
        context = torch.empty(2 * batch, 77, family.unet.context_dim)
    counts = []
    for hooked in (False, True):
        handles = _low_rank_hooks(network, lora) if hooked else []
        with FlopCounterMode(display=False) as counter:
            network.unet(x, t, context)
        counts.append(counter.get_total_flops())
        for handle in handles:
            handle.remove()
    return counts[0], counts[1] - counts[0]


def _time(fn, device: torch.device, iters: int, warm_up: bool = True) -> float:  # noqa: ANN001
    """Median seconds of `iters` calls of `fn`, after one untimed call unless not `warm_up`."""
    if warm_up:
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atelier bench lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, help="image side of the UNet calls (pixels)")
    parser.add_argument("--batch", type=int, default=1, help="images per UNet call (x2 for guidance)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs only (meta device, instant)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    family = FAMILIES[args.family]
    plain_flops, extra_flops = unet_flops(family, args.rank, args.size, args.batch)
    print(f"{args.family} UNet call at {args.size}px, batch {2 * args.batch}: {plain_flops / 1e9:.0f} GFLOP; the "
          f"low-rank path (rank {args.rank}) adds {extra_flops / 1e9:.1f} GFLOP (+{extra_flops / plain_flops * 100:.1f}%)")
    if args.flops_only:
        return 0
    torch.manual_seed(0)
    network = random_network(family, device, dtype)
    lora = random_lora(network, args.rank)
    merge = LoraMerge()
    print(f"{args.family} {dtype} on {device}, LoRA rank {args.rank} on {len(lora.patches)} layers "
          f"({sum(p.down.numel() + p.up.numel() for p in lora.patches) * 2 / 2**20:.0f} MiB in float16)")

    def timed(fn) -> float:  # noqa: ANN001  (merges change state: each is timed once, cold)
        return _time(fn, device, 1, warm_up=False)

    first = timed(lambda: merge.apply(network, [(lora, 1.0)], (0,)))
    switches = [timed(lambda i=i: merge.apply(network, [(lora, 1.0 + i)], (i,))) for i in range(1, args.iters + 1)]
    restore = timed(lambda: merge.restore(network))
    kept = sum(network.get_parameter(name).numel() for name in {p.target.parameter for p in lora.patches})
    print(f"first merge (originals copied aside): {first * 1000:.0f} ms; switch to another set on the same "
          f"layers: {statistics.median(switches) * 1000:.0f} ms; restore to no LoRA: {restore * 1000:.0f} ms; "
          f"originals kept while merged: {kept * network.unet.time_embed[0].weight.element_size() / 2**20:.0f} MiB")
    merge_s = statistics.median(switches)

    f = 8
    side = args.size // f
    x = torch.randn(2 * args.batch, 4, side, side, device=device, dtype=dtype)
    t = torch.full((2 * args.batch,), 500.0, device=device)
    context = torch.randn(2 * args.batch, 77, family.unet.context_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        plain = _time(lambda: network.unet(x, t, context), device, args.iters)
        handles = _low_rank_hooks(network, lora)
        low_rank = _time(lambda: network.unet(x, t, context), device, args.iters)
        for handle in handles:
            handle.remove()
    print(f"UNet call at {args.size}px, batch {2 * args.batch}: {plain * 1000:.0f} ms merged (or no LoRA), "
          f"{low_rank * 1000:.0f} ms with the low-rank path (+{(low_rank - plain) * 1000:.0f} ms, "
          f"+{(low_rank / plain - 1) * 100:.1f}% per call)")
    print(f"break-even: merging pays off once a LoRA set is used for more than "
          f"{merge_s / max(low_rank - plain, 1e-9):.1f} UNet calls")
    return 0
