"""Corpus readers: JSONL / Parquet / datasets folders, ids, random access, streaming, errors."""

import json
import os

import pytest

from msif.data.corpus import Corpus, detect_format, fingerprints_match, iter_records
from msif.data.jsonl import scan_line_offsets
from msif.data.encoding import InputError

ROWS = [{"id": f"doc-{i}", "text": f"sentence number {i} " + "x" * (i % 7), "n": i} for i in range(53)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_CACHE_DIR", str(tmp_path / "cache"))


def write_jsonl(path, rows, blank_every=None):
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(r) + "\n")
            if blank_every and i % blank_every == 0:
                f.write("\n   \n")
    return path


def write_parquet(path, rows, row_group_size=10):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_datasets(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.fixture(params=["jsonl", "parquet", "datasets"])
def corpus_path(request, tmp_path):
    if request.param == "jsonl":
        return write_jsonl(tmp_path / "c.jsonl", ROWS, blank_every=5)
    if request.param == "parquet":
        return write_parquet(tmp_path / "c.parquet", ROWS)
    return write_datasets(tmp_path / "c_ds", ROWS)


def test_formats_detected(corpus_path):
    expected = {"c.jsonl": "jsonl", "c.parquet": "parquet", "c_ds": "datasets"}[corpus_path.name]
    assert detect_format(corpus_path) == expected
    assert Corpus(corpus_path).format == expected


def test_len_random_access_and_ids(corpus_path):
    c = Corpus(corpus_path)
    assert len(c) == len(ROWS)
    assert c.has_ids
    for i in [0, 1, 9, 10, 11, 29, 52, -1]:
        r = ROWS[i]
        assert c[i]["text"] == r["text"] and c[i]["n"] == r["n"]
        assert c.text(i) == r["text"]
        assert c.doc_id(i) == r["id"]
    order = [52, 3, 17, 3, 40]
    assert c.texts(order) == [ROWS[i]["text"] for i in order]
    assert c.doc_ids(order) == [ROWS[i]["id"] for i in order]
    assert c.row_of("doc-17") == 17
    with pytest.raises(KeyError):
        c.row_of("nope")
    with pytest.raises(IndexError):
        c[len(ROWS)]


def test_streaming_batches_and_records(corpus_path):
    c = Corpus(corpus_path)
    batches = list(c.iter_batches(8))
    assert [b.start for b in batches] == list(range(0, 53, 8))
    assert [t for b in batches for t in b.texts] == [r["text"] for r in ROWS]
    assert [d for b in batches for d in b.ids] == [r["id"] for r in ROWS]
    assert list(batches[2].rows) == list(range(16, 24))
    # start / limit, other field
    part = list(c.iter_batches(4, field="n", start=11, limit=7))
    assert [v for b in part for v in b.texts] == list(range(11, 18))
    assert part[0].start == 11
    recs = list(iter_records(corpus_path, fields=["n"], start=50))
    assert recs == [{"n": i, "id": f"doc-{i}"} for i in range(50, 53)]
    recs = list(iter_records(corpus_path, limit=2))
    assert recs[1]["text"] == ROWS[1]["text"] and recs[1]["id"] == "doc-1"
    assert list(iter_records(corpus_path, start=60)) == []


def test_row_numbers_as_ids_when_no_id_field(tmp_path):
    rows = [{"text": r["text"]} for r in ROWS[:5]]
    for p in (write_jsonl(tmp_path / "a.jsonl", rows), write_parquet(tmp_path / "a.parquet", rows)):
        c = Corpus(p)
        assert not c.has_ids
        assert [c.doc_id(i) for i in range(5)] == ["0", "1", "2", "3", "4"]
        assert next(c.iter_batches(10)).ids == ["0", "1", "2", "3", "4"]
        assert c.row_of("3") == 3
        assert list(iter_records(p, limit=1)) == [{"text": rows[0]["text"], "id": "0"}]
    # explicit None ignores an existing id field
    c = Corpus(write_jsonl(tmp_path / "b.jsonl", ROWS[:3]), id_field=None)
    assert c.doc_id(2) == "2"


def test_custom_fields_and_integer_ids(tmp_path):
    rows = [{"key": 100 + i, "body": f"b{i}"} for i in range(4)]
    for p in (write_jsonl(tmp_path / "a.jsonl", rows), write_parquet(tmp_path / "a.parquet", rows)):
        c = Corpus(p, text_field="body", id_field="key")
        assert c.text(2) == "b2" and c.doc_id(2) == "102"


def test_parquet_folder_of_shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write_parquet(d / "part-000.parquet", ROWS[:20], row_group_size=7)
    write_parquet(d / "part-001.parquet", ROWS[20:], row_group_size=7)
    c = Corpus(d)
    assert c.format == "parquet" and len(c) == 53
    assert c.texts([0, 19, 20, 52]) == [ROWS[i]["text"] for i in (0, 19, 20, 52)]
    assert [t for b in c.iter_batches(5, start=18, limit=4) for t in b.texts] == [ROWS[i]["text"] for i in range(18, 22)]


def test_datasets_dict_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:5]), "test": datasets.Dataset.from_list(ROWS[5:7])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="split"):
        Corpus(tmp_path / "dd")
    c = Corpus(tmp_path / "dd", split="test")
    assert len(c) == 2 and c.doc_id(1) == "doc-6"


