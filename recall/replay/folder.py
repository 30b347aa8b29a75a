"""A replay source reading a user's own images: ``ROOT/<class_name>/*.jpg|*.jpeg|*.png``.

Files are taken in sorted order, so source index i is always the same file. Unreadable or
corrupt files are skipped and counted (``.skipped`` per class, ``.problems`` per file).
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from recall.replay.pool import PIL_ERRORS, ReplayError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class FolderSource:
    """Replay images from ``root/<class_name>/``; license and owner are unknown (None)."""

    name = "folder"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ReplayError(f"{self.root}: replay folder is missing; expected one sub-directory per class "
                              f"named like the class, e.g. {self.root}/aeroplane/*.jpg")
        self.skipped: Counter[str] = Counter()
        self.problems: list[tuple[str, str]] = []
        self._files: dict[str, list[Path]] = {}

    def __repr__(self) -> str:
        return f"FolderSource(root={str(self.root)!r})"

    @property
    def params(self) -> dict:
        return {"root": str(self.root)}

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
            self._files[class_name] = sorted(p for p in directory.iterdir()
                                             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return self._files[class_name]

    def available(self, class_index: int, class_name: str) -> int:
        return len(self.files(class_name))

    def images(self, class_index: int, class_name: str, start: int, count: int
               ) -> Iterator[tuple[Image.Image, dict]]:
        """``(RGB image, meta)`` for files ``start .. start + count - 1``; unreadable files are skipped."""
        files = self.files(class_name)
        for index in range(start, min(start + count, len(files))):
            path = files[index]
            try:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as opened:
                    image = opened.convert("RGB")
            except PIL_ERRORS as error:  # OSError covers unreadable files too
                self.skipped[class_name] += 1
                self.problems.append((str(path), f"unreadable: {error}"))
                continue
            yield image, {"index": index, "source_class": class_name, "license": None, "owner": None,
                          "file": f"{class_name}/{path.name}", "file_sha256": hashlib.sha256(data).hexdigest()}
