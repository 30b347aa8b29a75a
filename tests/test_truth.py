"""What the simulations know: the generator's true masks, the Flickr stand-in's, and the scores built on them
(label quality, the class map's score, oracle labels)."""

from __future__ import annotations

import json

import numpy as np
from conftest import FAST
from omegaconf import OmegaConf
from PIL import Image

from recall.cli import main
from recall.replay.pool import ReplayPool, build_pool
from recall.sim.toy_gan import ToyGenerator
from recall.sim.truth import gan_label_quality, score_labels, true_mask


def test_render_with_mask_matches_render_and_marks_the_object():
    generator = ToyGenerator()
    z = generator.latent(5, 3)
    image, mask = generator.render_with_mask(5, z)
    assert np.array_equal(np.array(image), np.array(generator.render(5, z)))
    assert 0.05 < mask.mean() < 0.9 and set(np.unique(mask)) == {0, 1}


def test_label_quality_scores_each_image_against_its_true_mask(tmp_path):
    records = [{"id": "a", "target_class": 3, "target_name": "bird"}, {"id": "b", "target_class": 3,
                                                                        "target_name": "bird"},
               {"id": "c", "target_class": 5, "target_name": "bottle"}, {"id": "d", "target_class": 5,
                                                                          "target_name": "bottle"}]
    truth = {"a": np.zeros((4, 4), bool), "b": np.zeros((4, 4), bool), "c": np.zeros((4, 4), bool), "d": None}
    truth["a"][:2] = True  # 8 true pixels
    truth["b"][:1] = True
    labels = {"a": np.zeros((4, 4), np.uint8), "b": np.zeros((4, 4), np.uint8), "c": np.zeros((4, 4), np.uint8)}
    labels["a"][1:3] = 3  # 4 of its 8 pixels right, 4 wrong: IoU 4 / 12
    labels["a"][3, 0] = 7  # another class: not the image's
    for name, label in labels.items():
        Image.fromarray(label).save(tmp_path / f"{name}.png")
    quality = score_labels(records, tmp_path, lambda record: truth[record["id"]])
    assert quality[3]["iou"] == (4 / 12 + 0.0) / 2 and quality[3]["empty"] == 0.5  # b labelled empty
    assert quality[5] == {"iou": 1.0, "empty": 1.0, "images": 1}  # both empty; d has no truth: not scored


def test_the_class_map_score_knows_every_kind_and_shared_sources():
    from recall.sim.toy_imagenet import class_map_score, class_space

    classes = class_space()
    lookalike = {c.target: i for i, c in enumerate(classes) if c.kind == "lookalike"}
    variant = next((i, c.target) for i, c in enumerate(classes) if c.kind == "variant")
    other = next(i for i, c in enumerate(classes) if c.kind == "other")
    distractor = next(i for i, c in enumerate(classes) if c.kind == "distractor")
    mapping = {**lookalike, variant[1]: variant[0], 1: other, 2: distractor, 3: lookalike[4]}
    score = class_map_score(mapping)
    assert score["per_class"][variant[1]]["kind"] == "variant"
    kinds = {c: score["per_class"][c]["kind"] for c in (1, 2, 3, 4)}
    assert kinds == {1: "other", 2: "distractor", 3: "wrong_target", 4: "lookalike"}
    assert score["correct"] == 20 - 3 and score["classes"] == 20
    assert score["shared"] == {classes[lookalike[4]].name: [3, 4]}


def test_the_look_alike_is_the_nearest_class_of_the_class_space():
    """No distractor or further class shares two of shape, texture and hue (within 35 degrees) with a toy class:
    such a class would be nearer to it than its look-alike, and the class map would rightly pick it."""
    from recall.sim.toy_imagenet import MIN_HUE_DISTANCE, class_space
    from recall.sim.toyworld import CLASS_STYLES

    for source in class_space():
        if source.kind in ("distractor", "other"):
            for toy in CLASS_STYLES.values():
                gap = abs((source.style.hue - toy.hue + 180) % 360 - 180)
                same = (source.style.shape == toy.shape) + (source.style.texture == toy.texture) + \
                    (gap < MIN_HUE_DISTANCE)
                assert same <= 1, (source.name, toy)


