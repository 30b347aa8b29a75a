"""The replay stages end to end through the `recall` command: stand-in weights → class mapping → BigGAN pool,
the Flickr pool through the real flickrapi client and a local stand-in, and a RECALL run replaying it —
with a key and secret in the environment that must never reach a file, a log or the MLflow database."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import FAST

from recall.cli import main
from recall.config import compose
from recall.replay.pool import ReplayPool
from recall.sim.flickr_standin import FlickrStandIn

KEY = "k3y-4c5e9f1d2b7a8e60"
SECRET = "s3cr3t-do-not-leak-4711"


def _files_containing(root: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]


def test_gan_stages_make_weights_mapping_and_pool(tmp_path: Path, tiny_world: Path, capsys) -> None:
    weights = tmp_path / "standin"
    assert main(["standin-weights", str(weights)]) == 0
    common = [f"dataset.root={tiny_world}", "replay=gan", f"replay.source.weights={weights}/biggan",
              f"replay.classifier.weights={weights}/imagenet_classifier.pth",
              f"replay.mapping={tmp_path}/gan_mapping.json", f"replay.pool={tmp_path}/pool", "replay.per_class=3"]
    assert main(["classmap", *common, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]) == 0
    mapping = json.loads((tmp_path / "gan_mapping.json").read_text())
    present = [m for m in mapping.values() if m["n_images"]]
    assert present and all(0 <= m["source_class"] < 1000 and len(m["top_k"]) == 3 for m in present)
    assert main(["pool", *common]) == 0
    summary = ReplayPool(tmp_path / "pool").summary()
    assert summary["total"] == 60 and summary["params"]["source"] == "gan"
    assert summary["params"]["source_params"]["mapping"]["1"] == mapping["1"]["source_class"]
    # or a hand-written mapping instead of the classifier's
    hand_written = Path(__file__).parents[1] / "conf" / "replay" / "voc_imagenet_mapping.json"
    assert main(["pool", *common[:-3], f"replay.mapping={hand_written}", f"replay.pool={tmp_path}/pool2",
                 "replay.per_class=2"]) == 0
    assert ReplayPool(tmp_path / "pool2").summary()["params"]["source_params"]["mapping"]["1"] == 404  # airliner
    (tmp_path / "broken.json").write_text('{"aeroplane": "no such class"}')
    assert main(["pool", *common[:-3], f"replay.mapping={tmp_path}/broken.json", f"replay.pool={tmp_path}/pool3"]) == 2
    assert "no such class" in capsys.readouterr().err


def test_unknown_classifier_kind_is_named(tiny_world: Path, capsys) -> None:
    assert main(["classmap", f"dataset.root={tiny_world}", "replay=gan", "replay.classifier.kind=magic"]) == 2
    assert "magic" in capsys.readouterr().err


@pytest.mark.slow
def test_web_pool_and_recall_run_never_leak_the_key(tmp_path: Path, tiny_world: Path, monkeypatch, capsys,
                                                    caplog) -> None:
    monkeypatch.setenv("FLICKR_API_KEY", KEY)
    monkeypatch.setenv("FLICKR_API_SECRET", SECRET)
    caplog.set_level("DEBUG")
    pool = tmp_path / "pool"
    with FlickrStandIn(api_key=KEY, size=64) as server:  # a "remote" endpoint that accepts the user's key
        assert main(["pool", f"dataset.root={tiny_world}", "replay=web", f"replay.source.rest_url={server.rest_url}",
                     f"replay.pool={pool}", "replay.per_class=4"]) == 0
        assert server.stats["searches"] >= 20 and server.stats["bad_key"] == 0  # our key was accepted
    summary = ReplayPool(pool).summary()
    assert summary["total"] == 80 and set(summary) >= {"dropped_near_copies", "dropped_dataset_copies"}
    run_dir = tmp_path / "run"
    assert main(["run", f"dataset.root={tiny_world}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *FAST,
                 "protocol=19-1", "method=recall", "replay=web", f"replay.pool={pool}", f"run_dir={run_dir}"]) == 0

    out = capsys.readouterr()
    logs = "\n".join(record.getMessage() for record in caplog.records)
    for text in (out.out, out.err, logs):
        assert KEY not in text and SECRET not in text
    assert _files_containing(tmp_path, KEY) == [] and _files_containing(tmp_path, SECRET) == []
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # every value of every table
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            for row in db.execute(f"SELECT * FROM {table}"):
                assert not any(KEY in str(v) or SECRET in str(v) for v in row), table
        params = dict(db.execute("SELECT key, value FROM params").fetchall())
    assert params["pool_built.total"] == "80" and params["replay.name"] == "web"
    assert "pool_built.dropped_near_copies" in params
    # the stand-in knows its photos' true masks: the run scored its replay labels against them, as we do here
    from omegaconf import OmegaConf

    from recall.sim.truth import web_label_quality

    final = json.loads((run_dir / "metrics.json").read_text())["final"]["statistics"]
    replay_cfg = OmegaConf.create({"name": "web", "source": {"endpoint": "standin", "standin": {"size": 64}}})
    quality = web_label_quality(replay_cfg, ReplayPool(pool).records(), run_dir / "steps" / "replay_labels")
    assert len(quality) == 19 and all(q["images"] == 4 for q in quality.values())  # every photo parsed to its truth
    assert final["replay_labels/iou/aeroplane"] == quality[1]["iou"]
    assert final["replay_labels/empty/sofa"] == quality[18]["empty"]
    replay = compose(["replay=web"]).replay  # no config field can hold a key or a secret
    assert not [k for k in json.dumps(dict(replay), default=str).lower().split('"') if "secret" in k or "api_key" in k]
    repo_params = (Path(__file__).parents[1] / "params.yaml").read_text()
    assert KEY not in repo_params and SECRET not in repo_params


def test_val_images_planted_in_the_flickr_standin_are_caught(tmp_path: Path, tiny_world: Path) -> None:
    """VOC's photos came from Flickr: a crawl may return evaluation images, resized and recompressed."""
    import io

    from PIL import Image

    from recall.data.voc import read_split
    from recall.replay.leakage import LeakageGuard
    from recall.replay.pool import build_pool
    from recall.replay.web import FlickrSource

    val_ids = read_split(tiny_world, "val")[:2]
    with FlickrStandIn(size=64) as server:
        for position, (image_id, size) in enumerate(zip(val_ids, [(96, 96), (48, 48)])):
            buffer = io.BytesIO()
            Image.open(tiny_world / "JPEGImages" / f"{image_id}.jpg").resize(size).save(buffer, "JPEG", quality=70)
            server.plant("bird", 2 * position + 1, buffer.getvalue())
        with FlickrSource(endpoint="standin", rest_url=server.rest_url, min_size=32) as source:
            summary = build_pool(source, {3: "bird"}, 6, tmp_path / "pool",
                                 guard=LeakageGuard.from_dataset(tiny_world), progress=False)
    assert summary["dropped_near_copies"] == 2 and summary["counts"] == {"bird": 6}
    leaks = [json.loads(line) for line in (tmp_path / "pool" / "leakage.jsonl").read_text().splitlines()]
    assert [leak["dataset_id"] for leak in leaks] == [f"val/{i}" for i in val_ids]
    assert sorted(leak["source_index"] for leak in leaks) == [1, 3]
