"""The one config schema: nested dataclasses, validated at construction.

Hydra composes YAML from the groups in this folder against these classes (registered in the
ConfigStore), so a mistyped key fails at compose time; `OmegaConf.to_object` then runs each
`__post_init__`, so a bad value (`sae.d_sae=-3`) fails before any work with its name in the error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
DTYPES = ("bf16", "fp16", "fp32")
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")
"""tracking.uri schemes MLflow stores take (`postgresql+psycopg2://` counts as postgresql)."""


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value}")


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # as sae.training.fit.DEVICE (conf imports no torch)


def _choice(owner: str, name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{owner}.{name}={value!r} is not one of {', '.join(valid)}")


@dataclass
class ModelConfig:
    name: str = "stdlib-gpt2"
    """Label used in the MLflow experiment name and the data directory."""
    source: str = "builtin"
    """`builtin`: the offline default LM the project trains; `hub`: `from_pretrained(path)`."""
    path: str = ""
    """Hub id or local directory (source=hub)."""
    revision: str = "main"
    """Hub revision (source=hub); part of the activation cache key."""
    dtype: str = "fp32"
    """Dtype of the language model's forward pass (caching and evaluation)."""
    device: str = "auto"
    """Where the language model runs for caching, evaluation and steering: auto (cuda when torch
    sees a GPU, else cpu), cpu or cuda. On cuda the activation cache key also holds the GPU's
    name and compute capability; building the builtin model is not affected."""
    # The builtin model's recipe (source=builtin); see sae/lm/builtin.py and DESIGN §8.
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_ctx: int = 256
    vocab_size: int = 4096
    train_tokens: int = 1_600_000
    batch_size: int = 8
    lr: float = 2e-3
    corpus_bytes: int = 0
    """Limit on the builtin model's training text (0 = the whole stdlib); tests use a slice."""
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("model", "source", self.source, ("builtin", "hub"))
        if not re.fullmatch(r"[0-9A-Za-z_][0-9A-Za-z._-]*", self.name):  # a directory name
            raise ValueError(f"model.name must be letters, digits, . - _, got {self.name!r}")
        _choice("model", "dtype", self.dtype, DTYPES)
        _choice("model", "device", self.device, ("auto", "cpu", "cuda"))
        if self.source == "hub" and not self.path:
            raise ValueError("model.path is required when model.source=hub (a Hub id or a dir)")
        _positive(
            "model",
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
            n_ctx=self.n_ctx,
            vocab_size=self.vocab_size,
            batch_size=self.batch_size,
            lr=self.lr,
        )


@dataclass
class DataConfig:
    source: str = "stdlib"
    """`stdlib` (the standard library's source, offline), `files` (local txt/jsonl/parquet) or
    `hf` (a Hugging Face `datasets` dataset, streamed)."""
    paths: list[str] = field(default_factory=list)
    """Local files for source=files; `data_files` for source=hf (e.g. hf_name=json)."""
    hf_name: str = ""
    """source=hf: dataset name (`monology/pile-uncopyrighted`) or a builder (`json`, `parquet`)."""
    hf_config: str | None = None
    hf_split: str = "train"
    text_column: str = "text"
    holdout: float = 0.03
    """Fraction of documents held out (by a stable hash) for evaluation."""
    context_length: int = 256
    """Tokens per packed context."""
    prepend_bos: bool = True
    """Start every context with BOS, as the model saw in training."""
    max_bytes: int = 0
    """Stop reading documents after this many bytes (0 = no limit)."""

    def __post_init__(self) -> None:
        _choice("data", "source", self.source, ("stdlib", "files", "hf"))
        if self.source == "hf" and not self.hf_name:
            raise ValueError("data.hf_name is required when data.source=hf")
        _positive("data", context_length=self.context_length)
        if not 0 < self.holdout < 1:
            raise ValueError(f"data.holdout must be in (0, 1), got {self.holdout}")
        if self.source == "files" and not self.paths:
            raise ValueError("data.paths is required when data.source=files")


