"""config.yaml is the config in use; each earlier one is kept under configs/ with the step it started at."""

import yaml

from stablediff.training.run_configs import write_run_config


def test_a_changed_config_moves_the_previous_one_to_configs_step_n(tmp_path):
    assert write_run_config(tmp_path, "seed: 0\n", 0, keep_previous=False) is None
    archived = write_run_config(tmp_path, "seed: 1\n", 40, keep_previous=True)
    assert archived == tmp_path / "configs" / "step-0.yaml"
    assert yaml.safe_load(archived.read_text()) == {"seed": 0}
    assert write_run_config(tmp_path, "seed: 2\n", 90, keep_previous=True) == tmp_path / "configs" / "step-40.yaml"
    assert yaml.safe_load((tmp_path / "configs" / "step-40.yaml").read_text()) == {"seed": 1}
    current = (tmp_path / "config.yaml").read_text()
    assert current.startswith("# the resolved config of this run, in effect from step 90\n")
    assert yaml.safe_load(current) == {"seed": 2}


def test_an_unchanged_config_keeps_its_file_and_its_starting_step(tmp_path):
    write_run_config(tmp_path, "seed: 0\n", 0, keep_previous=False)
    assert write_run_config(tmp_path, "seed: 0\n", 40, keep_previous=True) is None
    assert "from step 0\n" in (tmp_path / "config.yaml").read_text()
    assert not (tmp_path / "configs").exists()


def test_a_second_change_at_the_same_step_does_not_overwrite_the_first(tmp_path):
    write_run_config(tmp_path, "seed: 0\n", 0, keep_previous=False)
    write_run_config(tmp_path, "seed: 1\n", 0, keep_previous=True)
    assert write_run_config(tmp_path, "seed: 2\n", 0, keep_previous=True) == tmp_path / "configs" / "step-0.2.yaml"


def test_an_old_config_yaml_without_header_started_at_step_0(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert write_run_config(tmp_path, "seed: 0\n", 10, keep_previous=True) is None  # same YAML
    assert write_run_config(tmp_path, "seed: 3\n", 10, keep_previous=True) == tmp_path / "configs" / "step-0.yaml"


def test_starting_over_without_a_checkpoint_keeps_no_copy(tmp_path):
    write_run_config(tmp_path, "seed: 0\n", 0, keep_previous=False)
    write_run_config(tmp_path, "seed: 5\n", 0, keep_previous=False)
    assert not (tmp_path / "configs").exists()
