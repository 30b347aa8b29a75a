"""`recall select` (RECALL+'s selection of a pool's images): the scores, the thresholds, the decision, the pool it
writes and what it refuses."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FAST, TUNE_PROTOCOL
from omegaconf import OmegaConf

from recall.cli import main
from recall.replay.pool import ReplayPool
from recall.selection import SelectConfig, class_share, decide, domain_scores, quantile, selection_score


def test_class_share_is_the_share_of_pixels_whose_argmax_is_the_images_class():
    logits = torch.zeros(2, 3, 2, 2)  # channels: background, class 4, class 7
    logits[0, 1, 0, :] = 5  # image 0: top row class 4
    logits[1, 2] = 5  # image 1: all class 7
    shares = class_share(logits, [0, 4, 7], [4, 4])
    assert shares.tolist() == [0.5, 0.0]
    assert class_share(logits, [0, 4, 7], [7, 7]).tolist() == [0.0, 1.0]
    assert class_share(logits, [0, 4, 7], [9, 9]).tolist() == [0.0, 0.0]  # a class the model has no channel for


def test_domain_scores_are_out_of_fold_and_tell_apart_what_differs():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(120, 8, generator=g) + 3.0
    pool = torch.randn(150, 8, generator=g)
    cfg = SelectConfig(epochs=80, hidden=16, seed=1)
    scores_t, scores_p = domain_scores(train, pool, cfg)
    assert scores_t.shape == (120,) and scores_p.shape == (150,)
    assert (scores_t[:, None] > scores_p[None, :]).mean() > 0.99  # held out, still ranked apart
    assert np.median(scores_t) > 0.9 and np.median(scores_p) < 0.1
    same_t, same_p = domain_scores(torch.randn(120, 8, generator=g), torch.randn(150, 8, generator=g), cfg)
    assert abs(np.median(same_t) - np.median(same_p)) < 0.25  # one distribution: nothing to tell apart
    assert np.array_equal(domain_scores(train, pool, cfg)[1], scores_p)  # seeded: the same scores again


def test_decide_drops_by_either_test_and_keeps_a_floor_of_the_most_training_like():
    classes = [1, 1, 1, 1, 2, 2]
    domain = [0.9, 0.1, 0.8, 0.05, 0.9, 0.9]
    content = [0.5, 0.5, 0.0, 0.0, None, None]  # class 2: unknown to the step-0 model
    out = decide(classes, domain, content, domain_threshold=0.5, content_threshold={1: 0.2}, min_keep=0.0)
    assert [d.reason for d in out] == ["kept", "domain", "content", "domain+content", "kept", "kept"]
    assert [d.keep for d in out] == [True, False, False, False, True, True]
    floor = decide(classes, domain, content, 0.5, {1: 0.2}, min_keep=0.75)  # class 1 keeps ceil(3) of 4
    assert [d.reason for d in floor] == ["kept", "floor", "floor", "domain+content", "kept", "kept"]  # 0.8, 0.1
    assert [d.failed for d in floor] == ["", "domain", "content", "domain+content", "", ""]  # why, kept or not


def test_selection_score_against_the_truth():
    s = selection_score(dropped=[True, True, False, False, True], noise=[True, False, True, False, False])
    assert (s["dropped"], s["noise"], s["dropped_noise"]) == (3, 2, 1)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
    assert s["good_dropped"] == pytest.approx(2 / 3)
    assert math.isnan(selection_score([False], [True])["precision"])
    assert quantile([], 0.5) == 0.0 and quantile([0.0, 1.0], 0.25) == 0.25


def test_select_config_refuses_shares_outside_0_1():
    with pytest.raises(ValueError, match="domain_quantile"):
        SelectConfig(domain_quantile=1.5)


def test_the_stand_ins_truth_says_which_web_photos_show_their_class():
    from recall.sim.flickr_standin import photo_id
    from recall.sim.toy_web import ToyWebPhotos
    from recall.sim.truth import web_shows_class

    replay = OmegaConf.create({"name": "web", "source": {"endpoint": "standin",
                                                         "standin": {"size": 32, "seed": 4, "tag_noise": 0.5}}})
    photos = ToyWebPhotos(size=32, seed=4, tag_noise=0.5)
    records = [{"photo_id": photo_id(4, 3, k)} for k in range(12)] + [{"photo_id": "123"}]
    shows = web_shows_class(replay, records)
    assert shows[:-1] == [photos.facts(3, k).shows_class for k in range(12)]
    assert shows[-1] is None and set(shows[:-1]) == {True, False}  # tag noise 0.5: both kinds among 12


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_world):
    """A step-0 run (one epoch: what it scores need not be good) and a toy-GAN pool of 4 images per class."""
    from recall.replay.pool import build_pool
    from recall.sim.toy_gan import ToyGenerator

    tmp = tmp_path_factory.mktemp("select")
    step0 = tmp / "step0"
    assert main(["run", f"dataset.root={tiny_world}", f"protocol={TUNE_PROTOCOL}", "last_step=0",
                 f"run_dir={step0}", "tracking.uri=", *FAST]) == 0
    pool = tmp / "pool"
    build_pool(ToyGenerator(mapping=ToyGenerator().lookalike_mapping()), {c: f"c{c}" for c in range(1, 21)},
               per_class=4, root=pool, progress=False)
    return SimpleNamespace(root=tiny_world, step0=step0, pool=pool)


def _select(world, out, *extra):
    return main(["select", f"dataset.root={world.root}", f"protocol={TUNE_PROTOCOL}", "replay=toy_gan",
                 f"replay.pool={world.pool}", f"step0={world.step0}", f"select.pool={out}", "tracking.uri=",
                 "select.epochs=60", *[o for o in FAST if o.startswith("model.")], *extra])


def test_recall_select_writes_the_kept_images_as_a_pool_and_every_candidates_scores(world, tmp_path, capsys):
    source = ReplayPool(world.pool)
    before = source.manifest_path.read_bytes()
    out = tmp_path / "selected"
    assert _select(world, out, "select.min_keep=0.5") == 0
    assert source.manifest_path.read_bytes() == before  # the source pool is read, never changed
    rows = [json.loads(line) for line in (out / "selection.jsonl").open()]
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in source.records())
    kept = ReplayPool(out).records()
    assert sorted(r["selected_from"] for r in kept) == sorted(r["id"] for r in rows if r["kept"])
    by_id = {r["id"]: r for r in source.records()}
    for record in kept:  # copied byte for byte, with its scores
        original = by_id[record["selected_from"]]
        assert record["sha256"] == original["sha256"] and record["target_class"] == original["target_class"]
        assert (out / "images" / f"{record['id']}.jpg").read_bytes() == \
            (world.pool / "images" / f"{original['id']}.jpg").read_bytes()
        assert record["select_reason"] in ("kept", "floor") and 0 <= record["select_domain"] <= 1
    for c in {r["target_class"] for r in rows}:
        members = [r for r in rows if r["target_class"] == c]
        assert sum(r["kept"] for r in members) >= math.ceil(0.5 * len(members))
    step0_classes = set(range(1, 19))  # 18-1x2: classes 19 and 20 come later and have no content score
    assert all((r["content"] is None) == (r["target_class"] not in step0_classes) for r in rows)
    summary = json.loads((tmp_path / "selected.json").read_text())
    assert summary["kept"] == len(kept) and summary["images"] == len(rows)
    assert sum(summary["reasons"].values()) == len(rows)
    assert ReplayPool(out).summary()["selection"] == summary
    assert f"kept {len(kept)} of {len(rows)}" in capsys.readouterr().err


def test_the_selection_records_paths_inside_the_working_directory_relative(world, monkeypatch):
    """As a DVC stage's output, the selected pool holds no absolute path of this clone."""
    monkeypatch.chdir(world.step0.parent)
    out = Path("selected_here")
    assert main(["select", f"dataset.root={world.root}", f"protocol={TUNE_PROTOCOL}", "replay=toy_gan",
                 "replay.pool=pool", "step0=step0", f"select.pool={out}", "tracking.uri=", "select.epochs=5",
                 *[o for o in FAST if o.startswith("model.")]]) == 0
    text = "".join(p.read_text() for p in (out / "pool.json", out / "owner.json"))
    assert str(world.step0.parent) not in text
    assert '"step0": "step0"' in text and '"from": "pool"' in text


