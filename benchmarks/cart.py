"""Wall time of CART (Choi et al. 2024, Eq. 4) at CLIP ViT-B/32 scale, 8 tasks, on CPU and CUDA.

CART truncates 4 matrices per block (in_proj 2304×768 as one SVD, out_proj 768×768, c_fc
3072×768, c_proj 768×3072): 48 matrices × 8 tasks = 384 decompositions. The original calls
``torch.linalg.svd`` once per matrix; ``merge("cart", ...)`` batches them by shape on the
tensors' device, and by default (``method="gram"``) takes the top singular subspace from ``eigh``
of the float64 Gram matrix on the smaller side (``gram32``: in float32). ``--methods gram,gram32,svd``
times each; ``--baseline``
also times the original's one-matrix-at-a-time ``torch.linalg.svd`` on 8 matrices per shape and
extrapolates to all 384.

Weights are random with ViT-B/32 shapes (see benchmarks/ties.py). On CPU the merge runs in a
child process and its peak RSS is reported; on CUDA, ``torch.cuda.max_memory_allocated``.
Prints figures; asserts nothing.

    python benchmarks/cart.py                         # CUDA if available, else CPU
    python benchmarks/cart.py --device cuda --methods gram,svd --baseline
    OMP_WAIT_POLICY=passive python benchmarks/cart.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ties import child_env, proc_status, random_checkpoints, reset_peak  # noqa: E402  (same directory)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _baseline(pre: dict, fts: list[dict], device: torch.device, per_shape: int = 8) -> float:
    """Original CART: one torch.linalg.svd per (matrix, task); seconds extrapolated to all matrices."""
    from mergebook.methods.cart import default_matrix_rule

    keys = [k for k in pre if default_matrix_rule(k, pre[k])]
    by_shape: dict[tuple, list[str]] = {}
    for k in keys:
        by_shape.setdefault(tuple(pre[k].shape), []).append(k)
    total = 0.0
    for shape, ks in by_shape.items():
        mats = [fts[t][k] - pre[k] for k in ks for t in range(len(fts))][:per_shape]
        torch.linalg.svd(mats[0], full_matrices=False)  # warm-up (cuSOLVER handle, workspace)
        _sync(device)
        t = time.perf_counter()
        for a in mats:
            u, s, vh = torch.linalg.svd(a, full_matrices=False)
            r = max(1, int(0.12 * s.shape[0]))
            (u[:, :r] * s[:r]) @ vh[:r, :]
        _sync(device)
        total += (time.perf_counter() - t) / len(mats) * len(ks) * len(fts)
    return total


def run(args: argparse.Namespace, device: torch.device) -> dict:
    """Generate weights, time each method (and the baseline), return the figures."""
    from mergebook.methods import merge
    from mergebook.methods.cart import lowrank

    if args.threads:
        torch.set_num_threads(args.threads)
    pre, fts = random_checkpoints(args.tasks, device=str(device))
    out: dict = {"params": sum(v.numel() for v in pre.values()), "tasks": args.tasks, "device": str(device),
                 "threads": torch.get_num_threads(), "methods": {}}
    if device.type == "cpu":
        out["inputs_rss_mib"] = proc_status("VmRSS")
    for method in args.methods.split(","):
        warm = torch.randn(4, 64, 32, device=device)
        lowrank(warm, 4, method=method)  # first linalg call initialises cuSOLVER/MAGMA
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base_mem = torch.cuda.memory_allocated(device)
        else:
            reset_peak()
        t = time.perf_counter()
        merged = merge("cart", pre, fts, ratio=args.ratio, method=method)
        _sync(device)
        wall = time.perf_counter() - t
        peak = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20 if device.type == "cuda" \
            else proc_status("VmHWM")
        out["methods"][method] = {"wall_s": wall, "peak_mib": peak}
        del merged
    if args.baseline:
        out["baseline_s"] = _baseline(pre, fts, device)
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run (in a child process on CPU), print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.12)
    ap.add_argument("--methods", default=None,
                    help="comma list of gram,gram32,svd (default: gram on CPU, all three on CUDA)")
    ap.add_argument("--baseline", action="store_true", help="also time the original per-matrix SVD loop")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--omp-wait", default="passive", choices=["passive", "active", "inherit"],
                    help="OMP_WAIT_POLICY of the CPU child (default passive: see benchmarks/README.md)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.methods is None:
        args.methods = "gram,gram32,svd" if device.type == "cuda" else "gram"
    if args.child:
        print("RESULT " + json.dumps(run(args, device)), flush=True)
        return
    if device.type == "cuda":
        r = run(args, device)
        where = torch.cuda.get_device_name(device)
    else:
        cmd = [sys.executable, __file__, "--child", "--device", "cpu", "--tasks", str(args.tasks), "--ratio",
               str(args.ratio), "--methods", args.methods] + (["--baseline"] if args.baseline else []) \
            + (["--threads", str(args.threads)] if args.threads else [])
        env = child_env(args.omp_wait)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(proc.returncode)
        r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        where = f"CPU, {r['threads']} threads, OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '(unset)')}"
    print(f"# CART (ratio {args.ratio}, 48 matrices x {r['tasks']} tasks = {48 * r['tasks']} truncations), "
          f"ViT-B/32 shapes, {r['params'] / 1e6:.1f}M params; torch {torch.__version__}, {where}")
    mem = "peak GPU MiB above inputs (max_memory_allocated)" if device.type == "cuda" else "peak RSS GiB (VmHWM)"
    print(f"{'method':8} {'wall s':>8}   {mem}")
    for m, v in r["methods"].items():
        shown = f"{v['peak_mib']:.0f}" if device.type == "cuda" else f"{v['peak_mib'] / 1024:.2f}"
        print(f"{m:8} {v['wall_s']:8.2f}   {shown}")
    if "inputs_rss_mib" in r:
        print(f"(RSS with inputs loaded: {r['inputs_rss_mib'] / 1024:.2f} GiB; child ru_maxrss "
              f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GiB)")
    if "baseline_s" in r:
        print(f"original per-matrix torch.linalg.svd loop, extrapolated: {r['baseline_s']:.2f} s")


if __name__ == "__main__":
    main()
