"""Wall time and peak memory of the spectral family's merges at CLIP ViT-B/32 shapes, 8 tasks.

TSV-M (``tsv_m``), Iso-C (``iso_c``), Iso-CTS (``iso_cts``), DARE with Task Arithmetic or Ties
(``dare_ta``, ``dare_ties``) and CART for comparison (``cart``), each through ``merge(...)`` on
random weights with ViT-B/32 shapes (as benchmarks/ties.py). The spectral methods treat every 2-D
tensor as a matrix, as the authors' code does: per block in_proj 2304×768 (Q, K, V stacked),
out_proj 768×768, c_fc 3072×768, c_proj 768×3072, plus positional_embedding 50×768 and proj
768×512. TSV-M takes one full SVD per (matrix, task) and two polar factors per matrix; Iso-C one
SVD of the sum; Iso-CTS one of the sum, one per (matrix, task) residual and two polar factors.

``--blocks N`` keeps only the first N of the 12 residual blocks (every block has the same shapes,
so the SVD work is linear in N); the printed ``×12/N`` column extrapolates the wall time to the full
model. Peak memory is measured for the run as configured: on CPU the merge runs in a child process
and VmHWM is reset after the inputs are built (peak RSS above the inputs); on CUDA it is
``torch.cuda.max_memory_allocated`` above the inputs. ``--json PATH`` also writes the figures.
Prints figures; asserts nothing.

    python benchmarks/spectral.py                                   # CUDA if available, else CPU
    OMP_WAIT_POLICY=passive python benchmarks/spectral.py --device cpu --threads 1 --blocks 2
    python benchmarks/spectral.py --device cuda --methods tsv_m,iso_c,iso_cts,cart
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ties import b32_shapes, child_env, proc_status, reset_peak  # noqa: E402  (same directory)

METHODS = {
    "tsv_m": ("tsv_m", {}),
    "iso_c": ("iso_c", {}),
    "iso_cts": ("iso_cts", {}),
    "dare_ta": ("dare", {"merger": "task_arithmetic"}),
    "dare_ties": ("dare", {"merger": "ties"}),
    "cart": ("cart", {}),
}
DEFAULT = "tsv_m,iso_c,iso_cts,dare_ta,dare_ties"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checkpoints(tasks: int, blocks: int, seed: int = 0, device: str = "cpu") -> tuple[dict, list[dict]]:
    """θ_pre ~ N(0, 0.02²), θ_k = θ_pre + N(0, 0.001²) with B/32 shapes, residual blocks < ``blocks`` only.

    Built directly at the reduced size (never allocated in full and trimmed): freed pages would be
    reused by the merge and hide its memory from the peak-RSS figure.
    """
    shapes = {k: s for k, s in b32_shapes().items()
              if not (k.startswith("transformer.resblocks.") and int(k.split(".")[2]) >= blocks)}
    g = torch.Generator(device=device).manual_seed(seed)
    pre = {k: 0.02 * torch.randn(s, generator=g, device=device) for k, s in shapes.items()}
    fts = [{k: torch.randn(v.shape, generator=g, device=device).mul_(1e-3).add_(v) for k, v in pre.items()}
           for _ in range(tasks)]
    return pre, fts


def run(args: argparse.Namespace, device: torch.device) -> dict:
    """Generate weights, time each method, return the figures."""
    from mergebook.methods import merge

    if args.threads:
        torch.set_num_threads(args.threads)
    pre, fts = checkpoints(args.tasks, args.blocks, device=str(device))
    out: dict = {"params": sum(v.numel() for v in pre.values()), "tasks": args.tasks, "blocks": args.blocks,
                 "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "methods": {}}
    if device.type == "cpu":
        out["inputs_rss_mib"] = proc_status("VmRSS")
    torch.linalg.svd(torch.randn(64, 32, device=device), full_matrices=False)  # initialise the solver
    for name in args.methods.split(","):
        method, kw = METHODS[name]
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            reset_peak()
            base = proc_status("VmRSS")
        t = time.perf_counter()
        merged = merge(method, pre, fts, **kw)
        _sync(device)
        wall = time.perf_counter() - t
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" \
            else proc_status("VmHWM") - base
        out["methods"][name] = {"wall_s": wall, "wall_s_12_blocks": wall * 12 / args.blocks,
                                "peak_above_inputs_mib": peak}
        del merged
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run (in a child process on CPU), print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=12, help="residual blocks kept (1-12); time is extrapolated")
    ap.add_argument("--methods", default=DEFAULT, help=f"comma list of {','.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    ap.add_argument("--omp-wait", default="passive", choices=["passive", "active", "inherit"],
                    help="OMP_WAIT_POLICY of the CPU child (default passive: see benchmarks/README.md)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; use a comma list of {', '.join(METHODS)}")
    if not 1 <= args.blocks <= 12:
        ap.error(f"--blocks {args.blocks} is out of range: ViT-B/32 has 12 residual blocks (use 1-12)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.child:
        print("RESULT " + json.dumps(run(args, device)), flush=True)
        return
    if device.type == "cuda":
        r = run(args, device)
        where = torch.cuda.get_device_name(device)
    else:
        cmd = [sys.executable, __file__, "--child", "--device", "cpu", "--tasks", str(args.tasks), "--blocks",
               str(args.blocks), "--methods", args.methods, "--threads", str(args.threads)]
        env = child_env(args.omp_wait)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(proc.returncode)
        r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        where = f"CPU, {r['threads']} thread(s), OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '(unset)')}"
    r["where"] = where
    print(f"# spectral family, ViT-B/32 shapes, {r['blocks']} of 12 blocks ({r['params'] / 1e6:.1f}M params), "
          f"{r['tasks']} tasks; torch {torch.__version__}, {where}")
    mem = "peak MiB above inputs (GPU max_memory_allocated)" if device.type == "cuda" else \
        "peak RSS MiB above inputs (VmHWM)"
    print(f"{'method':10} {'wall s':>8} {'x12/' + str(r['blocks']) + ' s':>10}   {mem}")
    for m, v in r["methods"].items():
        print(f"{m:10} {v['wall_s']:8.2f} {v['wall_s_12_blocks']:10.1f}   {v['peak_above_inputs_mib']:.0f}")
    if "inputs_rss_mib" in r:
        print(f"(RSS with inputs loaded: {r['inputs_rss_mib'] / 1024:.2f} GiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
