"""`recall data prepare`: tiny archives in the real formats, prepared and read back with the project's own loader.

Nothing here touches the internet: downloads come from an http.server on 127.0.0.1 that answers Range requests and
can cut a connection half way.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import yaml
from PIL import Image

from recall.atomic import write_bytes
from recall.cli import main
from recall.data import prepare as prep
from recall.data.classes import VOC_CLASSES, voc_palette
from recall.data.datasets import ade20k, class_names, voc
from recall.data.datasets.ade20k import ADE20K_CLASSES
from recall.data.fetch import ArchiveError, download, obtain
from recall.data.voc import DatasetError, VOCSegmentation, load_mask, read_split

ROOT = Path(__file__).resolve().parents[1]

VOC_TRAIN = ["2007_000032", "2007_000039", "2008_000008"]
VOC_VAL = ["2007_000033", "2007_000042"]
VOC_ONLY_IMAGE = "2009_000001"          # in JPEGImages, in no segmentation split
SBD_TRAIN = ["2008_000002", "2008_000003", "2007_000032", "2007_000033"]  # one VOC train, one VOC val image
SBD_VAL = ["2008_000004", "2007_000039"]
SBD_ONLY_IMAGE = "2008_000004"          # only in SBD's img/ (the fallback for an image VOC lacks)
TRAIN_AUG = sorted({"2008_000002", "2008_000003", "2008_000004", *VOC_TRAIN})
ADE_TRAIN = ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000003"]
ADE_VAL = ["ADE_val_00000001", "ADE_val_00000002"]
SIZE = (12, 9)  # width, height


# --------------------------------------------------------------------------- archives in the real formats


def _seed(image_id: str) -> int:
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16)


def _jpeg(image_id: str) -> bytes:
    rng = np.random.default_rng(_seed(image_id))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def voc_mask(image_id: str) -> np.ndarray:
    """VOC's mask: one object of a class 1-20 with a 255 border."""
    mask = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    mask[1:8, 2:10] = IGNORE = 255
    mask[2:7, 3:9] = _seed(image_id) % 20 + 1
    assert IGNORE in mask
    return mask