def test_a_run_replays_the_selected_pool(world, tmp_path):
    out = tmp_path / "selected"
    assert _select(world, out) == 0
    run_dir = tmp_path / "run"
    assert main(["run", f"dataset.root={world.root}", f"protocol={TUNE_PROTOCOL}", "method=recall",
                 "replay=toy_gan", f"replay.pool={out}", f"step0={world.step0}", f"run_dir={run_dir}",
                 "last_step=1", "tracking.uri=", *FAST]) == 0
    assert (run_dir / "metrics.json").is_file()


@pytest.mark.parametrize("change, message", [
    (["step0=/nonexistent/step0"], "has no finished step 0"),
    (["protocol=15-5"], "learnt 18 classes at step 0"),
    (["select.min_keep=2"], "select.min_keep"),
])
def test_recall_select_refuses_bad_input_with_one_line(world, tmp_path, capsys, change, message):
    assert _select(world, tmp_path / "s", *change) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_select_metrics_never_overwrites_a_file_that_is_not_a_selections_summary(world, tmp_path, capsys):
    """select.metrics is checked before any work: another file there is left as it is, a directory or a path inside
    the pool is refused; an earlier selection's summary is replaced."""
    precious = tmp_path / "notes.json"
    precious.write_text('{"mine": 1}')
    for where, message in ((precious, "is not an earlier selection's summary"), (tmp_path, "is a directory"),
                           (tmp_path / "s" / "m.json", "lies in select.pool"),
                           (world.pool / "m.json", "lies in replay.pool")):
        assert _select(world, tmp_path / "s", f"select.metrics={where}") == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert precious.read_text() == '{"mine": 1}' and not (tmp_path / "s").exists()
    again = tmp_path / "summary.json"
    assert _select(world, tmp_path / "s", f"select.metrics={again}", "select.epochs=5") == 0
    first = json.loads(again.read_text())
    from recall.stages.select import SUMMARY_KEYS

    assert SUMMARY_KEYS <= set(first)  # the keys that recognise a summary are keys a summary has
    assert _select(world, tmp_path / "s", f"select.metrics={again}", "select.epochs=5") == 0  # its own: replaced
    assert json.loads(again.read_text())["images"] == first["images"]


