"""Shuffled training batches from an activation cache: bounded memory, exact resume.

The stream of rows is fixed by (cache, hook, seed, buffer_rows, exclude_special) alone:

    epoch e     the shards in the order perm(n_shards; seed, e), cut in that order into
                *windows* of whole shards holding ≤ buffer_rows rows (a bigger shard alone)
    window w    its kept rows in the order perm(n_kept; seed, e, w), where kept = not special
                and not outlier when exclude_special (older caches without the flags: token
                ids in the manifest's special_token_ids)
    stream      window after window, epoch after epoch; a batch is the next batch_size rows,
                so a batch may straddle two windows or two epochs

So every kept row comes exactly once per epoch (an epoch's last rows may open the next epoch's
first batch: every batch is full, but the last of a run with `epochs` set), and a position in the
stream is three counters, (epoch, window, row in the window). Each permutation is drawn from a
generator seeded by its own (seed, epoch[, window]), so there is no RNG state to save:
`ActivationLoader.state()` is a small JSON-able dict, and `ActivationLoader(..., state=s)` goes
on with exactly the batches the saved loader would have yielded next (with another batch_size,
the same rows in other batches: the shuffled row stream does not depend on batch_size).

Within a batch the rows are in storage order: the batch is a uniformly shuffled *set*, but its
row indices are sorted before the gather, which then reads memory forwards (~1.5x faster
here) and needs no concatenation of the window's shards. A gradient step does not see the
order within a batch (but `fit` samples its init from the first rows of the first batch).

Memory: a window is held as its shards' decoded activation columns (`_from_binary`, zero-copy
over pyarrow's buffers; only the hook and flag columns are read). With prefetch > 0 the loader
holds two windows (the one served and the next, read ahead in a thread) plus `prefetch`
finished batches made in a second thread: ≈ 2 · buffer_rows · d_in · 2 bytes, whatever the
size of the cache. pyarrow and numpy release the GIL there, so the consumer only dequeues.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae.activations.cache import STORE_DTYPES, CacheError, Manifest, Shard, _from_binary
from sae.activations.prefetch import Prefetch

FLAG_COLUMNS = ("special", "outlier")
"""Boolean columns whose rows exclude_special leaves out (those a shard has)."""
STATE_VERSION = 1


class Position(NamedTuple):
    """The next row of the stream: `row` of window `window` of epoch `epoch`."""

    epoch: int
    window: int
    row: int


def plan(seed: int, epoch: int, shard_rows: tuple[int, ...], buffer_rows: int) -> list[list[int]]:
    """Shard indices of each window of `epoch`: consecutive in the epoch's shard order, whole
    shards, ≤ buffer_rows rows per window (a shard with more rows is a window of its own)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, 0)))
    windows: list[list[int]] = []
    rows = 0
    for i in rng.permutation(len(shard_rows)).tolist():
        if windows and rows + shard_rows[i] <= buffer_rows:
            windows[-1].append(i)
            rows += shard_rows[i]
        else:
            windows.append([i])
            rows = shard_rows[i]
    return windows


@dataclass(frozen=True)
class Window:
    """The kept rows of one window, shuffled; rows are numbered across its shards in order."""

    parts: list[np.ndarray]
    """(rows_k, d_in) int16 bit patterns of each shard's activations, zero-copy."""
    starts: np.ndarray
    """(K + 1,) first window row of each part, then the total."""
    order: np.ndarray
    """(n_kept,) kept window rows in the shuffled order."""

    def __len__(self) -> int:
        return len(self.order)

    def take(self, row: int, out: np.ndarray) -> None:
        """out (n, d_in) ← shuffled rows [row, row + n), gathered in storage order."""
        idx = np.sort(self.order[row : row + len(out)])
        cuts = np.searchsorted(idx, self.starts)  # idx[cuts[k] : cuts[k + 1]] lie in part k
        for k, part in enumerate(self.parts):
            a, b = cuts[k], cuts[k + 1]
            if b > a:  # mode="clip": with the default "raise", numpy copies via a temp buffer
                np.take(part, idx[a:b] - self.starts[k], axis=0, out=out[a:b], mode="clip")


