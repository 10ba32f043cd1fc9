"""`ckpt verify` re-hashes by default, `ckpt list` says what it checked, and gc/verify/list accept a
store that holds only the orphan chunks of a failed first save."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from stablediff.checkpoint import CheckpointStore
from tests.conftest import run_cli


def _chunk_only_in_newest(run_dir):
    manifests = sorted((run_dir / "checkpoints" / "manifests").glob("*.json"))
    chunks = [{h for t in json.loads(m.read_text())["tensors"].values() for h in t["chunks"]} for m in manifests]
    digest = sorted(chunks[-1] - set().union(*chunks[:-1]))[0]
    return run_dir / "checkpoints" / "objects" / digest[:2] / digest, int(manifests[-1].stem)


def test_verify_rehashes_by_default_and_quick_only_checks_sizes(run_copy):
    chunk, newest = _chunk_only_in_newest(run_copy)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    result = run_cli("ckpt", "verify", str(run_copy))
    assert result.returncode == 1 and chunk.name[:12] in result.stdout
    assert f"damaged: steps [{newest}]" in result.stderr
    quick = run_cli("ckpt", "verify", str(run_copy), "--quick")
    assert quick.returncode == 0 and "presence and size only (--quick)" in quick.stdout
    assert run_cli("ckpt", "verify", str(run_copy), "--deep").returncode == 1  # the old flag still works


def test_list_says_what_it_checked_and_flags_a_checkpoint_with_a_missing_chunk(run_copy):
    chunk, newest = _chunk_only_in_newest(run_copy)
    chunk.unlink()
    result = run_cli("ckpt", "list", str(run_copy))
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 2}
    assert "NO: 1 chunk missing" in rows[str(newest)]
    assert all(row.rstrip("│ ").endswith("ok") for step, row in rows.items() if step not in ("step", str(newest)))
    assert "chunks: present+size" in result.stdout and "`stablediff ckpt verify` re-hashes" in result.stdout


def test_a_store_with_only_orphan_chunks_is_listed_verified_and_collected(tmp_path):
    store = CheckpointStore(tmp_path / "run" / "checkpoints", chunk_bytes=1024)
    store.save(1, {"w": np.arange(1000, dtype=np.float32)})  # 4 chunks...
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "manifests")  # ...and the manifest never came
    old = time.time() - 2 * 3600
    for path in (tmp_path / "run" / "checkpoints" / "objects").rglob("*"):
        os.utime(path, (old, old))
    store.put_chunk("ab" * 32, b"a save in flight")  # young: a save may still commit it
    run_dir = str(tmp_path / "run")
    listed = run_cli("ckpt", "list", run_dir)
    assert listed.returncode == 0 and "5 chunks are referenced by no checkpoint" in listed.stdout
    verified = run_cli("ckpt", "verify", run_dir)
    assert verified.returncode == 0 and "5 unreferenced chunks" in verified.stdout
    collected = run_cli("ckpt", "gc", run_dir)
    assert collected.returncode == 0 and "removed 4 chunks" in collected.stdout, collected.stderr
    assert set(store.object_sizes()) == {"ab" * 32}
    assert "removed 1 chunks" in run_cli("ckpt", "gc", run_dir, "--grace", "0").stdout
