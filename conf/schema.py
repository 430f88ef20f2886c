"""The one config schema: the core's configs, nested, plus what only orchestration needs.

Each concern's config is owned by the code that uses it and imported here as it is: `sae` *is*
`sae.models.config.SAEConfig`, `train` extends `sae.training.config.FitConfig` by the
orchestration-only fields, `model` extends the builtin LM's recipe `sae.lm.config.LMSpec`, and
`scaling` is `sae.analysis.scaling.ScalingConfig`. Every value has one default (a dataclass field;
the YAML files in this folder hold only what differs from it), one check (`__post_init__`) and
one docstring.

Hydra composes YAML from the groups in this folder against these classes (registered in the
ConfigStore), so a mistyped key fails at compose time; `OmegaConf.to_object` then runs each
`__post_init__`, so a bad value (`sae.d_sae=-3`) fails before any work with its name in the error.
Composed once at the edge (`flows/config.py`), the typed `Config` is what flows, tasks and DDP
ranks carry; `from_dict` rebuilds it from its `asdict` where a plain dict had to travel.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, get_type_hints
from urllib.parse import urlparse

from hydra.core.config_store import ConfigStore

from sae.analysis.protocol import PROTOCOLS
from sae.analysis.scaling import ScalingConfig
from sae.checks import choice, finite, fraction, non_negative, positive
from sae.devices import LM_DEVICES, LM_DTYPES, check_device
from sae.lm.config import LMSpec, check_hook
from sae.lm.text import CHUNK_CHARS
from sae.lm.text import ERRORS as TEXT_ERRORS
from sae.models.config import DEFAULT_LR, DEFAULT_LR_DECAY, SAEConfig
from sae.training.config import FitConfig, check_lr_fracs

EXPORT_FORMATS = ("saelens", "neuronpedia")
"""What `saeflow export` writes (`export.format`)."""
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")
"""tracking.uri schemes MLflow stores take (`postgresql+psycopg2://` counts as postgresql)."""


@dataclass
class ModelConfig(LMSpec):
    """The language model: which one, where it runs, and (source=builtin) the recipe of the
    offline default model, whose fields (`n_layer`, `n_embd`, …) are `LMSpec`'s."""

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

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("model", "source", self.source, ("builtin", "hub"))
        if not re.fullmatch(r"[0-9A-Za-z_][0-9A-Za-z._-]*", self.name):  # a directory name
            raise ValueError(f"model.name must be letters, digits, . - _, got {self.name!r}")
        choice("model", "dtype", self.dtype, LM_DTYPES)
        choice("model", "device", self.device, LM_DEVICES)
        if self.source == "hub" and not self.path:
            raise ValueError("model.path is required when model.source=hub (a Hub id or a dir)")


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
    """source=hf: the dataset's configuration name (None = its default)."""
    hf_split: str = "train"
    """source=hf: the split streamed."""
    text_column: str = "text"
    """The column holding the text (jsonl, parquet, hf)."""
    holdout: float = 0.03
    """Fraction of documents held out (by a stable hash) for evaluation."""
    chunk_chars: int = CHUNK_CHARS
    """files/hf sources: documents longer than this many characters are cut into chunks (at
    line ends) and `holdout` of each one's chunks go to eval, so a corpus of a few huge
    documents still gets both splits (`sae/lm/text.py`); 0 keeps documents whole."""
    encoding: str = "utf-8"
    """source=files: the text files' encoding (any Python codec name)."""
    errors: str = "strict"
    """source=files, a byte that does not decode or a binary file: `strict` fails naming the
    file and byte offset, `replace` reads bad bytes as U+FFFD, `skip` leaves such files out
    (logged)."""
    context_length: int | None = None
    """Tokens per packed context (None = the model's n_ctx, filled in by `Config`)."""
    prepend_bos: bool = True
    """Start every context with BOS, as the model saw in training."""
    max_bytes: int = 0
    """Stop reading documents after this many bytes (0 = no limit)."""

    def __post_init__(self) -> None:
        choice("data", "source", self.source, ("stdlib", "files", "hf"))
        if self.source == "hf" and not self.hf_name:
            raise ValueError("data.hf_name is required when data.source=hf")
        if self.context_length is not None:
            positive("data", context_length=self.context_length)
        if not 0 < self.holdout < 1:
            raise ValueError(f"data.holdout must be in (0, 1), got {self.holdout}")
        if self.source == "files" and not self.paths:
            raise ValueError("data.paths is required when data.source=files")
        non_negative("data", chunk_chars=self.chunk_chars)
        choice("data", "errors", self.errors, TEXT_ERRORS)
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"data.encoding={self.encoding!r} is not a known codec") from None


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
        choice("cache", "dtype", self.dtype, ("bf16", "fp16"))
        if self.store is not None:
            url = urlparse(self.store)
            if url.scheme not in ("s3", "gs", "gcs", "file") or (
                not url.path.startswith("/") if url.scheme == "file" else not url.netloc
            ):
                raise ValueError(
                    f"cache.store={self.store!r} is not a store URL; valid: s3://bucket[/prefix], "
                    "gs://bucket[/prefix], file:///absolute/path"
                )
        non_negative("cache", outlier_factor=self.outlier_factor)
        positive(
            "cache", tokens=self.tokens, shard_tokens=self.shard_tokens, batch_size=self.batch_size
        )


