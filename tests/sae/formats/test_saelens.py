"""SAELens's format, both ways, checked with the real `sae_lens` package: every saeflow
architecture exported and loaded by `sae_lens.SAE.load_from_disk` computes the same f and x̂;
SAELens directories (written by sae_lens itself) load into saeflow with the same f and x̂."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE as LensSAE

from sae.formats import saelens
from sae.formats.hooks import from_transformer_lens, to_transformer_lens
from sae.formats.load import detect, load_any
from sae.models.base import SAE
from sae.models.registry import build_sae

D_IN, D_SAE = 16, 48
ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka", "matryoshka-batch"]
EXPORTED = {"matryoshka": "topk", "matryoshka-batch": "jumprelu"}
"""The SAELens architecture of each case, where it is not `saelens.ARCHITECTURE[arch]`."""


def random_sae(case: str, seed: int = 0) -> SAE:
    """An SAE with every parameter random (b_dec and b_enc far from 0), so a bias folded the
    wrong way, or applied to the wrong side, shows. `matryoshka-batch`: matryoshka_topk=batch."""
    arch, _, topk = case.partition("-")
    hp = {"k": 5} if arch in ("topk", "batchtopk", "matryoshka") else {}
    if topk:
        hp["matryoshka_topk"] = topk
    sae = build_sae(arch, D_IN, D_SAE, seed=seed, **hp)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name != "b_dec" else 2.0))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g))
        if sae.encodes_as == "batchtopk":
            sae.threshold.fill_(0.7)
    return sae.eval()


def x(n: int = 256) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(7)) * 3 + 1


def export(sae: SAE, dir: Path) -> dict:
    return saelens.export(
        sae,
        dir,
        model_name="tiny",
        hook="blocks.1.resid_post",
        context_size=64,
        prepend_bos=True,
        dataset_path="saeflow:stdlib",
        log10_frequency=torch.linspace(-5, -1, D_SAE),
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_lens_loads_every_export_with_the_same_f_and_x_hat(tmp_path: Path, arch: str) -> None:
    sae = random_sae(arch)
    cfg = export(sae, tmp_path)
    lens = LensSAE.load_from_disk(tmp_path)
    xs = x()
    f = sae.encode(xs)
    with torch.no_grad():
        f_lens = lens.encode(xs)
        x_hat_lens = lens.decode(f_lens)
    assert (f > 0).float().mean() > 0.02  # the comparison is not of zeros
    torch.testing.assert_close(f_lens, f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat_lens, sae.decode(f), atol=1e-4, rtol=1e-5)
    assert cfg["architecture"] == (EXPORTED.get(arch) or saelens.ARCHITECTURE[arch])
    assert lens.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert lens.cfg.metadata.model_name == "tiny"
    assert lens.cfg.metadata.context_size == 64
    assert lens.cfg.normalize_activations == "none"


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_through_saelens_keeps_f_and_x_hat(tmp_path: Path, arch: str) -> None:
    sae = random_sae(arch)
    export(sae, tmp_path)
    assert detect(tmp_path) == "saelens"
    back = load_any(tmp_path)
    xs = x()
    torch.testing.assert_close(back.sae.encode(xs), sae.encode(xs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.sae(xs).x_hat, sae(xs).x_hat, atol=1e-4, rtol=1e-5)
    assert back.hook == "blocks.1.resid_post" and back.format == "saelens"


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_written_directories_load_with_the_same_f_and_x_hat(
    tmp_path: Path, arch: str, apply_b_dec: bool
) -> None:
    """A directory written by sae_lens's own `save_model`, either side of apply_b_dec_to_input."""
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    kinds = {
        "standard": (StandardSAE, StandardSAEConfig, {}),
        "topk": (TopKSAE, TopKSAEConfig, {"k": 6}),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    }
    cls, cfg_cls, extra = kinds[arch]
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec, **extra)
    cfg.metadata.hook_name = "blocks.0.hook_mlp_out"
    lens = cls(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if arch == "jumprelu":
            lens.threshold.copy_(torch.rand(D_SAE, generator=g))
    lens.save_model(tmp_path)
    got = load_any(tmp_path)
    xs = x()
    with torch.no_grad():
        f_lens = lens.encode(xs)
        x_hat_lens = lens.decode(f_lens)
    assert (f_lens > 0).float().mean() > 0.02
    torch.testing.assert_close(got.sae.encode(xs), f_lens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sae.decode(got.sae.encode(xs)), x_hat_lens, atol=1e-4, rtol=1e-5)
    assert got.sae.arch == saelens.IMPORTED[arch]
    assert got.hook == "blocks.0.mlp_out"


def test_sparsity_file_holds_log10_frequency(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    export(random_sae("topk"), tmp_path)
    sparsity = load_file(str(tmp_path / saelens.SPARSITY))["sparsity"]
    torch.testing.assert_close(sparsity, torch.linspace(-5, -1, D_SAE))


@pytest.mark.parametrize("arch", ["topk", "matryoshka"])
def test_a_top_k_above_a_threshold_is_not_exported(tmp_path: Path, arch: str) -> None:
    """TopK_k'(z)·1[z > θ] (sae.k_train_factor > 1) is neither SAELens's TopK nor its JumpReLU."""
    sae = random_sae(arch)
    sae.threshold.fill_(0.7)
    with pytest.raises(
        ValueError, match=r"top 5 of each token above a learnt threshold 0\.7.*k_train_factor"
    ):
        export(sae, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_saelens_configs_are_named(tmp_path: Path) -> None:
    export(random_sae("relu"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for change, said in [
        ({"architecture": "gated"}, "SAELens architecture 'gated' is not supported"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ({"d_sae": D_SAE + 1}, "W_enc has shape"),
    ]:
        (tmp_path / "cfg.json").write_text(json.dumps(cfg | change))
        with pytest.raises(ValueError, match=said):
            load_any(tmp_path)


def test_hook_names_translate_both_ways() -> None:
    assert to_transformer_lens("blocks.3.resid_post") == "blocks.3.hook_resid_post"
    assert from_transformer_lens("blocks.3.hook_resid_post") == "blocks.3.resid_post"
    assert from_transformer_lens("blocks.0.mlp_out") == "blocks.0.mlp_out"
    with pytest.raises(ValueError, match=r"hook 'blocks\.3\.hook_z' has no saeflow equivalent"):
        from_transformer_lens("blocks.3.hook_z")


def test_a_hub_id_that_cannot_be_fetched_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real huggingface_hub download path, offline here: the error names the SAE."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError, match=r"cannot download the SAE 'no-one/no-saes:l6/w16k'"
    ):
        load_any("no-one/no-saes:l6/w16k")
    with pytest.raises(FileNotFoundError, match=r"neither a directory nor a Hub id"):
        load_any("not a path or id")
