"""Wall time and peak memory of Ties-Merging at CLIP ViT-B/32 scale (8 tasks × 87.8M float32).

The original (and FusionBench) stack all task vectors into one [8, d] tensor and call
``kthvalue`` on it, which allocates int64 indices on top of several float copies and runs out of
memory (≈ 22 GB). ``merge("ties", ...)`` finds each task's exact global threshold with a sampled
bracket and one counting pass, then streams the merge key by key, so its memory is the inputs plus
per-tensor temporaries.

Weights are random with the ViT-B/32 vision tower's shapes (``mergebook.models.vit`` with width
768, 12 blocks, patch 32, output 512; built on the meta device for the shapes). The merge runs in
a child process so that its peak RSS (``VmHWM`` from /proc, and the parent's ``ru_maxrss`` of
children as a cross-check) is not mixed with anything else. Prints figures; asserts nothing.

    python benchmarks/ties.py                 # 8 tasks, k=0.2, sum
    python benchmarks/ties.py --threads 1 --check   # also compare task 0's threshold with kthvalue
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

B32 = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512)


def proc_status(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_env(omp_wait: str) -> dict[str, str]:
    """Environment of the measuring child: OpenMP threads sleep instead of spinning unless asked."""
    env = dict(os.environ)
    if omp_wait != "inherit":
        # With more runnable processes than cores, spinning OpenMP threads make element-wise ops
        # 5-10x slower than one thread; passive waiting removes that artefact of a shared machine.
        env["OMP_WAIT_POLICY"] = omp_wait.upper()
    return env


def b32_shapes() -> dict[str, torch.Size]:
    """State-dict shapes of the CLIP ViT-B/32 visual tower, without allocating it."""
    from mergebook.models.vit import ViTConfig, VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(ViTConfig(**B32))
    return {k: v.shape for k, v in model.state_dict().items()}


def random_checkpoints(tasks: int, seed: int = 0, device: str = "cpu") -> tuple[dict, list[dict]]:
    """θ_pre ~ N(0, 0.02²) and θ_k = θ_pre + N(0, 0.001²), with B/32 shapes."""
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = b32_shapes()
    pre = {k: 0.02 * torch.randn(s, generator=g, device=device) for k, s in shapes.items()}
    fts = []
    for _ in range(tasks):
        ft = {}
        for k, v in pre.items():
            ft[k] = torch.randn(v.shape, generator=g, device=device).mul_(1e-3).add_(v)
        fts.append(ft)
    return pre, fts


def child(args: argparse.Namespace) -> None:
    from mergebook.methods import merge
    from mergebook.methods import ties as T
    from mergebook.statedict import TaskVectorView

    if args.threads:
        torch.set_num_threads(args.threads)
    pre, fts = random_checkpoints(args.tasks)
    params = sum(v.numel() for v in pre.values())
    inputs_mib = proc_status("VmRSS")
    can_reset = reset_peak()
    t = time.perf_counter()
    out = merge("ties", pre, fts, k=args.k, scaling_coef=0.3, disjoint=args.disjoint)
    wall = time.perf_counter() - t
    result = {
        "params": params, "tensors": len(pre), "tasks": args.tasks, "threads": torch.get_num_threads(),
        "wall_s": wall, "inputs_rss_mib": inputs_mib, "peak_rss_mib": proc_status("VmHWM"),
        "peak_is_merge_only": can_reset,
    }
    del out
    if args.check:
        view = TaskVectorView(fts[0], pre)
        t = time.perf_counter()
        fast = T.topk_threshold(view, args.k)
        result["threshold_auto_s"] = time.perf_counter() - t
        t = time.perf_counter()
        slow = T.topk_threshold(view, args.k, method="sort")
        result["threshold_sort_s"] = time.perf_counter() - t
        result["threshold_equal"] = fast == slow
    print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run the merge in a child process and print its wall time and peak memory."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--k", type=float, default=0.2)
    ap.add_argument("--disjoint", default="sum", choices=["sum", "mean", "max"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--check", action="store_true", help="also check task 0's threshold against kthvalue")
    ap.add_argument("--omp-wait", default="passive", choices=["passive", "active", "inherit"],
                    help="OMP_WAIT_POLICY of the child (default passive: see benchmarks/README.md)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    cmd = [sys.executable, __file__, "--child", "--tasks", str(args.tasks), "--k", str(args.k),
           "--disjoint", args.disjoint] + (["--threads", str(args.threads)] if args.threads else []) \
        + (["--check"] if args.check else [])
    env = child_env(args.omp_wait)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    total = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(proc.returncode)
    r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"# Ties-Merging, ViT-B/32 vision-tower shapes: {r['tensors']} tensors, {r['params'] / 1e6:.1f}M "
          f"params x {r['tasks']} tasks, k={args.k}, disjoint={args.disjoint}, torch {torch.__version__}, "
          f"{r['threads']} CPU threads, OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"merge wall time         {r['wall_s']:8.2f} s")
    print(f"RSS with inputs loaded  {r['inputs_rss_mib'] / 1024:8.2f} GiB   (pretrained + {r['tasks']} fine-tuned)")
    scope = "during the merge" if r["peak_is_merge_only"] else "whole child process"
    print(f"peak RSS ({scope}) {r['peak_rss_mib'] / 1024:8.2f} GiB   (VmHWM)")
    print(f"peak RSS of the child   {children_peak / 1024:8.2f} GiB   (ru_maxrss, includes generating inputs)")
    if args.check:
        print(f"threshold of task 0: auto {r['threshold_auto_s']:.2f} s, kthvalue {r['threshold_sort_s']:.2f} s, "
              f"equal: {r['threshold_equal']}")
    print(f"(child process total, incl. generating random weights: {total:.1f} s)")


if __name__ == "__main__":
    main()
