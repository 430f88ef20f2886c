"""SAE architectures, the registry, save/load and fold_scale (sae/base, relu, topk, models)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from sae.models import topk as topk_module
from sae.models.base import SAE, reusing_buffers
from sae.models.registry import ARCHS, build_sae, hparam_names, load_sae
from sae.models.relu import ReluSAE
from sae.models.topk import TopKSAE
from sae.training.fit import train_step

D_IN, D_SAE = 16, 64
HPARAMS = {
    "relu": {"l1_coeff": 2.0},
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "jumprelu": {"l1_coeff": 1.0},
    "matryoshka": {"k": 4},
}


def make(arch: str, **hp) -> SAE:
    sae = build_sae(arch, D_IN, D_SAE, seed=0, **(HPARAMS[arch] | hp))
    with torch.no_grad():  # a trained-looking SAE: non-zero biases
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 1.0)
    return sae


def data(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) + 0.5


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_shapes_and_consistency(arch: str) -> None:
    sae = make(arch).eval()
    x = data()
    out = sae(x)
    assert out.x_hat.shape == (32, D_IN) and out.f.shape == (32, D_SAE)
    assert out.loss.shape == out.mse.shape == out.aux.shape == ()
    assert (out.f >= 0).all()
    torch.testing.assert_close(out.f, sae.encode(x))
    torch.testing.assert_close(out.x_hat, sae.decode(out.f), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mse, ((x - out.x_hat) ** 2).sum(-1).mean() / D_IN)


@pytest.mark.parametrize("unit", [True, False])
def test_topk_exactly_k_nonzeros_and_decoder_norms_after_step(unit: bool) -> None:
    """`unit_decoder`: the rows stay at norm 1; by default (False) Adam moves their norms."""
    sae = make("topk", unit_decoder=unit)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: TopK keeps exactly k
    x = data()
    assert ((sae.encode(x) != 0).sum(-1) == 4).all()
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    train_step(sae, opt, x, 1.0, grad_clip=1.0, bf16=False)
    norms = sae.W_dec.norm(dim=-1)
    if unit:
        torch.testing.assert_close(norms, torch.ones(D_SAE))
    else:
        assert (norms - 1).abs().max() > 1e-3


def test_topk_keeps_top_k_then_relu() -> None:
    sae = make("topk").eval()
    x = data()
    z = sae.pre_acts(x)
    f = sae.encode(x)
    kth = z.topk(4, dim=-1).values[:, -1:]
    torch.testing.assert_close(f, torch.where(z >= kth, z.relu(), torch.zeros_like(z)))


def test_topk_before_step_removes_parallel_gradient() -> None:
    sae = make("topk", unit_decoder=True).train()
    sae(data()).loss.backward()
    sae.before_step()
    along = (sae.W_dec.grad * sae.W_dec).sum(-1)  # rows are unit: the parallel component
    assert along.abs().max() < 1e-6
    free = make("topk").train()  # unit_decoder False: the hooks change nothing
    free(data()).loss.backward()
    grad, w = free.W_dec.grad.clone(), free.W_dec.detach().clone()
    free.before_step()
    free.after_step()
    assert torch.equal(free.W_dec.grad, grad) and torch.equal(free.W_dec, w)
    assert (grad * w).sum(-1).abs().max() > 1e-4  # there was a parallel component to keep


def test_topk_auxk_trains_dead_latents_only() -> None:
    sae = make("topk", dead_tokens=64, aux_k=8).train()
    with torch.no_grad():
        sae.b_enc[32:] = 100.0  # latents 0..31 never make the top k, though often positive
    x = data(64)
    assert sae(x).aux == 0  # nothing can be dead before 64 training tokens
    dead = sae.tokens_since_fired >= 64
    assert dead[:32].all()
    out = sae(x)
    assert out.aux > 0
    out.aux.backward()
    g = sae.W_dec.grad.abs().sum(-1)  # (d_sae,)
    assert g[:32].sum() > 0  # AuxK reconstructs the residual with dead latents...
    assert (g[~dead] == 0).all()  # ...and only with them


@pytest.mark.parametrize(
    ("aux_k", "aux_dense"),
    [(8, 0), (8, 8), (64, 8)],
    ids=["auxk-gathered", "auxk-dense-top8", "auxk-dense-every-dead"],
)
def test_topk_sparse_gradients_match_the_dense_formula(
    aux_k: int, aux_dense: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SparseGather's backward (only the picked latents, main and AuxK) equals autograd's dense
    one, in float64, with AuxK on: ~32 dead latents taken by the sparse gather (AUX_DENSE 0), as
    a dense sub-dictionary keeping each token's top 8, and with aux_k above #dead (all kept)."""
    monkeypatch.setattr(topk_module, "AUX_DENSE", aux_dense)
    sae = make("topk", dead_tokens=64, aux_k=aux_k).double().train()
    with torch.no_grad():
        sae.b_enc[32:] += 3.0  # latents 0..31 rarely picked: dead after the first batch
    x = data(64).double()
    sae(x)
    dead = sae.tokens_since_fired >= 64
    assert dead.any()
    out = sae(x)
    out.loss.backward()
    fast = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc

    def decode(z: torch.Tensor, k: int) -> torch.Tensor:
        vals, idx = z.topk(k, dim=-1)
        return torch.zeros_like(z).scatter(-1, idx, vals.relu()) @ sae.W_dec

    x_hat = decode(z, 4) + sae.b_dec
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    e = (x - x_hat).detach()
    assert 8 < int(dead.sum()) < 64
    e_hat = decode(z.masked_fill(~dead, float("-inf")), min(aux_k, int(dead.sum())))
    aux = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    (fvu + sae.aux_coeff * aux).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, fast[name], rtol=1e-9, atol=1e-12)


