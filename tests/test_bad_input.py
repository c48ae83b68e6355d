"""Bad input (issue 13): every error names the file, the row and the column; skip_invalid skips and counts;
16-bit images are scaled, huge images refused before decoding; import and predict name bad files."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from coreseg.common.data import SCHEMA, DataError, DataWarning, LesionDataset, sample_to_row, write_parquet
from coreseg.common.images import ImageError, decode_image, decode_mask, encode_png
from tests.png_writer import blank_png, png16


@pytest.fixture()
def rows(synth_samples):
    out = [sample_to_row(s) for s in synth_samples[:6]]
    for r in out:
        r["split"] = "train"
    return out


def _write(rows, path, **kw):
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, **kw)
    return path


def _error(path, **kw) -> str:
    with pytest.raises(DataError) as err:
        ds = LesionDataset(str(path), split="train", batch_size=100, shuffle=False, **kw)
        ds.next_batch()
    return str(err.value)


# -- duplicate ids ----------------------------------------------------------------------------------------------
def test_duplicate_ids_name_both_rows_across_files(tmp_path, rows):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(rows[:3], folder / "a.parquet")
    second = [dict(r) for r in rows[3:]]
    second[1]["id"] = rows[2]["id"]  # b.parquet row 1 repeats a.parquet row 2
    _write(second, folder / "b.parquet")
    msg = _error(folder)
    assert f"{folder / 'b.parquet'}: row 1" in msg and f"also in {folder / 'a.parquet'} row 2" in msg
    assert repr(rows[2]["id"]) in msg and "column 'id'" in msg and "duplicate id" in msg
    ds = LesionDataset(str(folder), split="train", batch_size=100, shuffle=False, skip_invalid=True)
    assert ds.skipped == 1 and len(ds) == 5 and ds.ids == [r["id"] for r in rows[:3]] + [second[0]["id"], second[2]["id"]]
    got = {s.id: s for s in next(ds.iter_all())}
    assert np.array_equal(got[rows[2]["id"]].image, decode_image(rows[2]["image"]))  # the first row is kept


def test_duplicate_ids_in_other_splits_and_one_file(tmp_path, rows):
    rows[4]["id"], rows[4]["split"] = rows[0]["id"], "val"  # ids key caches across splits too
    msg = _error(_write(rows, tmp_path / "one.parquet"))
    assert "one.parquet: row 4" in msg and "one.parquet row 0" in msg and repr(rows[0]["id"]) in msg


# -- nulls, count mismatch ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("column, value, match", [
    ("boxes", "null_coordinate", "box 0 coordinate 1 (y1) is null"),
    ("boxes", "null_box", "box 0 is null"),
    ("masks", "null_mask", "mask 0 is null"),
    ("boxes", "extra_box", "2 boxes but 1 masks"),
    ("boxes", "extra_mask", "1 boxes but 2 masks"),
])
def test_nulls_in_lists_and_count_mismatch_name_file_row_and_column(tmp_path, rows, column, value, match):
    bad = rows[2]
    bad["masks"], bad["boxes"] = bad["masks"][:1], bad["boxes"][:1]
    box = list(bad["boxes"][0])
    if value == "null_coordinate":
        bad["boxes"] = [[box[0], None, box[2], box[3]]]
    elif value == "null_box":
        bad["boxes"] = [None]
    elif value == "null_mask":
        bad["masks"] = [None]
    elif value == "extra_box":
        bad["boxes"] = [box, box]
    else:
        bad["masks"] = bad["masks"] * 2
    path = _write(rows, tmp_path / "bad.parquet")
    msg = _error(path)
    assert f"{path}: row 2 (id={bad['id']!r}): column '{column}': {match}" in msg
    ds = LesionDataset(str(path), split="train", batch_size=5, shuffle=False, skip_invalid=True)
    assert [s.id for s in ds.next_batch()] == [r["id"] for r in rows if r is not bad] and ds.skipped == 1
    assert ds.skipped_reasons == [msg]


# -- unreadable Parquet ------------------------------------------------------------------------------------------
def _corrupt_page(path, row_group: int, column: str):
    """Overwrite the header of `column`'s data page in `row_group` (pyarrow then fails that page only)."""
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(row_group).column(SCHEMA.names.index(column))
    raw = bytearray(path.read_bytes())
    raw[col.data_page_offset:col.data_page_offset + 16] = bytes(16)
    path.write_bytes(bytes(raw))


