"""Speed and memory of ``gsr_core.render.rasterize`` (backend "torch") on the CPU, side by side with a peer.

    python -m benchmarks.bench_rasterizer [--peer PATH] [--repeats 5] [--threads 2] [--quick]

The peer is Mxbonn/gsplat-pytorch, a pure-PyTorch 3DGS rasterizer: pass the folder of a checkout (the one with
``gsplat/rasterize.py``); without ``--peer`` it is skipped. Its modules are loaded from that folder by file
path under private names, so they never shadow the real ``gsplat`` package, and nothing of it is copied here.

Each case (image size, Gaussian count, forward or forward+backward) runs in fresh worker processes, one per
implementation, that build the same seeded scene; the parent asks them for timed renders in turn (ours, peer,
ours, ...), so both see the same machine load, and reports the median. Peak memory is the worker's maximum
resident set size (``getrusage``) minus its resident size after the scene was built and imported libraries
loaded, i.e. what rendering itself added. A last case renders 1024x1024 with 500k Gaussians without gradients
(ours only) and checks that it stays under 6 GB.

The scene: N Gaussians uniform in a 2 x 2 x 1 box 3 units in front of one camera with a 40 degree field of
view, log-uniform scales 0.004-0.03 (about 0.5-4 px standard deviation at 256 px), random rotations,
opacities sigmoid(N(0, 1)), random RGB colours. The peer renders it with its own projection and its
``rasterize_gaussians`` with 16 px tiles (its fastest setting here; 8 px tiles were 3x slower forward+backward).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

MEMORY_LIMIT_GB = 6.0


DEFAULT_SCALES = (0.005, 0.05)


def make_scene(n_gaussians: int, size: int, scales: tuple[float, float] = DEFAULT_SCALES, seed: int = 0):
    """Seeded benchmark scene: means [N, 3], quats [N, 4], scales [N, 3], opacities [N], colors [N, 3],
    viewmats [1, 4, 4], Ks [1, 3, 3] (float32); scales log-uniform in ``scales``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    means = (torch.rand(n_gaussians, 3, generator=generator) * 2 - 1) * torch.tensor([1.0, 1.0, 0.5])
    quats = torch.randn(n_gaussians, 4, generator=generator)
    low, high = math.log(scales[0]), math.log(scales[1])
    log_scales = torch.empty(n_gaussians, 3).uniform_(low, high, generator=generator)
    opacities = torch.sigmoid(torch.randn(n_gaussians, generator=generator))
    colors = torch.rand(n_gaussians, 3, generator=generator)
    viewmat = torch.eye(4)
    viewmat[2, 3] = 3.0
    focal = 0.5 * size / math.tan(math.radians(20.0))
    K = torch.tensor([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])
    return means, quats, log_scales.exp(), opacities, colors, viewmat[None], K[None]


def _load_peer(path: str):
    """The peer's two modules, loaded by file path under private names."""
    modules = {}
    for name in ("project_gaussians", "rasterize"):
        file = Path(path) / "gsplat" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_bench_peer_{name}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def _render_ours(scene, size: int, backward: bool):
    from gsr_core.render import rasterize

    means, quats, scales, opacities, colors, viewmats, Ks = scene
    params = [t.clone().requires_grad_(backward) for t in (means, quats, scales, opacities, colors)]
    rendered, _, _ = rasterize(*params, viewmats, Ks, size, size, backend="torch")
    if backward:
        rendered.sum().backward()


def _render_peer(peer, scene, size: int, backward: bool):
    import torch

    means, quats, scales, opacities, colors, viewmats, Ks = scene
    means, quats, scales, opacities, colors = (
        t.clone().requires_grad_(backward) for t in (means, quats, scales, opacities, colors)
    )
    K = Ks[0]
    xys, depths, radii, conics, _, _ = peer["project_gaussians"].project_gaussians(
        means, scales, 1.0, quats / quats.norm(dim=-1, keepdim=True), viewmats[0],
        K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item(), size, size,
    )  # fmt: skip
    rendered = peer["rasterize"].rasterize_gaussians(
        xys, depths, radii, conics, colors, opacities, size, size, 16, torch.zeros(3)
    )
    if backward:
        rendered.sum().backward()


