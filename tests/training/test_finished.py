"""A finished run re-exports only when its export is missing, incomplete or older than its checkpoint."""

import os

from stablediff.training.finished import DIFFUSERS_FILES, completed_step, outputs_up_to_date


class Resume:
    def __init__(self, step, stage="unet"):
        self.step, self.meta = step, {"stage": stage}


def make_run(tmp_path, step=4):
    manifest = tmp_path / "checkpoints" / "manifests" / f"{step:012d}.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    os.utime(manifest, (1000, 1000))
    export = tmp_path / "export" / "diffusers"
    for name in (*DIFFUSERS_FILES, "text_encoder/config.json"):
        (export / name).parent.mkdir(parents=True, exist_ok=True)
        (export / name).write_text("x")
        os.utime(export / name, (2000, 2000))
    grid = tmp_path / "samples" / "final.png"
    grid.parent.mkdir()
    grid.write_text("png")
    return export, grid, manifest


def up_to_date(tmp_path, export, grid, said):
    return outputs_up_to_date(4, export, grid, tmp_path / "checkpoints", False, said.append)


def test_a_whole_export_newer_than_the_checkpoint_is_kept(tmp_path):
    export, grid, _ = make_run(tmp_path)
    said = []
    assert up_to_date(tmp_path, export, grid, said)
    assert said == [f"run already complete at step 4: the export in {export} is up to date, nothing to do"]


def test_an_export_older_than_the_checkpoint_or_missing_a_file_is_redone(tmp_path):
    export, grid, manifest = make_run(tmp_path)
    os.utime(export / "text_encoder" / "config.json", (500, 500))
    said = []
    assert not up_to_date(tmp_path, export, grid, said)
    assert "older than the newest checkpoint" in said[0]
    os.utime(export / "text_encoder" / "config.json", (2000, 2000))
    (export / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert not up_to_date(tmp_path, export, grid, said)
    assert "missing or incomplete" in said[1]


def test_a_missing_final_grid_is_written_again(tmp_path):
    export, grid, _ = make_run(tmp_path)
    grid.unlink()
    assert not up_to_date(tmp_path, export, grid, [])


def test_only_a_stage_2_checkpoint_at_max_steps_is_complete():
    assert completed_step(Resume(4), 4) == 4 and completed_step(Resume(9), 4) == 9
    assert completed_step(Resume(3), 4) is None and completed_step(None, 4) is None
    assert completed_step(Resume(600, stage="vae"), 4) is None
