"""Shared fixtures: small views folders, specs, a Prefect test harness, a loopback Prefect server, and running
`gsr` in a new process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

# Before anything imports Prefect: an isolated Prefect home, no telemetry, quiet console.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="gsr-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from gsr_core.cameras import Camera, intrinsics_from_fov, look_at  # noqa: E402
from gsr_core.data.points import PointCloud  # noqa: E402
from gsr_core.data.views import ViewsWriter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def orbit_camera(index: int, count: int, size: int, radius: float = 3.0) -> Camera:
    angle = torch.tensor(2 * torch.pi * index / count, dtype=torch.float64)
    eye = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle), torch.tensor(1.0, dtype=torch.float64)])
    return Camera(intrinsics_from_fov(size, size, 50.0), look_at(eye, torch.zeros(3), torch.tensor([0.0, 0.0, 1.0])),
                  size, size)


def write_views(folder: Path, count: int = 8, size: int = 32, seed: int = 0, test_every: int = 4) -> Path:
    """A views folder of smooth random images (so downsampling and upsampling are meaningful)."""
    generator = torch.Generator().manual_seed(seed)
    writer = ViewsWriter(folder, metadata={"scene": "test"})
    for index in range(count):
        coarse = torch.rand(1, 3, max(2, size // 8), max(2, size // 8), generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        split = "test" if index % test_every == 0 else "train"
        writer.add(f"v{index:03d}", split, orbit_camera(index, count, size), image[0].permute(1, 2, 0))
    writer.close(PointCloud(torch.rand(50, 3, generator=generator), torch.rand(50, 3, generator=generator)))
    return folder


@pytest.fixture
def views_folder(tmp_path: Path) -> Path:
    return write_views(tmp_path / "views")


def chain_spec(views: Path, name: str = "chain", factor: int = 4) -> dict:
    """load_views -> downsample -> upsample -> evaluate: the demo's shape over a folder of ours."""
    return {
        "name": name,
        "nodes": {
            "scene": {"task": "load_views", "params": {"path": str(views)}},
            "lowres": {"task": "downsample", "inputs": {"views": "scene"}, "params": {"factor": factor}},
            "bicubic": {"task": "upsample", "inputs": {"views": "lowres"}, "params": {"factor": factor}},
            "report": {"task": "evaluate", "inputs": {"reference": "scene", "candidates": ["bicubic"]},
                       "params": {"metrics": ["psnr", "ssim"]}},
        },
    }


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (real server code, SQLite) for every in-process flow run of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def loopback_prefect_server(home: Path, command: Callable[[int], list[str]] | None = None) -> Iterator[str]:
    """A real Prefect server on 127.0.0.1 with its own home and database (analytics and UI off) for as long as
    the block runs; yields its API URL.

    ``command(port)`` is what starts it (default: ``prefect server start``); its output goes to
    ``home/server.log``. The server is stopped with its whole process group.
    """
    port = free_port()
    argv = command(port) if command else [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                          "--port", str(port)]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "w") as log:
        server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not come up on port {port} (exit {server.poll()}): "
                            f"{(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def run_gsr(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """Run the `gsr` command in a new process (its own ephemeral Prefect API unless env says otherwise)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def node_statuses(stdout: str) -> dict[str, str]:
    """{node: status} from the per-node lines `gsr run` prints."""
    statuses = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) >= 3 and line.startswith("  ") and words[2] in ("cached", "ran", "failed", "skipped"):
            statuses[words[0]] = words[2]
    return statuses


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module: tiny networks gain nothing from threads, and on a shared 2-core
    CPU two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
