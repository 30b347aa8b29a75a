"""The diffusion stand-in (replay=toy_diffusion): prompted by class names, deterministic per image, its confusion,
context and domain shift; `recall pool` and a RECALL run replaying it, with its labels scored against its truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from omegaconf import OmegaConf
from PIL import Image

from recall.cli import main
from recall.data.classes import VOC_CLASSES
from recall.errors import ReplayError
from recall.labeling import save_label_png
from recall.replay.pool import ReplayPool, build_pool
from recall.replay.sources import build_source
from recall.sim.toy_diffusion import CLASS_STYLES, SAME_SHAPE, ToyDiffusion, concept_of
from recall.sim.truth import diffusion_correct_own_class, diffusion_label_quality

CONF = Path(__file__).resolve().parents[1] / "conf" / "replay" / "toy_diffusion.yaml"


def _pixels(source: ToyDiffusion, c: int, start: int, count: int) -> list[np.ndarray]:
    return [np.asarray(image) for image, _ in source.images(c, VOC_CLASSES[c], start, count)]


def test_the_prompt_names_the_class_it_draws() -> None:
    assert concept_of("a photo of a potted plant") == 16 and concept_of("A TV Monitor, on a desk") == 20
    assert concept_of("a photo of a TV") is None and concept_of("a plant") is None
    source = ToyDiffusion(size=32, confusion=0.0, prompts={"cow": "a photo of a horse", "sheep": "a photo of a TV"})
    _, mask, facts = source.render_with_mask(10, "cow", 0)  # an override naming another class draws that one
    assert facts["concept"] == 13 and facts["prompt"] == "a photo of a horse" and not mask.any()
    _, mask, facts = source.render_with_mask(17, "sheep", 0)  # naming none: scenery only
    assert facts["concept"] is None and facts["context_class"] is None and not mask.any()
    _, mask, facts = source.render_with_mask(16, "pottedplant", 0)
    assert facts["concept"] == 16 and facts["prompt"] == "a photo of a potted plant" and mask.any()


def test_images_are_deterministic_and_vary_within_a_class() -> None:
    a, b = ToyDiffusion(size=32), ToyDiffusion(size=32)
    assert all((x == y).all() for x, y in zip(_pixels(a, 3, 0, 4), _pixels(b, 3, 0, 4)))
    assert all((x == y).all() for x, y in zip(_pixels(a, 3, 2, 2), _pixels(a, 3, 0, 4)[2:]))  # any start
    images = _pixels(a, 3, 0, 4)
    assert all((images[0] != other).any() for other in images[1:])
    assert (images[0] != _pixels(ToyDiffusion(size=32, seed=1), 3, 0, 1)[0]).any()


def test_confusion_and_context_change_only_the_images_they_are_about() -> None:
    plain, confused = ToyDiffusion(size=32, confusion=0.0, context=0.0), ToyDiffusion(size=32, confusion=0.5,
                                                                                     context=0.0)
    facts = [confused.render_with_mask(7, "car", k) for k in range(200)]
    share = np.mean([f["confused"] for _, _, f in facts])
    assert 0.4 < share < 0.6 and {f["concept"] for _, _, f in facts} == {7, SAME_SHAPE[7]}
    assert CLASS_STYLES[SAME_SHAPE[7]].shape == CLASS_STYLES[7].shape and SAME_SHAPE[7] != 7
    for k, (image, mask, f) in enumerate(facts[:40]):
        same, same_mask, _ = plain.render_with_mask(7, "car", k)
        assert f["confused"] or ((np.asarray(image) == np.asarray(same)).all() and (mask == same_mask).all())
        assert not f["confused"] or not mask.any()
    busy = [ToyDiffusion(size=32, context=1.0).render_with_mask(13, "horse", k)[2] for k in range(20)]
    assert {f["context_class"] for f in busy} == {15}  # a rider beside the horse


def test_render_shift_zero_draws_the_toy_world_s_own_styles() -> None:
    own, shifted = ToyDiffusion(render_shift=0.0), ToyDiffusion()
    assert own._styles == CLASS_STYLES
    assert all(shifted._styles[c].hue != CLASS_STYLES[c].hue for c in CLASS_STYLES)
    assert all(shifted._styles[c].texture_period > CLASS_STYLES[c].texture_period for c in CLASS_STYLES)


def test_bad_options_are_clear_errors() -> None:
    for options, message in [({"confusion": 1.5}, "confusion is a probability"), ({"size": 8}, "size"),
                             ({"render_shift": -1}, "render_shift"), ({"templates": ["a cow"]}, r"needs \{name\}")]:
        with pytest.raises(ReplayError, match=message):
            build_source("toy_diffusion", **options)
    with pytest.raises(ReplayError, match="toy classes 1..20, got class 21"):
        next(ToyDiffusion(size=16).images(21, "21", 0, 1))


def test_pool_records_carry_prompts_and_the_truth_scores_labels(tmp_path: Path) -> None:
    cfg = OmegaConf.load(CONF)
    source = build_source(cfg.name, **OmegaConf.to_container(cfg.source, resolve=True))
    assert source.params["templates"] == ["a photo of a {name}"] and cfg.mapping is None
    classes = {11: "diningtable", 16: "pottedplant"}
    summary = build_pool(source, classes, 4, tmp_path / "pool", progress=False)
    records = ReplayPool(tmp_path / "pool").records()
    assert summary["counts"] == {"diningtable": 4, "pottedplant": 4} and summary["params"]["source"] == "toy_diffusion"
    assert {r["prompt"] for r in records} == {"a photo of a dining table", "a photo of a potted plant"}
    assert all(r["seed"] == 0 and r["license"] == "generated" for r in records)
    labels = tmp_path / "labels"
    labels.mkdir()
    for r in records:  # labels that are the truth, then empty labels
        _, mask, _ = source.render_with_mask(r["target_class"], r["target_name"], r["source_index"])
        save_label_png(labels / f"{r['id']}.png", (mask * r["target_class"]).astype(np.uint8))
    quality = diffusion_label_quality(cfg, records, labels)
    assert quality == {11: {"iou": 1.0, "empty": 0.0, "images": 4}, 16: {"iou": 1.0, "empty": 0.0, "images": 4}}
    for r in records:
        save_label_png(labels / f"{r['id']}.png", np.zeros((64, 64), np.uint8))
    assert all(q["empty"] == 1.0 for q in diffusion_label_quality(cfg, records, labels).values())
    for r in records:  # labels of another class everywhere; the oracle gives the image's class its true mask
        save_label_png(labels / f"{r['id']}.png", np.full((64, 64), 5, np.uint8))
    assert diffusion_correct_own_class(cfg, records, labels) == len(records)
    assert all(q["iou"] == 1.0 for q in diffusion_label_quality(cfg, records, labels).values())
    with Image.open(labels / f"{records[0]['id']}.png") as label:
        assert set(np.unique(np.asarray(label))) == {5, records[0]["target_class"]}  # the others kept


@pytest.mark.slow
def test_recall_pool_and_a_recall_run_replay_it(tmp_path: Path, tiny_world: Path) -> None:
    pool, run_dir = tmp_path / "pool", tmp_path / "run"
    assert main(["pool", f"dataset.root={tiny_world}", "replay=toy_diffusion", f"replay.pool={pool}",
                 "replay.per_class=4"]) == 0
    assert ReplayPool(pool).summary()["total"] == 80
    assert main(["run", f"dataset.root={tiny_world}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *FAST,
                 "protocol=19-1", "method=recall", "replay=toy_diffusion", f"replay.pool={pool}",
                 "replay.per_class=4", f"run_dir={run_dir}"]) == 0
    final = json.loads((run_dir / "metrics.json").read_text())["final"]["statistics"]
    assert 0 <= final["replay_labels/iou_step0_classes"] <= 1 and "replay_labels/iou/aeroplane" in final