def test_recall_select_needs_a_built_pool(world, tmp_path, capsys):
    assert main(["select", f"dataset.root={world.root}", f"protocol={TUNE_PROTOCOL}", "replay=toy_gan",
                 f"replay.pool={tmp_path / 'nothing'}", f"step0={world.step0}", "tracking.uri="]) == 2
    assert "is not built" in capsys.readouterr().err


def test_either_test_can_be_switched_off(world, tmp_path):
    assert _select(world, tmp_path / "content", "select.domain_test=false", "select.min_keep=0") == 0
    rows = [json.loads(line) for line in (tmp_path / "content" / "selection.jsonl").open()]
    assert not any("domain" in r["reason"] for r in rows) and all(0 <= r["domain"] <= 1 for r in rows)
    assert _select(world, tmp_path / "domain", "select.content_test=false", "select.min_keep=0") == 0
    rows = [json.loads(line) for line in (tmp_path / "domain" / "selection.jsonl").open()]
    assert not any("content" in r["reason"] for r in rows)
    assert any(r["reason"] == "domain" for r in rows)  # one epoch's step-0 encoder still tells its data apart


def test_images_of_several_sizes_are_each_scored_as_themselves(world, tmp_path):
    """A pool of two image sizes (real photos come in many): each row's content share is the one the step-0 model
    gives that very image, scored alone."""
    from PIL import Image

    from recall.config import compose, section
    from recall.data.transforms import eval_transform
    from recall.model import ModelConfig, load_checkpoint
    from recall.replay.pool import PoolDataset

    mixed = ReplayPool(tmp_path / "mixed")
    for record in ReplayPool(world.pool).records()[:24]:
        with Image.open(world.pool / "images" / f"{record['id']}.jpg") as image:
            side = 48 if record["source_index"] % 2 else 64
            mixed.add(image.convert("RGB").resize((side, side)), {"target_class": record["target_class"]})
    (tmp_path / "mixed" / "pool.json").write_text("{}")
    out = tmp_path / "selected"
    assert main(["select", f"dataset.root={world.root}", f"protocol={TUNE_PROTOCOL}", "replay=toy_gan",
                 f"replay.pool={mixed.root}", f"step0={world.step0}", f"select.pool={out}", "tracking.uri=",
                 "select.epochs=20", *[o for o in FAST if o.startswith("model.")]]) == 0
    rows = {r["id"]: r for r in map(json.loads, (out / "selection.jsonl").open())}
    assert {(r["height"]) for r in mixed.records()} == {48, 64}
    cfg = compose([f"protocol={TUNE_PROTOCOL}", *[o for o in FAST if o.startswith("model.")]])
    model, _ = load_checkpoint(world.step0 / "steps" / "0" / "model.pt", section(cfg.model, ModelConfig))
    data = PoolDataset(mixed.root, transform=eval_transform())
    with torch.no_grad():
        for i, record in enumerate(data.records):
            c = int(record["target_class"])
            if c > 18:
                assert rows[record["id"]]["content"] is None
                continue
            share = float(class_share(model.eval()(data[i][0][None])["out"], [0, *range(1, 19)], [c])[0])
            assert rows[record["id"]]["content"] == pytest.approx(share, abs=1e-5)


def test_a_selection_is_rebuilt_with_the_same_options_and_refused_with_others(world, tmp_path, capsys):
    out = tmp_path / "selected"
    assert _select(world, out) == 0
    first = (out / "selection.jsonl").read_bytes()
    assert _select(world, out) == 0 and (out / "selection.jsonl").read_bytes() == first  # same: rebuilt alike
    capsys.readouterr()
    assert _select(world, out, "select.content_quantile=0.5") == 2
    err = capsys.readouterr().err
    assert "another selection" in err and "Traceback" not in err
    assert (out / "selection.jsonl").read_bytes() == first  # untouched
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a pool")
    assert _select(world, tmp_path / "mine") == 2 and "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_recall_pool_never_grows_a_selected_pool(world, tmp_path, capsys):
    out = tmp_path / "selected"
    assert _select(world, out) == 0
    before = (out / "manifest.jsonl").read_bytes()
    from recall.replay.classmap import save_mapping
    from recall.sim.toy_gan import ToyGenerator

    save_mapping(ToyGenerator().lookalike_mapping(), tmp_path / "mapping.json")
    assert main(["pool", f"dataset.root={world.root}", "replay=toy_gan", f"replay.pool={out}",
                 f"replay.mapping={tmp_path / 'mapping.json'}", "replay.per_class=8", "tracking.uri="]) == 2
    assert "selection of another pool" in capsys.readouterr().err
    assert (out / "manifest.jsonl").read_bytes() == before