def test_corrupt_data_page_names_file_row_and_column(tmp_path, rows):
    path = _write(rows, tmp_path / "pages.parquet", row_group_size=2)
    _corrupt_page(path, 1, "image")  # rows 2 and 3
    with pytest.raises(OSError):  # what pyarrow alone says: no file, row or column
        pq.read_table(path)
    msg = _error(path)
    assert f"{path}: row 2 (id={rows[2]['id']!r}): column 'image': unreadable Parquet data in row group 1" in msg
    ds = LesionDataset(str(path), split="train", batch_size=6, shuffle=False, skip_invalid=True)
    assert [s.id for s in next(ds.iter_all())] == [rows[i]["id"] for i in (0, 1, 4, 5)]
    assert ds.skipped == 2 and all(str(path) in r and "column 'image'" in r for r in ds.skipped_reasons)


def test_unreadable_file_is_named_and_skipped_with_a_warning(tmp_path, rows):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(rows[:3], folder / "a.parquet")
    good = _write(rows[3:], folder / "b.parquet")
    (folder / "c.parquet").write_bytes(good.read_bytes()[:-40])  # footer cut off
    msg = _error(folder)
    assert f"{folder / 'c.parquet'}: unreadable Parquet file" in msg
    with pytest.warns(DataWarning, match="c.parquet: skipped"):
        ds = LesionDataset(str(folder), split="train", batch_size=6, shuffle=False, skip_invalid=True)
    assert ds.skipped_files == [str(folder / "c.parquet")] and len(ds) == 6


def test_column_missing_from_only_the_second_file_names_it(tmp_path, rows):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(rows[:3], folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:], schema=SCHEMA).drop_columns(["masks"]), folder / "b.parquet")
    msg = _error(folder)
    assert f"{folder / 'b.parquet'}: missing column 'masks'" in msg
    with pytest.warns(DataWarning, match=r"b.parquet: skipped \(data.skip_invalid\): missing column 'masks'"):
        ds = LesionDataset(str(folder), split="train", batch_size=6, shuffle=False, skip_invalid=True)
    assert ds.skipped_files == [str(folder / "b.parquet")]
    assert [s.id for s in next(ds.iter_all())] == [r["id"] for r in rows[:3]]


