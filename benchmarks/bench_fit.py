"""Speed and memory of ``gsr_core.fit.fit``: time per iteration and peak memory at LR 64x64 and HR 256x256.

    python -m benchmarks.bench_fit [--iterations 60] [--points 10000] [--views 16] [--threads 2]
                                   [--device auto] [--backend auto] [--strategy default]

One synthetic ``tiles`` scene (``gsr_core.data.synthetic``) is traced at 256 px and downsampled x4 (area filter)
to 64 px, so both resolutions share cameras and point cloud. Each resolution is fitted in a fresh worker
process (so its peak memory is its own) for ``--iterations`` steps with densification switched off, so the
Gaussian count stays at ``--points`` (one Gaussian per point) and the two timings compare like with like.

Reported per resolution: the median wall time of a step (first 3 steps skipped), Gaussians, and peak memory:
on the CPU the worker's maximum resident set size and how much of it the fit added (peak minus the resident
size before fitting, after imports and scene loading); on CUDA the peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path

WARMUP_STEPS = 3


def _worker(folder: str, options: dict, queue) -> None:
    import torch

    from gsr_core.data.views import Views
    from gsr_core.fit import FitConfig, fit

    torch.set_num_threads(options.pop("threads"))
    views = Views.read(folder)
    config = FitConfig(refine_start=options["iterations"] + 1, **options)
    stamps = []
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if torch.cuda.is_available() and config.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    result = fit(views, config, progress=lambda report: stamps.append(time.perf_counter()))
    steps = [later - earlier for earlier, later in zip(stamps, stamps[1:])][WARMUP_STEPS - 1 :]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu_mb = (torch.cuda.max_memory_allocated() / 2**20
              if torch.cuda.is_available() and config.device != "cpu" else None)  # fmt: skip
    queue.put({"ms": 1000 * statistics.median(steps), "gaussians": result.num_gaussians,
               "views": len(views.split("train")),
               "peak_mb": peak_kb / 1024, "added_mb": (peak_kb - baseline_kb) / 1024, "gpu_mb": gpu_mb})  # fmt: skip


def _measure(folder: Path, options: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(str(folder), dict(options), queue))
    process.start()
    outcome = queue.get()
    process.join()
    return outcome


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60, help="steps per fit (timing skips the first 3)")
    parser.add_argument("--points", type=int, default=10_000, help="Gaussians (initial point cloud size)")
    parser.add_argument("--views", type=int, default=16, help="views of the scene (1 in 8 held out)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in the workers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "gsplat"])
    parser.add_argument("--strategy", default="default", choices=["default", "mcmc"])
    args = parser.parse_args(argv)
    if args.iterations <= WARMUP_STEPS + 1:
        parser.error(f"--iterations must exceed {WARMUP_STEPS + 1}")

    from gsr_core.data.resample import resample_views
    from gsr_core.data.synthetic import write_synthetic_scene
    from gsr_core.data.views import Views

    options = {"iterations": args.iterations, "threads": args.threads, "device": args.device,
               "backend": args.backend, "strategy": args.strategy}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gsr-bench-fit-") as scratch:
        high = write_synthetic_scene(Path(scratch) / "hr", "tiles", resolution=256, views=args.views, seed=0,
                                     supersample=2, num_points=args.points)  # fmt: skip
        low = resample_views(Views.read(high), Path(scratch) / "lr", 4, "down")
        print(f"fit benchmark: {args.iterations} steps, strategy {args.strategy}, densification off, "
              f"device {args.device}, backend {args.backend}, {args.threads} CPU threads")  # fmt: skip
        print(f"{'resolution':>10} {'views':>5} {'gaussians':>9} {'ms/step':>8} {'peak RSS MB':>11} "
              f"{'fit added MB':>12} {'GPU peak MB':>11}")  # fmt: skip
        for label, folder in (("64x64", low), ("256x256", high)):
            row = _measure(folder, options)
            gpu = f"{row['gpu_mb']:11.0f}" if row["gpu_mb"] is not None else f"{'-':>11}"
            print(f"{label:>10} {row['views']:>5} {row['gaussians']:>9} {row['ms']:>8.1f} {row['peak_mb']:>11.0f} "
                  f"{row['added_mb']:>12.0f} {gpu}")  # fmt: skip


if __name__ == "__main__":
    main()
