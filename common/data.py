"""The lesion data format (one Parquet row per image) and a streaming, resumable reader.

Columns: id, image (PNG bytes), width, height, masks (list of PNG bytes, one per lesion), boxes (list of
[x1, y1, x2, y2] pixels, one per mask), question, reasoning, source, modality, split; optional: category.
Ids are unique across all files and splits. Every error names the file, the row (index in its file, and id)
and the column.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from coreseg.common.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image, decode_mask, encode_png, union_mask

SPLITS = ("train", "val", "test_id", "test_ood")
REQUIRED_COLUMNS = ("id", "image", "width", "height", "masks", "boxes", "question", "reasoning",
                    "source", "modality", "split")
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("masks", pa.list_(pa.binary())),
    ("boxes", pa.list_(pa.list_(pa.float32()))),
    ("question", pa.string()),
    ("reasoning", pa.string()),
    ("source", pa.string()),
    ("modality", pa.string()),
    ("split", pa.string()),
    ("category", pa.string()),
])


class DataError(ValueError):
    """A row or file does not follow the lesion data format."""


class DataWarning(UserWarning):
    """A file skipped under data.skip_invalid."""


_READ_ERRORS = (OSError, pa.ArrowException)  # what pyarrow raises on corrupt files and pages


@dataclass
class LesionSample:
    id: str
    image: np.ndarray  # HxWx3 uint8
    masks: List[np.ndarray]  # HxW bool, one per lesion
    boxes: np.ndarray  # [N, 4] float, pixels
    question: str
    reasoning: str = ""
    source: str = ""
    modality: str = ""
    split: str = ""
    category: str = "lesion"

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def union_mask(self) -> np.ndarray:
        return union_mask(self.masks, self.height, self.width)


def sample_to_row(s: LesionSample) -> dict:
    return {"id": s.id, "image": encode_png(s.image), "width": s.width, "height": s.height,
            "masks": [encode_png(m) for m in s.masks],
            "boxes": [[float(v) for v in b] for b in np.asarray(s.boxes).reshape(-1, 4)],
            "question": s.question, "reasoning": s.reasoning, "source": s.source,
            "modality": s.modality, "split": s.split, "category": s.category}


def write_parquet(samples: Sequence[LesionSample] | Sequence[dict], path: str | Path,
                  row_group_size: int = 64) -> Path:
    rows = [s if isinstance(s, dict) else sample_to_row(s) for s in samples]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _where(file: str, row: Optional[int], rid) -> str:
    return f"{file}: row {row} (id={rid!r})" if row is not None else f"{file}: row id={rid!r}"


def row_to_sample(row: dict, file: str, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                  row_index: Optional[int] = None) -> LesionSample:
    """Decode and check one row; raises DataError naming the file, row (index in the file, and id) and
    column. Images (and masks) above `max_image_pixels` pixels are refused before decoding."""
    rid = row.get("id")

    def fail(column: str, why: str):
        raise DataError(f"{_where(file, row_index, rid)}: column '{column}': {why}")

    for col in REQUIRED_COLUMNS:
        if row.get(col) is None and col not in ("reasoning",):
            fail(col, "missing value")
    if isinstance(row["image"], dict):  # e.g. an HF `datasets` Image struct {bytes, path}
        fail("image", "a struct, not encoded image bytes (a Parquet file written by HF datasets?); convert it "
                      "with `coreseg data import --parquet FILE`")
    try:
        image = decode_image(row["image"], max_image_pixels)
    except ImageError as err:
        fail("image", str(err))
    h, w = image.shape[:2]
    if (int(row["width"]), int(row["height"])) != (w, h):
        fail("width", f"width/height {row['width']}x{row['height']} but the image is {w}x{h}")
    masks = []
    for i, raw in enumerate(row["masks"]):
        if raw is None:
            fail("masks", f"mask {i} is null")
        try:
            mask = decode_mask(raw, max_image_pixels)
        except ImageError as err:
            fail("masks", f"mask {i}: {err}")
        if mask.shape != (h, w):
            fail("masks", f"mask {i} is {mask.shape[1]}x{mask.shape[0]} but the image is {w}x{h}")
        masks.append(mask)
    boxes = []
    for i, box in enumerate(row["boxes"]):
        if box is None:
            fail("boxes", f"box {i} is null")
        if len(box) != 4:
            fail("boxes", f"box {i} is not 4 numbers ({len(box)} values)")
        for j, v in enumerate(box):
            if v is None:
                fail("boxes", f"box {i} coordinate {j} ({'x1 y1 x2 y2'.split()[j]}) is null")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            fail("boxes", f"box {i} {[x1, y1, x2, y2]} is outside the {w}x{h} image or inverted")
        boxes.append([x1, y1, x2, y2])
    if len(boxes) != len(masks):
        fail("boxes", f"{len(boxes)} boxes but {len(masks)} masks (one box per lesion mask)")
    return LesionSample(id=str(rid), image=image, masks=masks,
                        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                        question=row["question"], reasoning=row.get("reasoning") or "",
                        source=row["source"], modality=row["modality"], split=row["split"],
                        category=row.get("category") or "lesion")


def _open(path: str | Path) -> pads.Dataset:
    """A local folder/file, or a URI read through pyarrow.fs (file://, s3://, gs://, hdfs://: whatever this
    pyarrow build supports), so every node reads the same data without a shared mount."""
    missing = f"data path {path} does not exist (run `coreseg data synth` or `coreseg data import`)"
    # An explicit schema: no file is read to infer one (a corrupt first file is then reported per file, and a
    # column missing from a later file is not hidden behind the first file's schema).
    if "://" in str(path):
        try:
            fs, root = pafs.FileSystem.from_uri(str(path))
            found = fs.get_file_info(root).type != pafs.FileType.NotFound
        except (pa.ArrowException, OSError, ValueError) as err:
            raise DataError(f"data path {path}: cannot be opened ({_first_line(err)})") from None
        if not found:
            raise DataError(missing)
        return pads.dataset(root, format="parquet", schema=SCHEMA, filesystem=fs)
    if not Path(path).exists():
        raise DataError(missing)
    return pads.dataset(str(path), format="parquet", schema=SCHEMA)


def _file_problem(frag) -> Optional[str]:
    """Why a Parquet file cannot be used at all (unreadable footer, a required column missing), or None."""
    try:
        names = frag.physical_schema.names
    except _READ_ERRORS as err:
        return f"unreadable Parquet file ({_first_line(err)})"
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        hint = ""
        if "image" in names and pa.types.is_struct(frag.physical_schema.field("image").type):
            hint = ("; its 'image' column is a struct, as HF datasets writes images: convert the file with "
                    "`coreseg data import --parquet FILE`")
        return f"missing column '{missing[0]}' (required: {', '.join(REQUIRED_COLUMNS)}){hint}"
    return None


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


@dataclass
class _RowRef:
    fragment: int
    row: int  # index in its file
    id: str


@dataclass
class LesionDataset:
    """Rows of one split, streamed a batch at a time.

    Only the `id`/`split` columns are scanned up front (every file's, all splits: ids must be unique across
    the data set); a batch reads just its rows. Order is a seeded permutation per epoch; `state_dict()`
    (epoch, position) restores exactly where a run stopped. Every problem raises a DataError naming file, row
    and column; with `skip_invalid` a bad row is skipped and counted (`skipped`, `skipped_reasons`) and a
    file that cannot be used at all is skipped with a DataWarning naming it (`skipped_files`).
    """
    path: str
    split: str
    batch_size: int = 4
    seed: int = 0
    skip_invalid: bool = False
    shuffle: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    epoch: int = 0
    position: int = 0
    skipped: int = 0
    skipped_reasons: List[str] = field(default_factory=list)
    skipped_files: List[str] = field(default_factory=list)

    def __post_init__(self):
        self._dataset = _open(self.path)
        self._fragments = []
        self._refs: List[_RowRef] = []
        first_seen: Dict[str, Tuple[str, int]] = {}
        for frag in self._dataset.get_fragments():
            problem = _file_problem(frag)
            if problem is None:
                try:
                    table = frag.to_table(columns=["id", "split"])
                except _READ_ERRORS as err:
                    problem = f"unreadable Parquet data in column 'id' or 'split' ({_first_line(err)})"
            if problem is not None:
                self._skip_file(frag.path, problem)
                continue
            fi = len(self._fragments)
            self._fragments.append(frag)
            for ri, (sid, sp) in enumerate(zip(table.column("id").to_pylist(), table.column("split").to_pylist())):
                where = f"{frag.path}: row {ri} (id={sid!r})"
                if sid is None or sp is None:
                    self._skip_row(f"{where}: column '{'id' if sid is None else 'split'}': missing value")
                    continue
                if sid in first_seen:
                    other_file, other_row = first_seen[sid]
                    self._skip_row(f"{where}: column 'id': duplicate id {sid!r}, also in {other_file} row "
                                   f"{other_row} (ids key caches and results; each row needs its own)")
                    continue
                first_seen[sid] = (frag.path, ri)
                if sp == self.split:
                    self._refs.append(_RowRef(fi, ri, str(sid)))
        if not self._refs:
            skipped = f" ({len(self.skipped_files)} files skipped: {', '.join(self.skipped_files)})" \
                if self.skipped_files else ""
            raise DataError(f"{self.path}: no rows with split '{self.split}'{skipped}")

    def _skip_row(self, reason: str) -> None:
        if not self.skip_invalid:
            raise DataError(reason)
        self.skipped += 1
        self.skipped_reasons.append(reason)

    def _skip_file(self, file: str, reason: str) -> None:
        if not self.skip_invalid:
            raise DataError(f"{file}: {reason}")
        self.skipped_files.append(file)
        warnings.warn(f"{file}: skipped (data.skip_invalid): {reason}", DataWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def ids(self) -> List[str]:
        return [ref.id for ref in self._refs]

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._refs))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._refs))

    def _take_rows(self, frag, refs: Sequence[_RowRef]) -> List[Union[dict, DataError]]:
        """The rows of one file; when a read fails, each row is read from its own row group so only rows
        in unreadable pages fail, each as a DataError naming file, row, id and the unreadable column."""
        try:
            return frag.take(pa.array([r.row for r in refs])).to_pylist()
        except _READ_ERRORS:
            pass
        starts = np.cumsum([0] + [rg.num_rows for rg in frag.row_groups])
        groups = frag.split_by_row_group()
        out: List[Union[dict, DataError]] = []
        for ref in refs:
            k = int(np.searchsorted(starts, ref.row, side="right") - 1)
            offset = pa.array([ref.row - int(starts[k])])
            try:
                out.append(groups[k].take(offset).to_pylist()[0])
                continue
            except _READ_ERRORS as err:
                failure = err
            column = "?"
            for name in SCHEMA.names:
                try:
                    groups[k].take(offset, columns=[name])
                except _READ_ERRORS as err:
                    column, failure = name, err
                    break
            out.append(DataError(f"{frag.path}: row {ref.row} (id={ref.id!r}): column '{column}': unreadable "
                                 f"Parquet data in row group {k} ({_first_line(failure)})"))
        return out

    def _read(self, indices: Sequence[int]) -> List[LesionSample]:
        out: List[Optional[LesionSample]] = [None] * len(indices)
        by_fragment: dict = {}
        for slot, idx in enumerate(indices):
            ref = self._refs[idx]
            by_fragment.setdefault(ref.fragment, []).append((slot, ref))
        for fi, items in by_fragment.items():
            frag = self._fragments[fi]
            rows = self._take_rows(frag, [ref for _, ref in items])
            for (slot, ref), row in zip(items, rows):
                error = row if isinstance(row, DataError) else None
                if error is None:
                    try:
                        out[slot] = row_to_sample(row, frag.path, self.max_image_pixels, ref.row)
                    except DataError as err:
                        error = err
                if error is not None:
                    self._skip_row(str(error))
        return [s for s in out if s is not None]

    def next_batch(self, batch_size: Optional[int] = None) -> List[LesionSample]:
        """The next `batch_size` valid samples (wrapping into the next epoch, reshuffled)."""
        want = batch_size or self.batch_size
        batch: List[LesionSample] = []
        attempts = 0
        while len(batch) < want:
            order = self._order(self.epoch)
            take = order[self.position:self.position + (want - len(batch))]
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
            batch.extend(self._read(take.tolist()))
            attempts += 1
            if attempts > 2 * len(self._refs) + 2:
                raise DataError(f"{self.path}: split '{self.split}' has no valid rows left")
        return batch

    def iter_all(self, limit: Optional[int] = None) -> Iterator[List[LesionSample]]:
        """Every row once, in file order, in batches (for evaluation)."""
        n = len(self._refs) if limit is None else min(limit, len(self._refs))
        for start in range(0, n, self.batch_size):
            yield self._read(list(range(start, min(n, start + self.batch_size))))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "split": self.split,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if state.get("split", self.split) != self.split:
            raise DataError(f"cursor is for split {state['split']!r}, dataset is {self.split!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self.skipped = int(state.get("skipped", 0))