@dataclass
class TrainConfig(FitConfig):
    """Training: what the trainer reads (`FitConfig`'s fields), and how saeflow runs it."""

    resume: bool = True
    """Reuse a finished run with the same settings; resume an unfinished one."""
    processes: int = 1
    """Data-parallel ranks on this machine (torchrun; gloo on CPU, NCCL on CUDA with one GPU per
    rank): each trains on batch_size / processes rows of every batch, gradients averaged, so the
    SAE is that of one process up to float summation order. train.batch_size must divide by it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("train", processes=self.processes)
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
    """Tokens shown before the marked token of a top example."""
    context_after: int = 3
    """Tokens shown after it."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts in `dense_frac`."""
    run_id: str | None = None
    """`saeflow evaluate`: the MLflow run whose SAE to evaluate (None = the latest trained)."""
    protocol: str = "saeflow"
    """Metric definitions: `saeflow` (DESIGN §6; logged as `eval/*`) or `saebench`, SAELens's and
    SAEBench's (every position zero-ablated, CE and KL over positions whose token is not special,
    mse summed over dimensions: `sae/analysis/evaluate.py`; logged as `eval_saebench/*`)."""
    sae: str | None = None
    """An SAE trained elsewhere, to evaluate, analyse, steer or export in place of `run_id`: a
    directory (saeflow's, SAELens's, sparsify's or dictionary_learning's; `sae.formats`) or a
    Hugging Face Hub id `owner/repo[:sae_id]`. It becomes an MLflow run of its own (tags
    `saeflow.source`, `saeflow.format`; its config as `source.*` params), once per content."""

    def __post_init__(self) -> None:
        positive(
            "eval", tokens=self.tokens, batch_size=self.batch_size, top_examples=self.top_examples
        )
        non_negative("eval", context_before=self.context_before, context_after=self.context_after)
        fraction("eval", dense_threshold=self.dense_threshold)
        choice("eval", "protocol", self.protocol, PROTOCOLS)
        # A run id names directories (saes/<id>, features/run_id=<id>): no path may hide in it.
        if self.run_id is not None and not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", self.run_id):
            raise ValueError(
                f"eval.run_id must be an MLflow run id (letters, digits, - and _), "
                f"got {self.run_id!r}"
            )
        if self.run_id is not None and self.sae is not None:
            raise ValueError(
                f"eval.run_id={self.run_id} and eval.sae={self.sae} both name the SAE; pass one"
            )


@dataclass
class RunnerConfig:
    kind: str = "local"
    """Where mapped tasks (cache shards, sweep training groups) run: `local` (threads in the
    flow's process), `dask` (Dask workers through prefect-dask) or `ray` (Ray workers through
    prefect-ray, an optional extra: `.venv/bin/pip install -e '.[ray]'` in the checkout)."""
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

        choice("runner", "kind", self.kind, ("local", "dask", "ray"))
        positive("runner", workers=self.workers)
        for d in self.devices:
            check_device("runner.devices", d, auto=False, sep=": ")
        if self.kind == "ray" and find_spec("prefect_ray") is None:
            raise ValueError(
                "runner.kind='ray' needs prefect-ray, which is not installed: "
                ".venv/bin/pip install -e '.[ray]' in the saeflow checkout (or use runner=local "
                "or runner=dask)"
            )