@dataclass
class CacheConfig:
    dir: str | None = None
    """An existing cache in the DESIGN §4 layout to train on; None = build one from model+data."""
    tokens: int = 1_048_576
    """Training tokens to cache (rounded up to whole contexts)."""
    dtype: str = "bf16"
    """Stored activation dtype (bf16 or fp16 bytes in a fixed_size_binary column)."""
    shard_tokens: int = 131_072
    """Rows per Parquet shard."""
    batch_size: int = 32
    """Contexts per forward pass while caching."""
    exclude_special: bool = True
    """Leave BOS/EOS/pad and outlier rows out of training batches (kept in the cache)."""
    outlier_factor: float = 10.0
    """Flag rows whose activation norm exceeds this × the shard's median (0 = never)."""
    verify: bool = True
    """Check every shard's sha256 before reusing a cache."""
    repair: bool = False
    """Recompute shards that fail their checksum instead of stopping with an error."""
    hooks: list[str] = field(default_factory=list)
    """More hook points cached in the same forward pass as `hook` (for later SAEs)."""
    store: str | None = None
    """A directory shared between machines (`s3://bucket/prefix`, `gs://bucket/prefix`,
    `file:///mnt/shared/caches`; S3 endpoint in the query: `?endpoint_override=host:port&
    scheme=http`, credentials from AWS_*): finished caches are published there under their key,
    write-once, and a machine fetches a cache from there instead of computing it. None = local."""

    def __post_init__(self) -> None:
        _choice("cache", "dtype", self.dtype, ("bf16", "fp16"))
        if self.store is not None:
            url = urlparse(self.store)
            if url.scheme not in ("s3", "gs", "gcs", "file") or (
                not url.path.startswith("/") if url.scheme == "file" else not url.netloc
            ):
                raise ValueError(
                    f"cache.store={self.store!r} is not a store URL; valid: s3://bucket[/prefix], "
                    "gs://bucket[/prefix], file:///absolute/path"
                )
        if self.outlier_factor < 0:
            raise ValueError(f"cache.outlier_factor must be >= 0, got {self.outlier_factor}")
        _positive(
            "cache", tokens=self.tokens, shard_tokens=self.shard_tokens, batch_size=self.batch_size
        )


@dataclass
class SAEConfig:
    arch: str = "relu"
    """`relu` (Anthropic April 2024: ReLU, decoder-norm-weighted L1) or `topk` (Gao et al.)."""
    d_sae: int = 1024
    """Number of latents."""
    l1_coeff: float = 3.0
    """relu, jumprelu: sparsity coefficient λ (L1 for relu, L0 for jumprelu)."""
    k: int = 16
    """topk, batchtopk: active latents per token (batchtopk: on average over the batch)."""
    aux_coeff: float = 1 / 32
    """topk, batchtopk: weight of the AuxK loss on dead latents."""
    target_l0: float | None = None
    """relu, jumprelu: steer λ during training so the run ends at this L0 (None = fixed λ)."""

    def __post_init__(self) -> None:
        _choice("sae", "arch", self.arch, ARCHS)
        _positive("sae", d_sae=self.d_sae, k=self.k)
        if self.k > self.d_sae:
            raise ValueError(f"sae.k={self.k} must be <= sae.d_sae={self.d_sae}")
        if self.l1_coeff < 0 or self.aux_coeff < 0:
            raise ValueError("sae.l1_coeff and sae.aux_coeff must be >= 0")
        if self.target_l0 is not None:
            if self.arch not in ("relu", "jumprelu"):
                raise ValueError(
                    f"sae.target_l0 needs arch relu or jumprelu; {self.arch} sets its L0 with sae.k"
                )
            if not 0 < self.target_l0 <= self.d_sae:
                raise ValueError(f"sae.target_l0 must be in (0, d_sae], got {self.target_l0}")


