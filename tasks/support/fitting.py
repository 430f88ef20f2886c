"""Training a group of SAEs as configured, shared by the train task (tasks/train.py) and the
ranks of a data-parallel run (tasks/support/ddp.py): building the SAEs and their loader, the
trainer states' directories, and the on_step loggers that send train/* to MLflow."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from conf.schema import Config
from sae.activations.loader import ActivationLoader
from sae.models.base import SAE
from sae.models.registry import build
from sae.training import checkpoint
from sae.training.checkpoint import TrainState
from sae.training.fit import OnStep, fit_many
from tasks.support import tracking
from tasks.support.home import sae_dir
from tasks.support.log import Progress, logger


def state_dir(run_id: str) -> Path:
    return sae_dir(run_id) / "state"


class _Logger:
    """on_step callback: buffers train/* metrics and sends them to MLflow in batches."""

    def __init__(
        self, run_id: str, uri: str | None, tokens: int, checkpoint_every: int, bar: str = ""
    ):
        self.run_id, self.uri, self.tokens = run_id, uri, tokens
        self.checkpoint_every = checkpoint_every
        self.buf: list[tuple[int, dict[str, float]]] = []
        self.last_print = 0.0
        self.bar = Progress(bar, "tok", tokens) if bar else None

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.buf.append((step, {f"train/{k}": v for k, v in metrics.items()}))
        every = self.checkpoint_every  # sent before the state is saved: none lost to a kill
        if len(self.buf) >= 20 or (every and step % every == 0):
            self.flush()
        if self.bar is not None:
            self.bar(int(metrics.get("tokens", 0)))
        if time.monotonic() - self.last_print > 10:
            self.last_print = time.monotonic()
            seen, rate = metrics.get("tokens", 0), metrics.get("tokens_per_s", 0) or 1
            logger().info(
                f"step {step}: loss {metrics['loss']:.4f} l0 {metrics['l0']:.1f} "
                f"{seen:,.0f}/{self.tokens:,} tokens, {rate:,.0f} tok/s, "
                f"ETA {(self.tokens - seen) / rate:.0f}s"
            )

    def flush(self) -> None:
        if self.buf:
            tracking.log_history(self.run_id, self.buf, self.uri)
            self.buf = []

    def close(self) -> None:
        """Flush, and finish the progress (bar, Prefect artifact)."""
        self.flush()
        if self.bar is not None:
            self.bar.close()


def load_states(run_ids: list[str], step: int) -> list[TrainState]:
    """The runs' trainer states of `step`, to resume them from."""
    return [checkpoint.load(state_dir(r), step) for r in run_ids]


def step_loggers(typed: list[Config], run_ids: list[str], bar: bool = True) -> list[_Logger]:
    """One train/* logger per run, and one terminal bar for the group: its SAEs step together."""
    label = f"train ×{len(typed)}" if bar else ""
    return [
        _Logger(r, t.tracking.uri, t.train.tokens, t.train.checkpoint_every, "" if i else label)
        for i, (r, t) in enumerate(zip(run_ids, typed, strict=True))
    ]


def fit_group(
    typed: list[Config],
    run_ids: list[str],
    cache_dir: Path,
    d_in: int,
    resume: list[TrainState] | None,
    on_steps: Sequence[OnStep | None],
) -> list[SAE]:
    """Build the group's SAEs and its loader as configured and train them (resumed from
    `resume`), writing trainer states to the runs' state dirs: in the task's process, or as one
    torchrun rank of tasks/support/ddp.py, where every rank builds the same."""
    c = typed[0]
    saes = [build(t.sae, d_in, seed=t.train.seed) for t in typed]
    loader = ActivationLoader(
        cache_dir,
        c.hook,
        c.train.batch_size,
        buffer_rows=c.train.shuffle_rows,
        seed=c.train.seed,
        exclude_special=c.cache.exclude_special,
        state=resume[0].loader if resume else None,
    )
    with loader:
        return fit_many(
            saes,
            loader,
            [t.train for t in typed],
            list(on_steps),
            checkpoints=[state_dir(r) for r in run_ids],
            resume=list(resume) if resume else None,
        )
