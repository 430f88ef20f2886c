"""Hook points on tiny random GPT-2, GPT-NeoX (parallel residual) and Llama models, against
references taken by hand: `output_hidden_states` and forward hooks on the modules themselves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from conf.schema import Config
from sae.lm.hooks import (
    SITES,
    HookPoint,
    activations_at,
    load_lm,
    logits_from,
    parse_hook,
    runs_from,
    spliced,
)

N, D, V, T = 3, 32, 64, 10  # layers, width, vocab, context


def _gpt2() -> nn.Module:
    cfg = GPT2Config(
        n_layer=N, n_embd=D, n_head=4, vocab_size=V, n_positions=T, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg)


def _neox() -> nn.Module:
    cfg = GPTNeoXConfig(
        num_hidden_layers=N,
        hidden_size=D,
        num_attention_heads=4,
        intermediate_size=2 * D,
        vocab_size=V,
        max_position_embeddings=T,
        use_parallel_residual=True,  # Pythia: attn and MLP both read resid_pre
    )
    return GPTNeoXForCausalLM(cfg)


def _llama() -> nn.Module:
    cfg = LlamaConfig(
        num_hidden_layers=N,
        hidden_size=D,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * D,
        vocab_size=V,
        max_position_embeddings=T,
    )
    return LlamaForCausalLM(cfg)


# family -> (builder, path of the block list, attention attribute, MLP attribute), spelled out
# here independently of sae/lm/hooks.py's structural search.
FAMILIES = {
    "gpt2": (_gpt2, "transformer.h", "attn", "mlp"),
    "neox": (_neox, "gpt_neox.layers", "attention", "mlp"),
    "llama": (_llama, "model.layers", "self_attn", "mlp"),
}
ALL = [HookPoint(layer, site) for layer in range(N) for site in SITES]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> tuple[nn.Module, list[nn.Module], str, str]:
    build, path, attn, mlp = FAMILIES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    return model, list(model.get_submodule(path)), attn, mlp


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reference(family, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every hook point's activation from one full forward, read with hand-registered hooks."""
    model, blocks, attn, mlp = family
    ref: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda _m, _a, out: ref.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    handles = []
    for L, block in enumerate(blocks):
        handles.append(block.register_forward_hook(keep(f"blocks.{L}.resid_post")))
        handles.append(getattr(block, attn).register_forward_hook(keep(f"blocks.{L}.attn_out")))
        handles.append(getattr(block, mlp).register_forward_hook(keep(f"blocks.{L}.mlp_out")))
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    for L in range(N):
        ref[f"blocks.{L}.resid_pre"] = hidden[L]  # hidden[L] is the input of block L
        if L < N - 1:  # hidden[N] has the final norm applied: the block hook is the reference
            torch.testing.assert_close(ref[f"blocks.{L}.resid_post"], hidden[L + 1])
    return ref


def test_each_hook_point_equals_the_reference(family, ids) -> None:
    ref = _reference(family, ids)
    for hp in ALL:
        got = activations_at(family[0], [hp], ids)
        assert list(got) == [hp.name]
        assert got[hp.name].shape == (2, T, D), hp.name
        torch.testing.assert_close(got[hp.name], ref[hp.name], msg=hp.name)


def test_residual_is_the_sum_of_its_writes(family, ids) -> None:
    """resid_post = resid_pre + attn_out + mlp_out, sequential or parallel (NeoX) residual."""
    got = activations_at(family[0], [HookPoint(1, s) for s in SITES], ids)
    a = {hp.split(".")[-1]: x for hp, x in got.items()}
    torch.testing.assert_close(a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"])


def test_many_hooks_at_once_equal_one_at_a_time(family, ids) -> None:
    model = family[0]
    together = activations_at(model, ALL[::-1], ids)  # order of the list does not matter
    assert set(together) == {hp.name for hp in ALL}
    for hp in ALL:
        torch.testing.assert_close(together[hp.name], activations_at(model, [hp], ids)[hp.name])


def _events(family, ids: torch.Tensor, hooks: list[HookPoint] | None) -> list[str]:
    """What ran, in order: block starts/ends, attention and MLP modules, the LM head."""
    model, blocks, attn, mlp = family
    events: list[str] = []

    def log(event: str):
        return lambda *_: events.append(event)

    # Registered before activations_at's own hooks, so they fire first on the same module.
    handles = [model.lm_head.register_forward_hook(log("head"))]
    for L, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(log(f"start {L}")))
        handles.append(getattr(block, attn).register_forward_hook(log(f"attn {L}")))
        handles.append(getattr(block, mlp).register_forward_hook(log(f"mlp {L}")))
        handles.append(block.register_forward_hook(log(f"end {L}")))
    try:
        if hooks is None:
            _logits(model, ids)
        else:
            activations_at(model, hooks, ids)
    finally:
        for h in handles:
            h.remove()
    return events


SITE_EVENT = {"resid_pre": "start", "attn_out": "attn", "mlp_out": "mlp", "resid_post": "end"}


def test_forward_stops_after_the_deepest_hook(family, ids) -> None:
    full = _events(family, ids, None)
    assert full[-1] == "head" and len(full) == 4 * N + 1
    for hp in ALL:
        last = full.index(f"{SITE_EVENT[hp.site]} {hp.layer}")
        assert _events(family, ids, [hp]) == full[: last + 1], hp.name
    many = [HookPoint(2, "attn_out"), HookPoint(0, "resid_post"), HookPoint(1, "mlp_out")]
    assert _events(family, ids, many) == full[: full.index("attn 2") + 1]


