"""Every expected failure of the CLI is one line naming the problem and the fix, exit code 2, no traceback,
and nothing half-written. The messages are the catalogue in docs/errors.md, which this test checks
(``MSIF_WRITE_ERRORS_DOC=1 pytest tests/test_errors_catalogue.py`` rewrites it)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from test_cli_attribute import fitted  # noqa: F401  (fixture)
from test_cli_fit import checkpoint, run  # noqa: F401  (fixture)

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


def _cases(ck: Path, fx: Path, tmp: Path) -> list[tuple[str, list]]:
    """(what the user did, the command) for every probe."""
    attr = ["attribute", "--pretrained", ck / "lm", "--finetuned", ck / "other", "--pretrained-factors", fx / "pt",
            "--finetuned-factors", fx / "ft", "--corpus", ck / "lm.jsonl", "--no-progress"]
    q = ["--prompt", "berlin is in", "--answer", " germany"]
    fit = ["fit", ck / "lm", ck / "lm.jsonl", "--no-progress", "--out"]
    junk = tmp / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    (tmp / "file").write_text("x")
    (tmp / "noconfig").mkdir()
    # factors whose metadata lost its modules entry, and factors whose normaliser was edited
    shutil.copytree(fx / "pt", tmp / "nomodules")
    meta = json.loads((tmp / "nomodules" / "factors.json").read_text())
    (tmp / "nomodules" / "factors.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("modules", "meta_sha256")}))
    shutil.copytree(fx / "pt", tmp / "edited")
    (tmp / "edited" / "factors.json").write_text(json.dumps({**meta, "n_examples_lambda": meta["n_examples_lambda"] + 1}))
    _tokenizers(ck, tmp)
    nan = tmp / "nanlm"  # a checkpoint with NaN weights: RepSim's scores are NaN
    shutil.copytree(ck / "lm", nan)
    from safetensors.torch import load_file, save_file

    w = load_file(nan / "model.safetensors")
    w["gpt_neox.final_layer_norm.weight"][0] = float("nan")
    save_file(w, nan / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(ck / "lm.jsonl", tmp / "corpus.jsonl")  # indexed, then edited
    assert run("index", tmp / "corpus.jsonl", "--out", tmp / "idx0", "--no-progress")[0] == 0
    (tmp / "corpus.jsonl").write_text((tmp / "corpus.jsonl").read_text().replace("paris", "lyon"))
    (tmp / "res.json").write_text("[]\n")
    (tmp / "locked").mkdir()
    return [
        ("fit: the model folder does not exist", ["fit", tmp / "no-such-model", ck / "lm.jsonl", "--out", tmp / "f1"]),
        ("fit: a relative model path that does not exist", ["fit", "no/such/dir", ck / "lm.jsonl", "--out", tmp / "f1"]),
        ("fit: a tokenizer larger than the model's embedding", fit + [tmp / "f1", "--tokenizer", tmp / "bigtok"]),
        ("fit: another msif fit is writing the same --out", fit + [tmp / "locked", "--overwrite"], ("locked", tmp / "locked")),
        ("fit: the disk fills up while the factors are written", fit + [tmp / "f1"], ("fsize", 4096)),
        ("fit: the model folder has no config.json", ["fit", tmp / "noconfig", ck / "lm.jsonl", "--out", tmp / "f2"]),
        ("fit: --out is the model's own folder", fit + [ck / "lm"]),
        ("fit: --out is a folder of other files", fit + [junk]),
        ("fit: --out is a file", fit + [tmp / "file"]),
        ("fit: --out already holds factors", fit + [fx / "pt"]),
        ("fit: --batch-size 0", fit + [tmp / "f3", "--batch-size", 0]),
        ("attribute: --damping-pt -1", attr + q + ["--damping-pt", "-1"]),
        ("attribute: --damping-pt nan", attr + q + ["--damping-pt", "nan"]),
        ("attribute: --damping-ft inf", attr + q + ["--damping-ft", "inf"]),
        ("attribute: --damping-pt abc", attr + q + ["--damping-pt", "abc"]),
        ("attribute: --damping-ft 0.1y", attr + q + ["--damping-ft", "0.1y"]),
        ("attribute: --batch-size 0", attr + q + ["--batch-size", 0]),
        ("attribute: --top 0", attr + q + ["--top", 0]),
        ("attribute: --top -5", attr + q + ["--top", -5]),
        ("attribute: --candidates 0", attr + q + ["--candidates", 0]),
        ("attribute: --candidates -5", attr + q + ["--candidates", -5]),
        ("attribute: --max-length above the model's context", attr + q + ["--max-length", 400]),
        ("attribute: a prompt with a lone surrogate", attr + ["--prompt", "berlin \ud800 is in", "--answer", " germany"]),
        ("attribute: --refine-query -1", attr + q + ["--refine-query", -1]),
        ("attribute: factors.json without its modules entry", [*attr[:6], tmp / "nomodules", *attr[7:], *q]),
        ("attribute: factors.json edited after it was written", [*attr[:6], tmp / "edited", *attr[7:], *q]),
        ("attribute: the pre-trained factors given as the fine-tuned ones", [*attr[:8], fx / "pt", *attr[9:], *q]),
        ("attribute: ms-if without --finetuned-factors", [*attr[:7], *attr[9:], *q]),
        ("attribute: a tokenizer larger than the model's embedding", attr + q + ["--tokenizer", tmp / "bigtok"]),
        ("attribute: a tokenizer of another, smaller vocabulary", attr + q + ["--tokenizer", tmp / "othertok"]),
        ("attribute --json: scores are NaN (a model with NaN weights)",
         ["attribute", "--pretrained", nan, "--finetuned", nan, "--corpus", ck / "lm.jsonl", "--method", "repsim", "--json", *q]),
        ("attribute: the corpus was edited after it was indexed", [*attr, *q, "--index", tmp / "idx0", "--corpus", tmp / "corpus.jsonl"]),
        ("attribute: --out is a folder", attr + q + ["--out", tmp]),
        ("attribute: --out exists (no --overwrite)", attr + q + ["--out", tmp / "res.json"]),
        ("attribute: the disk fills up while --out is written", attr + q + ["--out", tmp / "res.json", "--overwrite"], ("fsize", 64)),
        ("index: --batch-size 0", ["index", ck / "lm.jsonl", "--out", tmp / "idx", "--batch-size", 0]),
    ]


def _tokenizers(ck: Path, tmp: Path) -> None:
    """TMP/bigtok: more tokens than the tiny models' embedding; TMP/othertok: another vocabulary, smaller."""
    from test_cli_fit import SENTENCES
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    for name, texts, size in (("bigtok", SENTENCES + [f"word{i}" for i in range(40)], 100), ("othertok", list(reversed(SENTENCES)) + ["zebra"], 12)):
        tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tk.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"], vocab_size=size))
        PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                unk_token="[UNK]").save_pretrained(tmp / name)


