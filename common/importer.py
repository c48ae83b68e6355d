"""`coreseg data import`: image + mask files (ISIC/Kvasir folders matched by file stem, or a Parquet file such as
one written by HF `datasets`) to the lesion Parquet format.

- A mask pixel is lesion when its grey value is above `mask_threshold` x the mask's brightest value (0.5: a 0/255
  mask splits at 127.5, a 0/1 label mask at 0.5), so JPEG compression noise around 0 is background.
- Each 8-connected component of the thresholded mask is one lesion; components smaller than
  `min_lesion_fraction` of the image's pixels (JPEG speckle, stray pixels) are dropped and counted.
- Images keep their original bytes when they are PNG or JPEG (the reader decodes both); other formats (BMP,
  TIFF) are written as PNG. Lesion masks are written as 1-bit-per-lesion PNGs.
- Rows are written a row group at a time, so memory holds one row group of encoded images, never the data set.
- `reasoning="template"` writes a one-sentence description from the masks (modality, count, size and place of
  each lesion; no coordinates), as the synthetic set's `short` style does; `none` leaves it empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
from scipy import ndimage
from tqdm import tqdm

from coreseg.common.data import SCHEMA, SPLITS, DataError
from coreseg.common.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image, encode_png, mask_to_box, open_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
KEPT_FORMATS = ("PNG", "JPEG")  # stored as given; the reader decodes them
REASONING_MODES = ("none", "template")
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass
class ImportOptions:
    category: str = "lesion"
    modality: str = "unknown"
    source: str = ""
    split: str = "auto"  # one of SPLITS for every row, or auto (80/10/10 train/val/test_id by seed)
    seed: int = 0
    question: str = "Locate and segment the {category}."
    mask_threshold: float = 0.5
    min_lesion_fraction: float = 0.001
    reasoning: str = "none"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    row_group_size: int = 32

    def check(self) -> None:
        if not 0 < self.mask_threshold < 1:
            raise DataError(f"mask threshold {self.mask_threshold} must be in (0, 1) (a fraction of the mask's "
                            "brightest value)")
        if not 0 <= self.min_lesion_fraction < 1:
            raise DataError(f"minimum lesion fraction {self.min_lesion_fraction} must be in [0, 1)")
        if self.reasoning not in REASONING_MODES:
            raise DataError(f"reasoning {self.reasoning!r} must be one of {REASONING_MODES}")
        if self.split != "auto" and self.split not in SPLITS:
            raise DataError(f"split {self.split!r} must be auto or one of {SPLITS}")


@dataclass
class ImportStats:
    rows: int = 0
    lesions: int = 0
    dropped_components: int = 0  # components below the minimum lesion size
    rows_with_dropped: List[str] = field(default_factory=list)
    rows_without_lesion: List[str] = field(default_factory=list)
    reencoded: int = 0  # images not PNG/JPEG, written as PNG

    def summary(self, opts: ImportOptions) -> str:
        lines = [f"{self.rows} rows, {self.lesions} lesions"]
        if self.dropped_components:
            lines.append(f"warning: dropped {self.dropped_components} mask components smaller than "
                         f"{opts.min_lesion_fraction:g} of the image in {len(self.rows_with_dropped)} rows "
                         f"(e.g. {self.rows_with_dropped[0]}); change with --min-lesion-fraction")
        if self.rows_without_lesion:
            lines.append(f"warning: {len(self.rows_without_lesion)} rows have no lesion after thresholding "
                         f"(e.g. {self.rows_without_lesion[0]})")
        if self.reencoded:
            lines.append(f"{self.reencoded} images were neither PNG nor JPEG and are stored as PNG")
        return "\n".join(lines)


def mask_values(data: bytes, max_pixels: Optional[int]) -> np.ndarray:
    """HxW grey values of mask bytes (colour masks as luminance, 16-bit masks as they are)."""
    img = open_image(data, max_pixels)
    try:
        with img:
            if img.mode in ("1", "L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                return np.asarray(img).astype(np.float64)
            return np.asarray(img.convert("L")).astype(np.float64)
    except Exception as err:
        raise ImageError(f"undecodable mask: {type(err).__name__}: {err}") from None


def lesion_masks(values: np.ndarray, threshold: float, min_pixels: int) -> Tuple[List[np.ndarray], int]:
    """One bool mask per 8-connected component of `values > threshold * values.max()` with at least
    `min_pixels` pixels, largest first; and how many smaller components were dropped."""
    top = float(values.max()) if values.size else 0.0
    if top <= 0:
        return [], 0
    labels, count = ndimage.label(values > threshold * top, structure=np.ones((3, 3), dtype=int))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = [k + 1 for k in np.argsort(-sizes, kind="stable") if sizes[k] >= min_pixels]
    return [labels == k for k in keep], int(count - len(keep))


def _words_size(area_fraction: float) -> str:
    return "tiny" if area_fraction < 0.008 else "small" if area_fraction < 0.03 else \
        "medium-sized" if area_fraction < 0.08 else "large"


def _words_place(box: np.ndarray, width: int, height: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    vert = "upper" if cy < 0.38 else "lower" if cy > 0.62 else "middle"
    horiz = "left" if cx < 0.38 else "right" if cx > 0.62 else "central"
    return "centre" if (vert, horiz) == ("middle", "central") else f"{vert} {horiz} part"


def template_reasoning(masks: List[np.ndarray], boxes: np.ndarray, modality: str, category: str) -> str:
    """The synthetic set's `short` style from real masks: modality, count, size and place of each lesion."""
    if not masks:
        return f"{modality} image, no {category} visible."
    h, w = masks[0].shape
    n = len(masks)
    where = "; ".join(f"{_words_size(m.sum() / (h * w))}, {_words_place(b, w, h)}" for m, b in zip(masks, boxes))
    return f"{modality} image, {_NUMBER_WORDS.get(n, str(n))} {category}{'' if n == 1 else 's'}: {where}."


