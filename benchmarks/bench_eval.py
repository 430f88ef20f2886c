"""Evaluation cost per SAE in full forward passes per token (issue 5; DESIGN §9).

The model is the builtin default's architecture (GPT-2, 4 blocks × 128, vocab 4096, contexts of
256), randomly initialised: cost does not depend on the weights. One unit = the wall time of one
plain forward pass over the evaluation contexts. Measured in the same run:

    direct         what peers do: a full forward for the clean loss, one with the SAE spliced in
                   and one with the hook zeroed (the baselines recomputed for every SAE): 3 units
    ours, 1 SAE    `evaluate_sae` (prefix to the hook, clean suffix for KL, SAE suffix), with the
                   baselines (`ce_baselines`) computed once per evaluation set and not counted
    ours, 4 SAEs   `evaluate_saes` on four SAEs at once, per SAE (prefix and clean suffix shared)

Target: ≤ 1.0 unit per SAE. `ce_baselines` is reported too (once per set: prefix twice, three
suffixes).

    python benchmarks/bench_eval.py         # writes the Evaluation section of BENCHMARKS.md
"""

from __future__ import annotations

import datetime

import torch
from benchmd import cpu, main, timed
from transformers import GPT2Config, GPT2LMHeadModel

from sae.analysis.evaluate import ce_baselines, evaluate_sae, evaluate_saes
from sae.lm.hooks import HookPoint, next_token_ce, spliced
from sae.models.registry import build_sae

START, END = "<!-- bench_eval:start -->", "<!-- bench_eval:end -->"
T, BATCH, N_CTX, VOCAB = 256, 16, 64, 4096


def run(repeats: int) -> str:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=T, vocab_size=VOCAB)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (N_CTX, T), generator=g)
    ids[:, 0] = 0
    contexts = [(ids[i : i + BATCH], ids[i : i + BATCH] == 0) for i in range(0, N_CTX, BATCH)]
    saes = [build_sae("relu", 128, 1024, seed=s) for s in range(4)]
    unit = timed(lambda: [next_token_ce(model, c) for c, _ in contexts], repeats)
    rows = []
    for layer in (0, 2):
        hp = HookPoint(layer, "resid_post")
        base = ce_baselines(model, hp, contexts)

        def direct(hp: HookPoint = hp) -> None:
            for c, special in contexts:
                keep = ~special
                next_token_ce(model, c)
                with spliced(model, hp, lambda a, k=keep: a * ~k.unsqueeze(-1)):
                    next_token_ce(model, c)
                with spliced(model, hp, lambda a: saes[0].decode(saes[0].encode(
                        a.flatten(0, 1))).view_as(a)):  # fmt: skip
                    next_token_ce(model, c)

        ours_1 = timed(lambda hp=hp, base=base: evaluate_sae(model, hp, saes[0], contexts, base),
                       repeats)  # fmt: skip
        ours_4 = timed(lambda hp=hp, base=base: evaluate_saes(model, hp, saes, contexts, base),
                       repeats) / 4  # fmt: skip
        rows.append(
            (
                hp.name,
                timed(direct, repeats) / unit,
                ours_1 / unit,
                ours_4 / unit,
                timed(lambda hp=hp: ce_baselines(model, hp, contexts), repeats) / unit,
            )
        )
        print(rows[-1], flush=True)
    lines = [
        START,
        "## Evaluation (`python benchmarks/bench_eval.py`)",
        "",
        f"{datetime.date.today()} · {cpu()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. GPT-2 4 × 128, vocab {VOCAB}, {N_CTX} contexts of "
        f"{T}, batch {BATCH}; relu SAEs d_sae 1024. Unit: one full forward over the contexts "
        f"({unit:.2f} s); medians of {repeats}. Metrics per SAE: reconstruction, ce_sae, kl, "
        "loss recovered (zero and mean ablation).",
        "",
        "| hook | direct (3 forwards) | **ours, 1 SAE** | **ours, per SAE of 4** | "
        "baselines, once per set |",
        "|---|---|---|---|---|",
        *(f"| {h} | {d:.2f} | **{o1:.2f}** | **{o4:.2f}** | {b:.2f} |" for h, d, o1, o4, b in rows),
        "",
        "Target: ≤ 1.0 forward per token per SAE. A hook deeper in the model leaves fewer blocks "
        "to run after it; here the unembedding (128 × 4096) is as costly as two blocks and runs "
        "in every suffix.",
        END,
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main(__doc__, run, START, END, repeats=3)