def _resident_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def _worker(connection, implementation: str, peer_path: str | None, n_gaussians: int, size: int, backward: bool,
            threads: int, scales: tuple[float, float]):  # fmt: skip
    """Build the scene, then answer 'run' with seconds per render and 'memory' with (peak, baseline) in kB."""
    import torch

    torch.set_num_threads(threads)
    scene = make_scene(n_gaussians, size, scales)
    peer = _load_peer(peer_path) if implementation == "peer" else None
    import gsr_core.render  # noqa: F401  (imported before the baseline, like the peer's modules)

    baseline = _resident_kb()
    while True:
        command = connection.recv()
        if command == "run":
            start = time.perf_counter()
            if implementation == "ours":
                _render_ours(scene, size, backward)
            else:
                _render_peer(peer, scene, size, backward)
            connection.send(time.perf_counter() - start)
        elif command == "memory":
            connection.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, baseline))
        else:
            return


def measure_case(implementations, peer_path, n_gaussians, size, backward, repeats, threads, scales=DEFAULT_SCALES):
    """Median seconds and peak added memory (MB) per implementation, timed in alternation."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name in implementations:
        parent, child = context.Pipe()
        process = context.Process(
            target=_worker, args=(child, name, peer_path, n_gaussians, size, backward, threads, scales), daemon=True
        )
        process.start()
        workers[name] = (process, parent)
    times = {name: [] for name in implementations}
    try:
        for round_index in range(repeats + 1):  # round 0 warms up
            for name, (_, connection) in workers.items():
                connection.send("run")
                seconds = connection.recv()
                if round_index > 0:
                    times[name].append(seconds)
        results = {}
        for name, (process, connection) in workers.items():
            connection.send("memory")
            peak_kb, baseline_kb = connection.recv()
            results[name] = (statistics.median(times[name]), (peak_kb - baseline_kb) / 1024, peak_kb / 1024)
    finally:
        for process, connection in workers.values():
            if process.is_alive():
                connection.send("stop")
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", help="folder of a Mxbonn/gsplat-pytorch checkout (skipped when absent)")
    parser.add_argument("--repeats", type=int, default=5, help="timed renders per case (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    parser.add_argument("--quick", action="store_true", help="only 256x256 / 50k forward+backward, no large case")
    parser.add_argument(
        "--scales", type=float, nargs=2, default=DEFAULT_SCALES, metavar=("LOW", "HIGH"),
        help=f"range of the log-uniform Gaussian scales (default {DEFAULT_SCALES[0]} {DEFAULT_SCALES[1]})",
    )
    args = parser.parse_args(argv)

    implementations = ["ours"]
    if args.peer:
        if not (Path(args.peer) / "gsplat" / "rasterize.py").is_file():
            parser.error(f"--peer {args.peer} has no gsplat/rasterize.py (expected a Mxbonn/gsplat-pytorch checkout)")
        implementations.append("peer")
    else:
        print("peer: skipped (pass --peer PATH to a Mxbonn/gsplat-pytorch checkout to compare)")

    cases = [(256, 50_000, True)] if args.quick else [
        (size, n, backward) for size in (128, 256) for n in (10_000, 50_000) for backward in (False, True)
    ]  # fmt: skip
    print(
        f"threads={args.threads}, scales {args.scales[0]}-{args.scales[1]}, median of {args.repeats} runs after "
        "1 warm-up; memory = peak RSS added by rendering"
    )
    header = f"{'image':>9} {'gaussians':>9} {'pass':>8} | {'ours s':>8} {'ours MB':>8}"
    if args.peer:
        header += f" | {'peer s':>8} {'peer MB':>8} | {'speed-up':>8} {'mem ratio':>9}"
    print(header)
    print("-" * len(header))
    for size, n, backward in cases:
        results = measure_case(implementations, args.peer, n, size, backward, args.repeats, args.threads, args.scales)
        ours_s, ours_mb, _ = results["ours"]
        line = f"{f'{size}x{size}':>9} {n:>9} {'fwd+bwd' if backward else 'fwd':>8} | {ours_s:>8.3f} {ours_mb:>8.0f}"
        if args.peer:
            peer_s, peer_mb, _ = results["peer"]
            line += f" | {peer_s:>8.3f} {peer_mb:>8.0f} | {peer_s / ours_s:>7.1f}x {peer_mb / max(ours_mb, 1):>8.1f}x"
        print(line, flush=True)

    if not args.quick:
        results = measure_case(["ours"], None, 500_000, 1024, False, 1, args.threads, args.scales)
        seconds, added_mb, peak_mb = results["ours"]
        verdict = "OK" if peak_mb < MEMORY_LIMIT_GB * 1024 else "OVER"
        print(
            f"1024x1024, 500000 Gaussians, no grad: {seconds:.2f} s, peak RSS {peak_mb:.0f} MB "
            f"(rendering added {added_mb:.0f} MB) -> {verdict} (limit {MEMORY_LIMIT_GB:.0f} GB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