def stored_image(data: bytes, where: str, max_pixels: int) -> Tuple[bytes, int, int, bool]:
    """(bytes to store, width, height, re-encoded?): PNG and JPEG as given (decoded once to check them),
    others as PNG. DataError naming `where` for an unusable image."""
    try:
        image = decode_image(data, max_pixels)
        with open_image(data, max_pixels) as img:
            fmt = img.format
    except ImageError as err:
        raise DataError(f"{where}: {err}") from None
    h, w = image.shape[:2]
    if fmt in KEPT_FORMATS:
        return bytes(data), w, h, False
    return encode_png(image), w, h, True


def make_row(sample_id: str, image_data: bytes, mask_data: bytes, index: int, opts: ImportOptions,
             stats: ImportStats, image_where: str, mask_where: str) -> dict:
    image_bytes, w, h, reencoded = stored_image(image_data, image_where, opts.max_image_pixels)
    try:
        values = mask_values(mask_data, opts.max_image_pixels)
    except ImageError as err:
        raise DataError(f"{mask_where}: {err}") from None
    if values.shape != (h, w):
        raise DataError(f"{mask_where}: mask {values.shape[1]}x{values.shape[0]} differs from image {w}x{h}")
    min_pixels = max(1, int(np.ceil(opts.min_lesion_fraction * h * w)))
    masks, dropped = lesion_masks(values, opts.mask_threshold, min_pixels)
    boxes = np.stack([mask_to_box(m) for m in masks]).astype(np.float64) if masks else np.zeros((0, 4))
    if opts.split == "auto":
        u = np.random.default_rng([opts.seed, index]).random()
        split = "train" if u < 0.8 else "val" if u < 0.9 else "test_id"
    else:
        split = opts.split
    stats.rows += 1
    stats.lesions += len(masks)
    stats.reencoded += int(reencoded)
    if dropped:
        stats.dropped_components += dropped
        stats.rows_with_dropped.append(sample_id)
    if not masks:
        stats.rows_without_lesion.append(sample_id)
    reasoning = (template_reasoning(masks, boxes, opts.modality, opts.category) if opts.reasoning == "template"
                 else "")
    return {"id": sample_id, "image": image_bytes, "width": w, "height": h,
            "masks": [encode_png(m) for m in masks], "boxes": [[float(v) for v in b] for b in boxes],
            "question": opts.question.format(category=opts.category), "reasoning": reasoning,
            "source": opts.source, "modality": opts.modality, "split": split, "category": opts.category}


def write_rows(rows: Iterator[dict], out_path: str | Path, row_group_size: int) -> Path:
    """Streams rows into a Parquet file, one row group of `row_group_size` rows at a time; written to a
    temporary name and renamed at the end, so a failed import leaves no half file under `out_path`."""
    import pyarrow as pa

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    buffer: List[dict] = []
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for row in rows:
                buffer.append(row)
                if len(buffer) >= row_group_size:
                    writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMA))
                    buffer = []
            if buffer:
                writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMA))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out_path)
    return out_path


def _find_mask(masks_dir: Path, stem: str, mask_suffix: str) -> Optional[Path]:
    for candidate in sorted(masks_dir.glob(f"{stem}{mask_suffix}.*")):
        if candidate.suffix.lower() in IMAGE_SUFFIXES:
            return candidate
    return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None


