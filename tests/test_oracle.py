"""The generator's true masks and the label-quality diagnostic built on them."""

from __future__ import annotations

import json

import numpy as np
from conftest import FAST

from recall.cli import main
from recall.replay.pool import build_pool
from recall.sim.oracle import label_quality, true_mask
from recall.sim.toy_gan import ToyGenerator


def test_render_with_mask_matches_render_and_marks_the_object():
    generator = ToyGenerator()
    z = generator.latent(5, 3)
    image, mask = generator.render_with_mask(5, z)
    assert np.array_equal(np.array(image), np.array(generator.render(5, z)))
    assert 0.05 < mask.mean() < 0.9 and set(np.unique(mask)) == {0, 1}


def test_a_run_with_oracle_labels_replays_the_true_masks(tmp_path, tiny_world):
    """method.labels=oracle: the replay labels are the generator's true masks (label quality 1.0, none empty)."""
    generator = ToyGenerator(mapping=ToyGenerator().lookalike_mapping())
    mapping = tmp_path / "mapping.json"  # a hand-written mapping: target class index -> source class index
    mapping.write_text(json.dumps({str(c): s for c, s in generator.lookalike_mapping().items()}))
    pool = tmp_path / "pool"
    build_pool(generator, {c: f"c{c}" for c in range(1, 21)}, per_class=3, root=pool, progress=False)
    run_dir = tmp_path / "run"
    assert main(["run", f"dataset.root={tiny_world}", "protocol=19-1", "method=recall", "method.labels=oracle",
                 "replay=toy_gan", f"replay.pool={pool}", f"replay.mapping={mapping}", f"run_dir={run_dir}",
                 "tracking.uri=", *FAST]) == 0
    labels = run_dir / "steps" / "replay_labels"
    marker = json.loads((labels / "step0.done").read_text())
    assert (marker["labeller"], marker["images"], marker["classes"]) == ("oracle", 19 * 3, list(range(1, 20)))
    quality = label_quality(pool, labels, generator)
    assert len(quality) == 19 and all(q == {"iou": 1.0, "empty": 0.0, "images": 3} for q in quality.values())
    record = json.loads((pool / "manifest.jsonl").read_text().splitlines()[0])
    assert true_mask(generator, record).any()


def test_oracle_labels_need_the_toy_generator(tmp_path, tiny_world, capsys):
    assert main(["run", f"dataset.root={tiny_world}", "protocol=19-1", "method=recall", "method.labels=oracle",
                 "replay=folder", f"replay.pool={tmp_path}/nowhere", f"run_dir={tmp_path}/r", "tracking.uri=",
                 *FAST]) == 2
    assert "not built" in capsys.readouterr().err  # the pool is checked first: before step 0 trains
