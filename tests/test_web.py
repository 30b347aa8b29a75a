"""Web replay: the real flickrapi client (FlickrSource) against the local Flickr stand-in server."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from recall.replay.leakage import LeakageGuard, perceptual_hash
from recall.replay.pool import ReplayPool, build_pool
from recall.errors import ReplayError
from recall.replay.web import FlickrSource, parse_retry_after
from recall.sim.flickr_standin import STANDIN_KEY, FlickrStandIn
from recall.sim.toy_web import FLICKR_LICENSES, ToyWebPhotos

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
CAT, DOG = 8, 12  # cat: results 1 and 4 have no url_c (url_z instead), 5 only url_n (26 px: too small)
KEY = "k3y-do-not-leak-0815"
SECRET = "s3cr3t-do-not-leak-4711"
FAST = {"per_page": 5, "backoff": 0.001, "max_backoff": 0.01, "timeout": 2.0, "retries": 3, "workers": 4}


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch) -> None:
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    monkeypatch.delenv("FLICKR_API_SECRET", raising=False)


@pytest.fixture
def standin():
    with FlickrStandIn(size=SIZE, seed=0, per_class_limit=60) as server:
        yield server


def web(standin: FlickrStandIn, **options) -> FlickrSource:
    return FlickrSource(endpoint="standin", rest_url=standin.rest_url, **{**FAST, **options})


def manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines() if line.strip()]


def test_crawl_fills_the_pool_with_flickr_meta_and_size_fallback(standin, tmp_path) -> None:
    with web(standin) as source:
        summary = build_pool(source, {CAT: "cat", 16: "pottedplant"}, 8, tmp_path, progress=False)
    assert summary["counts"] == {"cat": 8, "pottedplant": 8} and summary["shortfall"] == {}
    assert summary["source_skipped"] == {"too_small": 1}  # cat result 5: only url_n, 26 px < min_size 32
    records = manifest(tmp_path)
    cats = [r for r in records if r["target_class"] == CAT]
    assert [r["source_index"] for r in cats] == [0, 1, 2, 3, 4, 6, 7, 8]
    assert [r["size_key"] for r in cats[:5]] == ["url_c", "url_z", "url_c", "url_c", "url_z"]
    assert {(r["size_key"], r["width"]) for r in cats} == {("url_c", SIZE), ("url_z", round(SIZE * 0.8))}
    toy = ToyWebPhotos(size=SIZE, seed=0)
    for record in records:
        query = "potted plant" if record["target_class"] == 16 else "cat"
        assert record["source"] == "web" and record["source_class"] == record["query"] == query
        assert record["photo_id"].isdigit() and record["source_id"] == record["photo_id"]
        assert record["photo_id"] == standin.photo_id(record["target_class"], record["source_index"])
        assert record["owner"].startswith("user_") and record["license"] in FLICKR_LICENSES
        assert record["tags"].split()[: len(query.split())] == query.split()
        assert record["url"].startswith(standin.base_url + "/photos/") and STANDIN_KEY not in record["url"]
        data = requests.get(record["url"], timeout=5).content
        assert record["file_sha256"] == hashlib.sha256(data).hexdigest()
        if record["size_key"] == "url_c":  # the toy photo itself, through a JPEG
            same, other = (np.asarray(image, dtype=float) for image, _ in
                           toy.images(record["target_class"], "", record["source_index"], 2))
            pool_image = np.asarray(Image.open(tmp_path / "images" / f"{record['id']}.jpg"), dtype=float)
            assert np.abs(pool_image - same).mean() < 0.5 * np.abs(pool_image - other).mean()
    assert standin.stats["searches"] == 4  # 2 pages of 5 per class


def test_results_are_the_same_with_one_or_many_workers(standin, tmp_path) -> None:
    digests = []
    for workers in (1, 4):
        with web(standin, workers=workers) as source:
            build_pool(source, {DOG: "dog"}, 7, tmp_path / str(workers), progress=False)
        digests.append([(r["source_index"], r["photo_id"], r["sha256"]) for r in manifest(tmp_path / str(workers))])
    assert digests[0] == digests[1] and len(digests[0]) == 7


def test_a_wrong_key_stops_at_the_first_request(standin, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLICKR_API_KEY", "wrong-key")
    with web(standin) as source, pytest.raises(ReplayError, match="FLICKR_API_KEY") as error:
        build_pool(source, {DOG: "dog"}, 3, tmp_path, progress=False)
    assert "Invalid API Key" in str(error.value) and "wrong-key" not in str(error.value)
    assert standin.stats["api"] == 1 and standin.stats["bad_key"] == 1 and standin.stats["images"] == 0


def test_real_flickr_needs_the_key_in_the_environment(monkeypatch) -> None:
    with pytest.raises(ReplayError, match="FLICKR_API_KEY and FLICKR_API_SECRET") as error:
        FlickrSource(endpoint="flickr")
    assert "export FLICKR_API_KEY=" in str(error.value)
    monkeypatch.setenv("FLICKR_API_KEY", KEY)
    with pytest.raises(ReplayError, match="FLICKR_API_SECRET"):
        FlickrSource(endpoint="flickr")
    for bad in ({"sizes": ["url_x"]}, {"per_page": 501}, {"license": "4;5"}, {"endpoint": "bing"},
                {"rest_url": "ftp://x"}, {"standin": {"colour": 1}}, {"retries": 0}):
        with pytest.raises(ReplayError, match=next(iter(bad))):
            FlickrSource(**bad)


def test_standin_speaks_flickr_errors_and_listens_on_loopback_only(standin) -> None:
    with pytest.raises(ReplayError, match="loopback"):
        FlickrStandIn(host="0.0.0.0")
    assert standin._server.server_address[0] == "127.0.0.1" and standin.rest_url.startswith("http://127.0.0.1:")
    form = {"method": "flickr.photos.search", "text": "cat", "format": "json", "nojsoncallback": "1"}
    assert requests.post(standin.rest_url, data={**form, "api_key": "nope"}, timeout=5).json() == {
        "stat": "fail", "code": 100, "message": "Invalid API Key (Key has invalid format)"}
    answer = requests.get(standin.rest_url, params={**form, "api_key": STANDIN_KEY, "per_page": 900,
                                                    "extras": "url_q,license"}, timeout=5).json()
    photos = answer["photos"]
    assert answer["stat"] == "ok" and photos["perpage"] == 500 and photos["total"] == 60 and len(photos["photo"]) == 60
    assert {"url_q", "license", "width_q"} <= set(photos["photo"][0]) and "url_c" not in photos["photo"][0]
    assert requests.post(standin.rest_url, data={**form, "api_key": STANDIN_KEY, "method": "flickr.x"},
                         timeout=5).json()["code"] == 112
    assert requests.post(standin.rest_url, data={**form, "api_key": STANDIN_KEY, "text": ""}, timeout=5).json()["code"] == 3
    unknown = requests.post(standin.rest_url, data={**form, "api_key": STANDIN_KEY, "text": "zebra"}, timeout=5).json()
    assert unknown["stat"] == "ok" and unknown["photos"]["total"] == 0
    licensed = requests.post(standin.rest_url, data={**form, "api_key": STANDIN_KEY, "license": "4,9",
                                                     "extras": "license"}, timeout=5).json()["photos"]
    assert 0 < licensed["total"] < 60 and {p["license"] for p in licensed["photo"]} <= {"4", "9"}


@pytest.mark.parametrize("fault", [
    {"http_errors": 2, "error_status": 500}, {"http_errors": 2, "error_status": 502},
    {"http_errors": 2, "error_status": 503, "scope": "images"}, {"rate_limits": 2, "scope": "all"},
    {"unavailable": 2}, {"slow_requests": 1, "slow_seconds": 1.5}, {"slow_requests": 1, "slow_seconds": 1.5,
                                                                    "scope": "images"}],
    ids=["500", "502", "503-images", "429", "code-105", "timeout", "timeout-image"])
def test_transient_faults_are_retried(standin, tmp_path, fault) -> None:
    standin.inject(**fault)
    with web(standin, timeout=0.3) as source:
        summary = build_pool(source, {DOG: "dog"}, 6, tmp_path, progress=False)
    assert summary["counts"] == {"dog": 6} and summary["source_skipped"] == {}
    injected = {"http_errors": "http_errors", "rate_limits": "rate_limited", "unavailable": "unavailable",
                "slow_requests": "slow"}
    name = next(k for k in injected if k in fault)
    assert standin.stats[injected[name]] == fault[name] and getattr(standin.faults, name) == 0
    assert standin.stats["requests"] == 2 + 6 + fault[name]  # 2 searches, 6 photos, one retry per fault


def test_retry_after_is_honoured_but_capped() -> None:
    source = FlickrSource(backoff=0.1, max_backoff=5.0)
    assert 5.0 == source._delay(1, 100.0) and 3.0 == source._delay(1, 3.0) and 0.05 <= source._delay(1, None) <= 0.1
    assert source._delay(10, None) == 5.0 and parse_retry_after("7") == 7.0 and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    source.close()


def test_persistent_failure_stops_and_a_rerun_resumes_without_loss(standin, tmp_path) -> None:
    classes = {CAT: "cat", DOG: "dog"}
    standin.inject(http_errors=1000)  # the search API is down
    with web(standin) as source, pytest.raises(ReplayError, match="after 3 attempts") as error:
        build_pool(source, classes, 10, tmp_path, progress=False)
    assert "Re-run the same command to resume" in str(error.value) and standin.stats["api"] == 3

    standin.clear_faults()
    standin.inject(fail_after_images=13)  # the network dies half way
    with web(standin) as source, pytest.raises(ReplayError, match="resume"):
        build_pool(source, classes, 10, tmp_path, progress=False)
    before = manifest(tmp_path)
    assert 0 < len(before) <= 13

    standin.clear_faults()
    with web(standin) as source:
        summary = build_pool(source, classes, 10, tmp_path, progress=False)
    after = manifest(tmp_path)
    assert summary["counts"] == {"cat": 10, "dog": 10} and after[: len(before)] == before
    assert len({r["photo_id"] for r in after}) == len(after) == 20 and len({r["id"] for r in after}) == 20
    assert ReplayPool(tmp_path).load()[1] == []  # every image present and intact


def test_every_download_failing_stops_the_crawl(standin, tmp_path) -> None:
    standin.inject(http_errors=10_000, scope="images")
    with web(standin, retries=2, max_consecutive_failures=5) as source, \
            pytest.raises(ReplayError, match="5 photo downloads in a row failed"):
        build_pool(source, {DOG: "dog"}, 10, tmp_path, progress=False)
    assert not (tmp_path / "manifest.jsonl").exists()


def test_bad_photos_and_repeated_results_are_skipped_and_counted(standin, tmp_path) -> None:
    ids = {k: standin.photo_id(DOG, k) for k in range(12)}
    standin.inject(truncated={ids[1]}, not_image={ids[2]}, tiny={ids[3]}, broken={ids[4]}, repeat={6: 0})
    with web(standin) as source:
        summary = build_pool(source, {DOG: "dog"}, 6, tmp_path, progress=False)
        skipped = dict(source.skipped)
    assert skipped == {"corrupt": 1, "not_image": 1, "too_small": 1, "download_failed": 1, "duplicate_id": 1}
    assert summary["source_skipped"] == skipped and summary["counts"] == {"dog": 6}
    records = manifest(tmp_path)
    assert [r["source_index"] for r in records] == [0, 5, 7, 8, 9, 10]
    assert len({r["photo_id"] for r in records}) == 6


def test_planted_copies_of_dataset_images_are_kept_out(standin, tmp_path) -> None:
    original, _ = next(ToyWebPhotos(size=SIZE, seed=99).images(3, "bird", 0, 1))  # stands for a val image
    buffer = io.BytesIO()
    original.resize((56, 56), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=70)
    near = standin.plant("dog", 1, buffer.getvalue())
    buffer = io.BytesIO()
    ToyWebPhotos(size=SIZE, seed=98).render_with_mask(4, 0)[0].save(buffer, format="PNG")  # another val image
    exact = standin.plant("dog", 2, buffer.getvalue())  # served byte for byte: caught by its file sha256
    guard = LeakageGuard(exact={hashlib.sha256(buffer.getvalue()).hexdigest()},
                         perceptual={"val_0001": perceptual_hash(original)})
    with web(standin) as source:
        summary = build_pool(source, {DOG: "dog"}, 4, tmp_path, guard=guard, progress=False)
    assert summary["dropped_dataset_copies"] == 1 and summary["dropped_near_copies"] == 1
    assert {near, exact}.isdisjoint(r["photo_id"] for r in manifest(tmp_path)) and summary["counts"] == {"dog": 4}


def test_key_and_secret_leak_nowhere(tmp_path, monkeypatch, caplog, capsys) -> None:
    monkeypatch.setenv("FLICKR_API_KEY", KEY)
    monkeypatch.setenv("FLICKR_API_SECRET", SECRET)
    caplog.set_level(logging.DEBUG)
    with FlickrStandIn(size=SIZE, api_key=KEY, per_class_limit=20) as standin:
        standin.inject(http_errors=1, rate_limits=1, scope="all")  # flickrapi logs error bodies at ERROR
        with web(standin, per_page=4) as source:
            build_pool(source, {DOG: "dog"}, 5, tmp_path, progress=True)
            params, text = json.dumps(source.params), repr(source)
            standin.inject(http_errors=1000)
            with pytest.raises(ReplayError) as error:
                build_pool(source, {CAT: "cat"}, 5, tmp_path, progress=True)
    captured = capsys.readouterr()
    assert "<redacted>" in caplog.text  # the OAuth debug logs did carry the key
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for secret in (KEY, SECRET):
        for place in (caplog.text, captured.out, captured.err, params, text, str(error.value)):
            assert secret not in place
        assert secret.encode() not in files


KILL_SCRIPT = """
import sys
from recall.replay.pool import build_pool
from recall.replay.web import FlickrSource
with FlickrSource(endpoint="standin", rest_url=sys.argv[1], per_page=5, workers=2, backoff=0.001) as source:
    build_pool(source, {8: "cat", 12: "dog"}, 15, sys.argv[2], progress=False)
