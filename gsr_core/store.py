"""The content-addressed artifact store: one folder per node output, named by its cache key.

Layout of a store root::

    objects/<key>/            finished outputs; each holds ``_node.json`` (what made it) and, written last,
                              ``_complete.json`` (the completion marker: every file's size and sha256 + the digest)
    tmp/<key>.<id>/           outputs being written; renamed into ``objects/`` only when complete
    scratch/<key>/            checkpoints of long nodes, kept across crashes, removed when the node completes
    records/                  the orchestrator's result records, one file per key (see ``record_path``)
    runs/<stamp>-<name>/      one folder per pipeline run: the resolved spec and a summary

A cache key hashes (node type, node version, params, the content digests of the inputs, gsr version), see
``cache_key``. A content digest hashes the files a node wrote (not ``_node.json``, not the marker), so two runs
that write identical bytes have identical digests and their dependents stay cached.

An output counts as present only if its marker exists and every file it lists still has its recorded size and
sha256: a deleted, truncated or edited output is treated as absent, and its node recomputes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gsr_core

MARKER_FILE = "_complete.json"
NODE_FILE = "_node.json"
_BOOKKEEPING = {MARKER_FILE, NODE_FILE}
_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(root: Path) -> list[Path]:
    """Every regular file under ``root`` except bookkeeping, sorted by relative path."""
    files = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in _BOOKKEEPING]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _digest_of(shas: dict[str, str]) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs."""
    return hashlib.sha256(canonical_json(sorted(shas.items())).encode()).hexdigest()


_tree_memo: dict[tuple, str] = {}


def digest_tree(root: str | Path) -> str:
    """Content digest of every file under ``root`` (or of one file): sha256 over sorted (path, sha256) pairs.

    Memoised per process on (path, sizes, modification times), so a large source folder is hashed once.
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{root} does not exist")
    files = [root] if root.is_file() else _listing(root)
    stats = tuple((p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stats not in _tree_memo:
        base = root.parent if root.is_file() else root
        _tree_memo[stats] = _digest_of({p.relative_to(base).as_posix(): sha256_file(p) for p in files})
    return _tree_memo[stats]


def cache_key(node_type: str, node_version: int, params: dict[str, Any], inputs: dict[str, Any],
              extra: dict[str, Any] | None = None) -> str:
    """The cache key of a node output: ``<node_type>-<24 hex digits>``.

    Args:
        node_type: registered node type name.
        node_version: bumped whenever the node's code changes what it writes.
        params: validated params, JSON-ready.
        inputs: per input port, the content digest(s) of what feeds it (JSON-ready).
        extra: anything else the output depends on (e.g. the digest of external weights).
    """
    material = {
        "node_type": node_type,
        "node_version": node_version,
        "params": params,
        "inputs": inputs,
        "extra": extra or {},
        "gsr_version": gsr_core.__version__,
    }
    return f"{node_type}-{hashlib.sha256(canonical_json(material).encode()).hexdigest()[:24]}"


@dataclass(frozen=True)
class Output:
    """A finished node output: its key, its content digest and its folder."""

    key: str
    digest: str
    path: Path


class Store:
    """A store root (see the module docstring). Creating one creates the folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        for sub in ("objects", "tmp", "scratch", "records", "runs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def object_dir(self, key: str) -> Path:
        return self.root / "objects" / key

    def scratch_dir(self, key: str) -> Path:
        """A folder for a node's checkpoints that survives crashes (created on demand)."""
        path = self.root / "scratch" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def record_path(self, key: str) -> Path:
        """Where the orchestrator keeps its result record for ``key``."""
        return self.root / "records" / key

    def lookup(self, key: str) -> Output | None:
        """The finished output for ``key``, or None when it is absent, incomplete or altered."""
        folder = self.object_dir(key)
        marker = folder / MARKER_FILE
        try:
            manifest = json.loads(marker.read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for name, (size, sha) in files.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != size or sha256_file(path) != sha:
                return None
        return Output(key, manifest["digest"], folder)

    def published(self, key: str) -> Output:
        """The output ``writer`` just published for ``key``, read from its marker without re-hashing."""
        manifest = json.loads((self.object_dir(key) / MARKER_FILE).read_text())
        return Output(key, manifest["digest"], self.object_dir(key))

    def forget_record(self, key: str) -> None:
        """Drop the orchestrator's record for ``key`` (used when the output it points to is gone)."""
        self.record_path(key).unlink(missing_ok=True)

    @contextmanager
    def writer(self, key: str, node_info: dict[str, Any]) -> Iterator[Path]:
        """Write a node output into a fresh temporary folder; on success publish it as ``objects/<key>``.

        The marker is written last, then the folder is renamed into place. An output already present (from
        a concurrent run, or being replaced by a forced rerun) is swapped out only after the new one is
        complete. On an exception the temporary folder is removed and nothing published is touched.

        Yields:
            the temporary folder to write into.
        """
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            (tmp / NODE_FILE).write_text(json.dumps(node_info, indent=1, default=str))
            files = {p.relative_to(tmp).as_posix(): (p.stat().st_size, sha256_file(p)) for p in _listing(tmp)}
            files[NODE_FILE] = ((tmp / NODE_FILE).stat().st_size, sha256_file(tmp / NODE_FILE))
            content = {name: sha for name, (_, sha) in files.items() if name != NODE_FILE}
            manifest = {"key": key, "digest": _digest_of(content), "files": files}
            (tmp / MARKER_FILE).write_text(json.dumps(manifest, indent=1))
            self._publish(tmp, self.object_dir(key))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.root / "scratch" / key, ignore_errors=True)

    def _publish(self, tmp: Path, target: Path) -> None:
        if target.exists():
            retired = self.root / "tmp" / f"{target.name}.retired.{uuid.uuid4().hex[:8]}"
            os.replace(target, retired)
            os.replace(tmp, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(tmp, target)

    def remove_stale_tmp(self, key: str) -> None:
        """Remove leftovers of earlier attempts at ``key`` whose process is gone (e.g. a run killed mid-node)."""
        for leftover in (self.root / "tmp").glob(f"{key}.*"):
            owner = leftover.name[len(key) + 1:].split(".")[0]
            if not (owner.isdigit() and _process_alive(int(owner))):
                shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
