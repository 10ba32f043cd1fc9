"""`stablediff ckpt` on a real run directory: list, info, verify (and its failure), gc, repair."""

import json

from tests.conftest import run_cli


def test_list_shows_every_checkpoint_with_sizes(run_copy):
    result = run_cli("ckpt", "list", str(run_copy))
    assert result.returncode == 0, result.stderr
    assert "step" in result.stdout and "new" in result.stdout
    assert " 4 " in result.stdout  # tiny.yaml trains 4 steps; the final step is saved


def test_info_reports_counters_and_tensor_groups(run_copy):
    result = run_cli("ckpt", "info", str(run_copy))
    info = json.loads(result.stdout)
    assert info["step"] == 4 and info["meta"]["stage"] == "unet"
    assert {"unet", "ema", "vae", "optim"} <= set(info["tensors"])


def test_verify_passes_on_a_clean_store(run_copy):
    result = run_cli("ckpt", "verify", str(run_copy), "--deep")
    assert result.returncode == 0 and result.stdout.startswith("")
    assert "ok:" in result.stdout


def test_verify_exits_1_and_names_the_chunk_after_a_bit_flip(run_copy):
    chunk = max((run_copy / "checkpoints" / "objects").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    result = run_cli("ckpt", "verify", str(run_copy), "--deep")
    assert result.returncode == 1
    assert chunk.name[:12] in result.stdout + result.stderr


def test_repair_restores_the_primary_from_a_replica(run_copy, tmp_path):
    replica = tmp_path / "replica"
    assert run_cli("ckpt", "repair", str(run_copy), "--replica", str(replica)).returncode == 0  # seeds it
    chunk = next(p for p in (run_copy / "checkpoints" / "objects").rglob("*") if p.is_file())
    chunk.unlink()
    assert run_cli("ckpt", "verify", str(run_copy)).returncode == 1
    result = run_cli("ckpt", "repair", str(run_copy), "--replica", str(replica))
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_cli("ckpt", "verify", str(run_copy), "--deep").returncode == 0


def test_ckpt_on_a_folder_without_a_store_exits_1(tmp_path):
    result = run_cli("ckpt", "list", str(tmp_path))
    assert result.returncode == 1 and "no checkpoint store" in result.stderr


def test_info_on_an_empty_store_exits_1(tmp_path):
    (tmp_path / "checkpoints" / "manifests").mkdir(parents=True)
    result = run_cli("ckpt", "info", str(tmp_path))
    assert result.returncode == 1 and "holds no checkpoints" in result.stderr