def test_jsonl_offset_scan_matches_python(tmp_path):
    p = tmp_path / "t.jsonl"
    text = '{"text": "a"}\n\n  \t\n{"text": "b"}\r\n{"text": "ç ü"}\n\n{"text": "last"}'
    p.write_bytes(text.encode())
    starts, ends = scan_line_offsets(p)
    raw = p.read_bytes()
    lines = [raw[s:e] for s, e in zip(starts, ends)]
    assert [json.loads(x)["text"] for x in lines] == ["a", "b", "ç ü", "last"]


def test_jsonl_offset_scan_across_chunks(tmp_path, monkeypatch):
    import msif.data.jsonl as mod

    monkeypatch.setattr(mod, "_SCAN_CHUNK", 7)  # lines and blank runs straddle chunk borders
    p = write_jsonl(tmp_path / "t.jsonl", ROWS[:12], blank_every=3)
    c = Corpus(p, cache_dir=False)
    assert len(c) == 12
    assert [c.text(i) for i in range(12)] == [r["text"] for r in ROWS[:12]]


def test_jsonl_offset_scan_same_for_any_chunk_size(tmp_path, monkeypatch):
    import msif.data.jsonl as mod

    p = write_jsonl(tmp_path / "t.jsonl", ROWS[:12], blank_every=3)
    whole = scan_line_offsets(p)
    for chunk in (1, 7, 64):
        monkeypatch.setattr(mod, "_SCAN_CHUNK", chunk)
        starts, ends = scan_line_offsets(p)
        assert starts.tolist() == whole[0].tolist() and ends.tolist() == whole[1].tolist()


def test_jsonl_offset_cache_written_and_invalidated(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", ROWS[:4])
    cache = tmp_path / "mycache"
    assert len(Corpus(p, cache_dir=cache)) == 4
    assert len(list(cache.glob("*.npy"))) == 1
    assert Corpus(p, cache_dir=cache).text(3) == ROWS[3]["text"]
    # the file changes: the cache must not be used
    write_jsonl(p, ROWS[:6])
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = Corpus(p, cache_dir=cache)
    assert len(c) == 6 and c.text(5) == ROWS[5]["text"]


def test_fingerprint(tmp_path):
    a = Corpus(write_jsonl(tmp_path / "a.jsonl", ROWS))
    b = Corpus(write_parquet(tmp_path / "b.parquet", ROWS))
    fa, fb = a.fingerprint(), b.fingerprint()
    assert fingerprints_match(fa, fb) is None  # same content, other file
    changed = [dict(r) for r in ROWS]
    changed[0]["text"] = "changed"
    fc = Corpus(write_jsonl(tmp_path / "c.jsonl", changed)).fingerprint()
    assert "content" in fingerprints_match(fa, fc)
    fd = Corpus(write_jsonl(tmp_path / "d.jsonl", ROWS[:-1])).fingerprint()
    assert "n_rows" in fingerprints_match(fa, fd)


# ----------------------------------------------------------------------------- error paths


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Corpus(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="does not exist"):
        list(iter_records(tmp_path / "nope.parquet"))


def test_unknown_format(tmp_path):
    (tmp_path / "c.csv").write_text("id,text\n1,a\n")
    with pytest.raises(InputError, match=r"unknown format.*\.csv.*Supported"):
        Corpus(tmp_path / "c.csv")
    (tmp_path / "c.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(InputError, match="compressed"):
        Corpus(tmp_path / "c.jsonl.gz")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="neither"):
        Corpus(tmp_path / "folder")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="Parquet"):
        Corpus(tmp_path / "bad.parquet")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "datasets"])