@dataclass(frozen=True)
class Source:
    """What fixes the row stream, and how to read it (no thread or position state)."""

    dir: Path
    manifest: Manifest
    hook: str
    seed: int
    buffer_rows: int
    exclude_special: bool
    epochs: int | None
    plans: dict[int, list[list[int]]] = field(default_factory=dict, repr=False, compare=False)
    """epoch -> its windows, for the last two epochs (asked for at every batch)."""

    @property
    def d_in(self) -> int:
        return self.manifest.d_in(self.hook)

    def fingerprint(self) -> dict[str, Any]:
        """The inputs a saved position is only valid for."""
        return {
            "cache_key": self.manifest.key,
            "n_shards": len(self.manifest.shards),
            "hook": self.hook,
            "seed": self.seed,
            "buffer_rows": self.buffer_rows,
            "exclude_special": self.exclude_special,
        }

    def windows(self, epoch: int) -> list[list[int]]:
        if epoch not in self.plans:
            rows = tuple(s.rows for s in self.manifest.shards)
            self.plans[epoch] = plan(self.seed, epoch, rows, self.buffer_rows)
            for old in [e for e in self.plans if e < epoch - 1]:  # the read-ahead may lag by 1
                self.plans.pop(old, None)
        return self.plans[epoch]

    def walk(self, start: Position) -> Iterator[tuple[int, int]]:
        """(epoch, window) from `start` to the end of the run (endless if epochs is None)."""
        epoch, w = start.epoch, start.window
        while self.epochs is None or epoch < self.epochs:
            yield from ((epoch, i) for i in range(w, len(self.windows(epoch))))
            epoch, w = epoch + 1, 0

    def after(self, epoch: int, w: int, row: int, n_rows: int) -> Position:
        """The position after `row` rows of window w, moved on to the next window at its end."""
        if row < n_rows:
            return Position(epoch, w, row)
        if w + 1 < len(self.windows(epoch)):
            return Position(epoch, w + 1, 0)
        return Position(epoch + 1, 0, 0)

    def read(self, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
        """(rows, d_in) int16 activations of one shard, and the indices of its kept rows."""
        path = self.dir / shard.file
        try:
            pf = pq.ParquetFile(path, memory_map=True)  # maps, then one copy into arrow memory
            flags = self._flag_columns(pf.schema_arrow.names)
            table = pf.read(columns=[self.hook, *flags], use_threads=False)
        except (OSError, pa.ArrowException) as e:
            raise CacheError(f"cannot read shard {path}: {e}") from e
        if table.num_rows != shard.rows:
            raise CacheError(f"shard {path} has {table.num_rows} rows, manifest says {shard.rows}")
        col = table[self.hook]
        if col.type != pa.binary(self.d_in * 2):
            raise CacheError(
                f"shard {path}: column {self.hook!r} is {col.type}, expected "
                f"fixed_size_binary({self.d_in * 2}) for d_in={self.d_in}"
            )
        # bf16 and fp16 have the same width: read as the other, every value is silently wrong.
        stored = (table.schema.metadata or {}).get(b"saeflow.dtype", b"").decode()
        if stored and stored != self.manifest.dtype:
            raise CacheError(
                f"shard {path} holds {stored} activations but the manifest says "
                f"dtype={self.manifest.dtype!r}; fix the manifest's dtype"
            )
        acts = _from_binary(col, self.d_in, self.manifest.dtype).view(torch.int16).numpy()
        drop = np.zeros(len(acts), dtype=bool)
        for name in flags:
            values = table[name].to_numpy()
            if name == "token_id":
                values = np.isin(values, self.manifest.special_token_ids)
            drop |= values
        return acts, np.flatnonzero(~drop)

    def _flag_columns(self, names: list[str]) -> list[str]:
        if not self.exclude_special:
            return []
        flags = [c for c in FLAG_COLUMNS if c in names]
        # A cache written elsewhere to DESIGN §4 may lack `special`: fall back to token ids.
        return flags if "special" in flags else [*flags, "token_id"]

    def load(self, epoch: int, w: int) -> Window:
        """Read window w of `epoch` and shuffle its kept rows."""
        parts, kept, starts = [], [], [0]
        for i in self.windows(epoch)[w]:
            acts, keep = self.read(self.manifest.shards[i])
            parts.append(acts)
            kept.append(keep + starts[-1])
            starts.append(starts[-1] + len(acts))
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(epoch, 1, w)))
        return Window(parts, np.array(starts), rng.permutation(np.concatenate(kept)))

    def loaded(
        self, start: Position, pool: ThreadPoolExecutor | None
    ) -> Iterator[tuple[int, int, Window]]:
        """(epoch, window, Window) from `start` on; with a pool, the next is read meanwhile."""
        keys = self.walk(start)
        key = next(keys, None)
        pending = self._submit(pool, key) if key else None
        empty_shards = 0
        while key and pending:
            win = pending()
            key_next = next(keys, None)
            pending = self._submit(pool, key_next) if key_next else None
            # Rows all excluded for two epochs' worth of shards: an endless run would spin.
            empty_shards = 0 if len(win) else empty_shards + len(self.windows(key[0])[key[1]])
            if empty_shards >= 2 * len(self.manifest.shards):
                raise CacheError(f"cache {self.dir}: every row is special or an outlier")
            yield key[0], key[1], win
            key = key_next

    def _submit(
        self, pool: ThreadPoolExecutor | None, key: tuple[int, int]
    ) -> Callable[[], Window]:
        """A call that returns the loaded window: read now in the pool, or later by the caller."""
        return pool.submit(self.load, *key).result if pool else functools.partial(self.load, *key)

    def stream(
        self, start: Position, batch_size: int, pool: ThreadPoolExecutor | None
    ) -> Generator[tuple[np.ndarray, Position], None, None]:
        """(batch (B, d_in) int16, position after it) from `start` to the end of the run."""
        out, filled = np.empty((batch_size, self.d_in), dtype=np.int16), 0
        for epoch, w, win in self.loaded(start, pool):
            row = start.row if (epoch, w) == start[:2] else 0
            if row > len(win):
                raise ValueError(f"loader state row={row} is past window {w}'s {len(win)} rows")
            while row < len(win):
                n = min(batch_size - filled, len(win) - row)
                win.take(row, out[filled : filled + n])
                row, filled = row + n, filled + n
                if filled == batch_size:
                    yield out, self.after(epoch, w, row, len(win))
                    out, filled = np.empty_like(out), 0
        if filled:
            yield out[:filled], Position(self.epochs or 0, 0, 0)


