"""Steering on a planted case: a feature whose decoder direction is a token's unembedding."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sae.analysis.steer import generate, intervention, next_token_probs
from sae.lm.hooks import HookPoint
from sae.models.registry import build_sae

D, V, TARGET, FEATURE = 32, 50, 7, 3


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=D, n_head=2, n_positions=32, vocab_size=V,
                     tie_word_embeddings=False)  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    sae = build_sae("relu", D, 16, seed=0)
    with torch.no_grad():  # feature 3 writes token 7's unembedding; it reads the same direction
        model.lm_head.weight[TARGET] *= 20  # a token the model can be pushed to say outright
        u = model.lm_head.weight[TARGET] - model.lm_head.weight.mean(0)
        sae.W_dec[FEATURE] = u / u.norm()
        sae.W_enc[:, FEATURE] = u / u.norm()
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    return model, sae, ids


def test_adding_the_feature_raises_its_token(planted) -> None:
    model, sae, ids = planted
    hp = HookPoint(1, "resid_post")  # the last block: the direction goes straight to the logits
    steer = intervention(sae, FEATURE, "add", 50.0)
    before = next_token_probs(model, ids)[:, TARGET]
    after = next_token_probs(model, ids, hp, steer)[:, TARGET]
    assert (after > 0.5).all() and (after > 10 * before).all()
    steered = generate(model, ids, 4, hp, steer)
    plain = generate(model, ids, 4)
    assert (steered == TARGET).all() and not (plain == TARGET).all()
    assert torch.equal(generate(model, ids, 4), plain)  # greedy: deterministic, hook removed


def test_clamp_sets_the_feature_and_keeps_the_error(planted) -> None:
    _, sae, _ = planted
    x = torch.randn(5, D) + 2 * sae.W_dec[FEATURE].detach()
    for value in (0.0, 4.0):
        y = intervention(sae, FEATURE, "clamp", value)(x)
        f = sae.encode(x)[:, FEATURE]
        torch.testing.assert_close(y - x, (value - f)[:, None] * sae.W_dec[FEATURE].detach())
    assert (sae.encode(intervention(sae, FEATURE, "clamp", 0.0)(x))[:, FEATURE] <
            sae.encode(x)[:, FEATURE]).all()  # fmt: skip


def test_bad_steering_requests_are_named(planted) -> None:
    _, sae, _ = planted
    with pytest.raises(ValueError, match=r"feature 16 is not in 0..15"):
        intervention(sae, 16, "add", 1.0)
    with pytest.raises(ValueError, match="mode 'push' is not one of add, clamp"):
        intervention(sae, 0, "push", 1.0)
