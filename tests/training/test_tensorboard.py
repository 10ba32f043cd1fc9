"""TensorBoard log: scalars and sample grids land in event files that TensorBoard reads back."""

import sys

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

from stablediff.training.tensorboard import TensorBoardLog


def read_back(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, IMAGES: 0})
    accumulator.Reload()
    return accumulator


def test_scalars_are_written_per_step_under_their_prefix(tmp_path):
    with TensorBoardLog(tmp_path / "tb") as tb:
        tb.scalars(1, {"loss": 0.5, "lr": 1e-3}, prefix="unet")
        tb.scalars(2, {"loss": 0.25, "lr": 1e-3}, prefix="unet")
    events = read_back(tmp_path / "tb")
    assert [(e.step, e.value) for e in events.Scalars("unet/loss")] == [(1, 0.5), (2, 0.25)]
    assert [e.step for e in events.Scalars("unet/lr")] == [1, 2]


def test_non_numeric_and_non_finite_fields_are_skipped(tmp_path):
    with TensorBoardLog(tmp_path / "tb") as tb:
        tb.scalars(3, {"stage": "unet", "resumed": True, "note": None, "loss": float("nan"), "grad_norm": 2})
    assert read_back(tmp_path / "tb").Tags()["scalars"] == ["grad_norm"]


def test_a_pil_sample_grid_is_stored_as_an_image(tmp_path):
    grid = Image.new("L", (48, 32), color=128)
    with TensorBoardLog(tmp_path / "tb") as tb:
        tb.image("samples", grid, step=10)
    (event,) = read_back(tmp_path / "tb").Images("samples")
    assert (event.step, event.width, event.height) == (10, 48, 32)
    assert event.encoded_image_string.startswith(b"\x89PNG")


def test_flush_makes_scalars_readable_before_close(tmp_path):
    tb = TensorBoardLog(tmp_path / "tb")
    tb.scalars(1, {"loss": 1.0})
    tb.flush()
    assert [e.value for e in read_back(tmp_path / "tb").Scalars("loss")] == [1.0]
    tb.close()


def test_importing_the_module_does_not_import_tensorboard():
    import subprocess
    code = "import sys, stablediff.training.tensorboard; print('tensorboard' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
