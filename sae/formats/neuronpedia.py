"""Neuronpedia's bulk-import layout (FORMATS.md), from an SAE, its feature table and the eval
contexts its top examples come from:

    <dir>/release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl
    <dir>/features/batch-<n>.jsonl.gz      one JSON object per latent
    <dir>/activations/batch-<n>.jsonl.gz   one per top example: its window's tokens and values

A feature's `maxActApprox` is its largest activation on the eval tokens, `frac_nonzero` its
firing frequency, `pos_/neg_str` and `_values` the tokens its decoder direction promotes and
suppresses most through the unembedding (logit lens), `freq_hist_data_*` the histogram of its
non-zero activations, `logits_hist_data_*` that of its logit-lens values, `topkCosSim*` its
nearest decoder directions. An activation record holds the example's window (`before` tokens,
the marked one, `after` tokens) with the feature's value at every token; the value at
`qualifyingTokenIndex` is the example's activation in the feature table's `examples`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.files import atomic_write, write_text
from sae.models.base import SAE, row_blocks, unit_rows

BATCH = 256
"""Features per `batch-<n>.jsonl.gz` file."""
BINS = 20
"""Bars of each histogram."""
NEIGHBOURS = 10
"""Nearest decoder directions per feature (`topkCosSimIndices`)."""
LOGITS = 10
"""Promoted and suppressed tokens per feature (`pos_str`, `neg_str`)."""


def source_id(layer: int, set_name: str) -> str:
    """Neuronpedia's source id: `<layer>-<source set name>`."""
    return f"{layer}-{set_name}"


def histogram(values: Tensor, bins: int = BINS) -> tuple[list[float], list[float]]:
    """(bar heights, bar centres) of `values`, `bins` equal bars over [min, max]."""
    if values.numel() == 0:
        return [], []
    lo, hi = values.min().item(), values.max().item()
    if hi <= lo:
        return [float(values.numel())], [lo]
    heights = torch.histc(values.float(), bins, lo, hi)
    width = (hi - lo) / bins
    return heights.tolist(), [lo + (i + 0.5) * width for i in range(bins)]


def scan(
    sae: SAE,
    contexts: Iterable[tuple[Tensor, Tensor, Tensor]],
    examples: list[list[dict[str, Any]]],
    before: int,
    after: int,
) -> tuple[dict[tuple[int, int], tuple[list[int], list[float], int]], list[Tensor]]:
    """One pass over `contexts` ((ids, excluded, acts) per batch of sequences, in the order the
    examples' `seq_id` counts): ({(feature, rank): (token ids, the feature's values, the
    example's index in them)} over each top example's window, [each latent's non-zero
    activations]). Excluded positions (BOS,
    outliers) get 0, as in training and in the feature table."""
    wanted: dict[int, list[tuple[int, int, int]]] = {}  # seq -> [(feature, rank, pos)]
    for feature, exs in enumerate(examples):
        for rank, ex in enumerate(exs):
            wanted.setdefault(int(ex["seq_id"]), []).append((feature, rank, int(ex["pos"])))
    found: dict[tuple[int, int], tuple[list[int], list[float], int]] = {}
    latents, values = [], []
    seq = 0
    with torch.no_grad():
        for all_ids, all_excluded, all_acts in contexts:
            # a few sequences at a time: never (tokens × d_sae) of a whole batch at once
            for rows in row_blocks(all_ids.shape[0], all_ids.shape[1] * sae.d_sae):
                ids, excluded = all_ids[rows], all_excluded[rows]
                f = sae.encode(all_acts[rows].flatten(0, 1).float()).view(*ids.shape, sae.d_sae)
                f[excluded] = 0
                nz = f.nonzero()  # (n, 3): sequence, position, latent
                latents.append(nz[:, 2])
                values.append(f[nz[:, 0], nz[:, 1], nz[:, 2]])
                for b in range(ids.shape[0]):
                    for feature, rank, pos in wanted.get(seq + b, []):
                        lo, hi = max(0, pos - before), min(ids.shape[1], pos + after + 1)
                        window = (ids[b, lo:hi].tolist(), f[b, lo:hi, feature].tolist(), pos - lo)
                        found[feature, rank] = window
                seq += ids.shape[0]
    latent, value = torch.cat(latents), torch.cat(values)
    order = latent.argsort(stable=True)
    counts = torch.bincount(latent, minlength=sae.d_sae).tolist()
    return found, list(value[order].split(counts))


