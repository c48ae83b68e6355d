import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coreseg.common.data import DataError, LesionDataset, SCHEMA, sample_to_row, write_parquet
from coreseg.common.images import encode_png, union_mask
from coreseg.common.importer import import_folder
from coreseg.common.synth import generate


def test_parquet_round_trip(tmp_path, synth_samples):
    path = write_parquet(synth_samples[:8], tmp_path / "a.parquet")
    ds = LesionDataset(str(path), split="train", batch_size=100, shuffle=False)
    want = [s for s in synth_samples[:8] if s.split == "train"]
    got = next(ds.iter_all())
    assert [s.id for s in got] == [s.id for s in want]
    for a, b in zip(got, want):
        assert np.array_equal(a.image, b.image)
        assert len(a.masks) == len(b.masks) and all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
        assert np.allclose(a.boxes, b.boxes)
        assert (a.question, a.reasoning, a.modality, a.category) == (b.question, b.reasoning, b.modality, b.category)


def _corrupt(rows, column, value):
    rows = [dict(r) for r in rows]
    rows[1][column] = value
    return rows


@pytest.fixture()
def rows(synth_samples):
    return [sample_to_row(s) for s in synth_samples[:6]]


@pytest.mark.parametrize("column, make_value, match", [
    ("image", lambda r: b"not a png", "undecodable image"),
    ("masks", lambda r: [encode_png(np.zeros((10, 10), bool))], "mask 0 is 10x10"),
    ("boxes", lambda r: [[0.0, 0.0, 500.0, 10.0]], "outside"),
    ("boxes", lambda r: [[0.0, 0.0, 5.0]], "not 4 numbers"),
    ("width", lambda r: 7, "width/height"),
    ("question", lambda r: None, "missing value"),
])
def test_corrupt_rows_name_file_row_and_column(tmp_path, rows, column, make_value, match):
    for r in rows:
        r["split"] = "train"
    bad = _corrupt(rows, column, make_value(rows[1]))
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(bad, schema=SCHEMA), path)
    ds = LesionDataset(str(path), split="train", batch_size=6, shuffle=False)
    with pytest.raises(DataError) as err:
        ds.next_batch()
    msg = str(err.value)
    assert "bad.parquet" in msg and repr(rows[1]["id"]) in msg and f"'{column}'" in msg and match in msg
    skipping = LesionDataset(str(path), split="train", batch_size=5, shuffle=False, skip_invalid=True)
    batch = skipping.next_batch()
    assert len(batch) == 5 and rows[1]["id"] not in [s.id for s in batch] and skipping.skipped == 1


def test_missing_column_names_file_and_column(tmp_path, rows):
    table = pa.Table.from_pylist(rows, schema=SCHEMA).drop_columns(["masks"])
    pq.write_table(table, tmp_path / "nomask.parquet")
    with pytest.raises(DataError, match=r"nomask.parquet.*missing column 'masks'"):
        LesionDataset(str(tmp_path / "nomask.parquet"), split="train")


def test_shuffle_is_seeded_and_cursor_resumes_exactly(synth_parquet):
    a = LesionDataset(str(synth_parquet), split="train", batch_size=3, seed=5)
    ids = [[s.id for s in a.next_batch()] for _ in range(4)]
    state = a.state_dict()
    after = [[s.id for s in a.next_batch()] for _ in range(6)]  # crosses an epoch boundary
    b = LesionDataset(str(synth_parquet), split="train", batch_size=3, seed=5)
    assert [[s.id for s in b.next_batch()] for _ in range(4)] == ids
    c = LesionDataset(str(synth_parquet), split="train", batch_size=3, seed=5)
    c.load_state_dict(state)
    assert [[s.id for s in c.next_batch()] for _ in range(6)] == after
    d = LesionDataset(str(synth_parquet), split="train", batch_size=3, seed=6)
    assert [[s.id for s in d.next_batch()] for _ in range(4)] != ids
    epoch0 = sorted(i for batch in ids for i in batch)
    assert len(set(epoch0)) == len(epoch0)  # no repeats inside an epoch


