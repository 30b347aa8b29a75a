"""The generator's true masks and the label-quality diagnostic built on them."""

from __future__ import annotations

import json

import numpy as np

from recall.replay import ToyGenerator, build_pool
from recall.replay.oracle import label_quality, true_mask, write_oracle_labels


def test_render_with_mask_matches_render_and_marks_the_object():
    generator = ToyGenerator()
    z = generator.latent(5, 3)
    image, mask = generator.render_with_mask(5, z)
    assert np.array_equal(np.array(image), np.array(generator.render(5, z)))
    assert 0.05 < mask.mean() < 0.9 and set(np.unique(mask)) == {0, 1}


def test_oracle_labels_score_perfectly_and_mark_steps_done(tmp_path):
    generator = ToyGenerator(mapping=ToyGenerator().lookalike_mapping())
    pool = tmp_path / "pool"
    build_pool(generator, {1: "aeroplane", 2: "bicycle"}, per_class=3, root=pool, progress=False)
    labels = tmp_path / "labels"
    assert write_oracle_labels(pool, labels, generator, num_steps_done=2) == 6
    assert (labels / "step0.done").exists() and (labels / "step1.done").exists()
    quality = label_quality(pool, labels, generator)
    assert quality["aeroplane"] == {"iou": 1.0, "empty": 0.0, "images": 3}
    record = json.loads((pool / "manifest.jsonl").read_text().splitlines()[0])
    assert true_mask(generator, record).any()