# -- images ------------------------------------------------------------------------------------------------------
def _ramp(bits: int, shape=(64, 64)) -> np.ndarray:
    n = int(np.prod(shape))
    return (np.arange(n) * ((1 << bits) - 1) // (n - 1)).astype(np.uint16).reshape(shape)


def _want(values: np.ndarray, bits: int) -> np.ndarray:
    return np.floor(values.astype(np.float64) * 255 / ((1 << bits) - 1) + 0.5).astype(np.uint8)


def test_16bit_greyscale_png_is_scaled_not_clipped():
    ramp = _ramp(12)  # a 12-bit ramp in a 16-bit container (no sBIT)
    raw = encode_png(ramp)  # PIL writes uint16 as a 16-bit greyscale PNG
    assert raw[24] == 16 and raw[25] == 0
    got = decode_image(raw)
    assert got.shape == (64, 64, 3) and (got[..., 0] == got[..., 2]).all()
    assert np.abs(got[..., 0].astype(int) - _want(ramp, 12)).max() <= 1  # max 4095 -> 12-bit scale
    assert (got == 255).mean() < 0.01 and got.min() == 0 and got.max() == 255  # clipping made 94% white
    full = _ramp(16)
    assert np.abs(decode_image(png16(full))[..., 0].astype(int) - _want(full, 16)).max() <= 1
    sbit = _ramp(10)  # sBIT says 10 significant bits: scaled by 1023 even though the values hold less
    assert np.abs(decode_image(png16(sbit // 2, sbit=[10]))[..., 0].astype(int) - _want(sbit // 2, 10)).max() <= 1


def test_16bit_rgb_png_keeps_all_16_bits():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 4096, (33, 47, 3)).astype(np.uint16)  # 12-bit values; rows Sub-filtered
    rgb[0, 0] = 4095
    got = decode_image(png16(rgb))
    assert got.shape == (33, 47, 3)
    assert np.abs(got.astype(int) - _want(rgb, 12)).max() <= 1  # PIL alone keeps the high byte: 0..15
    rgba = np.concatenate([rgb, np.full((33, 47, 1), 65535, np.uint16)], axis=2)
    assert np.abs(decode_image(png16(rgba, sbit=[12, 12, 12, 16])).astype(int) - _want(rgb, 12)).max() <= 1
    mask = np.zeros((5, 6), np.uint16)
    mask[1:3, 2:5] = 1  # a 16-bit label mask with label 1: still foreground
    assert (decode_mask(encode_png(mask)) == (mask > 0)).all()


def test_huge_image_is_refused_before_decoding(tmp_path, rows, monkeypatch):
    bomb = blank_png(10000, 10000)
    assert len(bomb) < 64 * 1024

    def no_decoding(self, *a, **k):
        raise AssertionError("pixels were decoded")

    with monkeypatch.context() as patched:
        patched.setattr(ImageFile.ImageFile, "load", no_decoding)
        with pytest.raises(ImageError, match="10000x10000 = 100000000 pixels, above the limit of 16777216"):
            decode_image(bomb, 4096 * 4096)
    rows[1]["image"] = bomb
    path = _write(rows, tmp_path / "bomb.parquet")
    msg = _error(path)
    assert f"{path}: row 1 (id={rows[1]['id']!r}): column 'image'" in msg and "100000000" in msg and "16777216" in msg
    small = _error(path, max_image_pixels=100)  # the configured limit applies (data.max_image_pixels)
    assert "row 0" in small and "above the limit of 100 pixels" in small


@pytest.mark.parametrize("content, match", [(b"", "0 bytes"), (b"just some text\n", "not a known image format"),
                                            ("truncated", "undecodable image")])
def test_import_names_an_empty_or_non_image_file(tmp_path, content, match):
    from coreseg.common.importer import import_folder

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "img" / "good.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "msk" / "good.png")
    if content == "truncated":
        content = encode_png(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))[:300]
    (tmp_path / "img" / "case2.png").write_bytes(content)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "msk" / "case2.png")
    with pytest.raises(DataError, match=rf"{tmp_path / 'img' / 'case2.png'}: .*{match}"):
        import_folder(tmp_path / "img", tmp_path / "msk", tmp_path / "out.parquet")
    (tmp_path / "img" / "case2.png").unlink()
    (tmp_path / "msk" / "good.png").write_bytes(content)  # a bad mask file is named too
    with pytest.raises(DataError, match=rf"{tmp_path / 'msk' / 'good.png'}: "):
        import_folder(tmp_path / "img", tmp_path / "msk", tmp_path / "out.parquet")


def test_cli_import_and_predict_exit_with_the_file_named(tmp_path, capsys):
    from coreseg.common.config import load_config, save_config
    from coreseg.deploy.cli import main

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    (tmp_path / "msk" / "empty.png").write_bytes(encode_png(np.ones((4, 4), bool)))
    with pytest.raises(SystemExit) as err:
        main(["data", "import", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
              "--out", str(tmp_path / "o.parquet")])
    assert str(err.value.code) == f"coreseg: {tmp_path / 'img' / 'empty.png'}: undecodable image: 0 bytes"
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("tiny_cpu"), run / "config.yaml")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit) as err:  # refused before any model is built
        main(["predict", "--run-dir", str(run), "--image", str(tmp_path / "notes.png"), "--question", "q"])
    assert str(tmp_path / "notes.png") in str(err.value.code) and "not a known image format" in str(err.value.code)


def test_imported_ids_must_be_unique(tmp_path):
    from coreseg.common.importer import import_folder

    for d in ("img", "msk"):
        (tmp_path / d).mkdir()
    for name in ("case1.png", "case1.jpg"):
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "img" / name)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "msk" / "case1.png")
    with pytest.raises(DataError, match=r"case1.jpg and .*case1.png have the same file stem"):
        import_folder(tmp_path / "img", tmp_path / "msk", tmp_path / "out.parquet")


def test_valid_data_reads_as_before(tmp_path, synth_samples):
    """The checks add no false alarms: the synthetic set reads whole, no row skipped."""
    path = write_parquet(synth_samples, tmp_path / "s.parquet", row_group_size=7)
    ds = LesionDataset(str(path), split="train", batch_size=100, shuffle=False)
    got = next(ds.iter_all())
    want = [s for s in synth_samples if s.split == "train"]
    assert [s.id for s in got] == [s.id for s in want] and ds.skipped == 0
    assert all(np.array_equal(a.image, b.image) for a, b in zip(got, want))
