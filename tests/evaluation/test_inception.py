"""Inception features: clean-fid's resize, the two accepted weight files, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from stablediff.errors import MissingPathError, ModelFileError
from stablediff.evaluation.inception import (
    PYTORCH_FID_NAME,
    TORCHSCRIPT_NAME,
    clean_resize,
    features,
    load_inception,
    state_dict_problems,
)
from stablediff.evaluation.inception_net import FIDInceptionV3

# The tests make TorchScript archives (the format of the standard weights) with torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def random_fid_inception(seed: int = 0) -> FIDInceptionV3:
    """Random weights that keep activations O(1) through all 94 layers (He init, random BN stats)."""
    gen = torch.Generator().manual_seed(seed)
    net = FIDInceptionV3().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return net


class NVlabsLayout(torch.nn.Module):
    """The shape of NVlabs' inception-2015-12-05.pt: a `layers` submodule on [-1, 1] input at 299."""

    def __init__(self, net: FIDInceptionV3) -> None:
        super().__init__()
        self.layers = net

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((img - 128.0) / 128.0)


class DetectorSignature(torch.nn.Module):
    """An archive without `layers`, called like StyleGAN's detector: (0..255 images, return_features=True)."""

    def __init__(self, width: int = 2048) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.width = width

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        channel_means = img.mean(dim=(2, 3)) * self.scale  # (B, 3)
        return channel_means.repeat(1, 683)[:, : self.width]


def state_without_counters(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    # pytorch-fid's file predates or omits BatchNorm's num_batches_tracked; ours must load without it.
    return {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inception")
    net = random_fid_inception()
    save_file(state_without_counters(net), folder / "pt_inception.safetensors")
    torch.jit.script(NVlabsLayout(net)).save(str(folder / TORCHSCRIPT_NAME))
    return folder


@pytest.fixture(scope="module")
def two_images():
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(2, 32, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def safetensors_features(weights, two_images):
    return features(two_images, load_inception(weights / "pt_inception.safetensors"))


def meta_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return FIDInceptionV3().state_dict()


def checkerboard(size: int = 8) -> np.ndarray:
    board = (np.indices((size, size)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return np.stack([board, 255 - board, board], axis=2)


def test_clean_resize_is_pil_bicubic_on_each_float_channel_exactly():
    image = np.random.default_rng(1).integers(0, 256, size=(37, 23, 3), dtype=np.uint8)
    resized = clean_resize(image)
    assert resized.shape == (299, 299, 3) and resized.dtype == np.float32
    for c in range(3):
        plane = Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
        np.testing.assert_array_equal(resized[:, :, c], np.asarray(plane))


def test_clean_resize_neither_rounds_nor_clips():
    resized = clean_resize(checkerboard())
    assert not np.array_equal(resized, np.round(resized))
    assert resized.min() < 0 and resized.max() > 255  # bicubic overshoot kept, as clean-fid keeps it


def test_clean_resize_differs_from_torch_bilinear():
    image = checkerboard()
    bilinear = F.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(299, 299), mode="bilinear", align_corners=False
    )[0].permute(1, 2, 0).numpy()
    assert np.abs(clean_resize(image) - bilinear).max() > 10


def test_safetensors_weights_give_2048_float64_features_identical_twice(weights, two_images, safetensors_features):
    model = load_inception(weights / "pt_inception.safetensors")
    assert model.kind == "safetensors" and not model.module.training
    first = safetensors_features
    assert first.shape == (2, 2048) and first.dtype == np.float64
    assert np.isfinite(first).all() and first.std() > 1e-3
    assert not np.allclose(first[0], first[1])
    np.testing.assert_array_equal(features(two_images, model), first)


def test_torchscript_archive_gives_the_safetensors_features(weights, two_images, safetensors_features):
    from_script = load_inception(weights / TORCHSCRIPT_NAME)
    assert from_script.kind == "torchscript"
    np.testing.assert_allclose(features(two_images, from_script), safetensors_features, rtol=1e-6, atol=1e-7)


def test_archive_without_layers_is_called_with_return_features_on_resized_pixels(tmp_path):
    path = tmp_path / "detector.pt"
    torch.jit.script(DetectorSignature()).save(str(path))
    images = np.random.default_rng(3).integers(0, 256, size=(3, 20, 20, 3), dtype=np.uint8)
    got = features(images, load_inception(path), batch_size=2)  # two batches: 2 + 1 images
    expected = np.stack([clean_resize(image).mean(axis=(0, 1), dtype=np.float64) for image in images])
    np.testing.assert_allclose(got[:, :3], expected, rtol=1e-5)
    np.testing.assert_array_equal(got[:, 3:6], got[:, :3])


def test_archive_that_does_not_return_2048_features_is_refused(tmp_path):
    path = tmp_path / "small.pt"
    torch.jit.script(DetectorSignature(width=3)).save(str(path))
    with pytest.raises(ModelFileError, match=r"shape \(1, 3\).*not the FID Inception"):
        features(np.zeros((1, 8, 8, 3), np.uint8), load_inception(path))


def test_state_dict_with_missing_and_extra_keys_is_refused_naming_them(tmp_path):
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in meta_state().items()}
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    save_file(state, tmp_path / "wrong.safetensors")
    with pytest.raises(ModelFileError) as caught:
        load_inception(tmp_path / "wrong.safetensors")
    message = str(caught.value)
    assert "1 missing keys (Mixed_7c.branch_pool.conv.weight)" in message
    assert "1 unexpected keys (AuxLogits.fc.weight)" in message
    assert TORCHSCRIPT_NAME in message and PYTORCH_FID_NAME in message and "\n" not in message


def test_state_dict_problems_names_wrong_shapes_and_tolerates_absent_counters():
    expected = meta_state()
    found = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    assert state_dict_problems(expected, found) == ""
    found["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, not the FID graph's
    assert state_dict_problems(expected, found) == "1 wrong shapes (fc.weight (1000, 2048) instead of (1008, 2048))"


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-save-zip", "legacy-pickle"])
def test_pickled_pth_is_refused_with_how_to_convert(tmp_path, zip_format):
    path = tmp_path / PYTORCH_FID_NAME
    torch.save({"fc.bias": torch.zeros(1008)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ModelFileError, match="is a pickle") as caught:
        load_inception(path)
    assert "safetensors.torch" in str(caught.value) and TORCHSCRIPT_NAME in str(caught.value)


def test_zip_that_torch_jit_cannot_load_is_one_paragraph_error(tmp_path):
    import zipfile

    path = tmp_path / "broken.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("broken/code/__torch__.py", "not torchscript")
    with pytest.raises(ModelFileError, match="could not be read as a TorchScript archive") as caught:
        load_inception(path)
    assert "\n" not in str(caught.value)


def test_missing_file_names_both_accepted_files(tmp_path):
    with pytest.raises(MissingPathError) as caught:
        load_inception(tmp_path / "nowhere.safetensors")
    assert TORCHSCRIPT_NAME in str(caught.value) and PYTORCH_FID_NAME in str(caught.value)
    with pytest.raises(ModelFileError, match="none were given"):
        load_inception(None)