@dataclass
class SteerConfig:
    feature: int = 0
    """The SAE latent to steer with (`saeflow steer`; the SAE is eval.run_id or the latest)."""
    mode: str = "add"
    """add: x + value·unit decoder direction; clamp: set the feature's activation to value."""
    value: float = 10.0
    """How far to push: the added multiple of the unit direction, or the clamped activation."""
    prompts: list[str] = field(default_factory=lambda: ["import os\n", "def main("])
    """Prompts generated from, greedily, with and without the feature."""
    max_new_tokens: int = 24
    """Tokens generated per prompt."""

    def __post_init__(self) -> None:
        choice("steer", "mode", self.mode, ("add", "clamp"))
        positive("steer", max_new_tokens=self.max_new_tokens)
        finite("steer", value=self.value)
        if self.feature < 0:
            raise ValueError(f"steer.feature must be >= 0, got {self.feature}")
        if not self.prompts:
            raise ValueError("steer.prompts must hold at least one prompt")


@dataclass
class ExportConfig:
    format: str = "saelens"
    """`saeflow export`: `saelens`, a directory `sae_lens.SAE.load_from_disk` reads as it is
    (`sae/formats/saelens.py`: cfg.json, sae_weights.safetensors, sparsity.safetensors), or
    `neuronpedia`, the bulk-import layout (`sae/formats/neuronpedia.py`; needs the SAE's
    feature table, from `saeflow evaluate`)."""
    dir: str | None = None
    """Where to write; None = `$SAEFLOW_HOME/exports/<run_id>-<format>`. A sweep's or scaling
    study's parent run (`eval.run_id`) exports each SAE into `<dir>/<run_id>`."""

    def __post_init__(self) -> None:
        choice("export", "format", self.format, EXPORT_FORMATS)


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
    export: ExportConfig = field(default_factory=ExportConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    hook: str = "blocks.2.resid_post"
    """Hook point, `blocks.{L}.resid_pre|attn_out|mlp_out|resid_post` (see sae/lm/hooks.py)."""
    run_name: str | None = None
    """MLflow run name of the SAE; None = `<arch>-<d_sae>`."""

    def __post_init__(self) -> None:
        if self.data.context_length is None:  # the model's own context unless set
            self.data.context_length = self.model.n_ctx
        if self.train.lr is None:  # the architecture's measured default
            self.train.lr = DEFAULT_LR[self.sae.arch]
        if self.train.lr_decay_frac is None:  # the same, and keyed as that value
            self.train.lr_decay_frac = DEFAULT_LR_DECAY[self.sae.arch]
            check_lr_fracs(self.train.lr_warmup_frac, self.train.lr_decay_frac, None)
        # A builtin model's depth is known before any work; a Hub model's once its config loads;
        # an external cache (cache.dir) says itself which hooks it holds, whatever the model.
        builtin = self.model.source == "builtin" and self.cache.dir is None
        n_layer = self.model.n_layer if builtin else None
        for key, hook in [("hook", self.hook)] + [("cache.hooks", h) for h in self.cache.hooks]:
            check_hook(key, hook, n_layer, self.model.name)
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


def register() -> None:
    """Put the schema in Hydra's ConfigStore; `config.yaml` extends it, so every group is typed."""
    ConfigStore.instance().store(name="schema", node=Config)


def from_dict(d: dict[str, Any]) -> Config:
    """The typed config from its `dataclasses.asdict` (as flows hand it to Prefect tasks that
    need plain values, or DDP ranks read it from JSON); every check runs again."""
    return _build(Config, d)


def _build(cls: type, d: dict[str, Any]) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(d) - names):
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; valid: {sorted(names)}")
    values = {}
    for name, value in d.items():
        kind = hints[name]
        values[name] = _build(kind, value) if dataclasses.is_dataclass(kind) else value
    return cls(**values)