@dataclass
class TrainConfig:
    tokens: int = 1_228_800
    """Training tokens (the loader cycles over the cache if it holds fewer)."""
    batch_size: int = 4096
    lr: float = 1e-3
    l1_warmup_frac: float = 0.05
    lr_decay_frac: float = 0.2
    grad_clip: float = 1.0
    dtype: str = "auto"
    """bf16 autocast (fp32 master weights), fp32, or auto: bf16 where the device has fast bf16
    matmuls (CUDA, CPUs with AVX512-BF16/AMX), else fp32 (measured: bf16 is far slower on AVX2)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (GPU N; `runner.devices` spreads a sweep's SAEs over GPUs)."""
    seed: int = 0
    log_every: int = 10
    shuffle_rows: int = 262_144
    """Rows in the loader's shuffle buffer: memory is bounded by this, not by the cache size."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    checkpoint_every: int = 100
    """Steps between trainer states (0 = none): a killed run resumes from the newest."""
    resume: bool = True
    """Reuse a finished run with the same settings; resume an unfinished one."""
    compile: bool = False
    """torch.compile the SAE's forward."""
    processes: int = 1
    """Data-parallel ranks on this machine (torchrun; gloo on CPU, NCCL on CUDA with one GPU per
    rank): each trains on batch_size / processes rows of every batch, gradients averaged, so the
    SAE is that of one process up to float summation order. train.batch_size must divide by it."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _choice("train", "dtype", self.dtype, ("auto", "bf16", "fp32"))
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"train.device={self.device!r} is not one of auto, cpu, cuda, cuda:N")
        _positive(
            "train",
            tokens=self.tokens,
            batch_size=self.batch_size,
            lr=self.lr,
            log_every=self.log_every,
            shuffle_rows=self.shuffle_rows,
            processes=self.processes,
        )
        if self.batch_size % self.processes:
            raise ValueError(
                f"train.processes={self.processes} must divide train.batch_size="
                f"{self.batch_size}: every rank trains on an equal slice of each batch; use a "
                f"divisor of {self.batch_size} or a batch_size that is a multiple of "
                f"{self.processes}"
            )


@dataclass
class EvalConfig:
    tokens: int = 65_536
    """Held-out tokens (whole contexts) for reconstruction, loss recovered and feature stats."""
    batch_size: int = 16
    """Contexts per forward pass."""
    top_examples: int = 8
    """Top-activating examples kept per feature."""
    context_before: int = 12
    context_after: int = 3
    dense_threshold: float = 0.1
    run_id: str | None = None
    """`saeflow evaluate`: the MLflow run whose SAE to evaluate (None = the latest trained)."""

    def __post_init__(self) -> None:
        _positive(
            "eval", tokens=self.tokens, batch_size=self.batch_size, top_examples=self.top_examples
        )
        # A run id names directories (saes/<id>, features/run_id=<id>): no path may hide in it.
        if self.run_id is not None and not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", self.run_id):
            raise ValueError(
                f"eval.run_id must be an MLflow run id (letters, digits, - and _), "
                f"got {self.run_id!r}"
            )


@dataclass
class RunnerConfig:
    kind: str = "local"
    """Where mapped tasks (cache shards, sweep training groups) run: `local` (threads in the
    flow's process), `dask` (Dask workers through prefect-dask) or `ray` (Ray workers through
    prefect-ray, an optional extra: `pip install 'saeflow[ray]'`)."""
    address: str | None = None
    """dask: the scheduler of an existing cluster (`tcp://host:8786`); None = a LocalCluster.
    ray: an existing cluster (`ray://host:10001`, or `auto`: the one this machine belongs to);
    None = a Ray instance of this run's own, shut down with it."""
    workers: int = 2
    """dask, LocalCluster: worker processes (one thread each: torch uses the cores).
    ray, own instance: CPUs it offers, so at most this many tasks at once (one CPU each)."""
    devices: list[str] = field(default_factory=list)
    """A sweep's or scaling study's SAEs placed round-robin on these devices (`[cuda:0,
    cuda:1]`): SAE i trains on devices[i mod n] (its `train.device`), so each device is a
    training group of its own; with runner=dask or ray and `workers` ≥ n they train at once.
    [] = every SAE on its `train.device`."""

    def __post_init__(self) -> None:
        from importlib.util import find_spec

        _choice("runner", "kind", self.kind, ("local", "dask", "ray"))
        _positive("runner", workers=self.workers)
        for d in self.devices:
            if d == "auto" or not DEVICE.fullmatch(d):
                raise ValueError(f"runner.devices: {d!r} is not one of cpu, cuda, cuda:N")
        if self.kind == "ray" and find_spec("prefect_ray") is None:
            raise ValueError(
                "runner.kind='ray' needs prefect-ray, which is not installed: "
                "pip install 'saeflow[ray]' (or use runner=local or runner=dask)"
            )


@dataclass
class SteerConfig:
    feature: int = 0
    """The SAE latent to steer with (`saeflow steer`; the SAE is eval.run_id or the latest)."""
    mode: str = "add"
    """add: x + value·unit decoder direction; clamp: set the feature's activation to value."""
    value: float = 10.0
    prompts: list[str] = field(default_factory=lambda: ["import os\n", "def main("])
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        _choice("steer", "mode", self.mode, ("add", "clamp"))
        _positive("steer", max_new_tokens=self.max_new_tokens)
        if self.feature < 0:
            raise ValueError(f"steer.feature must be >= 0, got {self.feature}")
        if not self.prompts:
            raise ValueError("steer.prompts must hold at least one prompt")


