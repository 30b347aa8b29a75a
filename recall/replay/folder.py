"""A replay source reading a user's own images: ``ROOT/<class_name>/*.jpg|*.jpeg|*.png``.

Files are taken in sorted order, so source index i is always the same file. A file is read under the same limits
as a web photo (``recall.replay.images``: bytes, pixels from the header before decoding, the shorter side), and a
symbolic link that leads outside ROOT is refused unless ``allow_outside_root``. Every skipped file is counted by
reason (``.skipped``) and listed with its reason (``.problems``: the pool build writes them to ``pool.json``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from recall.replay.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits, Skip, decode_image
from recall.errors import ReplayError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_MIN_SIZE = 1  # a user's own images: no lower limit unless asked (the web source's default is 32)


class FolderSource:
    """Replay images from ``root/<class_name>/``; license and owner are unknown (None)."""

    name = "folder"

    def __init__(self, root: str | Path, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES, allow_outside_root: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ReplayError(f"{self.root}: replay folder is missing; expected one sub-directory per class "
                              f"named like the class, e.g. {self.root}/aeroplane/*.jpg")
        for key, value in (("min_size", min_size), ("max_pixels", max_pixels), ("max_bytes", max_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ReplayError(f"replay.source.{key}={value!r}: a positive integer")
        self.limits = ImageLimits(min_size=min_size, max_pixels=max_pixels, max_bytes=max_bytes)
        self.allow_outside_root = bool(allow_outside_root)
        self.skipped: Counter[str] = Counter()
        self.problems: list[tuple[str, str]] = []
        self._files: dict[str, list[Path]] = {}

    def __repr__(self) -> str:
        return f"FolderSource(root={str(self.root)!r})"

    @property
    def params(self) -> dict:
        return {"root": str(self.root), "min_size": self.limits.min_size, "max_pixels": self.limits.max_pixels,
                "max_bytes": self.limits.max_bytes, "allow_outside_root": self.allow_outside_root}

    def files(self, class_name: str) -> list[Path]:
        """The class's image files, sorted by name."""
        if class_name not in self._files:
            directory = self.root / class_name
            if not directory.is_dir():
                present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
                raise ReplayError(
                    f"{directory}: class directory is missing; expected {self.root}/<class_name>/*.jpg|*.jpeg|*.png "
                    f"with the dataset's class names (e.g. {self.root}/{class_name}/0001.jpg); "
                    f"found directories: {present[:20] or 'none'}")
            self._files[class_name] = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                                             and (p.is_file() or p.is_symlink()))
        return self._files[class_name]

    def available(self, class_index: int, class_name: str) -> int:
        return len(self.files(class_name))

    def _read(self, path: Path) -> bytes:
        """The file's bytes, within the limits; `Skip` for a file that leaves the root, is not a regular file, or is
        larger than max_bytes (checked before reading)."""
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError) as error:  # a dangling or looping link
            raise Skip("unreadable", f"cannot resolve ({error})") from None
        if not self.allow_outside_root and not resolved.is_relative_to(self.root.resolve()):
            raise Skip("outside_root", f"a link to {resolved}, outside {self.root} (replay.source.allow_outside_root="
                                       "true admits it)")
        if not resolved.is_file():
            raise Skip("not_a_file", f"{resolved} is not a regular file")
        size = resolved.stat().st_size
        if size > self.limits.max_bytes:
            raise Skip("too_large", f"{size} bytes > max_bytes {self.limits.max_bytes}")
        try:
            return resolved.read_bytes()
        except OSError as error:
            raise Skip("unreadable", str(error)) from None

    def images(self, class_index: int, class_name: str, start: int, count: int
               ) -> Iterator[tuple[Image.Image, dict]]:
        """``(RGB image, meta)`` for files ``start .. start + count - 1``; files that fail a check are skipped."""
        files = self.files(class_name)
        for index in range(start, min(start + count, len(files))):
            path = files[index]
            try:
                data = self._read(path)
                image = decode_image(data, self.limits)
            except Skip as skip:
                self.skipped[skip.reason] += 1
                self.problems.append((f"{class_name}/{path.name}", f"{skip.reason}: {skip.detail}"))
                continue
            yield image, {"index": index, "source_class": class_name, "license": None, "owner": None,
                          "file": f"{class_name}/{path.name}", "file_sha256": hashlib.sha256(data).hexdigest()}
