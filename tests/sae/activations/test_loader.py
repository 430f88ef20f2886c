"""The training loader: exactly once per epoch, seeded order, exact resume, exclusion, memory."""

from __future__ import annotations

import gc
import json
import threading
import tracemalloc
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae.activations.cache import CacheError, Manifest, write_shard
from sae.activations.loader import ActivationLoader, Position

T, D, HOOK = 16, 8, "blocks.0.resid_post"


def make_cache(
    dir: Path, n_shards: int, seqs: int = 4, d: int = D, complete: bool = True, seed: int = 0
) -> tuple[Manifest, torch.Tensor, torch.Tensor]:
    """A cache of random bf16 rows; returns (manifest, all rows (N, d), kept mask (N,)).

    Position 0 of every sequence is special (BOS), and about 1 row in 20 is an outlier.
    """
    g = torch.Generator().manual_seed(seed)
    m = Manifest("k", {"test": True}, {HOOK: d}, "bf16", T, [0], shard_seqs=seqs)
    rows, keep = [], []
    for i in range(n_shards):
        acts = torch.randn(seqs, T, d, generator=g).to(torch.bfloat16)
        ids = torch.randint(1, 50, (seqs, T), generator=g)
        ids[:, 0] = 0
        special = ids == 0
        outlier = (torch.rand(seqs, T, generator=g) < 0.05) & ~special
        m.shards.append(write_shard(dir, i, i * seqs, ids, special, {HOOK: acts}, "bf16", outlier))
        rows.append(acts.reshape(-1, d))
        keep.append(~(special | outlier).reshape(-1))
    m.n_planned, m.complete = n_shards * seqs, complete
    m.save(dir)
    return m, torch.cat(rows), torch.cat(keep)


def key(rows: torch.Tensor) -> Counter:
    """The multiset of rows, by their bit patterns."""
    return Counter(map(tuple, rows.view(torch.int16).tolist()))


def bits(batch_list: list[torch.Tensor]) -> list[list[list[int]]]:
    return [b.view(torch.int16).tolist() for b in batch_list]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    dir = tmp_path_factory.mktemp("cache")
    _, rows, keep = make_cache(dir, n_shards=7)  # 7 shards × 64 rows
    return dir, rows, keep


def test_each_kept_row_once_per_epoch(cache) -> None:
    dir, rows, keep = cache
    out = list(ActivationLoader(dir, HOOK, 7, buffer_rows=150, seed=1, epochs=3))
    assert all(b.shape == (7, D) and b.dtype == torch.bfloat16 for b in out[:-1])
    got, n = torch.cat(out), int(keep.sum())
    assert len(got) == 3 * n
    epochs = [got[i * n : (i + 1) * n] for i in range(3)]
    assert all(key(e) == key(rows[keep]) for e in epochs)  # batches straddle, epochs don't
    assert not torch.equal(epochs[0].view(torch.int16), epochs[1].view(torch.int16))
    every = torch.cat(list(ActivationLoader(dir, HOOK, 7, exclude_special=False, epochs=1)))
    assert key(every) == key(rows)


def test_order_is_fixed_by_the_seed(cache) -> None:
    dir = cache[0]

    def run(seed: int, **kw) -> list:
        return bits(
            list(ActivationLoader(dir, HOOK, 5, buffer_rows=150, seed=seed, epochs=2, **kw))
        )

    assert run(3) == run(3) == run(3, prefetch=0)  # threads change nothing
    assert run(3) != run(4)


def test_restore_continues_the_identical_sequence(cache) -> None:
    dir = cache[0]
    kw = dict(buffer_rows=150, seed=2, epochs=3)
    loader = ActivationLoader(dir, HOOK, 9, **kw)
    ref, states = [], []
    for b in loader:
        ref.append(b.clone())
        states.append(json.loads(json.dumps(loader.state())))  # JSON round trip
    pos = [Position(s["epoch"], s["window"], s["row"]) for s in states]
    mid_window = next(i for i, p in enumerate(pos) if p.row > 0 and p.window > 0)
    window_start = next(i for i, p in enumerate(pos) if p.row == 0 and p.window > 0)
    across_epoch = next(i for i, p in enumerate(pos) if p.epoch == 1) - 1  # before the straddle
    assert pos[across_epoch + 1].row > 0  # the next batch straddles the epoch boundary
    for i in (0, mid_window, window_start, across_epoch, across_epoch + 1, len(ref) - 2):
        for prefetch in (0, 4):
            again = ActivationLoader(dir, HOOK, 9, prefetch=prefetch, state=states[i], **kw)
            assert bits(list(again)) == bits(ref[i + 1 :]), (i, pos[i])
            assert again.state() == states[-1]
    # Another batch_size on resume: the same rows follow (each batch is sorted differently).
    rest = torch.cat(list(ActivationLoader(dir, HOOK, 4, state=states[mid_window], **kw)))
    assert key(rest) == key(torch.cat(ref[mid_window + 1 :]))


