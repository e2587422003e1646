"""The content-addressed store: keys, atomic publication, integrity checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from gsr_core.store import Store, cache_key, digest_tree


def test_cache_key_depends_on_every_part_and_not_on_dict_order():
    base = cache_key("downsample", 1, {"factor": 4, "filter": "area"}, {"views": "abc"})
    assert base.startswith("downsample-") and len(base) == len("downsample-") + 24
    assert base == cache_key("downsample", 1, {"filter": "area", "factor": 4}, {"views": "abc"})
    variants = [cache_key("downsample", 2, {"factor": 4, "filter": "area"}, {"views": "abc"}),
                cache_key("downsample", 1, {"factor": 2, "filter": "area"}, {"views": "abc"}),
                cache_key("downsample", 1, {"factor": 4, "filter": "area"}, {"views": "abd"}),
                cache_key("downsample", 1, {"factor": 4, "filter": "area"}, {"views": "abc"}, {"weights": "x"})]
    assert len({base, *variants}) == 5


def _publish(store: Store, key: str, payload: bytes, info: dict | None = None) -> None:
    with store.writer(key, info or {"node": "n"}) as out:
        (out / "sub").mkdir()
        (out / "sub" / "data.bin").write_bytes(payload)


def test_published_output_is_found_and_its_digest_ignores_bookkeeping(tmp_path: Path):
    store = Store(tmp_path)
    _publish(store, "k1", b"hello", {"seconds": 1.0})
    _publish(store, "k2", b"hello", {"seconds": 2.0})
    first, second = store.lookup("k1"), store.lookup("k2")
    assert first.path == tmp_path.resolve() / "objects" / "k1" and (first.path / "sub" / "data.bin").is_file()
    assert first.digest == second.digest == store.published("k1").digest  # same bytes, same digest
    _publish(store, "k3", b"hellO")
    assert store.lookup("k3").digest != first.digest


def test_a_failing_writer_publishes_nothing_and_keeps_the_old_output(tmp_path: Path):
    store = Store(tmp_path)
    _publish(store, "k", b"old")
    with pytest.raises(RuntimeError):
        with store.writer("k", {}) as out:
            (out / "partial").write_text("x")
            raise RuntimeError("node crashed")
    assert (store.lookup("k").path / "sub" / "data.bin").read_bytes() == b"old"
    assert not list((tmp_path / "tmp").iterdir())


def test_deleted_truncated_or_edited_outputs_are_absent(tmp_path: Path):
    store = Store(tmp_path)
    for key, damage in [("gone", lambda p: (p / "sub" / "data.bin").unlink()),
                        ("short", lambda p: (p / "sub" / "data.bin").write_bytes(b"hel")),
                        ("edited", lambda p: (p / "sub" / "data.bin").write_bytes(b"jello")),
                        ("unmarked", lambda p: (p / "_complete.json").unlink())]:
        _publish(store, key, b"hello")
        damage(store.object_dir(key))
        assert store.lookup(key) is None, key


def test_stale_tmp_of_a_dead_process_is_removed_but_a_live_one_kept(tmp_path: Path):
    store = Store(tmp_path)
    dead = tmp_path / "tmp" / "k.999999999.abcd"
    live = tmp_path / "tmp" / f"k.{__import__('os').getpid()}.abcd"
    dead.mkdir(), live.mkdir()
    store.remove_stale_tmp("k")
    assert not dead.exists() and live.exists()


def test_digest_tree_follows_content(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("1")
    before = digest_tree(tmp_path / "a")
    (tmp_path / "a" / "x.txt").write_text("2")
    assert digest_tree(tmp_path / "a") != before
