"""The offline default model (DESIGN §8): a small GPT-2 trained on the Python standard library.

`build_stdlib_lm(out_dir, LMSpec())` trains a byte-level BPE tokenizer and a GPT-2-architecture
causal LM on the stdlib's own sources (`sae.lm.text`, train split), measures held-out cross-entropy
on whole held-out files, and saves everything with `save_pretrained`, so that
`AutoModelForCausalLM.from_pretrained(out_dir)` / `AutoTokenizer.from_pretrained(out_dir)` load it
like any Hub model. The build is cached: a directory with a `build.json` is finished and reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from sae.hardware import cpu_has_fast_bf16, num_threads
from sae.lm.config import ENDOFTEXT, LMSpec
from sae.lm.text import documents, token_contexts

WARMUP_FRAC = 0.05  # of the steps, linear warm-up before the cosine decay
MIN_LR_FRAC = 0.1  # cosine decays to this fraction of the peak lr
EVAL_BATCH = 16  # contexts per forward pass when measuring held-out loss


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme) with `<|endoftext|>` as BOS, EOS and pad token.

    Byte-level pre-tokenisation means any string round-trips through encode/decode.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT
    )


def lr_at(step: int, steps: int, lr: float) -> float:
    """Learning rate at `step` of `steps`: linear warm-up, then cosine from `lr` to 0.1·lr."""
    warmup = max(1, int(WARMUP_FRAC * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return lr * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_stdlib_lm(
    out_dir: Path,
    spec: LMSpec,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Build (or reuse) the stdlib LM in `out_dir`; return its `build.json` record.
    `progress(step, steps)` follows its training.

    Record: `spec`, `heldout_ce` and `unigram_ce` (nats/token on the eval split's targets, EOS
    targets excluded), `train_tokens`, `eval_tokens`, `seconds`, `weights_sha256`.
    """
    out_dir = Path(out_dir)
    if (out_dir / "build.json").exists():
        return _reuse(out_dir, spec, log)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} exists but has no build.json (unfinished or not a "
            "stdlib LM build); remove it or choose another out_dir"
        )
    start = time.perf_counter()
    with num_threads(spec.threads):
        tokenizer = train_tokenizer(_texts("train", spec), spec.vocab_size)
        tokenizer.model_max_length = spec.n_ctx
        train, held_out = _contexts(tokenizer, "train", spec), _contexts(tokenizer, "eval", spec)
        log(
            f"stdlib LM: {train.numel():,} train / {held_out.numel():,} eval tokens "
            f"in contexts of {spec.n_ctx}"
        )
        model = _new_model(spec, tokenizer)
        bf16 = spec.bf16 and cpu_has_fast_bf16()
        if spec.bf16 and not bf16:
            log(
                "stdlib LM: no native bf16 on this CPU "
                f"({torch.backends.cpu.get_cpu_capability()}): training in fp32"
            )
        train_tokens = _train(model, train, spec, bf16, log, progress)
        eos = tokenizer.eos_token_id
        heldout_ce, eval_tokens = heldout_cross_entropy(model, held_out, eos)
        record = {
            "spec": spec.recipe(),
            "heldout_ce": heldout_ce,
            "unigram_ce": unigram_cross_entropy(train, held_out, len(tokenizer), eos),
            "train_tokens": train_tokens,
            "train_dtype": "bf16" if bf16 else "fp32",
            "eval_tokens": eval_tokens,
            "n_params": sum(p.numel() for p in model.parameters()),
        }
    log(
        f"stdlib LM: held-out CE {record['heldout_ce']:.3f} nats/token vs unigram "
        f"{record['unigram_ce']:.3f} ({eval_tokens:,} eval tokens)"
    )
    record["seconds"] = round(time.perf_counter() - start, 1)
    return _save(out_dir, model, tokenizer, record, log)


def _reuse(out_dir: Path, spec: LMSpec, log: Callable[[str], None]) -> dict:
    record = json.loads((out_dir / "build.json").read_text())
    built = record.get("spec", {})
    differs = [k for k, v in spec.recipe().items() if k != "threads" and built.get(k) != v]
    note = f" (built with a different spec: {differs})" if differs else ""
    log(f"stdlib LM: reusing {out_dir}{note}")
    return record


def _texts(split: str, spec: LMSpec) -> Iterator[str]:
    return documents("stdlib", split, max_bytes=spec.corpus_bytes)


