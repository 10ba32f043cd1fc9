"""DreamBooth's class images, generated once by the base model and cached in RUN_DIR/class_images.

Image i is `NNNNN.png` (i zero-padded), drawn alone from the seed `class_image_seed(seed, i)`:
it depends on nothing but (seed, i) and the settings, so a restart regenerates a missing
image exactly as it was. One image per pipeline call on purpose: in a batch, float
summation order changes with the batch's size and neighbours, and image i would too.
Each image is written atomically (temp name, fsync, rename), so a kill leaves only whole
images (and perhaps a temp file, removed at the next start); a start generates only the
images that are missing or do not decode. The settings they were made with are recorded
in RUN_DIR/class_images.json; other settings over the same folder are an error, not a mix.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from stablediff.config.finetune import PriorSettings
from stablediff.errors import ConfigError
from stablediff.io.atomic import is_temp, remove_quietly, replace_atomic
from stablediff.models.atomic_output import write_file
from stablediff.training.interrupt import STOP

CLASS_IMAGES = "class_images"
CLASS_RECORD = "class_images.json"
_CLASS_STREAM = 0xDB  # keeps these seeds apart from every other (seed, index) use


def class_image_seed(seed: int, index: int) -> int:
    """The generation seed of class image `index` (a 63-bit int, as `stablediff generate --seed` takes)."""
    entropy = np.random.SeedSequence([seed, index, _CLASS_STREAM]).generate_state(2, dtype=np.uint64)
    return int(entropy[0] >> np.uint64(1))


def class_image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def generation_settings(prior: PriorSettings, seed: int, resolution: int, base_record: dict) -> dict:
    """What decides the images' pixels (num_class_images does not: image i is the same for any count)."""
    return {"prompt": prior.class_prompt, "steps": prior.steps, "guidance_scale": prior.guidance_scale,
            "seed": seed, "size": resolution, "base": base_record}


def ensure_class_images(pipe, prior: PriorSettings, seed: int, resolution: int, run_dir: Path, base_record: dict,
                        device: torch.device | None = None, say: Callable[[str], None] = print) -> Path:
    """RUN_DIR/class_images holding images 0..num_class_images-1 (only the missing ones generated)."""
    run_dir = Path(run_dir)
    folder = run_dir / CLASS_IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    check_record(run_dir, generation_settings(prior, seed, resolution, base_record))
    remove_temp_files(folder)  # a killed write's leftovers (the run directory has one writer: its lock)
    missing = [i for i in range(prior.num_class_images) if not is_whole_png(class_image_path(folder, i))]
    if not missing:
        say(f"class images: all {prior.num_class_images} in {folder} (none generated)")
        return folder
    say(f"class images: generating {len(missing)} of {prior.num_class_images} with the base model "
        f"({prior.class_prompt!r}, {prior.steps} steps, guidance {prior.guidance_scale}) into {folder}")
    pipe.set_progress_bar_config(disable=True)
    with _on_device(pipe, device), torch.random.fork_rng(devices=[]):  # training's RNG stays untouched
        for done, index in enumerate(missing):
            STOP.check("while generating class images", f"the {len(missing) - done} still missing are made "
                       f"when it starts again (the whole ones are kept in {folder})")
            image = generate_one(pipe, prior, class_image_seed(seed, index), resolution)
            write_file(class_image_path(folder, index), png_bytes(image))
            if (done + 1) % 10 == 0 or done + 1 == len(missing):
                say(f"class images: {done + 1}/{len(missing)} generated")
    return folder


def generate_one(pipe, prior: PriorSettings, seed: int, resolution: int):
    from stablediff.inference.pipeline import txt2img

    return txt2img(pipe, prior.class_prompt, steps=prior.steps, guidance_scale=prior.guidance_scale, seed=seed,
                   num=1, size=(resolution, resolution))[0]


def check_record(run_dir: Path, settings: dict) -> None:
    """Write the generation settings on the first start; later starts must have the same ones."""
    path = run_dir / CLASS_RECORD
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != settings:
            changed = sorted(k for k in settings.keys() | recorded.keys() if recorded.get(k) != settings.get(k))
            raise ConfigError(f"the class images in {run_dir / CLASS_IMAGES} were generated with other settings "
                              f"({', '.join(changed)} differ: see {path}); put finetune.prior back as it was, or "
                              f"remove {run_dir / CLASS_IMAGES} and {path} to generate them anew")
        return
    replace_atomic(path, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())


def remove_temp_files(folder: Path) -> None:
    for entry in folder.iterdir():
        if is_temp(entry.name) and entry.is_file():
            remove_quietly(str(entry))


def is_whole_png(path: Path) -> bool:
    """The file exists and decodes (a damaged one is generated again)."""
    from PIL import Image

    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def _on_device(pipe, device: torch.device | None):
    """The pipeline on the training device while it generates (a GPU makes 200 SD images minutes, not hours)."""
    moved = device is not None and device.type != "cpu"
    if moved:
        pipe.to(device)
    try:
        yield
    finally:
        if moved:
            pipe.to("cpu")