class ActivationLoader:
    """Iterator of (batch_size, d_in) activation batches in the cache's dtype (bf16/fp16).

    buffer_rows: rows shuffled together (a window; see the module doc). seed: fixes the order.
    exclude_special: leave out special-token and outlier rows. epochs: stop after this many
    (the last batch may then be short); None = endless. prefetch: batches made ahead in a
    background thread (0 = all work in the caller's thread, no read-ahead). state: a dict from
    `state()` of a loader over the same cache, hook, seed, buffer_rows and exclude_special.
    """

    def __init__(
        self,
        dir: Path,
        hook: str,
        batch_size: int,
        *,
        buffer_rows: int = 262_144,
        seed: int = 0,
        exclude_special: bool = True,
        epochs: int | None = None,
        prefetch: int = 4,
        state: dict[str, Any] | None = None,
    ):
        lows = {"batch_size": (batch_size, 1), "buffer_rows": (buffer_rows, 1), "seed": (seed, 0),
                "epochs": (epochs or 0, 0), "prefetch": (prefetch, 0)}  # fmt: skip
        for name, (value, low) in lows.items():
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        m = Manifest.load(Path(dir))
        if not m.complete or not m.shards:
            raise CacheError(f"cache {dir} is incomplete ({len(m.shards)} shards); finish it first")
        m.d_in(hook)  # unknown hook: CacheError naming the hooks there are
        self._source = Source(Path(dir), m, hook, seed, buffer_rows, exclude_special, epochs)
        self.batch_size = batch_size
        self.dtype = STORE_DTYPES[m.dtype]
        self._position, self._rows = self._restore(state) if state else (Position(0, 0, 0), 0)
        self._pool = ThreadPoolExecutor(1, "saeflow-read") if prefetch else None
        items = self._source.stream(self._position, batch_size, self._pool)
        self._items: Iterator[tuple[np.ndarray, Position]] = (
            Prefetch(items, prefetch) if prefetch else items
        )
        if self._pool is not None:
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    @property
    def d_in(self) -> int:
        return self._source.d_in

    def __iter__(self) -> ActivationLoader:
        return self

    def __next__(self) -> torch.Tensor:
        batch, self._position = next(self._items)
        self._rows += len(batch)
        return torch.from_numpy(batch).view(self.dtype)  # (B, d_in), no copy

    def state(self) -> dict[str, Any]:
        """JSON-able position after the last batch returned; pass as `state=` to resume."""
        return {
            "version": STATE_VERSION,
            **self._source.fingerprint(),
            "epoch": self._position.epoch,
            "window": self._position.window,
            "row": self._position.row,
            "rows": self._rows,
        }

    def _restore(self, state: dict[str, Any]) -> tuple[Position, int]:
        want = {"version": STATE_VERSION, **self._source.fingerprint()}
        for key, value in want.items():
            if state.get(key) != value:
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this loader {value!r}: a "
                    "state resumes only the same cache, hook, seed, buffer_rows, exclude_special"
                )
        pos = Position(int(state["epoch"]), int(state["window"]), int(state["row"]))
        return pos, int(state["rows"])

    def close(self) -> None:
        """Stop the background threads (also done when the loader is garbage-collected)."""
        if isinstance(self._items, Prefetch):
            self._items.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ActivationLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