def test_missing_text_or_id_field(tmp_path, fmt):
    writer = {"jsonl": write_jsonl, "parquet": write_parquet, "datasets": write_datasets}[fmt]
    p = writer(tmp_path / f"c.{fmt}", [{"id": "a", "body": "x"}])
    with pytest.raises(InputError, match=r"no field 'text'.*body.*text_field"):
        Corpus(p)
    with pytest.raises(InputError, match=r"no id field 'key'.*id_field"):
        Corpus(p, text_field="body", id_field="key")


def test_jsonl_field_missing_in_a_later_row(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "c", "body": "z"}])
    c = Corpus(p)
    with pytest.raises(InputError, match=r"c\.jsonl.*row 2 \(line 3\).*no field 'text'"):
        list(c.iter_batches(2))
    with pytest.raises(InputError, match=r"row 2 \(line 3\).*no field 'text'"):
        c.text(2)
    p = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"text": "y"}])
    with pytest.raises(InputError, match=r"row 1 \(line 2\).*no field 'id'"):
        Corpus(p).doc_id(1)


def test_null_text(tmp_path):
    p = write_parquet(tmp_path / "c.parquet", [{"id": "a", "text": "x"}, {"id": "b", "text": None}])
    with pytest.raises(InputError, match=r"row 1 has text=None"):
        list(Corpus(p).iter_batches(4))


def test_invalid_json_row(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"\n{"id": "c", "text": "z"}\n')
    c = Corpus(p)
    with pytest.raises(InputError, match=r"c\.jsonl.*row 1 \(line 3\) is not valid JSON.*fix or delete"):
        list(c.iter_batches(10))
    with pytest.raises(InputError, match=r"row 1 \(line 3\) is not valid JSON"):
        c[1]
    assert c[2]["id"] == "c"  # other rows stay readable
    p.write_text('[1, 2]\n')
    with pytest.raises(InputError, match="JSON array"):
        Corpus(p)
    p.write_text('[\n  {"text": "a"}\n]\n')
    with pytest.raises(InputError, match="JSON array"):
        Corpus(p)
    p.write_text('{"text": "a"}\n"just a string"\n')
    with pytest.raises(InputError, match=r"row 1 \(line 2\) is a JSON str"):
        list(Corpus(p).iter_batches(10))


def test_empty_corpus(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n")
    with pytest.raises(InputError, match="empty"):
        Corpus(tmp_path / "e.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(InputError, match="empty"):
        Corpus(tmp_path / "e.parquet")
    import datasets

    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "e_ds"))
    with pytest.raises(InputError, match="empty"):
        Corpus(tmp_path / "e_ds")


def test_duplicate_ids(corpus_path, tmp_path):
    rows = ROWS[:6] + [dict(ROWS[2], text="again")]
    fmt = detect_format(corpus_path)
    writer = {"jsonl": write_jsonl, "parquet": write_parquet, "datasets": write_datasets}[fmt]
    c = Corpus(writer(tmp_path / f"dup.{fmt}", rows))
    with pytest.raises(InputError, match=r"doc id 'doc-2' appears at rows 2 and 6.*unique"):
        list(c.iter_batches(3, check_ids=True))
    with pytest.raises(InputError, match="appears at rows 2 and 6"):
        c.validate()
    with pytest.raises(InputError, match="appears at rows 2 and 6"):
        c.row_of("doc-0")
    assert len(list(c.iter_batches(3))) == 3  # plain streaming does not check