@dataclass
class ScalingConfig:
    """`saeflow scaling`: a grid of SAEs on one cache, and power laws fitted to it."""

    d_sae: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    """Dictionary sizes of the grid."""
    tokens: list[int] = field(default_factory=lambda: [153_600, 307_200, 614_400])
    """Training tokens of the grid (SAEs with equal tokens train from one read of the cache)."""
    lr: list[float] = field(default_factory=lambda: [3e-3, 1e-2, 3e-2])
    """Learning rates of the grid: the best per budget is fitted against compute."""
    budget_bin: float = 2.0
    """Budgets within this factor of each other count as one (the best SAE of each bin is
    the compute-efficient one)."""
    extrapolate: float = 10.0
    """The recommendation is for this many times the grid's largest budget."""
    split_threshold: float = 0.5
    """Decoder cosine at or above which a feature of the larger SAE is a child of its best
    match in the smaller one (feature splitting)."""
    n_boot: int = 1000
    """Bootstrap resamples for the exponents' 90% intervals."""

    def __post_init__(self) -> None:
        for name in ("d_sae", "tokens", "lr"):
            values = getattr(self, name)
            if not values or any(v <= 0 for v in values):
                raise ValueError(f"scaling.{name} must be a non-empty list of values > 0")
            if len(set(values)) != len(values):
                raise ValueError(f"scaling.{name} has repeated values: {values}")
        if self.budget_bin <= 1:
            raise ValueError(f"scaling.budget_bin must be > 1, got {self.budget_bin}")
        _positive("scaling", extrapolate=self.extrapolate, n_boot=self.n_boot)
        if not 0 < self.split_threshold <= 1:
            raise ValueError(
                f"scaling.split_threshold must be in (0, 1], got {self.split_threshold}"
            )


@dataclass
class TrackingConfig:
    uri: str | None = None
    """MLflow tracking URI; None = SQLite under $SAEFLOW_HOME/mlflow."""
    experiment: str | None = None
    """MLflow experiment; None = `<model.name>/<hook>`."""
    ui_url: str | None = None
    """The MLflow UI's address, for links from Prefect flow runs; None = `uri` when it is an
    http(s) server, else http://127.0.0.1:5000 (the README's `mlflow ui`)."""

    def __post_init__(self) -> None:
        # MLflow would reject a mistyped scheme only at the first tracking call, after caching.
        scheme = urlparse(self.uri).scheme.split("+")[0] if self.uri else ""
        if scheme and scheme not in TRACKING_SCHEMES:
            raise ValueError(
                f"tracking.uri={self.uri!r} has the unknown scheme {scheme!r}; valid: "
                f"{', '.join(TRACKING_SCHEMES)} (e.g. http://127.0.0.1:5000), or a local path"
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    hook: str = "blocks.2.resid_post"
    """Hook point, `blocks.{L}.resid_pre|attn_out|mlp_out|resid_post` (see sae/lm/hooks.py)."""
    run_name: str | None = None
    """MLflow run name of the SAE; None = `<arch>-<d_sae>`."""

    def __post_init__(self) -> None:
        for name, hook in [("hook", self.hook)] + [("cache.hooks", h) for h in self.cache.hooks]:
            self._check_hook(name, hook)
        if self.train.processes > 1 and ":" in self.train.device:
            raise ValueError(
                f"train.device={self.train.device!r} is one GPU, but train.processes="
                f"{self.train.processes} puts a rank on each of GPUs 0 … "
                f"{self.train.processes - 1}: use train.device=cuda"
            )
        if self.train.processes > 1 and (self.sae.arch != "relu" or self.sae.target_l0):
            # Each rank would pick batchtopk's top k·B, AuxK's dead latents and target_l0's L0
            # from its own slice: not the one-process SAE. Shared statistics are not built.
            raise ValueError(
                f"train.processes={self.train.processes} (data-parallel) supports sae=relu "
                "without sae.target_l0 for now; use train.processes=1, or a sweep over devices"
            )
        if self.model.source == "builtin" and self.data.context_length > self.model.n_ctx:
            raise ValueError(
                f"data.context_length={self.data.context_length} exceeds "
                f"model.n_ctx={self.model.n_ctx}"
            )

    def _check_hook(self, name: str, hook: str) -> None:
        m = re.match(r"^blocks\.(\d+)\.(resid_pre|attn_out|mlp_out|resid_post)$", hook)
        if not m:
            raise ValueError(
                f"{name}={hook!r} is not a hook point; valid: "
                "blocks.<layer>.resid_pre|attn_out|mlp_out|resid_post"
            )
        # A builtin model's depth is known before any work.
        if self.model.source == "builtin" and int(m.group(1)) >= self.model.n_layer:
            raise ValueError(
                f"{name}={hook!r} does not exist: model {self.model.name} has "
                f"{self.model.n_layer} blocks (0..{self.model.n_layer - 1})"
            )


def register() -> None:
    """Put the schema in Hydra's ConfigStore; `config.yaml` extends it, so every group is typed."""
    ConfigStore.instance().store(name="schema", node=Config)


def from_dict(d: dict[str, Any]) -> Config:
    """The typed config from the plain dict the flows pass around (validated again)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))
