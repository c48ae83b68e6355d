"""`coreseg data import` on small generated images: mask threshold, minimum lesion size, original encodings,
row-group streaming, HF `datasets` Parquet (Image structs) and templated reasoning."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coreseg.common.data import DataError, LesionDataset
from coreseg.common.importer import ImportOptions, import_folder, import_parquet

H, W = 64, 80  # 5120 pixels: the default minimum lesion size 0.001 is ceil(5.12) = 6 pixels


def _bytes(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (H, W, 3), dtype=np.uint8)


def _mask(value=255):
    """Two lesions (10x10 upper left, 6x10 lower right) and speckle: a 1-pixel and a 2x2 dot at full value
    (components of 1 and 4 pixels, below the 6-pixel minimum) and a dim dot below half the brightest value."""
    m = np.zeros((H, W), np.uint8)
    m[4:14, 6:16] = value  # lesion A: 100 pixels, box [6, 4, 16, 14]
    m[50:60, 64:70] = value  # lesion B: 60 pixels, box [64, 50, 70, 60]
    m[30, 40] = value
    m[20:22, 60:62] = value
    m[40, 10] = value * 0.4 if value > 1 else 0
    return m


def _folder(tmp_path, image_fmt="JPEG", mask_array=None, mask_fmt="PNG", n=1):
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "msk").mkdir(exist_ok=True)
    suffix = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp"}
    for k in range(n):
        (tmp_path / "img" / f"case{k}.{suffix[image_fmt]}").write_bytes(_bytes(_image(k), image_fmt))
        (tmp_path / "msk" / f"case{k}.{suffix[mask_fmt]}").write_bytes(
            _bytes(_mask() if mask_array is None else mask_array, mask_fmt, **({"quality": 75} if mask_fmt == "JPEG" else {})))


def _read(path):
    return list(next(LesionDataset(str(path), split="train", batch_size=64, shuffle=False).iter_all()))


@pytest.mark.parametrize("value", [255, 1])  # a 0/255 mask and a 0/1 label mask split alike
def test_threshold_and_minimum_size_drop_and_count_speckle(tmp_path, value, capsys):
    _folder(tmp_path, mask_array=_mask(value))
    out, stats = import_folder(tmp_path / "img", tmp_path / "msk", tmp_path / "o.parquet", split="train")
    (s,) = _read(out)
    assert sorted(map(list, s.boxes)) == [[6, 4, 16, 14], [64, 50, 70, 60]]
    assert sorted(int(m.sum()) for m in s.masks) == [60, 100]
    assert stats.dropped_components == 2 and stats.rows_with_dropped == ["case0"] and stats.lesions == 2
    assert "dropped 2 mask components smaller than 0.001" in stats.summary(ImportOptions())
    out, stats = import_folder(tmp_path / "img", tmp_path / "msk", tmp_path / "all.parquet", split="train",
                               min_lesion_fraction=0.0)
    assert len(_read(out)[0].masks) == 4 and stats.dropped_components == 0  # the dim dot is below the threshold


def test_jpeg_mask_noise_does_not_become_lesions(tmp_path):
    _folder(tmp_path, mask_fmt="JPEG")
    out, stats = import_folder(tmp_path / "img", tmp_path / "msk", tmp_path / "o.parquet", split="train")
    (s,) = _read(out)
    assert len(s.masks) == 2  # compression ringing and speckle are thresholded or dropped
    truth = [np.zeros((H, W), bool), np.zeros((H, W), bool)]
    truth[0][4:14, 6:16] = True
    truth[1][50:60, 64:70] = True
    for m, t in zip(sorted(s.masks, key=lambda m: -m.sum()), truth):
        assert (m & t).sum() / (m | t).sum() > 0.85


def test_images_keep_their_encoding_and_others_become_png(tmp_path):
    _folder(tmp_path, image_fmt="JPEG")
    out, _ = import_folder(tmp_path / "img", tmp_path / "msk", tmp_path / "o.parquet", split="train")
    row = pq.read_table(out).to_pylist()[0]
    assert row["image"] == (tmp_path / "img" / "case0.jpg").read_bytes()  # the JPEG bytes, not a PNG of them
    bmp = tmp_path / "bmp"
    bmp.mkdir()
    _folder(bmp, image_fmt="BMP")
    out, stats = import_folder(bmp / "img", bmp / "msk", bmp / "o.parquet", split="train")
    (s,) = _read(out)
    assert pq.read_table(out).to_pylist()[0]["image"][:8] == b"\x89PNG\r\n\x1a\n" and stats.reencoded == 1
    np.testing.assert_array_equal(s.image, _image(0))  # lossless


def test_rows_are_written_a_row_group_at_a_time(tmp_path, monkeypatch):
    _folder(tmp_path, image_fmt="PNG", n=10)
    written = []
    real = pq.ParquetWriter.write_table

    def spy(self, table, *a, **kw):
        written.append(table.num_rows)
        return real(self, table, *a, **kw)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", spy)
    out, stats = import_folder(tmp_path / "img", tmp_path / "msk", tmp_path / "o.parquet", split="train",
                               row_group_size=4)
    assert written == [4, 4, 2] and pq.ParquetFile(out).metadata.num_row_groups == 3 and stats.rows == 10
    assert [s.id for s in _read(out)] == [f"case{k}" for k in range(10)]


def _hf_parquet(path, rows):
    """What HF `datasets` writes for Image features: struct<bytes: binary, path: string> columns."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([r[0] for r in rows], image_type),
                      "mask": pa.array([r[1] for r in rows], image_type)})
    pq.write_table(table, path)


