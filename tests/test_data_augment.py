"""AugmentConfig: SPEC §2 defaults, validation, derived values."""

from __future__ import annotations

import dataclasses

import pytest

from protoclr.data import AugmentConfig
from protoclr.data.augment import blur_kernel_size, eval_resize_size


def test_defaults_match_spec():
    a = AugmentConfig()
    assert a.crop_scale == (0.08, 1.0)
    assert a.jitter == (0.8, 0.8, 0.8, 0.2) and a.jitter_p == 0.8
    assert a.grayscale_p == 0.2 and a.blur_p == 0.5 and a.blur_sigma == (0.1, 2.0)
    assert a.flip_p == 0.5 and a.views == 2 and a.n_small_crops == 0
    assert a.num_views == 2


def test_every_field_has_help():
    for f in dataclasses.fields(AugmentConfig):
        assert f.metadata.get("help"), f.name


def test_blur_auto_off_for_32px():
    assert not AugmentConfig(image_size=32).blur_enabled
    assert AugmentConfig(image_size=64).blur_enabled
    assert AugmentConfig(image_size=32, blur="on").blur_enabled
    assert not AugmentConfig(image_size=224, blur="off").blur_enabled


def test_view_specs_multicrop():
    a = AugmentConfig(image_size=224, n_small_crops=4)
    specs = a.view_specs()
    assert [s.size for s in specs] == [224, 224, 96, 96, 96, 96]
    assert [s.blur for s in specs] == [True, True, False, False, False, False]
    assert specs[2].scale == a.small_scale
    assert AugmentConfig(image_size=32, n_small_crops=1, small_size=16).view_specs()[-1].size == 16


def test_lists_become_tuples():
    a = AugmentConfig(crop_scale=[0.2, 1.0], jitter=[0.4, 0.4, 0.4, 0.1])
    assert a.crop_scale == (0.2, 1.0) and a.jitter == (0.4, 0.4, 0.4, 0.1)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(image_size=0), "image_size"),
        (dict(views=0), "views"),
        (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
        (dict(crop_scale=(0.1,)), "crop_scale"),
        (dict(jitter_p=1.5), "jitter_p"),
        (dict(jitter=(0.8, 0.8, 0.8, 0.7)), "jitter"),
        (dict(blur="maybe"), "blur"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(n_small_crops=-1), "n_small_crops"),
    ],
)
def test_validation_names_field(kw, name):
    with pytest.raises(ValueError, match=name):
        AugmentConfig(**kw)


def test_derived_sizes():
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(32) == 3 and blur_kernel_size(96) % 2 == 1
    assert eval_resize_size(32) == 32 and eval_resize_size(224) == 256
