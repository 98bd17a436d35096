"""The CIFAR-10-C corruptions: the published parameters, seeded determinism, severity order on real images,
values by hand on constructed images, the blurs against scipy (what the original's scikit-image calls), the
noises' statistics, and the refusals."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
from conftest import shared_asset
from hf_prune.evals.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from PIL import Image

from hf_prune.errors import DataError
from hf_prune.image_data import read_image_set
from hf_prune.recipe import CORRUPTION_SEVERITIES, EVAL_CORRUPTIONS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Hendrycks & Dietterich's make_cifar_c.py, severity 1 to 5, written out again here.
PUBLISHED = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
}
NOISES = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")


def random_images(channels: int, n: int = 4, size: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=generator, dtype=torch.uint8)


def test_the_table_holds_the_published_parameters_and_the_recipe_names():
    assert tuple(CORRUPTIONS) == EVAL_CORRUPTIONS and SEVERITIES == CORRUPTION_SEVERITIES == (1, 2, 3, 4, 5)
    assert {name: list(c.parameters) for name, c in CORRUPTIONS.items()} == PUBLISHED
    assert {name for name, c in CORRUPTIONS.items() if c.random} == set(NOISES)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_seeded_determinism_shape_and_dtype(name, channels):
    images = random_images(channels)
    rng_state = torch.get_rng_state()
    for severity in SEVERITIES:
        first = corrupt(images, name, severity, seed=7)
        assert first.dtype == torch.uint8 and first.shape == images.shape
        assert torch.equal(first, corrupt(images.clone(), name, severity, seed=7))
        other_seed = corrupt(images, name, severity, seed=8)
        assert torch.equal(first, other_seed) != (name in NOISES)
        assert not torch.equal(first, images)  # every severity changes something
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is never drawn from


def test_each_severity_and_corruption_draws_its_own_noise():
    images = torch.full((1, 1, 32, 32), 128, dtype=torch.uint8)
    one, two = corrupt(images, "gaussian_noise", 4, seed=0), corrupt(images, "gaussian_noise", 5, seed=0)
    # σ 0.09 vs 0.10 from one stream would make the noises proportional; separate streams are not.
    d1, d2 = one.float() - 128, two.float() - 128
    assert abs(torch.corrcoef(torch.stack([d1.flatten(), d2.flatten()]))[0, 1]) < 0.2


@pytest.mark.parametrize("asset", ["images/fashion-mnist", "images/cifar10-test-500"])
def test_distance_from_the_clean_image_grows_with_severity_on_real_images(asset):
    images = read_image_set(shared_asset(asset), split="test", limit=100).images
    for name in PUBLISHED:
        distances = [
            (corrupt(images, name, s, seed=0).float() - images.float()).abs().mean() for s in SEVERITIES
        ]
        assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), (
            name,
            [round(float(d), 3) for d in distances],
        )


def image(*channels: list[list[int]]) -> torch.Tensor:
    return torch.tensor([list(channels)], dtype=torch.uint8)


def test_contrast_by_hand_pulls_each_channel_to_its_own_mean():
    x = image([[0, 100], [200, 60]], [[10, 10], [10, 50]], [[255, 255], [255, 255]])
    # severity 2: c = 0.5 around the channel means 90, 20 and 255
    expected = image([[45, 95], [145, 75]], [[15, 15], [15, 35]], [[255, 255], [255, 255]])
    assert torch.equal(corrupt(x, "contrast", 2, seed=0), expected)
    # severity 4: c = 0.3 on the first channel: 90 + 0.3·(x − 90)
    assert corrupt(x, "contrast", 4, seed=0)[0, 0].tolist() == [[63, 93], [123, 81]]


def test_brightness_by_hand_on_grey_and_colour():
    grey = image([[0, 100], [250, 255]])
    # severity 3: + 0.15·255 = 38.25, clipped at 255
    assert corrupt(grey, "brightness", 3, seed=0)[0, 0].tolist() == [[38, 138], [255, 255]]
    # colour, severity 3: V = max(R, G, B) + 38.25 with hue and saturation kept (channels scale by V'/V);
    # black has no hue: it becomes grey V'. Severity 5 (+76.5) on (204, 60, 12): V' = 255, scale 1.25.
    colour = image([[100, 0]], [[50, 0]], [[0, 0]])
    assert corrupt(colour, "brightness", 3, seed=0)[0, :, 0].tolist() == [[138, 38], [69, 38], [0, 38]]
    assert corrupt(image([[204]], [[60]], [[12]]), "brightness", 5, seed=0).flatten().tolist() == [
        255,
        75,
        15,
    ]


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_is_the_hsv_round_trip(severity):
    images = random_images(3, n=2, size=16, seed=3)
    got = corrupt(images, "brightness", severity, seed=0)
    shift = PUBLISHED["brightness"][severity - 1]
    pixels, outs = (t.permute(0, 2, 3, 1).reshape(-1, 3) for t in (images, got))
    for pixel, out in zip(pixels, outs, strict=True):
        h, s, v = colorsys.rgb_to_hsv(*(pixel.double() / 255).tolist())
        reference = [round(c * 255) for c in colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0))]
        assert max(abs(a - b) for a, b in zip(out.tolist(), reference, strict=True)) <= 1


def test_pixelate_by_hand_averages_blocks():
    # severity 5 on 4×4: int(4·0.65) = 2, so 2×2 block means, each spread back over its block
    x = torch.tensor([[10, 20, 0, 0], [30, 40, 100, 100], [7, 7, 200, 0], [9, 9, 0, 0]], dtype=torch.uint8)
    means = [[25, 25, 50, 50], [25, 25, 50, 50], [8, 8, 50, 50], [8, 8, 50, 50]]
    assert corrupt(x[None, None], "pixelate", 5, seed=0)[0, 0].tolist() == means
    rgb = torch.stack([x, 255 - x, torch.full_like(x, 3)])[None]
    out = corrupt(rgb, "pixelate", 5, seed=0)[0]
    assert out[1].tolist() == [[255 - v for v in row] for row in means] and out[2].eq(3).all()
    # severity 1 on 2×2: int(2·0.95) = 1 pixel, the mean of all four
    assert corrupt(image([[0, 40], [80, 120]]), "pixelate", 1, seed=0).flatten().tolist() == [60] * 4


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_is_a_pillow_save_at_the_published_quality(channels):
    images = random_images(channels, n=2, size=16, seed=5)
    for severity, quality in zip(SEVERITIES, PUBLISHED["jpeg_compression"], strict=True):
        got = corrupt(images, "jpeg_compression", severity, seed=0)
        for one, out in zip(images, got, strict=True):
            pixels = one.permute(1, 2, 0).numpy()
            buffer = io.BytesIO()
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buffer, "JPEG", quality=quality)
            reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
            assert np.array_equal(out.permute(1, 2, 0).numpy().reshape(reference.shape), reference)


def _close_to(reference: np.ndarray, got: torch.Tensor) -> None:
    """Equal after rounding, up to float32 against float64 ties: at most one level off, on < 0.1%."""
    difference = np.abs(np.round(np.clip(reference, 0, 1) * 255) - got.numpy())
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_blur_is_scipys_gaussian_filter(severity):
    from scipy import ndimage

    images = random_images(3, n=4, size=20, seed=severity)
    sigma = PUBLISHED["gaussian_blur"][severity - 1]
    x = images.numpy() / 255.0
    reference = ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
    _close_to(reference, corrupt(images, "gaussian_blur", severity, seed=0))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_defocus_blur_is_the_antialiased_disk_with_reflected_borders(severity):
    from scipy import ndimage

    images = random_images(1, n=4, size=20, seed=severity)
    radius, alias_sigma = PUBLISHED["defocus_blur"][severity - 1]
    grid = np.arange(-8, 9)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).astype(float)
    taps = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * alias_sigma**2))
    kernel = ndimage.correlate(disk / disk.sum(), np.outer(taps, taps) / taps.sum() ** 2, mode="mirror")
    reference = ndimage.correlate(images.numpy() / 255.0, kernel[None, None], mode="mirror")
    _close_to(reference, corrupt(images, "defocus_blur", severity, seed=0))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_noise_statistics_follow_the_parameter(severity):
    grey = torch.full((1, 1, 200, 200), 128, dtype=torch.uint8)
    x = 128 / 255
    sigma = PUBLISHED["gaussian_noise"][severity - 1]
    noise = corrupt(grey, "gaussian_noise", severity, seed=1).double() - 128
    assert abs(noise.mean()) < 4 * 255 * sigma / 200 and noise.std() == pytest.approx(255 * sigma, rel=0.03)
    photons = PUBLISHED["shot_noise"][severity - 1]
    shot = corrupt(grey, "shot_noise", severity, seed=1).double() / 255
    assert shot.mean() == pytest.approx(x, abs=2e-3) and shot.var() == pytest.approx(x / photons, rel=0.05)
    speckle_sigma = PUBLISHED["speckle_noise"][severity - 1]
    dark = torch.full_like(grey, 64)  # speckle scales with the value: its σ is 64·σ levels here
    speckle = corrupt(dark, "speckle_noise", severity, seed=1).double() - 64
    assert speckle.std() == pytest.approx(64 * speckle_sigma, rel=0.03)
    amount = PUBLISHED["impulse_noise"][severity - 1]
    impulse = corrupt(grey, "impulse_noise", severity, seed=1)
    salt, pepper, n = int((impulse == 255).sum()), int((impulse == 0).sum()), impulse.numel()
    assert int((impulse == 128).sum()) == n - salt - pepper
    for count, share in ((salt + pepper, amount), (salt, amount / 2), (pepper, amount / 2)):
        assert abs(count - n * share) < 5 * (n * share * (1 - share)) ** 0.5


def test_unknown_corruption_and_bad_severity_are_named():
    images = random_images(1)
    with pytest.raises(
        DataError, match=r"unknown corruption 'fog' \(allowed: gaussian_noise, shot_noise, .*pixelate\)"
    ):
        corrupt(images, "fog", 1, seed=0)
    for severity in (0, 6, True, "3", 2.0):
        with pytest.raises(DataError, match=rf"severity must be one of 1, 2, 3, 4, 5, got {severity!r}"):
            corrupt(images, "contrast", severity, seed=0)
    with pytest.raises(DataError, match="corrupt takes uint8 images"):
        corrupt(images.float(), "contrast", 1, seed=0)
    with pytest.raises(DataError, match="corrupt takes uint8 images"):
        corrupt(images[0], "contrast", 1, seed=0)
    with pytest.raises(DataError, match="1 .greyscale. or 3 .RGB. channels, the images have 2"):
        corrupt(random_images(2), "jpeg_compression", 1, seed=0)
