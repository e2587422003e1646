"""`make bench [PEER=DIR]`: every benchmark in turn, each printing its own table.

``--peer DIR`` (``make bench PEER=DIR``) names a checkout of Mxbonn/gsplat-pytorch for the rasterizer's
side-by-side comparison (see benchmarks/README.md); without it the peer column is skipped.
"""

import argparse
import sys

from benchmarks import bench_fit, bench_rasterizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every gsr benchmark.")
    parser.add_argument("--peer", help="Mxbonn/gsplat-pytorch checkout for the rasterizer comparison")
    args = parser.parse_args(argv)
    print("== rasterizer ==", flush=True)
    status = bench_rasterizer.main(["--peer", args.peer] if args.peer else [])
    print("\n== fit ==", flush=True)
    bench_fit.main([])
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
