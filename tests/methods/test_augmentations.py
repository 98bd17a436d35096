"""The augmentation families CARDs train with: seeded, shape- and range-keeping, and the operations'
values on constructed images worked out by hand."""

from __future__ import annotations

import pytest
import torch

from hf_prune.methods.robust import augmentations as aug


def batch(n: int = 6, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, 10, 10, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", aug.AUGMENTATIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_families_are_seeded_and_keep_shape_and_range(family, channels):
    x = batch(channels=channels)
    a = aug.augment(x, family, torch.Generator().manual_seed(5))
    b = aug.augment(x, family, torch.Generator().manual_seed(5))
    c = aug.augment(x, family, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    if family == "none":
        assert torch.equal(a, x)
    else:
        assert not torch.equal(a, c) and not torch.equal(a, x)


def test_gaussian_adds_noise_of_a_drawn_std_up_to_the_maximum():
    x = torch.full((4, 1, 6, 6), 0.5)
    out = aug.augment(x, "gaussian", torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    std = torch.rand(4, generator=generator) * 0.1
    noise = torch.randn(4, 1, 6, 6, generator=generator)
    torch.testing.assert_close(out, (0.5 + std.view(-1, 1, 1, 1) * noise).clamp(0, 1))
    assert float((out - 0.5).std(dim=(1, 2, 3)).max()) < 0.1 * 1.5


def test_autocontrast_stretches_each_channel_to_the_full_range():
    x = torch.tensor([[[[0.2, 0.4], [0.6, 0.4]]], [[[0.3, 0.3], [0.3, 0.3]]]])
    out = aug.autocontrast(x, torch.Generator())
    assert out[0].flatten().tolist() == pytest.approx([0.0, 0.5, 1.0, 0.5])
    assert torch.equal(out[1], x[1])  # a flat image stays


def test_equalize_maps_levels_through_the_cumulative_histogram():
    # levels 0, 0, 128, 255: cdf 2, 2, 3, 4; first non-empty cdf 2; (cdf - 2) / (4 - 2)
    x = torch.tensor([[[[0.0, 0.0], [128 / 255, 1.0]]]])
    assert aug.equalize(x, torch.Generator()).flatten().tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0])


def test_posterize_and_solarize_keep_their_invariants():
    x = batch(n=20)
    posterized = aug.posterize(x, torch.Generator().manual_seed(0)) * 255
    assert torch.allclose(posterized, (posterized / 16).round() * 16, atol=1e-3)  # at most 4 bits kept
    solarized = aug.solarize(x, torch.Generator().manual_seed(0))
    assert bool(((solarized - x).abs() < 1e-6).logical_or((solarized - (1 - x)).abs() < 1e-6).all())
    # AugMix's severity 3: the threshold is at least 1 - 0.3 * 256/255, so values below 0.69 never flip
    assert torch.equal(solarized[x < 0.69], x[x < 0.69])


def test_geometric_operations_move_pixels_but_keep_a_centred_constant():
    x = torch.zeros(8, 1, 9, 9)
    x[:, :, 3:6, 3:6] = 1.0
    for operation in (aug.rotate, aug.shear_x, aug.shear_y):
        out = operation(x, torch.Generator().manual_seed(1))
        assert torch.allclose(out[:, :, 4, 4], torch.ones(8), atol=1e-5), operation.__name__
    moved = aug.translate_x(x, torch.Generator().manual_seed(1))
    assert not torch.allclose(moved, x)
    # translation by up to a third of the side: the block's mass stays within the image, shifted sideways
    assert bool((moved.sum(dim=(1, 2, 3)) > 0).all())


def test_an_unknown_family_is_named():
    with pytest.raises(
        ValueError, match="unknown augmentation 'cutout' \\(allowed: augmix, gaussian, none\\)"
    ):
        aug.augment(batch(), "cutout", torch.Generator())
