"""Text sources, the held-out split, packing and tokenisation (`sae.lm.text`)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae.lm.text import _assign, documents, pack, split_of, stdlib_files, token_contexts

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_stdlib_files_are_the_stdlib_sources_without_tests():
    files = stdlib_files()
    total = sum(p.stat().st_size for p in files)
    # CPython 3.11 here: 734 files, 12.1 MB; leave room for other patch releases
    assert 600 <= len(files) <= 900
    assert 9e6 <= total <= 15e6
    assert files == sorted(files)
    rel = [p.relative_to(STDLIB).parts for p in files]
    assert all(parts[-1].endswith(".py") for parts in rel)
    for skipped in ("site-packages", "test", "tests", "idle_test"):
        assert not any(skipped in parts[:-1] for parts in rel), skipped
    assert ("json", "decoder.py") in rel and ("argparse.py",) in rel


def test_split_is_stable_and_holds_out_about_three_percent_of_bytes():
    # pinned: the split must not change between runs, Python versions or machines
    assert [i for i in range(20) if split_of(f"doc{i}", 0.5) == "eval"] == [
        1,
        2,
        4,
        5,
        9,
        10,
        13,
        18,
        19,
    ]
    assert split_of("x", 0.0) == "train"
    keys = [f"file{i}.py" for i in range(20_000)]
    assert 0.025 < sum(split_of(k) == "eval" for k in keys) / len(keys) < 0.035

    train = list(documents("stdlib", "train"))
    held_out = list(documents("stdlib", "eval"))
    n_train, n_eval = (sum(len(d.encode()) for d in docs) for docs in (train, held_out))
    assert len(train) + len(held_out) == len(stdlib_files())
    assert 0.01 < n_eval / (n_train + n_eval) < 0.06  # 2.4% on 3.11: whole files, so lumpy
    assert not set(train) & set(held_out)


def test_split_of_rejects_bad_holdout():
    with pytest.raises(ValueError, match=r"1\.5"):
        split_of("k", 1.5)


def test_max_bytes_caps_the_text():
    docs = list(documents("stdlib", "train", max_bytes=10_000))
    assert sum(len(d.encode()) for d in docs) == 10_000
    assert docs[0] == stdlib_files()[0].read_text(encoding="utf-8")[: len(docs[0])]


@pytest.fixture
def text_files(tmp_path: Path) -> dict[str, Path]:
    txt = tmp_path / "a.txt"
    txt.write_text("hello world\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    lines = [json.dumps({"text": f"line {i} é", "id": i}) for i in range(3)]
    jsonl.write_text("\n".join([lines[0], "", lines[1], lines[2]]) + "\n", encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(4)], "n": [0, 1, 2, 3]}), parquet)
    return {"txt": txt, "jsonl": jsonl, "parquet": parquet}


def _all(paths: list[Path]) -> list[str]:
    names = [str(p) for p in paths]
    # holdout=0 puts every document in train, so reading order and content are checked exactly
    return list(documents("files", "train", paths=names, holdout=0.0))


def test_files_source_reads_txt_jsonl_and_parquet(text_files):
    assert _all([text_files["txt"]]) == ["hello world\n"]
    assert _all([text_files["jsonl"]]) == ["line 0 é", "line 1 é", "line 2 é"]
    assert _all([text_files["parquet"]]) == [f"row {i}" for i in range(4)]
    # a directory expands to its supported files, sorted by name
    everything = _all([text_files["txt"].parent])
    assert everything == ["hello world\n", "line 0 é", "line 1 é", "line 2 é"] + [
        f"row {i}" for i in range(4)
    ]


def test_files_source_splits_by_document_id(text_files):
    path = str(text_files["parquet"])
    held_out = list(documents("files", "eval", paths=[path], holdout=0.5))
    train = list(documents("files", "train", paths=[path], holdout=0.5))
    expected = [f"row {i}" for i in range(4) if split_of(f"{path}:{i}", 0.5) == "eval"]
    assert held_out == expected
    assert sorted(held_out + train) == [f"row {i}" for i in range(4)]


def test_bad_sources_and_paths_name_the_problem(tmp_path: Path):
    with pytest.raises(ValueError, match=r"'wiki'.*stdlib.*files"):
        documents("wiki", "train")
    with pytest.raises(ValueError, match="needs hf_name"):
        documents("hf", "train")
    with pytest.raises(ValueError, match="'dev'"):
        documents("stdlib", "dev")
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        documents("files", "train", paths=[missing])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv"):
        documents("files", "train", paths=[str(tmp_path / "x.csv")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*'text'"):
        list(documents("files", "train", paths=[str(bad)], holdout=0.0))


def test_pack_without_bos_cuts_the_stream_and_drops_the_tail():
    docs = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9]]
    # stream: 1 2 3 E 4 5 E 6 7 8 9 (E=0; the empty document adds no separator)
    assert list(pack(docs, 4, bos_id=None, eos_id=0)) == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert list(pack(docs, 3, bos_id=None, eos_id=None)) == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_pack_with_bos_starts_every_context_with_it():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert list(pack(docs, 4, bos_id=99, eos_id=0)) == [
        [99, 1, 2, 3],
        [99, 0, 4, 5],
        [99, 0, 6, 7],
    ]
    assert list(pack([[1, 2]], 4, bos_id=99, eos_id=0)) == []
    with pytest.raises(ValueError, match="context_length"):
        list(pack(docs, 1, bos_id=99, eos_id=0))


class _WordTokenizer:
    """Stand-in with the tokenizer interface `token_contexts` uses: one id per word."""

    bos_token_id = None
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens, return_attention_mask, verbose):
        assert add_special_tokens is False
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def test_token_contexts_packs_with_eos_as_bos_fallback():
    docs = ["a bb ccc", "dddd", "e ff"] * 100
    contexts = list(token_contexts(_WordTokenizer(), docs, 5))
    assert contexts[:2] == [[0, 1, 2, 3, 0], [0, 4, 0, 1, 2]]
    assert len(contexts) == (600 + 299) // 4  # 600 word tokens, 299 separators, 4 per context
    assert len(list(token_contexts(_WordTokenizer(), docs, 5, max_contexts=7))) == 7
    no_bos = list(token_contexts(_WordTokenizer(), docs, 5, prepend_bos=False))
    assert no_bos[0] == [1, 2, 3, 0, 4]


def test_hf_datasets_source_streams_a_local_builder(tmp_path: Path):
    """The real `datasets` code path, offline: the `json` builder over local files."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(20)))
    kw = {"paths": [str(path)], "hf_name": "json", "text_column": "body", "holdout": 0.3}
    held_out, train = list(documents("hf", "eval", **kw)), list(documents("hf", "train", **kw))
    assert sorted(held_out + train) == sorted(f"doc {i}" for i in range(20))
    assert held_out == [f"doc {i}" for i in range(20) if split_of(f"json:{i}", 0.3) == "eval"]
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body'\]"):
        list(documents("hf", "train", **(kw | {"text_column": "text"})))