def test_topk_pre_activations_reuse_one_buffer_per_thread_inside_the_block() -> None:
    """Inside `reusing_buffers` (the trainer's loop) z of each step lands in storage the thread
    keeps (no fresh (N, d_sae) block per step) and equals a plain addmm (under CPU bf16 autocast
    too); another thread's is its own; outside the block each z is fresh."""
    sae = make("topk").train()
    x = data(64)
    want = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
    with reusing_buffers():
        z1, _ = sae.pre_acts_sparse(x)
        torch.testing.assert_close(z1, want)
        z2, _ = sae.pre_acts_sparse(x + 1)
        assert z2.data_ptr() == z1.data_ptr()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            zb, _ = sae.pre_acts_sparse(x)
            wb = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
        assert zb.dtype == wb.dtype == torch.bfloat16
        torch.testing.assert_close(zb, wb)
        other: list[int] = []

        def in_thread() -> None:
            with reusing_buffers():
                other.append(sae.pre_acts_sparse(x)[0].data_ptr())

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        assert other and other[0] != z1.data_ptr()
    z3, _ = sae.pre_acts_sparse(x)
    z4, _ = sae.pre_acts_sparse(x)
    assert z3.data_ptr() != z4.data_ptr()
    torch.testing.assert_close(z4, want)


