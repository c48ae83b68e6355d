"""The lesion data format (one Parquet row per image) and a streaming, resumable reader.

Columns: id, image (PNG bytes), width, height, masks (list of PNG bytes, one per lesion), boxes (list of
[x1, y1, x2, y2] pixels), question, reasoning, source, modality, split; optional: category.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from common.images import decode_image, decode_mask, encode_png, union_mask

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


def row_to_sample(row: dict, file: str) -> LesionSample:
    """Decode and check one row; raises DataError naming the file, row id and column."""
    rid = row.get("id")

    def fail(column: str, why: str):
        raise DataError(f"{file}: row id={rid!r}: column '{column}': {why}")

    for col in REQUIRED_COLUMNS:
        if row.get(col) is None and col not in ("reasoning",):
            fail(col, "missing value")
    try:
        image = decode_image(row["image"])
    except Exception as err:  # PIL raises several types on corrupt bytes
        fail("image", f"undecodable image ({type(err).__name__})")
    h, w = image.shape[:2]
    if (int(row["width"]), int(row["height"])) != (w, h):
        fail("width", f"width/height {row['width']}x{row['height']} but the image is {w}x{h}")
    masks = []
    for i, raw in enumerate(row["masks"]):
        try:
            mask = decode_mask(raw)
        except Exception as err:
            fail("masks", f"mask {i} is undecodable ({type(err).__name__})")
        if mask.shape != (h, w):
            fail("masks", f"mask {i} is {mask.shape[1]}x{mask.shape[0]} but the image is {w}x{h}")
        masks.append(mask)
    boxes = []
    for i, box in enumerate(row["boxes"]):
        if box is None or len(box) != 4:
            fail("boxes", f"box {i} is not 4 numbers")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            fail("boxes", f"box {i} {[x1, y1, x2, y2]} is outside the {w}x{h} image or inverted")
        boxes.append([x1, y1, x2, y2])
    return LesionSample(id=str(rid), image=image, masks=masks,
                        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                        question=row["question"], reasoning=row.get("reasoning") or "",
                        source=row["source"], modality=row["modality"], split=row["split"],
                        category=row.get("category") or "lesion")


def _open(path: str | Path) -> pads.Dataset:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist (run `coreseg data synth` or `coreseg data import`)")
    dataset = pads.dataset(str(path), format="parquet")
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.schema.names]
    if missing:
        files = ", ".join(dataset.files[:3])
        raise DataError(f"{files}: missing column '{missing[0]}' (required: {', '.join(REQUIRED_COLUMNS)})")
    return dataset


@dataclass
class _RowRef:
    fragment: int
    row: int


@dataclass
class LesionDataset:
    """Rows of one split, streamed a batch at a time.

    Only the `id`/`split` columns are scanned up front; a batch reads just its rows. Order is a seeded
    permutation per epoch; `state_dict()` (epoch, position) restores exactly where a run stopped.
    """
    path: str
    split: str
    batch_size: int = 4
    seed: int = 0
    skip_invalid: bool = False
    shuffle: bool = True
    epoch: int = 0
    position: int = 0
    skipped: int = 0
    skipped_reasons: List[str] = field(default_factory=list)

    def __post_init__(self):
        self._dataset = _open(self.path)
        self._fragments = list(self._dataset.get_fragments())
        self._refs: List[_RowRef] = []
        self._ids: List[str] = []
        for fi, frag in enumerate(self._fragments):
            table = frag.to_table(columns=["id", "split"])
            splits = table.column("split").to_pylist()
            ids = table.column("id").to_pylist()
            for ri, (sid, sp) in enumerate(zip(ids, splits)):
                if sp == self.split:
                    self._refs.append(_RowRef(fi, ri))
                    self._ids.append(str(sid))
        if not self._refs:
            raise DataError(f"{self.path}: no rows with split '{self.split}'")

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def ids(self) -> List[str]:
        return list(self._ids)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._refs))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._refs))

    def _read(self, indices: Sequence[int]) -> List[LesionSample]:
        out: List[Optional[LesionSample]] = [None] * len(indices)
        by_fragment: dict = {}
        for slot, idx in enumerate(indices):
            ref = self._refs[idx]
            by_fragment.setdefault(ref.fragment, []).append((slot, ref.row))
        for fi, items in by_fragment.items():
            frag = self._fragments[fi]
            rows = frag.take(pa.array([r for _, r in items])).to_pylist()
            for (slot, _), row in zip(items, rows):
                try:
                    out[slot] = row_to_sample(row, frag.path)
                except DataError as err:
                    if not self.skip_invalid:
                        raise
                    self.skipped += 1
                    self.skipped_reasons.append(str(err))
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