def test_hf_datasets_parquet_with_image_structs(tmp_path):
    jpeg, mask = _bytes(_image(3), "JPEG"), _bytes(_mask(), "PNG")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "m1.png").write_bytes(mask)
    src = tmp_path / "train-00000-of-00001.parquet"
    _hf_parquet(src, [({"bytes": jpeg, "path": "a.jpg"}, {"bytes": mask, "path": None}),
                      ({"bytes": jpeg, "path": None}, {"bytes": None, "path": "masks/m1.png"})])
    with pytest.raises(DataError, match="struct, as HF datasets writes images.*--parquet"):
        LesionDataset(str(src), split="train", batch_size=1)  # the raw file: the error says how to convert it
    out, stats = import_parquet(src, tmp_path / "o.parquet", split="train", reasoning="template",
                                modality="endoscopy", category="polyp")
    samples = _read(out)
    assert [s.id for s in samples] == ["train-00000-of-00001-0", "train-00000-of-00001-1"]
    assert all(sorted(map(list, s.boxes)) == [[6, 4, 16, 14], [64, 50, 70, 60]] for s in samples)
    assert pq.read_table(out).to_pylist()[0]["image"] == jpeg
    # lesion A covers 100/5120 = 0.0195 (small) around (11, 9)/(80, 64) = (0.14, 0.14): upper left;
    # B 60/5120 = 0.0117 (small) around (67, 55)/(80, 64) = (0.84, 0.86): lower right
    assert samples[0].reasoning == "endoscopy image, two polyps: small, upper left part; small, lower right part."
    assert stats.rows == 2 and stats.dropped_components == 4


def test_hf_parquet_errors_name_the_row_and_column(tmp_path):
    src = tmp_path / "d.parquet"
    _hf_parquet(src, [({"bytes": _bytes(_image(), "PNG"), "path": None}, {"bytes": None, "path": "gone.png"})])
    with pytest.raises(DataError, match=r"d.parquet: row 0 \(id='d-0'\): column 'mask': .*gone.png does not exist"):
        import_parquet(src, tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "o.parquet.tmp").exists()
    with pytest.raises(DataError, match="no column 'label'.*--mask-column"):
        import_parquet(src, tmp_path / "o.parquet", mask_column="label")


def test_cli_import_parquet_prints_the_counts(tmp_path, capsys):
    from coreseg.deploy.cli import main

    src = tmp_path / "d.parquet"
    _hf_parquet(src, [({"bytes": _bytes(_image(), "PNG"), "path": None}, {"bytes": _bytes(_mask(), "PNG"),
                                                                          "path": None})])
    main(["data", "import", "--parquet", str(src), "--out", str(tmp_path / "o.parquet"), "--split", "val",
          "--min-lesion-fraction", "0.0005"])  # 2.56 -> 3 pixels: the 4-pixel dot is kept
    out = capsys.readouterr().out
    assert "1 rows, 3 lesions" in out and "dropped 1 mask components" in out
    with pytest.raises(SystemExit, match="either --images DIR --masks DIR or --parquet FILE"):
        main(["data", "import", "--parquet", str(src), "--images", "x", "--out", str(tmp_path / "p.parquet")])