def sbd_mask(image_id: str) -> np.ndarray:
    """SBD's mask of the same image: other classes, no border (so a test sees which one was kept)."""
    mask = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    mask[:, : SIZE[0] // 2] = _seed(image_id) % 19 + 2
    mask[0, 0] = 1
    return mask


def ade_mask(image_id: str) -> np.ndarray:
    mask = np.full((SIZE[1], SIZE[0]), _seed(image_id) % 150 + 1, np.uint8)
    mask[:3] = 0        # "other"
    mask[-1, -1] = 150  # the last class
    return mask


def _png(mask: np.ndarray, palette: bool) -> bytes:
    image = Image.fromarray(mask, mode="L")
    if palette:
        image.putpalette(voc_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _gtcls_mat(mask: np.ndarray) -> bytes:
    """An SBD cls/<id>.mat: struct GTcls with Boundaries (20x1 cell of sparse), Segmentation, CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(20):
        boundaries[c, 0] = scipy.sparse.csc_matrix((mask == c + 1).astype(np.float64))
    present = np.unique(mask[mask > 0]).astype(np.uint8).reshape(-1, 1)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"GTcls": {"Boundaries": boundaries, "Segmentation": mask,
                                        "CategoriesPresent": present}})
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_voc_tar(path: Path) -> Path:
    base = "VOCdevkit/VOC2012/"
    with tarfile.open(path, "w") as tar:
        for image_id in [*VOC_TRAIN, *VOC_VAL, VOC_ONLY_IMAGE, "2008_000002", "2008_000003"]:
            _add(tar, f"{base}JPEGImages/{image_id}.jpg", _jpeg(image_id))
            _add(tar, f"{base}Annotations/{image_id}.xml", b"<annotation/>")
        for image_id in [*VOC_TRAIN, *VOC_VAL]:
            _add(tar, f"{base}SegmentationClass/{image_id}.png", _png(voc_mask(image_id), palette=True))
            _add(tar, f"{base}SegmentationObject/{image_id}.png", _png(voc_mask(image_id), palette=True))
        for split, ids in (("train", VOC_TRAIN), ("val", VOC_VAL), ("trainval", sorted(VOC_TRAIN + VOC_VAL))):
            _add(tar, f"{base}ImageSets/Segmentation/{split}.txt", "".join(f"{i}\n" for i in ids).encode())
        _add(tar, f"{base}ImageSets/Main/train.txt", b"2009_000001\n")
    return path


def make_sbd_tgz(path: Path) -> Path:
    base = "benchmark_RELEASE/dataset/"
    with tarfile.open(path, "w:gz") as tar:
        for image_id in sorted(set(SBD_TRAIN + SBD_VAL)):
            _add(tar, f"{base}cls/{image_id}.mat", _gtcls_mat(sbd_mask(image_id)))
            _add(tar, f"{base}inst/{image_id}.mat", _gtcls_mat(sbd_mask(image_id)))
        _add(tar, f"{base}img/{SBD_ONLY_IMAGE}.jpg", _jpeg(SBD_ONLY_IMAGE))
        _add(tar, f"{base}train.txt", "".join(f"{i}\n" for i in SBD_TRAIN).encode())
        _add(tar, f"{base}val.txt", "".join(f"{i}\n" for i in SBD_VAL).encode())
    return path


def make_ade_zip(path: Path) -> Path:
    base = "ADEChallengeData2016/"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{base}objectInfo150.txt", "Idx\tRatio\tTrain\tVal\tName\n")
        for folder, ids in (("training", ADE_TRAIN), ("validation", ADE_VAL)):
            for image_id in ids:
                archive.writestr(f"{base}images/{folder}/{image_id}.jpg", _jpeg(image_id))
                archive.writestr(f"{base}annotations/{folder}/{image_id}.png", _png(ade_mask(image_id), False))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truncated(path: Path, out: Path) -> Path:
    out.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return out


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("archives")
    return {"voc": make_voc_tar(folder / "VOCtrainval_11-May-2012.tar"),
            "sbd": make_sbd_tgz(folder / "benchmark.tgz"),
            "ade20k": make_ade_zip(folder / "ADEChallengeData2016.zip")}


def _prepare(dataset: str, root: Path, archive: Path | str, sha256: str | None = None, **options) -> dict:
    """prepare() with a test archive: its own digest stands in for the official one (as --sha256 does)."""
    digest = sha256 or (_sha(archive) if isinstance(archive, Path) and archive.is_file() else None)
    return prep.prepare(dataset, root, [str(archive)], sha256=digest, downloads=root.parent / "downloads",
                        progress=False, **options)


@pytest.fixture(scope="module")
def voc_sbd_root(tmp_path_factory, archives) -> Path:
    root = tmp_path_factory.mktemp("prepared") / "voc"
    _prepare("voc", root, archives["voc"])
    _prepare("sbd", root, archives["sbd"])
    return root


# --------------------------------------------------------------------------- VOC 2012 + SBD


def test_voc_is_extracted_and_read_by_the_loader(voc_sbd_root):
    root = voc_sbd_root
    assert read_split(root, "train") == VOC_TRAIN and read_split(root, "val") == VOC_VAL
    data = VOCSegmentation(root, "train", mask_dir="SegmentationClass")
    for i, image_id in enumerate(data.ids):
        image, mask = data[i]
        assert image.shape == (3, SIZE[1], SIZE[0])
        assert np.array_equal(mask.numpy(), voc_mask(image_id))
    assert Image.open(root / "SegmentationClass" / f"{VOC_TRAIN[0]}.png").mode == "P"
    assert not (root / "Annotations").exists() and not (root / "SegmentationObject").exists()
    assert (root / "JPEGImages" / f"{VOC_ONLY_IMAGE}.jpg").is_file()


def test_sbd_train_aug_is_the_usual_union_and_conf_voc_reads_it(voc_sbd_root):
    root = voc_sbd_root
    dataset = yaml.safe_load((ROOT / "conf" / "dataset" / "voc.yaml").read_text())
    train_ids = read_split(root, dataset["train_split"])
    assert train_ids == TRAIN_AUG == voc.train_aug_ids(SBD_TRAIN, SBD_VAL, VOC_TRAIN, VOC_VAL)
    assert not set(train_ids) & set(VOC_VAL), "no val image is trained on"
    assert read_split(root, dataset["val_split"]) == VOC_VAL
    for split in (dataset["train_split"], dataset["val_split"]):
        data = VOCSegmentation(root, split, num_classes=dataset["num_classes"], mask_dir=dataset["mask_dir"],
                               image_dir=dataset["image_dir"])
        for i, image_id in enumerate(data.ids):
            _, mask = data[i]
            # VOC's own masks (255 borders kept) win over SBD's; the others are SBD's, converted exactly
            expected = voc_mask(image_id) if image_id in VOC_TRAIN + VOC_VAL else sbd_mask(image_id)
            assert np.array_equal(mask.numpy(), expected), image_id
    aug = root / dataset["mask_dir"]
    assert (aug / f"{VOC_VAL[0]}.png").samefile(root / "SegmentationClass" / f"{VOC_VAL[0]}.png"), "a hard link"
    assert Image.open(aug / "2008_000002.png").mode == "P"
    assert (root / "JPEGImages" / f"{SBD_ONLY_IMAGE}.jpg").read_bytes() == _jpeg(SBD_ONLY_IMAGE)
    assert not list(root.rglob("*.tmp"))


def test_check_counts_images_per_split_through_the_cli(voc_sbd_root, capsys):
    assert main(["data", "prepare", "sbd", "--root", str(voc_sbd_root)]) == 0
    out = capsys.readouterr().out
    assert "train_aug 6" in out and "val 2" in out and "checked" in out
    assert prep.check("voc", voc_sbd_root) == {"train": 3, "val": 2}


def test_sbd_mat_reads_like_the_real_files():
    """The test .mat files load the way torchvision and mmsegmentation read the real GTcls files."""
    mask = sbd_mask("2008_000002")
    data = _gtcls_mat(mask)
    assert np.array_equal(voc.sbd_mask(data, "x.mat"), mask)
    torchvision_way = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["GTcls"]["Segmentation"].item()
    mmseg_way = scipy.io.loadmat(io.BytesIO(data))["GTcls"][0]["Segmentation"][0]
    assert np.array_equal(torchvision_way, mask) and np.array_equal(mmseg_way, mask)
    with pytest.raises(ArchiveError, match="GTcls"):
        voc.sbd_mask(b"not a mat file", "cls/bad.mat")


def test_sbd_needs_voc_first(tmp_path, archives):
    with pytest.raises(DatasetError, match="VOC 2012 is not ready"):
        _prepare("sbd", tmp_path / "voc", archives["sbd"])


def test_a_killed_conversion_resumes_without_half_files(tmp_path, archives, monkeypatch):
    root = tmp_path / "voc"
    _prepare("voc", root, archives["voc"])
    real, calls = voc.mask_png, []

    def dies_on_the_third(mask):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of the conversion
        return real(mask)

    monkeypatch.setattr(voc, "mask_png", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _prepare("sbd", root, archives["sbd"])
    done = sorted((root / "SegmentationClassAug").glob("*.png"))
    assert len(done) == 2 and all(load_mask(p).shape == (SIZE[1], SIZE[0]) for p in done)
    assert not list(root.rglob("*.tmp"))
    with pytest.raises(DatasetError, match="did not finish"):
        prep.check("sbd", root)
    monkeypatch.setattr(voc, "mask_png", real)
    summary = _prepare("sbd", root, archives["sbd"])
    assert summary["masks_skipped"] == 2 and summary["masks_converted"] == 1  # 3 SBD-only masks in all
    assert prep.check("sbd", root) == {"train_aug": len(TRAIN_AUG), "val": len(VOC_VAL)}
    again = _prepare("sbd", root, archives["sbd"])
    assert again["done"] == "already prepared"


def test_masks_cut_short_by_a_power_loss_are_redone(tmp_path, archives):
    """Files are not fsynced one by one: after a power loss an empty or truncated file may be left in place."""
    root = tmp_path / "voc"
    _prepare("voc", root, archives["voc"])
    _prepare("sbd", root, archives["sbd"])
    aug = root / "SegmentationClassAug"
    empty, truncated, whole = (aug / f"{i}.png" for i in ("2008_000002", "2008_000003", "2008_000004"))
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:-1])
    linked = aug / f"{VOC_VAL[0]}.png"  # a VOC mask copied (not linked) and cut short
    voc_bytes = linked.read_bytes()
    linked.unlink()
    linked.write_bytes(voc_bytes[: len(voc_bytes) // 2])
    prep._set_manifest(root, "sbd", {**prep.read_manifest(root)["sbd"], "status": prep.IN_PROGRESS})
    summary = _prepare("sbd", root, archives["sbd"])
    assert summary["done"] == "prepared"
    assert summary["masks_converted"] == 2 and summary["masks_skipped"] == 1 and summary["voc_masks_linked"] == 1
    for path in (empty, truncated, whole):
        assert np.array_equal(load_mask(path), sbd_mask(path.stem)), path
    assert linked.read_bytes() == voc_bytes
    assert prep.read_manifest(root)["sbd"]["status"] == prep.COMPLETE


def test_write_bytes_fsyncs_unless_not_durable(tmp_path, monkeypatch):
    real, fsyncs = os.fsync, []
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real(fd)))
    write_bytes(tmp_path / "fast.bin", b"abc", durable=False)
    assert (tmp_path / "fast.bin").read_bytes() == b"abc" and not fsyncs
    assert not list(tmp_path.glob(".*.tmp")), "still through a temp file and a rename"
    write_bytes(tmp_path / "durable.bin", b"abc")
    assert (tmp_path / "durable.bin").read_bytes() == b"abc" and len(fsyncs) == 1


@pytest.mark.parametrize("dataset", ["voc", "ade20k"])
def test_a_preparation_syncs_once_before_the_manifest_says_complete(tmp_path, archives, monkeypatch, dataset):
    root, syncs, fsyncs = tmp_path / dataset, [], []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "sync", lambda: syncs.append(prep.read_manifest(root)[dataset]["status"]))
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    summary = _prepare(dataset, root, archives[dataset])
    assert syncs == [prep.IN_PROGRESS], "once, before the manifest says complete"
    assert prep.read_manifest(root)[dataset]["status"] == prep.COMPLETE
    # the extracted files are not fsynced one by one: only the manifest (twice) and ADE20K's two split lists
    assert summary["files_written"] > 5 and len(fsyncs) == {"voc": 2, "ade20k": 4}[dataset]
    assert _prepare(dataset, root, archives[dataset])["done"] == "already prepared" and len(syncs) == 1


# --------------------------------------------------------------------------- errors


def test_wrong_root_is_a_clear_error(tmp_path, voc_sbd_root, capsys):
    assert main(["data", "prepare", "voc", "--root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recall: error:") and "nowhere" in err and "recall data prepare voc" in err
    with pytest.raises(DatasetError, match=r"did you mean --root .*voc"):
        prep.check("voc", voc_sbd_root.parent)  # the folder holding the dataset root
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="JPEGImages: missing directory"):
        prep.check("ade20k", empty)


def test_missing_files_are_named(tmp_path, archives):
    root = tmp_path / "voc"
    _prepare("voc", root, archives["voc"])
    with pytest.raises(DatasetError, match="SegmentationClassAug: missing directory; .*recall data prepare sbd"):
        prep.check("sbd", root)
    (root / "SegmentationClass" / f"{VOC_VAL[1]}.png").unlink()
    with pytest.raises(DatasetError, match=rf"1 of the 2 'val' ids .*{VOC_VAL[1]}\.png"):
        prep.check("voc", root)
    # a preparation marked complete whose files went missing is done again, not reported as done
    assert _prepare("voc", root, archives["voc"])["files_written"] == 1


def test_checksum_mismatch_names_file_and_digests(tmp_path, archives, capsys):
    wrong = "0" * 64
    args = ["data", "prepare", "voc", "--root", str(tmp_path / "voc"), "--archive", str(archives["voc"])]
    assert main([*args, "--sha256", wrong]) == 2
    err = capsys.readouterr().err
    assert str(archives["voc"]) in err and wrong in err and _sha(archives["voc"]) in err and "delete it" in err
    # without --sha256 the official digest (and size, where known) is expected
    with pytest.raises(ArchiveError, match=f"expected {voc.SBD_ARCHIVE.sha256}, got {_sha(archives['sbd'])}"):
        obtain(voc.SBD_ARCHIVE, [str(archives["sbd"])], tmp_path, progress=False)
    with pytest.raises(ArchiveError, match="bytes, expected 1999639040"):
        obtain(voc.VOC_ARCHIVE, [str(archives["voc"])], tmp_path, progress=False)


@pytest.mark.parametrize("dataset", ["voc", "sbd", "ade20k"])
def test_truncated_archive_is_a_clear_error_and_a_full_one_resumes(tmp_path, archives, dataset):
    root = tmp_path / ("ade20k" if dataset == "ade20k" else "voc")
    if dataset == "sbd":
        _prepare("voc", root, archives["voc"])
    cut = _truncated(archives[dataset], tmp_path / archives[dataset].name)
    with pytest.raises(ArchiveError, match=rf"{cut.name}.*(truncated|lacks files)"):
        _prepare(dataset, root, cut)
    with pytest.raises(DatasetError, match="did not finish"):
        prep.check(dataset, root)
    summary = _prepare(dataset, root, archives[dataset])
    assert summary["done"] == "prepared" and prep.check(dataset, root)
    skipped = summary.get("files_skipped", summary.get("masks_skipped"))
    assert dataset == "ade20k" or skipped > 0, "files extracted before the cut are not written again"


# --------------------------------------------------------------------------- download


class _Server:
    """Serves files on 127.0.0.1 with Range support, misbehaving as told: ``plan`` lists the fractions of the body
    the next responses send before dropping the connection, ``bad_ranges`` answers to a Range that start elsewhere
    (byte 0), ``no_length`` leaves out Content-Length, ``statuses`` answers errors first (e.g. 429)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.plan, self.bytes_served, self.ranges = files, [], 0, []
        self.bad_ranges, self.no_length, self.statuses = 0, False, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def do_GET(self):
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                if server.statuses:
                    self.send_error(server.statuses.pop(0))
                    return
                start = 0
                header = self.headers.get("Range")
                server.ranges.append(header)
                assert self.headers.get("Accept-Encoding") == "identity"
                if header:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    if server.bad_ranges:
                        server.bad_ranges -= 1
                        start = 0
                body = data[start:]
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                if not server.no_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.plan:
                    body = body[: int(len(body) * server.plan.pop(0))]
                self.wfile.write(body)
                server.bytes_served += len(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def test_download_resumes_after_a_cut_connection(tmp_path, archives):
    data = archives["voc"].read_bytes()
    with _Server({"/voc/VOCtrainval_11-May-2012.tar": data}) as server:
        server.plan = [0.5]
        root = tmp_path / "voc"
        summary = _prepare("voc", root, f"{server.url}/voc/VOCtrainval_11-May-2012.tar", sha256=_sha(archives["voc"]),
                           backoff=0)
    assert summary["splits"] == {"train": 3, "val": 2}
    assert server.bytes_served == len(data), "the bytes received before the cut are not downloaded again"
    assert server.ranges == [None, f"bytes={len(data) // 2}-"]
    assert (tmp_path / "downloads" / "VOCtrainval_11-May-2012.tar").read_bytes() == data
    assert not (tmp_path / "downloads" / "VOCtrainval_11-May-2012.tar.part").exists()


def test_a_part_file_survives_a_failed_command(tmp_path, archives):
    data = archives["ade20k"].read_bytes()
    dest = tmp_path / "ADEChallengeData2016.zip"
    with _Server({"/ade.zip": data}) as server:
        server.plan = [0.5, 0, 0]  # bytes, then two attempts in a row without any: give up
        with pytest.raises(ArchiveError, match=r"failed after 3 attempts.*\.part keeps the .* run the same command"):
            download(f"{server.url}/ade.zip", dest, attempts=2, backoff=0, progress=False)
        part = dest.with_name(dest.name + ".part")
        assert 0 < part.stat().st_size < len(data) and not dest.exists()
        server.plan, server.statuses = [0.5, 0.5, 0.5], [429, 408]  # progress resets the count; 408/429 retried
        assert download(f"{server.url}/ade.zip", dest, attempts=3, backoff=0, progress=False) == dest
        with pytest.raises(ArchiveError, match="404"):
            download(f"{server.url}/missing.zip", tmp_path / "missing.zip", attempts=3, backoff=0, progress=False)
    assert dest.read_bytes() == data and server.bytes_served == len(data)


def test_a_206_from_another_offset_restarts_from_byte_0(tmp_path, archives):
    data = archives["ade20k"].read_bytes()
    dest = tmp_path / "ade.zip"
    with _Server({"/ade.zip": data}) as server:
        server.plan, server.bad_ranges = [0.5], 1
        assert download(f"{server.url}/ade.zip", dest, backoff=0, progress=False, sha256=_sha(archives["ade20k"]))
    assert server.ranges == [None, f"bytes={len(data) // 2}-", None]
    assert dest.read_bytes() == data and not dest.with_name("ade.zip.part").exists()


def test_a_body_cut_without_content_length_is_never_promoted(tmp_path, archives):
    data = archives["ade20k"].read_bytes()
    url_path, digest = "/ADEChallengeData2016.zip", _sha(archives["ade20k"])
    with _Server({url_path: data}) as server:
        server.no_length = True
        # the size known: the short part is kept and resumed
        server.plan = [0.5]
        dest = tmp_path / "sized" / "ade.zip"
        assert download(server.url + url_path, dest, backoff=0, progress=False, size=len(data), sha256=digest)
        assert dest.read_bytes() == data and server.ranges[-1] == f"bytes={len(data) // 2}-"
        # only the digest known: the short file fails it, and nothing that looks finished is left
        server.plan = [0.5]
        dest = tmp_path / "digest" / "ade.zip"
        with pytest.raises(ArchiveError, match=rf"{dest}: SHA-256 mismatch: expected {digest}, got [0-9a-f]{{64}}"):
            download(server.url + url_path, dest, backoff=0, progress=False, sha256=digest)
        assert not dest.exists() and not dest.with_name("ade.zip.part").exists()
        # through obtain(): the official size and digest are passed on (here the test archive's, as if official)
        server.plan = [0.5]
        known = ade20k.ARCHIVE
        fake = type(known)("ade20k", known.name, "", digest, len(data), "test")
        archive = obtain(fake, [server.url + url_path], tmp_path / "obtain", backoff=0, progress=False)
        assert archive.official and archive.path.read_bytes() == data


# --------------------------------------------------------------------------- ADE20K


def _check_ade(root: Path) -> None:
    dataset = yaml.safe_load((ROOT / "conf" / "dataset" / "ade20k.yaml").read_text())
    assert read_split(root, dataset["train_split"]) == ADE_TRAIN
    assert read_split(root, dataset["val_split"]) == ADE_VAL
    for split in (dataset["train_split"], dataset["val_split"]):
        data = VOCSegmentation(root, split, num_classes=dataset["num_classes"], mask_dir=dataset["mask_dir"])
        for i, image_id in enumerate(data.ids):
            image, mask = data[i]
            assert image.shape == (3, SIZE[1], SIZE[0])
            assert np.array_equal(mask.numpy(), ade_mask(image_id)), "0 stays 0 (other), 1..150 stay"


def test_ade20k_from_the_zip(tmp_path, archives):
    root = tmp_path / "ade20k"
    summary = _prepare("ade20k", root, archives["ade20k"])
    assert summary["splits"] == {"train": 3, "val": 2} and summary["files_written"] == 10
    _check_ade(root)
    assert _prepare("ade20k", root, archives["ade20k"])["done"] == "already prepared"


def test_ade20k_from_an_extracted_directory_is_hard_linked(tmp_path, archives):
    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(archives["ade20k"]) as archive:
        archive.extractall(extracted)
    root = tmp_path / "ade20k"
    prep.prepare("ade20k", root, [str(extracted)], progress=False)
    _check_ade(root)
    source = extracted / "ADEChallengeData2016" / "images" / "training" / f"{ADE_TRAIN[0]}.jpg"
    assert (root / "JPEGImages" / f"{ADE_TRAIN[0]}.jpg").samefile(source)


def test_ade20k_config_classes_and_protocols():
    from recall.config import compose
    from recall.data.protocol import steps

    assert len(ADE20K_CLASSES) == 151 and ADE20K_CLASSES[1] == "wall" and ADE20K_CLASSES[150] == "flag"
    assert class_names("ade20k", 150) == list(ADE20K_CLASSES)
    assert class_names("voc", 20) == class_names("toy", 20) == list(VOC_CLASSES)
    assert class_names("cityscapes", 3) == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="150 classes"):
        class_names("ade20k", 20)
    for protocol in ("100-50", "100-10", "50-50"):
        cfg = compose(["dataset=ade20k", f"protocol={protocol}"])
        assert cfg.dataset.num_classes == 150 and cfg.dataset.root == "data/ade20k"
        assert sum(len(s) for s in steps(str(cfg.protocol.name), 150)) == 150


def test_an_extracted_directory_must_hold_the_archive_folder(tmp_path):
    (tmp_path / "VOC2012").mkdir()
    with pytest.raises(ArchiveError, match="no VOCdevkit/VOC2012/ inside; .*holding VOCdevkit/"):
        prep.prepare("voc", tmp_path / "voc", [str(tmp_path / "VOC2012")], progress=False)
    assert not (tmp_path / "voc").exists(), "nothing is written for a wrong source"


def test_official_archives_with_other_counts_warn(capsys):
    official = prep.Archive(Path("VOCtrainval_11-May-2012.tar"), "x", official=True)
    prep._warn_counts("sbd", {"train_aug": 10581, "val": 1449}, official)
    assert "10581" in capsys.readouterr().err
    prep._warn_counts("sbd", {"train_aug": 10582, "val": 1449}, official)
    prep._warn_counts("sbd", {"train_aug": 6, "val": 2}, prep.Archive(Path("b.tgz"), "y", official=False))
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- archive names, mixed roots, disk errors


def test_a_zip_is_read_as_a_zip_whatever_its_name(tmp_path, archives):
    unnamed = tmp_path / "ade_download"  # e.g. saved by a browser without the .zip
    unnamed.write_bytes(archives["ade20k"].read_bytes())
    _prepare("ade20k", tmp_path / "ade20k", unnamed)
    _check_ade(tmp_path / "ade20k")


def test_dot_slash_member_names_are_stripped(tmp_path, archives):
    extracted = tmp_path / "extracted"
    with tarfile.open(archives["voc"]) as tar:
        tar.extractall(extracted, filter="data")
    dotted = tmp_path / "voc.tgz"
    with tarfile.open(dotted, "w:gz") as tar:  # like `tar czf voc.tgz .` run inside the folder
        tar.add(extracted, arcname=".")
    with tarfile.open(dotted) as tar:
        assert any(name.startswith("./VOCdevkit/") for name in tar.getnames())
    assert _prepare("voc", tmp_path / "voc", dotted)["splits"] == {"train": 3, "val": 2}


def test_voc_and_ade20k_refuse_to_share_a_root(tmp_path, archives):
    voc, ade = tmp_path / "voc", tmp_path / "ade20k"
    _prepare("voc", voc, archives["voc"])
    _prepare("ade20k", ade, archives["ade20k"])
    with pytest.raises(DatasetError, match=r"holds another dataset \(prepared.json lists voc\); ade20k needs its own"):
        _prepare("ade20k", voc, archives["ade20k"])
    with pytest.raises(DatasetError, match=r"prepared.json lists ade20k\); voc needs its own root"):
        _prepare("voc", ade, archives["voc"])
    (voc / "prepared.json").unlink()  # a VOC root prepared by hand: its split files tell
    with pytest.raises(DatasetError, match=r"train.txt lists the ids of another dataset"):
        _prepare("ade20k", voc, archives["ade20k"])
    assert not list((voc / "JPEGImages").glob("ADE_*")), "refused before writing anything"


def test_a_full_disk_is_a_clear_error_and_a_rerun_resumes(tmp_path, archives, monkeypatch):
    root, real, calls = tmp_path / "voc", prep.write_bytes, []

    def disk_full_on_the_fourth(path, data, **options):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, **options)

    monkeypatch.setattr(prep, "write_bytes", disk_full_on_the_fourth)
    with pytest.raises(prep.StorageError, match=r"preparing voc in .*No space left on device.*finished so far are "
                                                r"kept.*run the same command again to resume") as error:
        _prepare("voc", root, archives["voc"])
    assert isinstance(error.value, DatasetError)
    monkeypatch.setattr(prep, "write_bytes", real)
    assert _prepare("voc", root, archives["voc"])["files_skipped"] == 3


def test_a_download_folder_that_cannot_be_written_is_a_clear_error(tmp_path, archives):
    a_file = tmp_path / "downloads"
    a_file.write_text("not a folder")  # fails for root too (ENOTDIR), unlike a read-only folder
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    with _Server({"/ade.zip": archives["ade20k"].read_bytes()}) as server:
        for downloads in (a_file / "sub", read_only):
            if downloads == read_only and os.geteuid() == 0:
                continue  # root ignores the permissions of a read-only folder
            with pytest.raises(prep.StorageError, match=r"downloading .*/ade.zip failed: .*finished so far are kept"):
                prep.prepare("ade20k", tmp_path / "ade20k", [f"{server.url}/ade.zip"], downloads=downloads,
                             progress=False, backoff=0)


def test_stale_temp_files_are_removed(tmp_path, archives):
    root = tmp_path / "voc"
    root.mkdir()
    (root / ".prepared.json.12345.tmp").write_text("{")
    (root / "JPEGImages").mkdir()
    (root / "JPEGImages" / ".x.jpg.12345.tmp").write_bytes(b"")
    _prepare("voc", root, archives["voc"])
    assert not list(root.rglob("*.tmp"))