def test_synth_is_deterministic_with_disjoint_splits_and_ood():
    a, b = generate(40, seed=3, progress=False), generate(40, seed=3, progress=False)
    assert [s.id for s in a] == [s.id for s in b]
    assert all(np.array_equal(x.image, y.image) and x.reasoning == y.reasoning for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, generate(1, seed=4, progress=False)[0].image)
    by_split = {}
    for s in a:
        by_split.setdefault(s.split, set()).add(s.id)
    ids = [i for v in by_split.values() for i in v]
    assert len(ids) == len(set(ids)) == 40
    train = [s for s in a if s.split == "train"]
    ood = [s for s in a if s.split == "test_ood"]
    assert ood and {s.modality for s in ood}.isdisjoint({s.modality for s in train})
    assert {s.category for s in ood}.isdisjoint({s.category for s in train})
    assert len({s.modality for s in train}) >= 3
    assert any(len(s.masks) >= 2 for s in a) and all(1 <= len(s.masks) <= 3 for s in a)
    for s in a:  # boxes are the masks' tight boxes; no coordinates leak into the reasoning
        for m, box in zip(s.masks, s.boxes):
            ys, xs = np.nonzero(m)
            assert list(box) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert not any(ch.isdigit() for ch in s.reasoning)


def test_import_folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    image = np.full((40, 50, 3), 100, np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    mask[5:10, 5:15] = 255  # lesion 1: x 5..14, y 5..9
    mask[20:30, 30:34] = 255  # lesion 2
    Image.fromarray(image).save(tmp_path / "img" / "case1.jpg")
    Image.fromarray(mask).save(tmp_path / "msk" / "case1_segmentation.png")
    Image.fromarray(image).save(tmp_path / "img" / "nomask.png")
    out, _ = import_folder(tmp_path / "img", tmp_path / "msk", tmp_path / "out.parquet", category="polyp",
                        modality="endoscopy", mask_suffix="_segmentation", split="train")
    ds = LesionDataset(str(out), split="train", batch_size=4, shuffle=False)
    (s,) = next(ds.iter_all())
    assert s.id == "case1" and s.category == "polyp" and len(s.masks) == 2
    assert sorted(map(list, s.boxes)) == [[5, 5, 15, 10], [30, 20, 34, 30]]
    assert s.masks[0].sum() + s.masks[1].sum() == 50 + 40


def test_synth_reasoning_styles_count_the_lesions():
    short = generate(24, seed=5, progress=False)
    detailed = generate(24, seed=5, progress=False, reasoning="detailed")
    words = {1: "one", 2: "two", 3: "three"}
    for s, d in zip(short, detailed):
        n = len(s.boxes)
        assert np.array_equal(s.image, d.image) and s.reasoning != d.reasoning
        assert s.reasoning.startswith(f"{s.modality} image, {words[n]} {s.category}")
        assert s.reasoning.count(";") == n - 1 and len(s.reasoning.split()) <= 5 + 4 * n
        assert ("There is one" if n == 1 else f"There are {words[n]}") in d.reasoning
    with pytest.raises(ValueError, match="reasoning style"):
        generate(1, progress=False, reasoning="verbose")


def test_union_mask_is_the_pixelwise_or_and_checks_shapes(synth_samples):
    s = synth_samples[0]
    want = np.zeros((s.height, s.width), bool)
    for m in s.masks:
        want = want | m
    assert np.array_equal(s.union_mask(), want) and np.array_equal(union_mask(s.masks, s.height, s.width), want)
    assert not union_mask([], 3, 5).any() and union_mask([], 3, 5).shape == (3, 5)
    with pytest.raises(ValueError, match=r"ground-truth mask is \(2, 2\), image is \(3, 5\)"):
        union_mask([np.ones((2, 2), bool)], 3, 5)


def test_data_through_a_file_uri_reads_like_the_local_path(synth_parquet, tmp_path):
    from coreseg.common.data import DataError, LesionDataset

    local = LesionDataset(str(synth_parquet.parent), "train", batch_size=4, seed=3)
    remote = LesionDataset(synth_parquet.parent.resolve().as_uri(), "train", batch_size=4, seed=3)
    for _ in range(3):
        a, b = local.next_batch(), remote.next_batch()
        assert [s.id for s in a] == [s.id for s in b]
        assert all(np.array_equal(x.image, y.image) and np.array_equal(x.boxes, y.boxes) for x, y in zip(a, b))
    missing = (tmp_path / "nothing-here").as_uri()
    with pytest.raises(DataError, match="nothing-here.*does not exist"):
        LesionDataset(missing, "train")


def _place_words(box, size):  # the test's own reading of the synthetic set's place words (3x3 grid)
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    vert = "upper" if cy < 0.38 else "lower" if cy > 0.62 else "middle"
    horiz = "left" if cx < 0.38 else "right" if cx > 0.62 else "central"
    return "centre" if (vert, horiz) == ("middle", "central") else f"{vert} {horiz} part"


def test_synth_referring_asks_for_one_of_two_lesions():
    sizes = ("tiny", "small", "medium-sized", "large")
    samples = generate(60, seed=2, progress=False, task="referring")
    plain = generate(60, seed=2, progress=False)
    areas = {"larger": [], "smaller": []}
    for s, p in zip(samples, plain):
        assert s.id == p.id and s.split == p.split  # same ids and splits as the plain set
        assert len(s.masks) == 1 and len(s.boxes) == 1
        ys, xs = np.nonzero(s.masks[0])
        assert list(s.boxes[0]) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        which = "larger" if "larger" in s.question else "smaller"
        assert s.question == f"Segment the {which} of the two {s.category}s."
        area = s.masks[0].mean()
        areas[which].append(area)
        own = "tiny" if area < 0.008 else "small" if area < 0.03 else "medium-sized" if area < 0.08 else "large"
        place = _place_words(s.boxes[0], 112)
        head, tail = s.reasoning.rsplit(". The ", 1)
        assert tail == f"{which}: {place}."
        found = [f.split(", ") for f in head.split(": ", 1)[1].split("; ")]
        assert head.startswith(f"{s.modality} image, two {s.category}s: ") and len(found) == 2
        assert [own, place] in found  # the target is one of the two findings, the other is the distractor
        other = found[1] if found[0] == [own, place] else found[0]
        rank = sizes.index(own) - sizes.index(other[0])
        assert rank >= 0 if which == "larger" else rank <= 0
    assert 15 < len(areas["larger"]) < 45  # both questions are asked
    assert np.median(areas["larger"]) > 4 * np.median(areas["smaller"])
    assert {s.split for s in samples} == {"train", "val", "test_id", "test_ood"}
    detailed = generate(8, seed=2, progress=False, task="referring", reasoning="detailed")
    assert all(np.array_equal(a.image, b.image) and "two suspicious findings" in b.reasoning
               for a, b in zip(samples, detailed))
    with pytest.raises(ValueError, match="synthetic task"):
        generate(1, progress=False, task="every")


# sha256 of the first 40 samples of seed 0 (image, question, reasoning, boxes, masks), as the set was drawn before the
# referring task was added (checked against that code then)
PLAIN_SET_SHA256 = "29b76bac3c80019b3d9626b16ef60e92e133b4a8e68c7810e2c0dd05865e1271"


def test_synth_lesions_task_keeps_its_bytes():
    """Cached data sets and tiny-aligned builds were drawn from these bytes: a change must be deliberate."""
    import hashlib

    h = hashlib.sha256()
    for s in generate(40, seed=0, progress=False):
        for part in (s.image.tobytes(), s.question.encode(), s.reasoning.encode(), s.boxes.tobytes(),
                     *[m.tobytes() for m in s.masks]):
            h.update(part)
    assert h.hexdigest() == PLAIN_SET_SHA256
