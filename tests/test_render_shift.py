"""The toy generator's render_shift: a dose of domain shift that changes what the generator draws and nothing else
(class space, toy ImageNet, encoder and class map stay), checked against the toy world's own class styles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recall.errors import ReplayError
from recall.sim.toy_gan import ToyGenerator, shifted_render_style
from recall.sim.toyworld import CLASS_STYLES, ClassStyle


def test_a_shift_scales_each_colour_field_of_the_imitation_as_computed_by_hand():
    own = ClassStyle(shape="ring", texture="stripes", hue=350.0, value=0.9, secondary_value=0.3, texture_period=6.0)
    imitation = ClassStyle(shape="ring", texture="stripes", hue=10.0, value=0.8, secondary_value=0.35,
                           texture_period=7.5)  # 20 degrees past 0, the short way round
    assert shifted_render_style(own, imitation, 1.0) is imitation
    zero = shifted_render_style(own, imitation, 0.0)
    assert (zero.hue, zero.value, zero.secondary_value, zero.texture_period) == (350.0, 0.9, 0.3, 6.0)
    half = shifted_render_style(own, imitation, 0.5)
    assert half.hue == pytest.approx(0.0) and half.value == pytest.approx(0.85)
    assert half.secondary_value == pytest.approx(0.325) and half.texture_period == pytest.approx(6.0 * 1.25 ** 0.5)
    double = shifted_render_style(own, imitation, 2.0)
    assert double.hue == pytest.approx(30.0) and double.value == pytest.approx(0.7)
    assert double.secondary_value == pytest.approx(0.4) and double.texture_period == pytest.approx(6.0 * 1.25 ** 2)
    far = shifted_render_style(own, imitation, 3.0)  # brightness stays in the renderer's range
    assert far.secondary_value == pytest.approx(0.45) and shifted_render_style(
        own, ClassStyle("ring", "stripes", 10.0, value=0.5, secondary_value=0.45), 3.0).value == pytest.approx(0.2)
    assert (zero.shape, zero.texture, zero.saturation) == (own.shape, own.texture, imitation.saturation)


def hue_gap(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def test_every_look_alike_moves_towards_its_toy_class_and_nothing_else_moves():
    default, shifts = ToyGenerator(), {s: ToyGenerator(render_shift=s) for s in (0.0, 0.5, 1.0, 2.0)}
    for index, source in enumerate(default.classes):
        styles = {s: g._styles[index] for s, g in shifts.items()}
        if source.target is None:  # distractors and further classes: drawn as they are at every shift
            assert all(style == source.style for style in styles.values())
            continue
        own = CLASS_STYLES[source.target]
        assert styles[1.0] == source.style
        assert (styles[0.0].hue, styles[0.0].texture_period) == (pytest.approx(own.hue % 360), own.texture_period)
        gaps = [hue_gap(styles[s].hue, own.hue) for s in (0.0, 0.5, 1.0, 2.0)]
        assert gaps[0] == pytest.approx(0, abs=1e-9) and gaps[1] == pytest.approx(gaps[2] / 2)
        assert gaps[3] == pytest.approx(min(2 * gaps[2], 360 - 2 * gaps[2]))
        ratios = [math.log(styles[s].texture_period / own.texture_period) for s in (0.5, 1.0, 2.0)]
        assert ratios == pytest.approx([ratios[1] / 2, ratios[1], 2 * ratios[1]])


def test_a_shift_changes_the_objects_colours_but_not_the_mask_the_background_or_the_default_images():
    default, zero, double = ToyGenerator(), ToyGenerator(render_shift=0.0), ToyGenerator(render_shift=2.0)
    explicit_one = ToyGenerator(render_shift=1.0)
    for target, source in list(default.lookalike_mapping().items())[:4]:
        z = default.latent(source, 7)
        image, mask = default.render_with_mask(source, z)
        assert np.array_equal(np.asarray(image), np.asarray(explicit_one.render(source, z)))
        for other in (zero, double):
            shifted, shifted_mask = other.render_with_mask(source, z)
            assert np.array_equal(mask, shifted_mask)  # the true mask (label quality's truth) does not move
            difference = np.abs(np.asarray(image, dtype=int) - np.asarray(shifted, dtype=int)).sum(axis=2)
            assert difference[mask == 0].max() == 0 and difference[mask == 1].mean() > 5, target


def test_a_pool_record_names_its_shift_and_a_bad_shift_is_refused():
    generator = ToyGenerator(mapping={3: ToyGenerator().lookalike_mapping()[3]}, render_shift=0.5)
    _, record = next(generator.images(3, "bird", 0, 1))
    assert record["render_shift"] == 0.5 and generator.params["render_shift"] == 0.5
    for bad in (-0.1, 3.5):
        with pytest.raises(ReplayError, match="render_shift must be in"):
            ToyGenerator(render_shift=bad)