"""


def test_a_crawl_killed_with_sigkill_resumes_to_a_complete_pool(tmp_path) -> None:
    root = tmp_path / "pool"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with FlickrStandIn(size=SIZE, per_class_limit=60, latency_seconds=0.05) as standin:
        process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, standin.rest_url, str(root)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        path = root / "manifest.jsonl"
        while time.monotonic() < deadline and process.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 8:
                break
            time.sleep(0.01)
        assert process.poll() is None, f"the crawl ended before it was killed: {process.stderr.read().decode()}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        process.stderr.close()
        before = ReplayPool(root).records()
        assert 8 <= len(before) < 30
        standin.inject(latency_seconds=0.0)
        with web(standin) as source:
            summary = build_pool(source, {CAT: "cat", DOG: "dog"}, 15, root, progress=False)
    after = ReplayPool(root).records()
    assert summary["counts"] == {"cat": 15, "dog": 15} and len(after) == 30
    by_id = {r["id"]: r for r in after}
    assert all(by_id.get(r["id"]) == r for r in before)  # every record written before the kill survives
    assert len({r["photo_id"] for r in after}) == 30
    assert ReplayPool(root).load()[1] == []


def test_the_in_process_standin_endpoint(tmp_path) -> None:
    with FlickrSource(standin={"per_class_limit": 4, "seed": 3}, **FAST) as source:
        summary = build_pool(source, {DOG: "dog"}, 6, tmp_path, progress=False)
        standin = source._standin
        assert source.params["standin"] == {"size": 64, "seed": 3, "tag_noise": 0.15, "per_class_limit": 4}
    assert summary["counts"] == {"dog": 4} and summary["shortfall"]["dog"]["missing"] == 2
    assert standin._server is None  # close() stopped it