def _run_case(argv: list, how: tuple | None) -> tuple[int, str]:
    """Exit code and output of one probe: in process, while another process holds its --out's lock, or in a
    child process whose file-size limit makes every write past ``n`` bytes fail (a full disk)."""
    if how is None:
        return run(*argv)
    if how[0] == "locked":
        from msif.atomic import OutputLock

        with OutputLock(how[1], "msif fit"):
            return run(*argv)
    from test_faults import _cli, _finish

    return _finish(_cli(argv, fsize=how[1]))


def _catalogue(rows: list[tuple[str, str]]) -> str:
    out = ["# Expected failures and their messages", "",
           "Every failure msif expects ends the command with exit code 2 and one line on stderr naming the problem",
           "and the fix; nothing is written or left half-written. Generated by `tests/test_errors_catalogue.py`",
           "(which fails when a message here and the code disagree); paths shown as `CKPT/…` (a saved checkpoint",
           "folder), `FACTORS/…` (fitted factors), `TMP/…` and `CWD` (the working directory).", "", "| what the user did | message |", "|---|---|"]
    bar = "\\|"
    out += [f"| {what} | {msg.replace('|', bar)} |" for what, msg in rows]
    return "\n".join(out) + "\n"


def test_every_expected_failure_is_one_line(checkpoint, fitted, tmp_path):  # noqa: F811
    rows, tracebacks = [], 0
    for what, argv, *how in _cases(checkpoint, fitted, tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir() if p.name != ".locked.lock")
        code, out = _run_case(argv, how[0] if how else None)
        tracebacks += out.count("Traceback")
        lines = [ln for ln in out.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        assert code == 2 and len(errors) == 1, (what, out)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, (what, "wrote something")
        assert (tmp_path / "res.json").read_text() == "[]\n" and not any((tmp_path / "locked").iterdir())
        msg = " ".join(lines[lines.index(errors[0]):])  # a message rich wrapped over several lines
        for path, name in ((str(fitted), "FACTORS"), (str(checkpoint), "CKPT"), (str(tmp_path), "TMP"), (os.getcwd(), "CWD")):
            msg = msg.replace(path, name)
        msg = re.sub(r"fingerprint [0-9a-f]{6,}…?", "fingerprint …", msg)  # the models' hashes are not the point
        rows.append((what, msg.removeprefix("error: ")))
    assert tracebacks == 0
    text = _catalogue(rows)
    if os.environ.get("MSIF_WRITE_ERRORS_DOC"):
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/errors.md is out of date: rerun with MSIF_WRITE_ERRORS_DOC=1"
