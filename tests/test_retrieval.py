"""Candidate retrieval: embedding index (exact / IVF), persistence and its errors, BM25, TF-IDF."""

import hashlib
import json
import os

import numpy as np
import pytest

from msif.data.corpus import Corpus
from msif.data.encoding import InputError
from msif.retrieval import BM25Index, StoredIndexError, TfidfIndex, build_index, build_index_from_vectors, load_index
from msif.retrieval import index as index_mod
from msif.retrieval.index import exact_topk, recall_at_k
from msif.retrieval.synthetic import clustered_unit_vectors

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FACTS = [
    ("paris", "Paris is the capital and largest city of France."),
    ("berlin", "Berlin is the capital of Germany."),
    ("banana", "Bananas are a yellow fruit rich in potassium."),
    ("everest", "Mount Everest is the highest mountain on Earth."),
    ("python", "Python is a programming language created by Guido van Rossum."),
    ("moon", "The Moon orbits the Earth roughly every 27 days."),
    ("water", "Water boils at 100 degrees Celsius at sea level."),
    ("piano", "A piano has 88 keys."),
    ("amazon", "The Amazon rainforest spans several South American countries."),
    ("tokyo", "Tokyo is the capital of Japan."),
    ("insulin", "Insulin regulates blood sugar levels in the body."),
    ("chess", "Chess is a board game for two players."),
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_CACHE_DIR", str(tmp_path / "cache"))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture
def facts_path(tmp_path):
    return write_jsonl(tmp_path / "facts.jsonl", [{"id": i, "text": t} for i, t in FACTS])


class HashEncoder:
    """Deterministic stand-in for a sentence model: a seeded random unit vector per text."""

    name = "test/hash-encoder"
    dim = 24

    def __init__(self, fail_after=None):
        self.seen = 0
        self.fail_after = fail_after

    def vec(self, t):
        seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode(self, texts, batch_size=64, progress=False):
        if self.fail_after is not None and self.seen >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.seen += len(texts)
        return np.stack([self.vec(t) for t in texts])


# ----------------------------------------------------------------------------- real embedding model


@pytest.fixture(scope="module")
def minilm():
    from msif.retrieval.embed import load_encoder

    return load_encoder()


def test_encoder_normalised_float32(minilm):
    e = minilm.encode(["a sentence", "another one", ""], batch_size=2)
    assert e.dtype == np.float32 and e.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert minilm.name == "sentence-transformers/all-MiniLM-L6-v2"
    from msif.retrieval.embed import as_encoder

    wrapped = as_encoder(minilm.model)  # a bare SentenceTransformer is accepted too
    assert wrapped.dim == 384
    np.testing.assert_allclose(wrapped.encode(["a sentence"]), e[:1], atol=1e-5)


def test_embedding_index_finds_paraphrase(facts_path, tmp_path, minilm):
    vi = build_index(facts_path, tmp_path / "ix", model=minilm, batch_size=5, progress=False)
    assert vi.kind == "flat"  # small corpus: exact
    queries = ["Which city is France's capital?", "What is the tallest peak in the world?", "How many keys does a piano have?"]
    hits = load_index(tmp_path / "ix", corpus=facts_path, model=minilm).search(queries, k=3)
    assert [h[0] for h in hits.doc_ids] == ["paris", "everest", "piano"]
    assert hits.scores.shape == (3, 3) and np.all(np.diff(hits.scores, axis=1) <= 0)
    assert Corpus(facts_path).doc_ids(hits.rows[:, 0]) == ["paris", "everest", "piano"]


# ----------------------------------------------------------------------------- exact and approximate


def test_exact_index_equals_brute_force_cosine(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32) * rng.uniform(0.5, 3, (500, 1)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    vi = build_index_from_vectors(x, tmp_path / "ix", doc_ids=[f"d{i}" for i in range(500)], index_type="flat")
    hits = load_index(tmp_path / "ix").search_vectors(q, k=10)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cos = qn @ xn.T
    want = np.argsort(-cos, axis=1)[:, :10]
    np.testing.assert_array_equal(hits.rows, want)
    np.testing.assert_allclose(hits.scores, np.take_along_axis(cos, want, 1), rtol=1e-5, atol=1e-6)
    assert hits.doc_ids[0] == [f"d{r}" for r in want[0]]
    assert vi.search_vectors(q, k=10000).rows.shape == (7, 500)  # k clamped to n_docs


def test_exact_topk_streaming_matches_dense():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    s, r = exact_topk(x, q, 20, chunk=64)
    want = np.argsort(-(q @ x.T), axis=1)[:, :20]
    np.testing.assert_array_equal(r, want)


def test_build_index_streams_corpus_into_exact_embeddings(tmp_path):
    rows = [{"id": f"doc{i}", "text": f"text number {i}"} for i in range(103)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    enc = HashEncoder()
    vi = build_index(path, tmp_path / "ix", model=enc, batch_size=10, progress=False, keep_embeddings=True)
    emb = np.load(tmp_path / "ix" / "embeddings.npy")
    np.testing.assert_array_equal(emb, np.stack([enc.vec(r["text"]) for r in rows]))
    assert enc.seen == 103
    hits = vi.search_vectors(enc.vec("text number 42"), k=1)
    assert hits.doc_ids == [["doc42"]] and hits.rows[0, 0] == 42
    np.testing.assert_allclose(hits.scores[0, 0], 1.0, atol=1e-5)
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["model"] == {"name": enc.name, "dim": 24, "normalized": True, "max_seq_length": None}
    assert meta["n_docs"] == 103 and meta["index"]["type"] == "flat"
    assert meta["corpus"]["path"] == str(path.resolve()) and meta["corpus"]["n_rows"] == 103
    assert set(meta["files"]) == {"index.faiss", "doc_ids.parquet", "embeddings.npy"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left


@pytest.mark.parametrize("fmt", ["parquet", "datasets", "jsonl-no-ids"])
def test_build_index_from_other_formats(tmp_path, fmt):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"key": f"k{i}", "body": f"body {i}"} for i in range(30)]
    if fmt == "parquet":
        path, kw = tmp_path / "c.parquet", {"text_field": "body", "id_field": "key"}
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    elif fmt == "datasets":
        path, kw = tmp_path / "c_ds", {"text_field": "body", "id_field": "key"}
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        path, kw = write_jsonl(tmp_path / "c.jsonl", [{"text": r["body"]} for r in rows]), {}
    enc = HashEncoder()
    vi = build_index(path, tmp_path / "ix", model=enc, batch_size=4, progress=False, **kw)
    hits = load_index(tmp_path / "ix", corpus=Corpus(path, **{k: v for k, v in kw.items()})).search_vectors(enc.vec("body 17"), 2)
    assert hits.doc_ids[0][0] == ("17" if fmt == "jsonl-no-ids" else "k17")
    assert vi.meta["corpus"]["format"] == fmt.split("-")[0]


def test_ivf_recall_with_default_search_settings(tmp_path):
    allx = clustered_unit_vectors(20_000 + 200, 128, seed=3)
    x, q = allx[:20_000], allx[20_000:]
    build_index_from_vectors(x, tmp_path / "ix", index_type="ivf")
    vi = load_index(tmp_path / "ix")
    assert vi.kind == "ivf"
    nprobe = vi.search_params["nprobe"]
    assert 1 <= nprobe < vi.meta["index"]["params"]["nlist"]  # genuinely approximate
    _, exact = exact_topk(x, q, 100)
    assert recall_at_k(vi.search_vectors(q, 100).rows, exact) >= 0.95
    vi.set_search_params(nprobe=1)  # the check can fail: one probe is far from enough
    assert recall_at_k(vi.search_vectors(q, 100).rows, exact) < 0.9


def test_auto_index_type(tmp_path, monkeypatch):
    x = clustered_unit_vectors(2000, 16, branching=(5, 5), scales=(1.0, 0.7), seed=1)
    assert build_index_from_vectors(x, tmp_path / "a").kind == "flat"
    monkeypatch.setattr(index_mod, "AUTO_FLAT_MAX_DOCS", 1000)
    vi = build_index_from_vectors(x, tmp_path / "b")
    assert vi.kind == "ivf" and vi.meta["index"]["requested"] == "auto"
    with pytest.raises(InputError, match="index_type"):
        build_index_from_vectors(x, tmp_path / "c", index_type="annoy")


@pytest.mark.parametrize("n", [1, 2, 5, 60])
def test_approximate_index_on_tiny_corpora(tmp_path, n):
    x = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
    for kind in ("ivf", "hnsw"):
        vi = build_index_from_vectors(x, tmp_path / kind, index_type=kind)
        hits = vi.search_vectors(x, k=n)
        assert sorted(hits.rows[0].tolist()) == list(range(n))  # everything is found
        assert hits.rows[:, 0].tolist() == list(range(n))  # each vector's best match is itself


def test_hnsw_index(tmp_path):
    x = clustered_unit_vectors(3000 + 50, 32, branching=(10, 5), scales=(1.0, 0.7), seed=2)
    vi = build_index_from_vectors(x[:3000], tmp_path / "ix", index_type="hnsw", calibration_k=20)
    vi = load_index(tmp_path / "ix")
    _, exact = exact_topk(x[:3000], x[3000:], 20)
    assert recall_at_k(vi.search_vectors(x[3000:], 20).rows, exact) >= 0.95


# ----------------------------------------------------------------------------- persistence and errors


@pytest.fixture
def built(tmp_path):
    rows = [{"id": f"doc{i}", "text": f"text number {i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    enc = HashEncoder()
    vi = build_index(path, tmp_path / "ix", model=enc, progress=False)
    return path, tmp_path / "ix", enc, vi


def test_round_trip_same_results(built):
    path, ix, enc, vi = built
    q = np.stack([enc.vec("text number 7"), enc.vec("unrelated")])
    again = load_index(ix, corpus=path, model=enc)
    a, b = vi.search_vectors(q, 5), again.search_vectors(q, 5)
    assert a.doc_ids == b.doc_ids
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert again.search("text number 7", k=1).doc_ids == [["doc7"]]  # text queries use the encoder


def test_truncated_or_altered_index_file(built):
    path, ix, enc, vi = built
    f = ix / "index.faiss"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoredIndexError, match="truncated"):
        load_index(ix)
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(StoredIndexError, match="checksum"):
        load_index(ix)
    f.write_bytes(b"\x00" * len(data))
    with pytest.raises(StoredIndexError, match="FAISS cannot read"):
        load_index(ix, verify=False)


def test_missing_or_bad_meta(built, tmp_path):
    path, ix, enc, vi = built
    with pytest.raises(StoredIndexError, match="does not exist"):
        load_index(tmp_path / "nope")
    (ix / "meta.json").write_text("{not json")
    with pytest.raises(StoredIndexError, match="meta.json is not valid JSON"):
        load_index(ix)
    (ix / "meta.json").unlink()
    with pytest.raises(StoredIndexError, match="no meta.json"):
        load_index(ix)


def test_index_for_another_corpus(built, tmp_path):
    path, ix, enc, vi = built
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": f"doc{i}", "text": f"text number {i}!"} for i in range(50)])
    with pytest.raises(StoredIndexError, match="built for corpus.*content changed"):
        load_index(ix, corpus=other)
    shorter = write_jsonl(tmp_path / "short.jsonl", [{"id": f"doc{i}", "text": f"text number {i}"} for i in range(49)])
    with pytest.raises(StoredIndexError, match="n_rows differs"):
        load_index(ix, corpus=shorter)
    copy = write_jsonl(tmp_path / "copy.jsonl", [{"id": f"doc{i}", "text": f"text number {i}"} for i in range(50)])
    load_index(ix, corpus=copy)  # same content elsewhere is fine
    write_jsonl(path, [{"id": f"doc{i}", "text": f"changed {i}"} for i in range(60)])
    with pytest.warns(UserWarning, match="changed on disk"):
        load_index(ix)  # without a corpus argument: a cheap size/mtime warning


def test_wrong_query_model_dimension(built):
    path, ix, enc, vi = built

    class Other(HashEncoder):
        dim = 8

    with pytest.raises(StoredIndexError, match="24-dimensional"):
        load_index(ix, model=Other())


def test_overwrite_rules(built, tmp_path):
    path, ix, enc, vi = built
    with pytest.raises(InputError, match="already exists.*overwrite"):
        build_index(path, ix, model=enc, progress=False)
    build_index(path, ix, model=enc, progress=False, overwrite=True, index_type="flat")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(InputError, match="not an msif index"):
        build_index(path, tmp_path / "junk", model=enc, progress=False, overwrite=True)


def test_interrupted_build_resumes(tmp_path):
    rows = [{"id": f"doc{i}", "text": f"text number {i}"} for i in range(40_000)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(KeyboardInterrupt):
        build_index(path, tmp_path / "ix", model=HashEncoder(fail_after=20_000), batch_size=1000, progress=False)
    assert not (tmp_path / "ix").exists() and (tmp_path / ".ix.partial").is_dir()
    with pytest.raises(StoredIndexError, match="partial build"):
        load_index(tmp_path / "ix")
    done = json.loads((tmp_path / ".ix.partial" / "progress.json").read_text())["rows_done"]
    # progress is written every CHECKPOINT_ROWS rows (rounded up to whole batches): at most one such block is lost
    from msif.retrieval.index import CHECKPOINT_ROWS

    assert 20_000 - 1000 * -(-CHECKPOINT_ROWS // 1000) <= done <= 20_000
    enc = HashEncoder()
    vi = build_index(path, tmp_path / "ix", model=enc, batch_size=1000, progress=False, keep_embeddings=True)
    assert enc.seen == 40_000 - done  # only the rest is embedded
    emb = np.load(tmp_path / "ix" / "embeddings.npy", mmap_mode="r")
    for i in (0, done - 1, done, 39_999):
        np.testing.assert_array_equal(emb[i], enc.vec(f"text number {i}"))
    assert len(vi) == 40_000 and not (tmp_path / ".ix.partial").exists()


def test_duplicate_ids_rejected_before_embedding(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}])
    enc = HashEncoder()
    with pytest.raises(InputError, match="'a' appears at rows 0 and 2"):
        build_index(path, tmp_path / "ix", model=enc, progress=False)
    assert enc.seen == 0


# ----------------------------------------------------------------------------- lexical

LEX_DOCS = [
    ("paris", "Paris is the capital of France."),
    ("anagram", "Fancer pastial ca ofit sirap nice"),  # the query's letters, none of its words
    ("berlin", "Berlin is the capital of Germany."),
    ("fruit", "Bananas and apples are fruit."),
    ("france-food", "France is known for cheese and wine."),
]


def test_bm25_tokenises_words_not_characters():
    idx = BM25Index.build([t for _, t in LEX_DOCS], doc_ids=[i for i, _ in LEX_DOCS])
    assert idx.tokenize("What is the Capital of FRANCE?") == [["what", "capital", "france"]]
    hits = idx.search(["capital of France", "bananas"], k=5)
    assert hits.doc_ids[0][0] == "paris"
    assert set(hits.doc_ids[0][:3]) == {"paris", "berlin", "france-food"}
    assert "anagram" not in hits.doc_ids[0] and hits.doc_ids[0][3:] == [None, None]
    assert hits.doc_ids[1][0] == "fruit"
    none = idx.search("zzz the of", k=2)  # no known word: no results, not arbitrary ones
    assert none.doc_ids == [[None, None]] and np.all(none.rows == -1)


def test_bm25_from_corpus_and_persistence(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": t} for i, t in LEX_DOCS])
    idx = BM25Index.build(Corpus(path))
    idx.save(tmp_path / "bm25")
    again = BM25Index.load(tmp_path / "bm25")
    a, b = idx.search("German capital Berlin", 3), again.search("German capital Berlin", 3)
    assert a.doc_ids == b.doc_ids and a.doc_ids[0][0] == "berlin"
    np.testing.assert_array_equal(a.scores, b.scores)
    with pytest.raises(InputError, match="already exists"):
        idx.save(tmp_path / "bm25")
    params = next((tmp_path / "bm25").rglob("params.index.json"))
    params.write_text(params.read_text() + " ")
    with pytest.raises(StoredIndexError, match="corrupt"):
        BM25Index.load(tmp_path / "bm25")


def test_tfidf_cosine(tmp_path):
    from sklearn.metrics.pairwise import cosine_similarity

    texts = [t for _, t in LEX_DOCS]
    idx = TfidfIndex.build(texts, doc_ids=[i for i, _ in LEX_DOCS])
    hits = idx.search(["capital of France", "cheese from France"], k=5)
    assert hits.doc_ids[0][0] == "paris" and hits.doc_ids[1][0] == "france-food"
    assert "anagram" not in hits.doc_ids[0]
    want = cosine_similarity(idx.vectorizer.transform(["capital of France"]), idx.matrix)[0]
    got = hits.scores[0][hits.rows[0] >= 0]
    np.testing.assert_allclose(got, np.sort(want[want > 0])[::-1], rtol=1e-5)
    idx.save(tmp_path / "tfidf")
    again = TfidfIndex.load(tmp_path / "tfidf").search(["capital of France", "cheese from France"], k=5)
    assert again.doc_ids == hits.doc_ids
    np.testing.assert_allclose(again.scores, hits.scores, rtol=1e-6)
    (tmp_path / "tfidf" / "idf.npy").write_bytes(b"garbage")
    with pytest.raises(StoredIndexError, match="corrupt"):
        TfidfIndex.load(tmp_path / "tfidf")


def test_one_build_per_index_folder(built, tmp_path):
    from msif.atomic import OutputLock

    path, ix, enc, vi = built
    out = tmp_path / "ix2"
    with OutputLock(out, "msif index"):
        with pytest.raises(InputError, match="another msif index process is writing"):
            build_index(path, out, model=enc, progress=False)
    assert not out.exists()
    build_index(path, out, model=enc, progress=False, index_type="flat")
    assert (out / "meta.json").is_file() and not (tmp_path / ".ix2.lock").exists()


def test_index_sees_an_edit_outside_the_sampled_rows(tmp_path):
    """The sampled fingerprint misses most rows; the stored content hash does not (re-hashed only when the
    file's size or time changed)."""
    from msif.data.corpus import Corpus, fingerprints_match

    n = 500
    rows = [{"id": f"doc{i}", "text": f"text number {i}"} for i in range(n)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    enc = HashEncoder()
    build_index(path, tmp_path / "ix", model=enc, progress=False)
    load_index(tmp_path / "ix", corpus=path, model=enc)  # unchanged: accepted
    stored = json.loads((tmp_path / "ix" / "meta.json").read_text())["corpus"]
    sample = set(range(8)) | set(range(n - 8, n)) | set(np.linspace(0, n - 1, 64).astype(int).tolist())
    r = next(i for i in range(n) if i not in sample)
    rows[r]["text"] = rows[r]["text"][:-1] + "X"  # one character, same size, a row no sample looks at
    write_jsonl(path, rows)
    assert fingerprints_match(stored, Corpus(path).fingerprint()) is None  # what the sampled check alone saw
    with pytest.raises(StoredIndexError, match="edited"):
        load_index(tmp_path / "ix", corpus=path, model=enc)


INDEX_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_retrieval import HashEncoder
from msif.retrieval import build_index

class Slow(HashEncoder):
    def encode(self, texts, batch_size=64, progress=False):
        time.sleep(0.05)
        return super().encode(texts, batch_size, progress)

build_index({path!r}, {out!r}, model=Slow(), batch_size=250, progress=False)
print("finished", flush=True)
"""


@pytest.mark.parametrize("trial", range(2))
def test_sigkill_of_an_index_build_leaves_no_index_and_resumes_to_the_same_one(tmp_path, trial):
    import random
    import subprocess
    import sys
    from pathlib import Path

    from helpers import sigkill_when

    n = 6000
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": f"doc{i}", "text": f"text number {i}"} for i in range(n)])
    out = tmp_path / "ix"
    progress = tmp_path / ".ix.partial" / "progress.json"
    target = random.Random(trial).randrange(1, 4) * 1000  # rows checkpointed before the kill
    child = subprocess.Popen([sys.executable, "-c", INDEX_CHILD.format(tests=str(Path(__file__).parent), path=str(path), out=str(out))],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def reached():
        try:
            return json.loads(progress.read_text())["rows_done"] >= target
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    sigkill_when(child, reached, "index build")
    assert not out.exists()  # nothing that looks like a finished index
    with pytest.raises(StoredIndexError):
        load_index(out)
    done = json.loads(progress.read_text())["rows_done"]
    assert target <= done < n
    enc = HashEncoder()
    build_index(path, out, model=enc, batch_size=250, progress=False, keep_embeddings=True)
    assert enc.seen == n - done  # resumed where the checkpoint was
    whole = HashEncoder()
    build_index(path, tmp_path / "whole", model=whole, batch_size=250, progress=False, keep_embeddings=True)
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(tmp_path / "whole" / "embeddings.npy"))
    assert json.loads((out / "meta.json").read_text())["corpus"] == json.loads((tmp_path / "whole" / "meta.json").read_text())["corpus"]
