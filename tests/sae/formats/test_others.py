"""sparsify checkpoints (written by the real `sparsify` package) and dictionary_learning `ae.pt`
state dicts (in the layout of its classes) load as saeflow SAEs with the same f and x̂."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae.formats.load import detect, load_any

D_IN, D_SAE = 16, 48


def x(n: int = 256) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(7)) * 3 + 1


def test_sparsify_checkpoint_loads_with_the_same_f_and_x_hat(tmp_path: Path) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=6))
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    coder.save_to_disk(tmp_path / "layers.3")
    assert detect(tmp_path / "layers.3") == "sparsify"
    got = load_any(tmp_path / "layers.3")
    xs = x()
    with torch.no_grad():
        enc = coder.encode(xs)
        x_hat = coder.decode(enc.top_acts, enc.top_indices)
    f = torch.zeros(len(xs), D_SAE).scatter_(1, enc.top_indices, enc.top_acts)
    assert got.sae.arch == "topk" and got.sae.k == 6 and got.hook is None
    torch.testing.assert_close(got.sae.encode(xs), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sae(xs).x_hat, x_hat, atol=1e-4, rtol=1e-5)


def dictionary_learning_dir(dir: Path, cls: str, **extra: object) -> dict[str, torch.Tensor]:
    """An `ae.pt` + `config.json` as dictionary_learning saves the class `cls` (its tensor names
    and shapes: `encoder` and `decoder` nn.Linear, `bias` or `b_dec`, `threshold`, `k`)."""
    g = torch.Generator().manual_seed(2)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.5  # noqa: E731
    if cls == "JumpReluAutoEncoder":
        state = {"W_enc": r(D_IN, D_SAE), "b_enc": r(D_SAE), "W_dec": r(D_SAE, D_IN),
                 "b_dec": r(D_IN), "threshold": torch.rand(D_SAE, generator=g)}  # fmt: skip
    else:
        state = {"encoder.weight": r(D_SAE, D_IN), "encoder.bias": r(D_SAE),
                 "decoder.weight": r(D_IN, D_SAE)}  # fmt: skip
        state |= {"bias": r(D_IN)} if cls == "AutoEncoder" else {"b_dec": r(D_IN)}
        if cls != "AutoEncoder":
            state |= {"k": torch.tensor(6), "threshold": torch.tensor(0.4)}
    dir.mkdir()
    torch.save(state, dir / "ae.pt")
    trainer = {"dict_class": cls, "activation_dim": D_IN, "dict_size": D_SAE, **extra}
    (dir / "config.json").write_text(json.dumps({"trainer": trainer}))
    return state


@pytest.mark.parametrize(
    ("cls", "apply_b_dec"),
    [
        ("AutoEncoder", False),
        ("AutoEncoderTopK", False),
        ("BatchTopKSAE", False),
        ("JumpReluAutoEncoder", False),
        ("JumpReluAutoEncoder", True),
    ],
)
def test_dictionary_learning_loads_with_the_same_f_and_x_hat(
    tmp_path: Path, cls: str, apply_b_dec: bool
) -> None:
    """Against dictionary_learning 0.1.0's encode (read from the wheel on PyPI; the package
    itself pulls nnsight 0.3 and is not installed here)."""
    s = dictionary_learning_dir(tmp_path / "ae", cls, k=6, apply_b_dec_to_input=apply_b_dec)
    got = load_any(tmp_path / "ae")
    assert got.format == "dictionary_learning"
    xs = x()
    if cls == "JumpReluAutoEncoder":  # their encode: ReLU(pre·1[pre > θ])
        pre = (xs - s["b_dec"] * apply_b_dec) @ s["W_enc"] + s["b_enc"]
        f = pre.relu() * (pre > s["threshold"])
        b_dec, W_dec = s["b_dec"], s["W_dec"]
    else:
        b_dec = s["bias"] if cls == "AutoEncoder" else s["b_dec"]
        z = ((xs - b_dec) @ s["encoder.weight"].T + s["encoder.bias"]).relu()
        if cls == "AutoEncoderTopK":
            vals, idx = z.topk(6, dim=-1)
            f = torch.zeros_like(z).scatter_(1, idx, vals)
        elif cls == "BatchTopKSAE":
            f = z * (z > s["threshold"])
        else:
            f = z
        W_dec = s["decoder.weight"].T
    assert (f > 0).float().mean() > 0.02
    torch.testing.assert_close(got.sae.encode(xs), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sae(xs).x_hat, f @ W_dec + b_dec, atol=1e-4, rtol=1e-5)


def test_unknown_dictionary_class_and_pickles_are_refused(tmp_path: Path) -> None:
    dictionary_learning_dir(tmp_path / "gated", "GatedAutoEncoder")
    with pytest.raises(ValueError, match="dictionary class 'GatedAutoEncoder' is not supported"):
        load_any(tmp_path / "gated")
    (tmp_path / "evil").mkdir()
    torch.save({"W": object()}, tmp_path / "evil" / "ae.pt")  # needs pickle to load
    with pytest.raises(ValueError, match="is not a weights-only torch state dict"):
        load_any(tmp_path / "evil")