def _contexts(tokenizer: PreTrainedTokenizerFast, split: str, spec: LMSpec) -> torch.Tensor:
    """All BOS-prefixed packed contexts of one split, (N, n_ctx) int64."""
    rows = list(token_contexts(tokenizer, _texts(split, spec), spec.n_ctx))
    if not rows:
        raise ValueError(
            f"the stdlib {split} split (corpus_bytes={spec.corpus_bytes}) holds "
            f"less than one context of n_ctx={spec.n_ctx} tokens; raise corpus_bytes"
        )
    return torch.tensor(rows, dtype=torch.long)


def _new_model(spec: LMSpec, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_ctx,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=0.0,  # dropout off: under one epoch of data, nothing to regularise
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # GPT-2's tanh GELU as one fused op (gelu_new is 4 elementwise ops: ~8% of a CPU step)
        activation_function="gelu_pytorch_tanh",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    return GPT2LMHeadModel(config)


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay 0.1 on matrices (embeddings, projections), none on biases/norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean CE of predicting ids[:, t+1] from logits[:, t]; logits (B, T, V), ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _train(
    model: GPT2LMHeadModel,
    train: torch.Tensor,
    spec: LMSpec,
    bf16: bool,
    log: Callable,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Train on random rows of `train` (N, n_ctx); return the number of tokens trained on.
    `progress(step, steps)` is called after each step."""
    steps = spec.train_tokens // (spec.batch_size * spec.n_ctx)
    every = max(1, steps // 10)
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = _optimizer(model, spec.lr)
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, spec.lr)
        ids = train[torch.randint(len(train), (spec.batch_size,), generator=generator)]  # (B, T)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = _next_token_loss(model(ids).logits, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += loss.item()
        if progress is not None:
            progress(step + 1, steps)
        if (step + 1) % every == 0 or step + 1 == steps:
            n_logged = (step % every) + 1
            tokens = (step + 1) * spec.batch_size * spec.n_ctx
            rate = tokens / (time.perf_counter() - start)
            log(
                f"stdlib LM: step {step + 1}/{steps}, {tokens:,} tokens, "
                f"loss {running / n_logged:.3f}, {rate:,.0f} tokens/s"
            )
            running = 0.0
    model.eval()
    return steps * spec.batch_size * spec.n_ctx


@torch.no_grad()
def heldout_cross_entropy(
    model: torch.nn.Module, contexts: torch.Tensor, ignore_id: int | None
) -> tuple[float, int]:
    """Mean next-token CE (nats) over `contexts` (N, T) in fp32, targets == ignore_id excluded.

    Returns (ce, number of targets counted).
    """
    model.eval()
    total, count = 0.0, 0
    for batch in contexts.split(EVAL_BATCH):
        logits = model(batch).logits[:, :-1].float()  # (B, T-1, V)
        targets = batch[:, 1:].clone()
        if ignore_id is not None:
            targets[targets == ignore_id] = -100  # cross_entropy's ignore_index
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += int((targets != -100).sum())
    return total / count, count


def unigram_cross_entropy(
    train: torch.Tensor, held_out: torch.Tensor, vocab_size: int, ignore_id: int | None
) -> float:
    """CE of the add-one-smoothed train unigram p(v) = (c_v + 1) / (N + V) on held-out targets.

    Same targets as `heldout_cross_entropy`: held_out[:, 1:] without ignore_id; counts skip it too.
    """
    tokens, targets = train.flatten(), held_out[:, 1:].flatten()
    if ignore_id is not None:
        tokens, targets = tokens[tokens != ignore_id], targets[targets != ignore_id]
    counts = torch.bincount(tokens, minlength=vocab_size).double()
    log_p = torch.log((counts + 1) / (counts.sum() + vocab_size))
    return float(-log_p[targets].mean())


def _save(
    out_dir: Path,
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    record: dict,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Write into a temp dir beside out_dir, then rename: out_dir is complete or absent."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = (tmp / "model.safetensors").read_bytes()
        record["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        (tmp / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        # mkdtemp makes the dir 0700 and safetensors writes 0600: make the build readable by all
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        os.rename(tmp, out_dir)  # replaces an empty out_dir; fails on a non-empty one
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and (out_dir / "build.json").exists():
            # a concurrent build of the same out_dir finished first: use it
            return _reuse(out_dir, LMSpec(**record["spec"]), log)
        raise
    log(f"stdlib LM: saved to {out_dir} in {record['seconds']:.0f} s")
    return record