# --- corpora as users bring them -------------------------------------------------------------
def test_the_short_last_chunk_is_never_the_held_out_one() -> None:
    """Cuts at line ends leave one short piece past the n chunks (here 32 of 2.5M characters):
    for any key, the held-out chunks are full-size ones, so the held-out share stays near
    `holdout` (a path's hash once picked the 32 characters: share 1e-5)."""
    lines = "".join(f"def f{i}(x):\n    return {i}\n" for i in range(80_000))
    for i in range(200):
        out = list(_assign([(f"/tmp/k{i}/lines.txt", lines)], 0.05, 100_000))
        held = sum(len(t) for split, t in out if split == "eval")
        assert len(out) == 27 and len(out[-1][1]) < 200  # 26 chunks and the short piece
        assert 0.03 < held / len(lines) < 0.08, i


def test_one_huge_document_is_chunked_so_both_splits_get_text(tmp_path: Path):
    """A corpus of one 3 MB line (and one 2 MB multi-line file): cut into chunks, ~holdout of
    them held out, at least one; nothing lost or duplicated."""
    line = "".join(f"token{i} " for i in range(400_000))  # ~3.1 MB, no line end
    lines = "".join(f"def f{i}(x):\n    return {i}\n" for i in range(80_000))
    for name, text in [("line.txt", line), ("lines.txt", lines)]:
        (tmp_path / name).write_text(text)
        path = [str(tmp_path / name)]
        train = documents("files", "train", paths=path)
        held = documents("files", "eval", paths=path)
        train_text, held_text = "".join(train), "".join(held)
        assert held_text and train_text, name
        assert len(train_text) + len(held_text) == len(text)
        assert 0.01 < len(held_text) / len(text) < 0.08, name
        assert held.read == train.read >= 34 and held.kept >= 1
    with_lines = list(documents("files", "eval", paths=[str(tmp_path / "lines.txt")]))
    assert all(chunk.endswith("\n") for chunk in with_lines)  # cut at line ends
    whole = documents("files", "train", paths=[str(tmp_path / "line.txt")], chunk_chars=0)
    assert whole.read == 0 or len(list(whole)) <= 1  # chunk_chars=0 keeps it one document


def test_bad_bytes_binary_files_and_links_are_named(tmp_path: Path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("déjà vu\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"latin\.txt' is not valid utf-8 at byte 1 .*data\.errors=replace"
    ):
        list(documents("files", "train", paths=[str(bad)], holdout=0.0))
    assert list(documents("files", "train", paths=[str(bad)], holdout=0.0, encoding="latin-1")) == [
        "déjà vu\n"
    ]
    replaced = list(documents("files", "train", paths=[str(bad)], holdout=0.0, errors="replace"))
    assert replaced == ["d\ufffdj\ufffd vu\n"]
    binary = tmp_path / "model.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(
        ValueError, match=r"model\.txt' is a binary file, not text \(a NUL byte at byte 4\)"
    ):
        list(documents("files", "train", paths=[str(binary)], holdout=0.0))
    good = tmp_path / "good.txt"
    good.write_text("fine\n")
    docs = documents("files", "train", paths=[str(tmp_path)], holdout=0.0, errors="skip")
    assert list(docs) == ["fine\n"]
    assert [s.split(": ", 1)[1] for s in docs.skipped] == [
        "not utf-8 at byte 1",
        "binary (a NUL byte at 4)",
    ]
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    with pytest.raises(FileNotFoundError, match=r"loop\.txt' is a symlink loop"):
        documents("files", "train", paths=[str(loop)])
    dangling = tmp_path / "gone.txt"
    dangling.symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(
        FileNotFoundError, match=r"gone\.txt' links to .*nowhere\.txt', which is missing"
    ):
        documents("files", "train", paths=[str(dangling)])
