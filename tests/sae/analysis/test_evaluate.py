"""eval/* metrics against a direct computation on a tiny GPT-2 and a random SAE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from sae.analysis.evaluate import ce_baselines, evaluate_sae, evaluate_saes
from sae.lm.hooks import HookPoint
from sae.models.registry import build_sae

T, D, V = 12, 16, 40


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = (
        GPT2LMHeadModel(
            GPT2Config(
                n_layer=2,
                n_embd=D,
                n_head=2,
                n_positions=T,
                vocab_size=V,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
        .eval()
        .double()
    )
    ids = torch.randint(1, V, (6, T))
    ids[:, 0] = 0  # BOS: special, never spliced
    ids[2, 5] = 0  # an EOS inside a context
    special = ids == 0
    sae = build_sae("relu", D, 32, seed=1).double()  # float64 throughout: an exact reference
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return model, ids, special, sae


def _logits(model, ids, replace=None) -> torch.Tensor:
    """Reference: a full forward with a hand-registered hook on block 0's output."""
    h = None
    if replace is not None:
        h = model.transformer.h[0].register_forward_hook(lambda m, a, out: replace(out))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        if h is not None:
            h.remove()


def _ce(model, ids, replace=None) -> float:
    logits = _logits(model, ids, replace)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).item()


def test_metrics_equal_direct_computation(setup) -> None:
    model, ids, special, sae = setup
    keep = (~special).unsqueeze(-1)
    contexts = [(ids[:3], special[:3]), (ids[3:], special[3:])]
    base = ce_baselines(model, HookPoint(0, "resid_post"), contexts)
    got = evaluate_sae(model, HookPoint(0, "resid_post"), sae, contexts, base)

    with torch.no_grad():
        x_all = model(ids, output_hidden_states=True).hidden_states[1]  # block 0's output
        x = x_all[~special]  # (N, D)
        f = sae.encode(x)
        x_hat = sae.decode(f)

    def splice(out):
        full = out.clone()
        full[~special] = sae.decode(sae.encode(out[~special]))
        return full

    mean = x_all[~special].mean(0)
    ce_clean, ce_zero, ce_sae, ce_mean = (
        _ce(model, ids),
        _ce(model, ids, lambda o: o * ~keep),
        _ce(model, ids, splice),
        _ce(model, ids, lambda o: torch.where(keep, mean, o)),
    )
    p = _logits(model, ids)[:, :-1].log_softmax(-1)  # clean
    q = _logits(model, ids, splice)[:, :-1].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()  # KL(p_clean ‖ p_sae)
    reverse = (q.exp() * (q - p)).sum(-1).mean().item()
    x, x_hat = x.double(), x_hat.double()
    err = (x - x_hat).pow(2).sum()
    want = {
        "ce_clean": ce_clean,
        "ce_zero": ce_zero,
        "ce_sae": ce_sae,
        "ce_mean": ce_mean,
        "loss_recovered": (ce_zero - ce_sae) / (ce_zero - ce_clean),
        "loss_recovered_mean": (ce_mean - ce_sae) / (ce_mean - ce_clean),
        "kl": kl,
        "delta_ce": ce_sae - ce_clean,
        "mse": (err / x.numel()).item(),
        "fvu": (err / (x - x.mean(0)).pow(2).sum()).item(),
        "explained_variance": 1 - (err / (x - x.mean(0)).pow(2).sum()).item(),
        "l0": (f > 0).float().sum(1).mean().item(),
        "dead_frac": ((f > 0).sum(0) == 0).float().mean().item(),
        "tokens": float(x.shape[0]),
    }
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got["ce_clean"] < got["ce_zero"]
    assert got["kl"] > 0 and got["kl"] != pytest.approx(reverse, rel=1e-3)  # the direction


def test_baselines_do_not_depend_on_the_sae(setup) -> None:
    model, ids, special, sae = setup
    contexts = [(ids, special)]
    base = ce_baselines(model, HookPoint(0, "resid_post"), contexts)
    other = build_sae("topk", D, 32, k=4, seed=2).double()
    a = evaluate_sae(model, HookPoint(0, "resid_post"), sae, contexts, base)
    b = evaluate_sae(model, HookPoint(0, "resid_post"), other, contexts, base)
    assert a["ce_clean"] == b["ce_clean"] and a["ce_zero"] == b["ce_zero"]
    assert b["l0"] == pytest.approx(4.0, abs=0.5)


def test_many_saes_in_one_pass_equal_one_at_a_time(setup) -> None:
    model, ids, special, sae = setup
    contexts = [(ids[:3], special[:3]), (ids[3:], special[3:])]
    hp = HookPoint(1, "resid_pre")
    base = ce_baselines(model, hp, contexts)
    saes = [sae, build_sae("topk", D, 32, k=4, seed=2).double()]
    together = evaluate_saes(model, hp, saes, contexts, base)
    for s, got in zip(saes, together, strict=True):
        alone = evaluate_sae(model, hp, s, contexts, base)
        assert got == pytest.approx(alone, rel=1e-12)