def feature_records(
    sae: SAE,
    table: dict[str, list[Any]],
    unembed: Tensor | None,
    vocab: Callable[[int], str],
    nonzero: Callable[[int], Tensor],
    *,
    model_id: str,
    source: str,
    hook_name: str,
) -> Iterator[dict[str, Any]]:
    """One Neuronpedia feature object per latent (`table`: the feature table as columns;
    `nonzero(i)`: latent i's non-zero activations on the eval tokens)."""
    W_dec = sae.W_dec.detach().float()
    unit = unit_rows(W_dec)
    for block in row_blocks(sae.d_sae, sae.d_sae):  # all pairs (time ∝ d_sae²), in blocks
        rows = range(block.start, block.stop)
        sim = unit[block] @ unit.T  # (chunk, d_sae)
        sim[torch.arange(len(rows)), torch.tensor(rows)] = -2.0  # not itself
        near_v, near_i = sim.topk(min(NEIGHBOURS, sae.d_sae - 1), dim=1)
        lens = None if unembed is None else W_dec[block] @ unembed.float().T
        for j, i in enumerate(rows):
            record: dict[str, Any] = {
                "modelId": model_id,
                "layer": source,
                "index": str(i),
                "hookName": hook_name,
                "maxActApprox": float(table["max_act"][i]),
                "frac_nonzero": float(table["freq"][i]),
                "hasVector": False,
                "vector": [],
                "vectorDefaultSteerStrength": None,
                "topkCosSimIndices": near_i[j].tolist(),
                "topkCosSimValues": near_v[j].tolist(),
                "neuron_alignment_indices": [],
                "neuron_alignment_values": [],
                "neuron_alignment_l1": [],
                "correlated_neurons_indices": [],
                "correlated_neurons_pearson": [],
                "correlated_neurons_l1": [],
                "correlated_features_indices": [],
                "correlated_features_pearson": [],
                "correlated_features_l1": [],
                "decoder_weights_dist": [],
            }
            heights, centres = histogram(nonzero(i))
            record |= {"freq_hist_data_bar_heights": heights, "freq_hist_data_bar_values": centres}
            if lens is None:
                pos = neg = torch.zeros(0)
                pos_i = neg_i = torch.zeros(0, dtype=torch.long)
                heights, centres = [], []
            else:
                pos, pos_i = lens[j].topk(LOGITS)
                neg, neg_i = (-lens[j]).topk(LOGITS)
                neg = -neg
                heights, centres = histogram(lens[j])
            record |= {
                "pos_str": [vocab(t) for t in pos_i.tolist()],
                "pos_values": pos.tolist(),
                "neg_str": [vocab(t) for t in neg_i.tolist()],
                "neg_values": neg.tolist(),
                "logits_hist_data_bar_heights": heights,
                "logits_hist_data_bar_values": centres,
            }
            yield record


def activation_records(
    examples: list[list[dict[str, Any]]],
    found: dict[tuple[int, int], tuple[list[int], list[float], int]],
    vocab: Callable[[int], str],
    *,
    model_id: str,
    source: str,
    data_source: str,
) -> Iterator[dict[str, Any]]:
    """One Neuronpedia activation object per top example, in feature order."""
    for feature, exs in enumerate(examples):
        for rank, ex in enumerate(exs):
            ids, values, marked = found[feature, rank]
            top = max(range(len(values)), key=values.__getitem__)
            yield {
                "id": f"{model_id}@{source}:{feature}:{rank}",
                "modelId": model_id,
                "layer": source,
                "index": str(feature),
                "tokens": [vocab(t) for t in ids],
                "values": values,
                "maxValue": values[top],
                "maxValueTokenIndex": top,
                "minValue": min(values),
                "binMin": -1,
                "binMax": -1,
                "binContains": -1,
                "qualifyingTokenIndex": marked,  # the example's own token
                "dataIndex": str(ex["seq_id"]),
                "dataSource": data_source,
            }


def write_batches(dir: Path, records: Iterable[dict[str, Any]], key: Callable[[dict], int]) -> int:
    """`dir/batch-<n>.jsonl.gz`, n = key(record) // BATCH (records come in key order); returns
    how many files."""
    dir.mkdir(parents=True, exist_ok=True)
    files, lines, current = 0, [], None

    def flush(n: int, lines: list[str]) -> None:
        data = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
        atomic_write(dir / f"batch-{n}.jsonl.gz", lambda tmp: Path(tmp).write_bytes(data))

    for record in records:
        n = key(record) // BATCH
        if current is not None and n != current and lines:
            flush(current, lines)
            files, lines = files + 1, []
        current = n
        lines.append(json.dumps(record))
    if lines and current is not None:
        flush(current, lines)
        files += 1
    return files


def write_jsonl(path: Path, record: dict[str, Any]) -> None:
    write_text(path, json.dumps(record) + "\n")