def test_bad_hook_names_list_the_valid_ones(family) -> None:
    model = family[0]
    valid = r"blocks\.\{0\.\.2\}\.resid_pre\|attn_out\|mlp_out\|resid_post"
    for bad in ("blocks.3.resid_pre", "blocks.0.mlp", "mlp_out", "blocks.-1.attn_out"):
        with pytest.raises(ValueError, match=valid):
            parse_hook(model, bad)
    with pytest.raises(ValueError, match=valid):
        activations_at(model, [HookPoint(N, "mlp_out")], torch.zeros(1, 2, dtype=torch.long))
    assert parse_hook(model, "blocks.2.attn_out") == HookPoint(2, "attn_out")


def test_a_family_without_an_mlp_module_says_so() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.Linear(D, D)
            self.fc1 = nn.Linear(D, D)  # an MLP inlined into the block (as OPT does)

    lm = nn.Module()
    lm.model = nn.Module()
    lm.model.layers = nn.ModuleList([Block(), Block()])
    valid = r"blocks\.\{0\.\.1\}\.resid_pre\|attn_out\|resid_post"
    with pytest.raises(ValueError, match=r"no submodule named mlp.*" + valid):
        parse_hook(lm, "blocks.0.mlp_out")
    assert parse_hook(lm, "blocks.1.attn_out") == HookPoint(1, "attn_out")


def test_splicing_identity_keeps_logits_and_zeros_change_them(family, ids) -> None:
    model = family[0]
    clean = _logits(model, ids)
    for hp in ALL:
        with spliced(model, hp, lambda a: a.clone()):
            torch.testing.assert_close(_logits(model, ids), clean, msg=hp.name)
        with spliced(model, hp, torch.zeros_like):
            assert not torch.allclose(_logits(model, ids), clean), hp.name
    torch.testing.assert_close(_logits(model, ids), clean)  # every splice was removed


def test_logits_from_runs_only_the_later_blocks_and_equals_a_full_splice(family, ids) -> None:
    """For every hook point and family, logits_from(acts) equals a full forward with acts spliced
    in; at residual sites the blocks before the hook do not run, and the model is left whole."""
    model, blocks_, _, _ = family
    g = torch.Generator().manual_seed(2)
    for hp in ALL:
        acts = activations_at(model, [hp], ids)[hp.name]
        new = acts + 0.5 * torch.randn(acts.shape, generator=g)
        with spliced(model, hp, lambda a, new=new: new):
            want = _logits(model, ids)
        ran: list[int] = []
        handles = [b.register_forward_pre_hook(lambda m, a, i=i, ran=ran: ran.append(i))
                   for i, b in enumerate(blocks_)]  # fmt: skip
        try:
            got = logits_from(model, hp, ids, new)
        finally:
            for h in handles:
                h.remove()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=hp.name)
        first = {"resid_pre": hp.layer, "resid_post": hp.layer + 1}.get(hp.site, 0)
        assert ran == list(range(first if first < N else 0, N)), hp.name
        assert runs_from(model, hp) == (hp.site.startswith("resid") and first < N)
    assert list(model.get_submodule(FAMILIES_PATH[type(model).__name__])) == blocks_


FAMILIES_PATH = {"GPT2LMHeadModel": "transformer.h", "GPTNeoXForCausalLM": "gpt_neox.layers",
                 "LlamaForCausalLM": "model.layers"}  # fmt: skip


def test_config_accepts_every_site() -> None:
    for site in SITES:
        assert Config(hook=f"blocks.1.{site}").hook == f"blocks.1.{site}"
    with pytest.raises(ValueError, match=re.escape("resid_pre|attn_out|mlp_out|resid_post")):
        Config(hook="blocks.1.mlp")


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 and a word-level tokenizer, written as `save_pretrained` writes them."""
    out = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    _gpt2().save_pretrained(out)
    words = WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, V)}}, unk_token="[UNK]")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(words)).save_pretrained(out)
    return out


def test_load_lm_runs_on_the_cpu_by_default(saved_lm: Path, ids) -> None:
    model, tok = load_lm(str(saved_lm), None, "bf16")
    assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training
    assert next(model.parameters()).dtype == torch.bfloat16 and len(tok) == V
    same, _ = load_lm(str(saved_lm), None, "fp32", "cpu")
    torch.testing.assert_close(_logits(same, ids), _logits(_saved(saved_lm), ids))


@pytest.mark.gpu
def test_load_lm_puts_the_model_on_cuda(saved_lm: Path, ids) -> None:
    model, _ = load_lm(str(saved_lm), None, "fp32", "cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"} and not model.training
    hp = parse_hook(model, "blocks.1.resid_post")
    acts = activations_at(model, [hp], ids.cuda())[hp.name]
    assert acts.device.type == "cuda"
    want = activations_at(_saved(saved_lm), [hp], ids)[hp.name]
    torch.testing.assert_close(acts.cpu(), want, rtol=1e-4, atol=1e-5)
    got = _logits(model, ids.cuda()).cpu()
    torch.testing.assert_close(got, _logits(_saved(saved_lm), ids), rtol=1e-4, atol=1e-4)


def _saved(path: Path) -> nn.Module:
    """The reference: the saved model loaded by hand, fp32 on the CPU."""
    return GPT2LMHeadModel.from_pretrained(path).eval()
