"""The offline default model (`sae.lm.builtin`): a tiny build, its numbers, reload and reuse."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae.lm.builtin import (
    LMSpec,
    build_stdlib_lm,
    heldout_cross_entropy,
    lr_at,
    train_tokenizer,
    unigram_cross_entropy,
)
from sae.lm.text import documents, token_contexts

# One thread: on 2 shared cores a second torch thread made this build ~10x slower, not faster.
TINY = LMSpec(
    n_layer=1, n_embd=32, n_head=2, n_ctx=64, vocab_size=512, train_tokens=40_000, lr=1e-2,
    corpus_bytes=300_000, threads=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    out_dir = tmp_path_factory.mktemp("lm") / "stdlib-lm"
    logs: list[str] = []
    record = build_stdlib_lm(out_dir, TINY, log=logs.append)
    return out_dir, record, logs


def test_build_record_has_the_numbers(built):
    out_dir, record, logs = built
    assert json.loads((out_dir / "build.json").read_text()) == record
    assert record["spec"] == dataclasses.asdict(TINY)
    assert record["train_tokens"] == (40_000 // (8 * 64)) * 8 * 64
    assert record["eval_tokens"] > 10_000
    weights = (out_dir / "model.safetensors").read_bytes()
    assert record["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    # it learned something beyond token frequencies, and the baseline is below uniform
    assert record["heldout_ce"] < record["unigram_ce"] < math.log(512)
    assert record["heldout_ce"] > 2.0
    assert any("step 78/78" in line and "tokens/s" in line for line in logs)
    assert not [p for p in out_dir.parent.iterdir() if p != out_dir]  # no temp dir left
    assert (out_dir / "model.safetensors").stat().st_mode & 0o777 == 0o644  # not mkdtemp's 0600


def test_build_round_trips_through_from_pretrained(built):
    out_dir, record, _ = built
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert model.config.n_layer == 1 and model.config.n_positions == 64
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert len(tokenizer) == model.config.vocab_size == 512
    code = "def add(a, b=None):\n    return a + b  # sum\n"
    ids = tokenizer(code, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == code
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # tied, as in GPT-2

    # the reloaded model and tokenizer reproduce the held-out CE measured before saving
    held_out = torch.tensor(list(token_contexts(tokenizer, _eval_docs(), TINY.n_ctx)))
    ce, n = heldout_cross_entropy(model, held_out, tokenizer.eos_token_id)
    assert n == record["eval_tokens"]
    assert ce == pytest.approx(record["heldout_ce"], rel=1e-6)


def _eval_docs():
    return documents("stdlib", "eval", max_bytes=TINY.corpus_bytes)


def test_second_build_reuses_without_training(built):
    out_dir, record, _ = built
    mtime = (out_dir / "model.safetensors").stat().st_mtime_ns
    logs: list[str] = []
    assert build_stdlib_lm(out_dir, TINY, log=logs.append) == record
    assert (out_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert len(logs) == 1 and "reusing" in logs[0]


def test_build_refuses_a_foreign_non_empty_directory(tmp_path: Path):
    (tmp_path / "junk.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match=r"no build\.json"):
        build_stdlib_lm(tmp_path, TINY, log=lambda _: None)


def test_tokenizer_is_byte_level_bpe_with_endoftext():
    tokenizer = train_tokenizer(["def f(x):\n    return x\n"] * 50, vocab_size=300)
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert 257 <= len(tokenizer) <= 300
    text = "naïve → 🙂\tnever seen"  # unseen bytes still encode: byte-level
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_unigram_baseline_matches_the_formula():
    train = torch.tensor([[0, 1, 1, 2]])
    held_out = torch.tensor([[0, 1, 0, 3]])  # targets 1, 0 (ignored), 3
    # counts without id 0: c1=2, c2=1 -> p(v) = (c_v + 1) / (3 + 4)
    expected = -(math.log(3 / 7) + math.log(1 / 7)) / 2
    assert unigram_cross_entropy(train, held_out, 4, ignore_id=0) == pytest.approx(expected)


def test_lr_warms_up_then_decays_to_a_tenth():
    lrs = [lr_at(s, 1000, 1.0) for s in range(1000)]
    assert lrs[0] == pytest.approx(1 / 50) and lrs[49] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[49:]))
    assert lrs[-1] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_ctx": -1}, "n_ctx"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"corpus_bytes": -5}, "corpus_bytes"),
        ({"train_tokens": 100}, "train_tokens"),
    ],
)
def test_spec_validation_names_the_bad_field(change, field):
    with pytest.raises(ValueError, match=field):
        LMSpec(**change)


def test_build_is_deterministic(built, tmp_path: Path):
    _, record, _ = built
    again = build_stdlib_lm(tmp_path / "again", TINY, log=lambda _: None)
    assert again["weights_sha256"] == record["weights_sha256"]
    assert again["heldout_ce"] == record["heldout_ce"]