def import_folder(images_dir: str | Path, masks_dir: str | Path, out_path: str | Path, *, mask_suffix: str = "",
                  opts: Optional[ImportOptions] = None, **options) -> Tuple[Path, ImportStats]:
    """Images in `images_dir` with a mask `<stem><mask_suffix>.*` in `masks_dir`; the file stem is the sample id.
    `options` are ImportOptions fields (when `opts` is not given). Raises DataError naming the file for an empty,
    non-image, corrupt or too large (> max_image_pixels, checked before decoding) image or mask."""
    opts = opts or ImportOptions(**options)
    opts.check()
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"{d} is not a folder")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{images_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    by_stem: dict = {}
    for path in images:  # the stem is the sample id: two images of one stem would share it
        if path.stem in by_stem:
            raise DataError(f"{by_stem[path.stem]} and {path} have the same file stem, which is the sample id; "
                            "rename one")
        by_stem[path.stem] = path
    pairs = [(p, _find_mask(masks_dir, p.stem, mask_suffix)) for p in images]
    unmatched = [p.name for p, m in pairs if m is None]
    pairs = [(p, m) for p, m in pairs if m is not None]
    if not pairs:
        raise DataError(f"no image in {images_dir} has a mask in {masks_dir} (matched by file stem"
                        f"{' + ' + repr(mask_suffix) if mask_suffix else ''})")
    if unmatched:
        print(f"warning: {len(unmatched)} images without a mask were skipped (e.g. {unmatched[0]})")
    if not opts.source:
        opts.source = images_dir.name
    stats = ImportStats()
    rows = (make_row(p.stem, _read(p), _read(m), k, opts, stats, str(p), str(m))
            for k, (p, m) in enumerate(tqdm(pairs, desc="import")))
    return write_rows(rows, out_path, opts.row_group_size), stats


def cell_bytes(value, column: str, where: str, base_dir: Path) -> bytes:
    """The encoded image in a Parquet cell: binary, or an HF `datasets` Image struct {bytes, path} (its bytes,
    else the file at its path, relative to the Parquet file's folder)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            path = Path(value["path"])
            path = path if path.is_absolute() else base_dir / path
            if path.is_file():
                return _read(path)
            raise DataError(f"{where}: column '{column}': the image struct has no bytes and its path {path} "
                            "does not exist")
        raise DataError(f"{where}: column '{column}': the image struct has neither bytes nor a path")
    raise DataError(f"{where}: column '{column}': expected encoded image bytes or an image struct {{bytes, path}}, "
                    f"got {type(value).__name__}")


def import_parquet(in_path: str | Path, out_path: str | Path, *, image_column: str = "image",
                   mask_column: str = "mask", id_column: str = "", opts: Optional[ImportOptions] = None,
                   **options) -> Tuple[Path, ImportStats]:
    """Rows of a Parquet file with an image and a mask column (binary, or HF `datasets` Image structs), read a
    batch at a time. Ids: `id_column`'s values, else `<file stem>-<row index>`."""
    opts = opts or ImportOptions(**options)
    opts.check()
    in_path = Path(in_path)
    try:
        source = pq.ParquetFile(in_path)
    except (OSError, ValueError) as err:
        raise DataError(f"{in_path}: not a readable Parquet file ({err})") from None
    columns = [c for c in (image_column, mask_column, id_column) if c]
    missing = [c for c in columns if c not in source.schema_arrow.names]
    if missing:
        raise DataError(f"{in_path}: no column {missing[0]!r} (columns: {source.schema_arrow.names}); name the "
                        "columns with --image-column, --mask-column, --id-column")
    if not opts.source:
        opts.source = in_path.stem
    stats = ImportStats()

    def rows() -> Iterator[dict]:
        seen = set()
        index = 0
        bar = tqdm(total=source.metadata.num_rows, desc="import")
        for batch in source.iter_batches(batch_size=opts.row_group_size, columns=columns):
            for record in batch.to_pylist():
                sample_id = str(record[id_column]) if id_column else f"{in_path.stem}-{index}"
                where = f"{in_path}: row {index} (id={sample_id!r})"
                if sample_id in seen:
                    raise DataError(f"{where}: duplicate id")
                seen.add(sample_id)
                image = cell_bytes(record[image_column], image_column, where, in_path.parent)
                mask = cell_bytes(record[mask_column], mask_column, where, in_path.parent)
                yield make_row(sample_id, image, mask, index, opts, stats, f"{where}: column '{image_column}'",
                               f"{where}: column '{mask_column}'")
                index += 1
                bar.update(1)
        bar.close()

    return write_rows(rows(), out_path, opts.row_group_size), stats
