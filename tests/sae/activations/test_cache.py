"""The activation cache: round trip against the model, layout, resume, corruption, loader."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sae.activations.cache import CacheError, Manifest, cache_key, read_shard, sequences, verify
from sae.activations.extract import build_cache
from sae.activations.loader import ActivationLoader
from sae.lm.hooks import HookPoint, activations_at, parse_hook

T, D = 16, 24


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=D, n_head=2, n_positions=T, vocab_size=50)
    return GPT2LMHeadModel(cfg).eval()


def _contexts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, T), generator=g)
    ids[:, 0] = 0  # BOS
    return ids.tolist()


def _plan(n: int, hooks: list[HookPoint], **kw) -> Manifest:
    return Manifest(
        key="k",
        key_inputs={"test": True},
        hooks={h.name: D for h in hooks},
        dtype="bf16",
        context_length=T,
        special_token_ids=[0],
        n_planned=n,
        shard_seqs=4,
        **kw,
    )


def _build(dir: Path, model, hooks, contexts, log=lambda s: None, **kw) -> Manifest:
    return build_cache(
        dir, model, hooks, iter(contexts), _plan(len(contexts), hooks), batch_size=3, log=log, **kw
    )


def test_round_trip_equals_hidden_states(tmp_path: Path, gpt2) -> None:
    hooks = [parse_hook(gpt2, "blocks.1.resid_post"), parse_hook(gpt2, "blocks.0.resid_pre")]
    ctx = _contexts(10)
    m = _build(tmp_path, gpt2, hooks, ctx)
    assert m.complete and m.n_sequences == 10 and m.n_tokens == 10 * T
    assert [s.n_seqs for s in m.shards] == [4, 4, 2]  # sequence-contiguous shards
    hidden = gpt2(torch.tensor(ctx), output_hidden_states=True).hidden_states
    got = torch.cat([a for _, _, a in sequences(tmp_path, "blocks.1.resid_post", 4)])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), hidden[2], rtol=1e-2, atol=1e-2)
    pre = torch.cat([a for _, _, a in sequences(tmp_path, "blocks.0.resid_pre", 4)])
    torch.testing.assert_close(pre.float(), hidden[0], rtol=1e-2, atol=1e-2)
    ids = torch.cat([i for i, _, _ in sequences(tmp_path, "blocks.1.resid_post", 4)])
    assert ids.tolist() == ctx


def test_shard_layout(tmp_path: Path, gpt2) -> None:
    _build(tmp_path, gpt2, [HookPoint(1, "resid_post")], _contexts(5))
    f = pq.ParquetFile(tmp_path / "shard-00000.parquet")
    schema = f.schema_arrow
    assert schema.field("seq_id").type == pa.int64() and schema.field("pos").type == pa.int32()
    assert schema.field("token_id").type == pa.int32()
    assert schema.field("blocks.1.resid_post").type == pa.binary(D * 2)
    assert schema.metadata[b"saeflow.dtype"] == b"bf16"
    col = f.metadata.row_group(0).column(4)
    assert col.compression == "UNCOMPRESSED" and not col.is_stats_set
    t = pq.read_table(tmp_path / "shard-00000.parquet")
    assert t["seq_id"].to_pylist()[: T + 1] == [0] * T + [1]
    assert t["pos"].to_pylist()[:T] == list(range(T))
    assert t["special"].to_pylist()[0] is True and t["special"].to_pylist()[1] is False


def test_resume_recomputes_only_missing_shards(tmp_path: Path, gpt2) -> None:
    hooks, ctx = [HookPoint(1, "resid_post")], _contexts(10)
    full = _build(tmp_path / "full", gpt2, hooks, ctx)
    part_dir = tmp_path / "part"
    _build(part_dir, gpt2, hooks, ctx)
    m = Manifest.load(part_dir)  # as if killed after shard 0 and 2 of 3 were recorded
    m.shards, m.complete = [m.shards[0], m.shards[2]], False
    m.save(part_dir)
    (part_dir / "shard-00001.parquet").unlink()
    kept = (part_dir / "shard-00000.parquet").stat().st_mtime_ns
    logs: list[str] = []
    resumed = _build(part_dir, gpt2, hooks, ctx, log=logs.append)
    assert "1 of 3 shards done" not in logs[0] and "2 of 3 shards done" in logs[0]
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in full.shards]
    assert (part_dir / "shard-00000.parquet").stat().st_mtime_ns == kept  # not recomputed
    assert resumed.complete


def test_corrupt_shard_is_named(tmp_path: Path, gpt2) -> None:
    m = _build(tmp_path, gpt2, [HookPoint(1, "resid_post")], _contexts(8))
    shard = tmp_path / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify(tmp_path, m) == ["shard-00001.parquet"]
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CacheError, match=r"shard-00001\.parquet"):
        read_shard(tmp_path, m.shards[1], ["blocks.1.resid_post"], m)


def test_missing_manifest_and_unknown_hook(tmp_path: Path, gpt2) -> None:
    with pytest.raises(CacheError, match=r"manifest\.json is missing"):
        Manifest.load(tmp_path)
    m = _build(tmp_path, gpt2, [HookPoint(1, "resid_post")], _contexts(4))
    with pytest.raises(CacheError, match=r"blocks.1.resid_post"):
        m.d_in("blocks.2.resid_post")
    with pytest.raises(ValueError, match=r"blocks\.\{0\.\.2\}"):
        parse_hook(gpt2, "blocks.3.resid_post")


def test_cache_key_is_content_hash() -> None:
    a = cache_key({"model": "m", "hooks": ["h"], "n": 1})
    assert a == cache_key({"n": 1, "hooks": ["h"], "model": "m"}) and len(a) == 16
    assert a != cache_key({"model": "m", "hooks": ["h"], "n": 2})


def test_loader_yields_each_row_once_and_skips_special(tmp_path: Path, gpt2) -> None:
    _build(tmp_path, gpt2, [HookPoint(1, "resid_post")], _contexts(12))
    hook = "blocks.1.resid_post"
    rows = torch.cat(list(ActivationLoader(tmp_path, hook, 7, buffer_rows=40, seed=1, epochs=1)))
    every = torch.cat([a.reshape(-1, D) for _, _, a in sequences(tmp_path, hook, 4)])
    special = torch.cat([s.reshape(-1) for _, s, _ in sequences(tmp_path, hook, 4)])
    kept = every[~special]
    assert rows.shape == kept.shape  # every non-special row exactly once
    key = lambda t: sorted(map(tuple, t.view(torch.int16).tolist()))  # noqa: E731
    assert key(rows) == key(kept)
    again = torch.cat(list(ActivationLoader(tmp_path, hook, 7, buffer_rows=40, seed=1, epochs=1)))
    assert torch.equal(rows.view(torch.int16), again.view(torch.int16))  # same seed, same order
    other = torch.cat(list(ActivationLoader(tmp_path, hook, 7, buffer_rows=40, seed=2, epochs=1)))
    assert not torch.equal(rows.view(torch.int16), other.view(torch.int16))


def test_activations_stop_after_deepest_hook(gpt2) -> None:
    calls: list[int] = []
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
        for i, b in enumerate(gpt2.transformer.h)
    ]
    try:
        out = activations_at(gpt2, [HookPoint(0, "resid_post")], torch.tensor(_contexts(2)))
    finally:
        for h in handles:
            h.remove()
    assert calls == [0] and out["blocks.0.resid_post"].shape == (2, T, D)