def test_topk_loss_is_fvu_without_dead_latents() -> None:
    sae = make("topk", dead_tokens=10**9).train()
    x = data()
    out = sae(x)
    assert out.aux == 0
    torch.testing.assert_close(
        out.loss, ((x - out.x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    )


def test_relu_sparsity_term_is_decoder_norm_weighted_l1() -> None:
    sae = make("relu").train()
    x = data()
    out = sae(x, sparsity_scale=0.5)
    f = torch.relu(x @ sae.W_enc + sae.b_enc)  # no b_dec subtracted at the input
    norms = sae.W_dec.norm(dim=-1)
    by_hand = sum(f[:, i] * norms[i] for i in range(D_SAE)).mean()
    torch.testing.assert_close(out.aux, by_hand)
    recon = ((x - out.x_hat) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.loss, recon + 2.0 * 0.5 * by_hand)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)  # f is unchanged, the penalty triples
    torch.testing.assert_close(sae(x).aux, 3.0 * by_hand)


def test_relu_init_tied_small_decoder() -> None:
    sae = build_sae("relu", D_IN, D_SAE, seed=1, init_norm=0.1)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((D_SAE,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fold_scale_gives_same_latents_on_raw_inputs(arch: str) -> None:
    sae = make(arch).eval()
    s, x = 7.5, data()
    with torch.no_grad():
        f_scaled, x_hat_scaled = sae.encode(s * x), sae(s * x).x_hat
        sae.fold_scale(s)
        torch.testing.assert_close(sae.encode(x), f_scaled, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x).x_hat, x_hat_scaled / s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_save_load_round_trip_is_bit_exact(arch: str, tmp_path) -> None:
    sae = make(arch).eval()
    sae.save(tmp_path / "ckpt", meta={"hook": "blocks.2.resid_post"})
    cfg = json.loads((tmp_path / "ckpt" / "cfg.json").read_text())
    assert (
        cfg["arch"] == arch and cfg["d_in"] == D_IN and cfg["meta"]["hook"] == "blocks.2.resid_post"
    )
    loaded = load_sae(tmp_path / "ckpt")
    assert type(loaded) is type(sae) and loaded.config() == sae.config()
    assert not loaded.training
    x = data()
    a, b = sae(x), loaded(x)
    assert torch.equal(a.f, b.f) and torch.equal(a.x_hat, b.x_hat)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.*cfg\.json"):
        load_sae(tmp_path / "nowhere")
    make("relu").save(tmp_path / "a")
    cfg_path = tmp_path / "a" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(cfg | {"arch": "gated"}))
    with pytest.raises(ValueError, match=r"'gated'.*relu.*topk"):
        load_sae(tmp_path / "a")
    cfg_path.write_text(json.dumps(cfg | {"d_sae": D_SAE * 2}))
    with pytest.raises(ValueError, match="does not match"):
        load_sae(tmp_path / "a")


def test_build_sae_validates() -> None:
    assert isinstance(build_sae("relu", 8, 16), ReluSAE)
    assert isinstance(build_sae("topk", 8, 16, k=2), TopKSAE)
    assert "l1_coeff" in hparam_names("relu") and "k" in hparam_names("topk")
    with pytest.raises(ValueError, match=r"'vanilla'.*relu.*topk"):
        build_sae("vanilla", 8, 16)
    with pytest.raises(ValueError, match=r"'k'.*relu"):
        build_sae("relu", 8, 16, k=3)
    with pytest.raises(ValueError, match=r"d_in.*-1"):
        build_sae("relu", -1, 16)
    with pytest.raises(ValueError, match=r"d_sae.*0"):
        build_sae("topk", 8, 0)
    with pytest.raises(ValueError, match=r"k.*17"):
        build_sae("topk", 8, 16, k=17)
    with pytest.raises(ValueError, match=r"k.*0"):
        build_sae("topk", 8, 16, k=0)


def test_build_sae_seed_is_reproducible_and_leaves_global_rng() -> None:
    state = torch.random.get_rng_state()
    a, b = build_sae("topk", 8, 16, seed=3, k=2), build_sae("topk", 8, 16, seed=3, k=2)
    assert torch.equal(a.W_dec, b.W_dec)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(a.W_dec, build_sae("topk", 8, 16, seed=4, k=2).W_dec)


def test_config_rebuilds() -> None:
    sae = build_sae("topk", 8, 16, k=2)
    cfg = sae.config()
    assert cfg == {"arch": "topk", "d_in": 8, "d_sae": 16, "k": 2, "k_train_factor": 1.0,
                   "aux_k": 4, "aux_coeff": 1 / 32, "dead_tokens": 200_000,
                   "unit_decoder": False}  # fmt: skip
    arch, d_in, d_sae = cfg.pop("arch"), cfg.pop("d_in"), cfg.pop("d_sae")
    assert build_sae(arch, d_in, d_sae, **cfg).config() == sae.config()


# batchtopk/jumprelu: tests/sae/models/test_archs.py
@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_gradients_match_the_textbook_formula(arch: str) -> None:
    """The shortcuts (sparse decode, b_dec's gradient via a vector) change no gradient."""
    sae = make(arch).double().train()
    x = data().double()
    sae(x, sparsity_scale=0.7).loss.backward()
    fast = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    if arch == "topk":
        z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        vals, idx = z.topk(4, dim=-1)
        f = torch.zeros_like(z).scatter(-1, idx, vals.relu())
        x_hat = f @ sae.W_dec + sae.b_dec
        loss = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    else:
        f = torch.relu(x @ sae.W_enc + sae.b_enc)
        x_hat = f @ sae.W_dec + sae.b_dec
        l1 = (f * sae.W_dec.norm(dim=-1)).sum(-1)
        loss = ((x - x_hat) ** 2).sum(-1).mean() + 2.0 * 0.7 * l1.mean()
    loss.backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, fast[name], rtol=1e-10, atol=1e-12)


def test_weights_whose_bytes_changed_are_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from tests.sae.training.test_checkpoint import flip_last_byte

    build_sae("relu", 8, 16, seed=0).save(tmp_path)
    weights = tmp_path / "sae.safetensors"
    flip_last_byte(weights)
    with pytest.raises(ValueError, match=r"sae.safetensors is corrupt: its tensors do not match"):
        load_sae(tmp_path)
    # saved before the header carried a sha256: loads as it did
    save_file(load_file(str(weights)), str(weights), metadata={"arch": "relu"})
    assert isinstance(load_sae(tmp_path), ReluSAE)


def test_identical_saes_saved_by_different_processes_are_byte_identical(tmp_path) -> None:
    """The kill tests compare weight files by sha256: a safetensors metadata map of two keys
    came out in a per-process order (measured: two runs, two files of equal tensors)."""
    import hashlib
    import subprocess
    import sys

    from tests.servers import ROOT

    code = "import sys; from sae.models.registry import build_sae; "
    code += "build_sae('relu', 8, 16, seed=0).save(sys.argv[1])"
    for i in range(3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(i))], check=True,
                       env={"PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
    files = {hashlib.sha256((tmp_path / str(i) / "sae.safetensors").read_bytes()).hexdigest()
             for i in range(3)}  # fmt: skip
    assert len(files) == 1


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_a_folded_centre_gives_the_latents_of_training(arch: str) -> None:
    """relu and jumprelu encode x − c in training (c: the data's median, scaled units);
    fold_centre + fold_scale give an SAE with the same latents and reconstruction on raw x."""
    sae = build_sae(arch, D_IN, D_SAE, seed=0, centre=True).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 3 + 7
    s, c = 0.25, torch.full((D_IN,), 7 * 0.25)
    sae.centre_on(c)
    f, x_hat = sae.encode(x * s), sae.decode(sae.encode(x * s)) / s
    sae.fold_centre()
    sae.fold_scale(s)
    assert torch.equal(sae.c, torch.zeros(D_IN))
    torch.testing.assert_close(sae.encode(x), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat, atol=1e-4, rtol=1e-5)
    assert (f > 0).any()
