"""A run's stores: RUN_DIR/checkpoints first, then the replicas its config.yaml names (or those given)."""

from pathlib import Path

from stablediff.checkpoint.run_stores import configured_replicas, run_stores


def test_replicas_come_from_the_runs_config(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("checkpoint:\n  replicas: [/mnt/a, 'file:///mnt/b']\n")
    assert configured_replicas(tmp_path) == ["/mnt/a", "file:///mnt/b"]
    primary, replicas = run_stores(tmp_path)
    assert Path(primary.location) == tmp_path / "checkpoints"
    assert [r.location for r in replicas] == ["/mnt/a", "/mnt/b"]  # file:// is the local filesystem


def test_a_run_without_config_or_replicas_has_none(tmp_path: Path):
    assert configured_replicas(tmp_path) == []
    (tmp_path / "config.yaml").write_text("checkpoint:\n  replicas:\n")
    assert configured_replicas(tmp_path) == []


def test_given_replicas_win_over_the_config(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("checkpoint:\n  replicas: [/mnt/a]\n")
    _, replicas = run_stores(tmp_path, ["/mnt/c"])
    assert [r.location for r in replicas] == ["/mnt/c"]
