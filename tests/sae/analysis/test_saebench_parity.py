"""eval.protocol=saebench against SAELens's own evaluation code (`sae_lens.evals`), on the same
SAE (exported to SAELens and loaded by it), the same model (the tiny builtin GPT-2, converted to
a TransformerLens HookedTransformer) and the same eval tokens: mse, explained variance, L0, CE
with and without the SAE, CE zero-ablated, KL and the CE score agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


class TokenBatches:
    """The eval cache's contexts, one batch per call, as SAELens's evals ask an activation store
    for them (`get_batch_tokens`)."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = iter(batches)

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        return next(self.batches)


def hooked(path: str):
    """The HF GPT-2 at `path` as a TransformerLens HookedTransformer (the same weights)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
        original_architecture="GPT2LMHeadModel", default_prepend_bos=False,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return model.eval(), hf


def test_saebench_protocol_matches_sae_lens_evals(study, tiny_model, tmp_path: Path) -> None:
    from sae_lens import SAE as LensSAE
    from sae_lens.evals import (
        get_downstream_reconstruction_metrics,
        get_sparsity_and_variance_metrics,
    )
    from sae_lens.training.activation_scaler import ActivationScaler

    from sae.activations.cache import Manifest, sequences
    from sae.analysis.evaluate import ce_baselines, evaluate_saes
    from sae.formats import saelens
    from sae.lm.hooks import parse_hook
    from sae.models.registry import load_sae

    sae = load_sae(Path(study["trained"]["checkpoint"]))
    saelens.export(
        sae, tmp_path, model_name="tiny", hook="blocks.0.resid_post", context_size=64,
        prepend_bos=True, dataset_path="saeflow:stdlib",
    )  # fmt: skip
    lens = LensSAE.load_from_disk(tmp_path)
    eval_dir = Path(study["eval_cache"]["dir"])
    special_ids = Manifest.load(eval_dir).special_token_ids
    batches = [ids for ids, _, _ in sequences(eval_dir, "blocks.0.resid_post", 8)]
    tl, hf = hooked(tiny_model["path"])
    with torch.no_grad():  # the converted model is the same model
        torch.testing.assert_close(tl(batches[0]), hf(batches[0]).logits, atol=2e-4, rtol=1e-4)

    special = torch.tensor(special_ids)
    contexts = [(ids, torch.isin(ids, special)) for ids in batches]
    assert any(bool(k.any()) for _, k in contexts)  # BOS is there to be masked
    hp = parse_hook(hf, "blocks.0.resid_post")
    base = ce_baselines(hf, hp, contexts, protocol="saebench")
    ours = evaluate_saes(hf, hp, [sae], contexts, base, protocol="saebench")[0]

    scaler = ActivationScaler()
    down = get_downstream_reconstruction_metrics(
        lens, tl, TokenBatches(batches), scaler, compute_kl=True, compute_ce_loss=True,
        n_batches=len(batches), eval_batch_size_prompts=8, ignore_tokens=special_ids,
    )  # fmt: skip
    sparse, _ = get_sparsity_and_variance_metrics(
        lens, tl, TokenBatches(batches), scaler, n_batches=len(batches), compute_l2_norms=False,
        compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True, eval_batch_size_prompts=8, model_kwargs={},
        ignore_tokens=special_ids,
    )  # fmt: skip
    pairs = {
        "mse": (ours["mse"], sparse["mse"]),
        "explained_variance": (ours["explained_variance"], sparse["explained_variance"]),
        "l0": (ours["l0"], sparse["l0"]),
        "ce_clean": (ours["ce_clean"], down["ce_loss_without_sae"]),
        "ce_sae": (ours["ce_sae"], down["ce_loss_with_sae"]),
        "ce_zero": (ours["ce_zero"], down["ce_loss_with_ablation"]),
        "kl": (ours["kl"], down["kl_div_with_sae"]),
        "loss_recovered": (ours["loss_recovered"], down["ce_loss_score"]),
    }
    print({k: (round(a, 6), round(b, 6)) for k, (a, b) in pairs.items()})
    for name, (a, b) in pairs.items():
        assert a == pytest.approx(b, rel=1e-4, abs=2e-5), name