def test_state_from_another_stream_is_refused(cache) -> None:
    dir = cache[0]
    loader = ActivationLoader(dir, HOOK, 8, seed=1)
    next(loader)
    state = loader.state()
    loader.close()
    with pytest.raises(ValueError, match="seed=1"):
        ActivationLoader(dir, HOOK, 8, seed=2, state=state)


def test_special_and_outlier_rows_are_left_out(cache, tmp_path: Path) -> None:
    dir, rows, keep = cache
    got = torch.cat(list(ActivationLoader(dir, HOOK, 16, epochs=1)))
    assert key(got) == key(rows[keep])
    # A cache written elsewhere without the flag columns: special rows known by token id.
    m = Manifest.load(dir)
    for s in m.shards:
        table = pq.read_table(dir / s.file).drop_columns(["special", "outlier"])
        pq.write_table(table, tmp_path / s.file)
    m.save(tmp_path)
    got = torch.cat(list(ActivationLoader(tmp_path, HOOK, 16, epochs=1)))
    bos = torch.arange(len(rows)) % T == 0
    assert key(got) == key(rows[~bos])


def test_all_rows_excluded_is_an_error_not_a_hang(tmp_path: Path) -> None:
    m, _, _ = make_cache(tmp_path, n_shards=2, seqs=1)
    for s in m.shards:
        table = pq.read_table(tmp_path / s.file)
        table = table.set_column(3, "special", pa.array([True] * table.num_rows))
        pq.write_table(table, tmp_path / s.file)
    with pytest.raises(CacheError, match="every row"):
        next(ActivationLoader(tmp_path, HOOK, 4))


def test_memory_is_bounded_by_the_buffer(tmp_path: Path) -> None:
    """Cache 20x the buffer: arrow memory (the windows) and numpy memory (batches, indices)
    stay within a few windows. torch tensors here are views of those, so this is all of it."""
    d, seqs = 256, 128  # shards of 2048 rows × 512 bytes = 1 MiB
    make_cache(tmp_path, n_shards=20, seqs=seqs, d=d)
    window = seqs * T * d * 2
    base = pa.total_allocated_bytes()
    tracemalloc.start()
    arrow_peak = 0
    for b in ActivationLoader(tmp_path, HOOK, 256, buffer_rows=seqs * T, epochs=2):
        assert b.shape[1] == d
        arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - base)
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert window <= arrow_peak <= 3 * window  # served + read ahead (+ the one being freed)
    batch = 256 * d * 2  # queued (4) + being filled + held by the caller, and index arrays
    assert numpy_peak <= 6 * batch + window // 4


def test_bad_caches_and_arguments_raise_clearly(tmp_path: Path) -> None:
    make_cache(tmp_path, n_shards=2, complete=False)
    with pytest.raises(CacheError, match="incomplete"):
        ActivationLoader(tmp_path, HOOK, 8)
    m = Manifest.load(tmp_path)
    m.complete = True
    m.save(tmp_path)
    with pytest.raises(CacheError, match=r"blocks\.9\.resid_post.*blocks\.0\.resid_post"):
        ActivationLoader(tmp_path, "blocks.9.resid_post", 8)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ActivationLoader(tmp_path, HOOK, 0)
    with pytest.raises(CacheError, match="no activation cache"):
        ActivationLoader(tmp_path / "nowhere", HOOK, 8)
    (tmp_path / m.shards[1].file).unlink()
    with pytest.raises(CacheError, match="shard-00001"):  # raised in the caller's thread
        list(ActivationLoader(tmp_path, HOOK, 8, epochs=1))


def test_background_threads_end_with_the_loader(cache) -> None:
    before = threading.active_count()
    loader = ActivationLoader(cache[0], HOOK, 8)
    next(loader)
    del loader  # fit() just stops iterating: dropping the loader must stop its threads
    gc.collect()
    for _ in range(50):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() <= before
