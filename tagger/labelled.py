"""Labelled folders (styles.csv + images/<id>.<ext>): the one reader train, eval and calibrate share."""

from __future__ import annotations

import csv
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tagger.errors import TaggerError
from tagger.pipeline.discover import ImageRef

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # tried in this order for each id
EXPECTED = "styles.csv and images/<id>.jpg (or .jpeg, .png, .webp)"


def read_styles(path: Path) -> list[dict[str, str]]:
    """Read a Fashion Product Images styles.csv into dicts.

    The original file has lines whose last field (productDisplayName) holds unquoted commas; the extra fields are
    joined back into the last column rather than dropping or shifting the row.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise TaggerError(f"{path} is empty") from None
        rows = []
        for fields in reader:
            if not fields:
                continue
            if len(fields) > len(header):
                fields = fields[: len(header) - 1] + [",".join(fields[len(header) - 1 :])]
            rows.append(dict(zip(header, (x.strip() for x in fields))))
    return rows


def image_ref(root: Path, row_id: str) -> ImageRef | None:
    """The first regular file images/<id><suffix> (symlinks followed) as an ImageRef, or None."""
    for suffix in IMAGE_SUFFIXES:
        rel = f"images/{row_id}{suffix}"
        abspath = str(root / rel)
        try:
            st = os.stat(abspath)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            return ImageRef(rel, abspath, st.st_size, st.st_mtime)
    return None


@dataclass(frozen=True)
class LabelledFolder:
    """A styles.csv and the image file found for each of its rows."""

    root: Path
    csv_path: Path
    rows: list[dict[str, str]]
    columns: set[str]
    refs: list[ImageRef]  # one per row with an image file, in csv order
    ref_rows: list[int]  # the csv row of each ref
    missing_ids: list[str]  # ids of the rows without an image file

    def truth(self, column: str) -> list[str]:
        """The column's label of each ref's row ('' where empty)."""
        return [self.rows[i].get(column, "") for i in self.ref_rows]

    def require_column(self, column: str, what: str) -> None:
        """TaggerError naming `what` (the task or option asking for it) unless styles.csv has the column."""
        if column not in self.columns:
            raise TaggerError(f"{what}: no column {column!r} in {self.csv_path}; columns: {sorted(self.columns)}")


def load_labelled_folder(root: Path, limit: int | None = None, seed: int = 0) -> LabelledFolder:
    """Read root/styles.csv and find each row's image file; rows without one are counted and logged, not fatal.

    limit: keep a random sample of that many rows (in csv order), the same for the same seed and file.

    TaggerError when the folder, the csv or its id column is missing, or when no row has an image file.
    """
    csv_path = root / "styles.csv"
    if not root.is_dir():
        raise TaggerError(f"data folder {root} does not exist")
    if not csv_path.is_file():
        raise TaggerError(f"{csv_path} not found: expected {EXPECTED}")
    rows = read_styles(csv_path)
    if not rows:
        raise TaggerError(f"{csv_path} has no rows")
    columns = set(rows[0])
    if "id" not in columns:
        raise TaggerError(f"{csv_path} has no 'id' column")
    if limit is not None and limit < len(rows):
        pick = np.random.default_rng(seed).choice(len(rows), size=limit, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    refs: list[ImageRef] = []
    ref_rows: list[int] = []
    missing_ids: list[str] = []
    for i, r in enumerate(rows):
        ref = image_ref(root, r.get("id", ""))
        if ref is None:
            missing_ids.append(r.get("id", ""))
        else:
            refs.append(ref)
            ref_rows.append(i)
    if not refs:
        raise TaggerError(f"no row of {csv_path} has its image in {root / 'images'}; expected {EXPECTED}")
    if missing_ids:
        log.warning("%d of %d rows have no image file (first id: %s)", len(missing_ids), len(rows), missing_ids[0])
    return LabelledFolder(root, csv_path, rows, columns, refs, ref_rows, missing_ids)


__all__ = ["IMAGE_SUFFIXES", "LabelledFolder", "image_ref", "load_labelled_folder", "read_styles"]