def _oracle_world(tmp_path, tiny_world):
    generator = ToyGenerator(mapping=ToyGenerator().lookalike_mapping())
    mapping = tmp_path / "mapping.json"  # a hand-written mapping: target class index -> source class index
    mapping.write_text(json.dumps({str(c): s for c, s in generator.lookalike_mapping().items()}))
    pool = tmp_path / "pool"
    build_pool(generator, {c: f"c{c}" for c in range(1, 21)}, per_class=3, root=pool, progress=False)
    return generator, mapping, pool


def test_a_run_with_oracle_labels_keeps_label_evaluation_but_the_true_mask_of_each_images_class(tmp_path, tiny_world):
    """method.labels=oracle: label evaluation's argmax over every output (the authors') for every pixel, except
    that the image's own class is exactly its true mask. The run logs the labels' quality against the truth."""
    generator, mapping, pool = _oracle_world(tmp_path, tiny_world)
    runs = {}
    for labels in ("evaluated", "oracle"):
        run_dir = tmp_path / labels
        assert main(["run", f"dataset.root={tiny_world}", "protocol=19-1", "method=recall", f"method.labels={labels}",
                     "replay=toy_gan", f"replay.pool={pool}", f"replay.mapping={mapping}", f"run_dir={run_dir}",
                     "tracking.uri=", *FAST]) == 0
        runs[labels] = run_dir
    labels_of = {k: v / "steps" / "replay_labels" for k, v in runs.items()}
    marker = json.loads((labels_of["oracle"] / "step0.done").read_text())
    assert marker["labeller"].endswith("the true masks of each image's class") and marker["images"] == 19 * 3
    replay = OmegaConf.create({"name": "toy_gan", "mapping": str(mapping), "source": {}})
    records = [r for r in ReplayPool(pool).records() if r["target_class"] <= 19]  # the classes 19-1 replays
    quality = gan_label_quality(replay, records, labels_of["oracle"])
    assert len(quality) == 19 and all(q == {"iou": 1.0, "empty": 0.0, "images": 3} for q in quality.values())
    for record in records:  # every other pixel: what label evaluation wrote
        evaluated = np.array(Image.open(labels_of["evaluated"] / f"{record['id']}.png"))
        oracle = np.array(Image.open(labels_of["oracle"] / f"{record['id']}.png"))
        own, mask = int(record["target_class"]), true_mask(generator, record)
        outside = ~mask & (evaluated != own)
        assert np.array_equal(oracle[outside], evaluated[outside])
        assert (oracle[mask] == own).all() and not (oracle[~mask] == own).any()
    final = json.loads((runs["evaluated"] / "metrics.json").read_text())["final"]["statistics"]
    measured = gan_label_quality(replay, records, labels_of["evaluated"])
    assert final["replay_labels/iou/aeroplane"] == measured[1]["iou"]  # the run's own numbers
    assert final["replay_labels/empty_step0_classes"] == np.mean([q["empty"] for q in measured.values()])
    mapping.unlink()  # each record names its generator class and latent: scoring a pool needs not the map it was built with
    assert gan_label_quality(replay, records, labels_of["evaluated"]) == measured


def test_oracle_labels_need_a_source_that_knows_its_true_masks(tmp_path, tiny_world, capsys):
    assert main(["run", f"dataset.root={tiny_world}", "protocol=19-1", "method=recall", "method.labels=oracle",
                 "replay=folder", f"replay.pool={tmp_path}/nowhere", f"run_dir={tmp_path}/r", "tracking.uri=",
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert "method.labels=oracle needs a simulated replay source" in err and "replay=folder" in err
    assert not (tmp_path / "r" / "steps").exists()  # refused before step 0
