"""Time one layer-wise AdaMerging step against its floor, on CPU and (when present) CUDA.

The step is what :class:`mergebook.adaptation.CoefficientAdapter` does each iteration: merge
θ = θ_pre + Σ_k λ_{l,k} τ_{k,l} in the autograd graph, one forward of K x 16 images through the
merged encoder, the per-task entropy, one backward to λ, one Adam step. The floor is one forward and
backward of the plain (un-merged) encoder on the same K x 16 images with gradients to its weights:
no method that needs dL/dλ can do less, since dL/dλ_{l,k} = <dL/dθ_l, τ_{k,l}>. The ratio
step / floor is the price of merging inside the graph.

Weights are random (speed does not depend on their values). Prints figures; asserts nothing.

    python benchmarks/adaptation.py                      # tiny ViT on CPU; + ViT-B/32 shapes on CUDA
    python benchmarks/adaptation.py --models tiny,b32,l14 --device cuda
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

from mergebook.adaptation import CoefficientAdapter, MergeSpace, entropy_objective
from mergebook.models.vit import ViTConfig, VisionTransformer

from mergebook.models.random_clip import ARCHS  # the true shapes of the random-b32 / random-l14 profiles

MODELS = {
    "tiny": ViTConfig(image_size=32, patch_size=8, width=128, layers=6, heads=4, output_dim=128),
    "b32": ARCHS["ViT-B/32"],
    "l14": ARCHS["ViT-L/14"],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB; it is the process-wide peak and never goes down.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench(name: str, cfg: ViTConfig, device: torch.device, autocast: torch.dtype | None,
          tasks: int, batch: int, classes: int, warmup: int, iters: int,
          vector_dtype: torch.dtype | None = None) -> dict[str, float | str]:
    """Median ms of one layer-wise AdaMerging step and of the floor, plus peak memory."""
    torch.manual_seed(0)
    model = VisionTransformer(cfg).to(device).requires_grad_(False)
    pre = {k: v.detach() for k, v in model.state_dict().items()}
    vectors = [{k: 1e-2 * torch.randn_like(v) for k, v in pre.items()} for _ in range(tasks)]
    space = MergeSpace(pre, vectors, device=device, vector_dtype=vector_dtype)
    del vectors  # the space holds the one stacked copy
    heads = [100 * torch.nn.functional.normalize(torch.randn(classes, cfg.output_dim, device=device), dim=-1)
             for _ in range(tasks)]
    images = torch.randn(tasks * batch, 3, cfg.image_size, cfg.image_size, device=device)
    batches = [[images[k * batch:(k + 1) * batch]] for k in range(tasks)]
    adapter = CoefficientAdapter(model, space, heads, granularity="layer", autocast_dtype=autocast)
    resident = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")

    params = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in pre.items()}

    def floor() -> None:
        loss, _ = entropy_objective(model, params, heads, batches, autocast_dtype=autocast)
        loss.backward()
        for p in params.values():
            p.grad = None

    def merge_only() -> None:
        with torch.no_grad():
            space.merge(adapter.raw)

    _reset_peak(device)
    floor_ms = _median_ms(floor, device, warmup, iters)
    floor_peak = _peak_mb(device)
    _reset_peak(device)
    step_ms = _median_ms(lambda: adapter.step(batches), device, warmup, iters)
    step_peak = _peak_mb(device)
    merge_ms = _median_ms(merge_only, device, warmup, iters)
    return {
        "model": name,
        "precision": ("bf16-autocast" if autocast else "fp32") + ("/bf16-tv" if vector_dtype else ""),
        "layers_L": space.num_layers, "groups": len(space.groups),
        "params_M": sum(v.numel() for v in pre.values()) / 1e6,
        "step_ms": step_ms, "floor_ms": floor_ms, "ratio": step_ms / floor_ms, "merge_ms": merge_ms,
        "floor_peak_MiB": floor_peak, "step_peak_MiB": step_peak, "resident_MiB": resident,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmarks, print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--models", default=None,
                    help=f"comma list of {','.join(MODELS)} (default: tiny on CPU; tiny,b32 on CUDA)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="images per task per step")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16-autocast runs on CUDA")
    ap.add_argument("--bf16-vectors", action="store_true",
                    help="store the stacked task vectors in bf16 (MergeSpace(vector_dtype=...))")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    names = args.models.split(",") if args.models else (["tiny", "b32"] if device.type == "cuda" else ["tiny"])
    precisions: list[torch.dtype | None] = [None]
    if device.type == "cuda" and not args.no_bf16:
        precisions.append(torch.bfloat16)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# torch {torch.__version__}, {where}; K={args.tasks} tasks x {args.batch} images, "
          f"median of {args.iters} after {args.warmup} warm-up", flush=True)
    mem = "peak MiB (CUDA max_memory_allocated)" if device.type == "cuda" else "peak RSS MiB (ru_maxrss, process-wide)"
    print(f"# memory: {mem}")
    header = f"{'model':6} {'precision':22} {'L':>4} {'groups':>6} {'params':>8} {'step ms':>9} " \
             f"{'floor ms':>9} {'ratio':>6} {'merge ms':>9} {'floor mem':>10} {'step mem':>10}"
    print(header)
    for name in names:
        for ac in precisions:
            r = bench(name, MODELS[name], device, ac, args.tasks, args.batch, args.classes,
                      args.warmup, args.iters, torch.bfloat16 if args.bf16_vectors else None)
            print(f"{r['model']:6} {r['precision']:22} {r['layers_L']:>4} {r['groups']:>6} "
                  f"{r['params_M']:>7.2f}M {r['step_ms']:>9.2f} {r['floor_ms']:>9.2f} "
                  f"{r['ratio']:>6.2f} {r['merge_ms']:>9.2f} {r['floor_peak_MiB']:>10.0f} "
                  f"{r['step_peak_MiB']:>10.0f}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
