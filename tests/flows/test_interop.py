"""SAEs in and out through the flows: a trained SAE exported as SAELens (`saeflow export`),
loaded by the real sae_lens, imported back (`eval.sae=`) as an MLflow run of its own whose
evaluation equals the original's; bad imports named before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY


def test_export_then_import_gives_the_same_metrics_as_a_run_of_its_own(
    study, tmp_path: Path
) -> None:
    from sae_lens import SAE as LensSAE

    from flows.pipeline import evaluate_flow, export_flow
    from sae.models.registry import load_sae
    from tasks.support import tracking

    run_id = study["trained"]["run_id"]
    out = export_flow([*TINY, f"eval.run_id={run_id}", f"export.dir={tmp_path / 'lens'}"])
    (exported,) = out["exports"]
    assert exported["run_id"] == run_id and exported["dir"] == str(tmp_path / "lens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg["architecture"] == "standard" and cfg["metadata"]["model_name"] == "tiny-gpt2"
    assert (tmp_path / "lens" / "sparsity.safetensors").is_file()  # from the feature table
    lens = LensSAE.load_from_disk(tmp_path / "lens")
    sae = load_sae(Path(study["trained"]["checkpoint"]))
    x = torch.randn(64, sae.d_in)
    with torch.no_grad():
        torch.testing.assert_close(lens.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    c = tracking.client()
    assert c.get_run(run_id).data.tags["saeflow.export.saelens"] == str(tmp_path / "lens")

    imported = evaluate_flow([*TINY, f"eval.sae={tmp_path / 'lens'}"])
    new = imported["trained"]["run_id"]
    assert new != run_id
    for key in ("explained_variance", "l0", "dead_frac", "ce_sae", "loss_recovered", "mse"):
        assert imported["metrics"][key] == pytest.approx(study["metrics"][key], rel=1e-5, abs=1e-7)
    run = c.get_run(new)
    assert run.data.tags["saeflow.format"] == "saelens"
    assert run.data.tags["saeflow.source"] == str(tmp_path / "lens")
    assert run.data.tags["saeflow.stage"] == "import" and run.info.status == "FINISHED"
    assert run.data.params["source.architecture"] == "standard"
    assert run.data.params["sae.arch"] == "relu"
    assert float(run.data.metrics["eval/explained_variance"]) == pytest.approx(
        study["metrics"]["explained_variance"], rel=1e-5
    )
    again = evaluate_flow([*TINY, f"eval.sae={tmp_path / 'lens'}"])
    assert again["trained"]["run_id"] == new  # the same content is the same run


def test_bad_imports_are_named_before_any_work(study, tmp_path: Path) -> None:
    from flows.pipeline import evaluate_flow, export_flow

    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.bin").write_bytes(b"\0" * 8)
    lens = tmp_path / "lens"
    export_flow([*TINY, f"eval.run_id={study['trained']['run_id']}", f"export.dir={lens}"])
    cases = [
        ([f"eval.sae={tmp_path / 'odd'}"], "is not an SAE directory saeflow can read"),
        ([f"eval.sae={tmp_path / 'none'}"], "no SAE directory at"),
        ([f"eval.sae={lens}", "hook=blocks.1.resid_post"], "trained at hook 'blocks.0.resid_post'"),
        ([f"eval.sae={lens}", "eval.run_id=abc"], "both name the SAE; pass one"),
    ]
    for overrides, message in cases:
        state = evaluate_flow([*TINY, *overrides], return_state=True)
        assert state.is_failed() and message in state.message, (overrides, state.message)
    cfg = json.loads((lens / "cfg.json").read_text())
    cfg["metadata"].pop("hook_name")  # no hook: the model's width is what is checked
    (lens / "cfg.json").write_text(json.dumps(cfg))
    wide = tmp_path / "wide"
    from sae.formats import saelens
    from sae.models.registry import build_sae

    saelens.export(
        build_sae("relu", 7, 16, seed=0),
        wide,
        model_name="x",
        hook="blocks.0.resid_post",
        context_size=8,
        prepend_bos=True,
        dataset_path="x",
    )
    state = evaluate_flow([*TINY, f"eval.sae={wide}"], return_state=True)
    assert state.is_failed() and "reads d_in=7, but model tiny-gpt2 has width" in state.message


FEATURE_FIELDS = {
    "modelId": str, "layer": str, "index": str, "hookName": str, "maxActApprox": float,
    "frac_nonzero": float, "hasVector": bool, "vector": list, "topkCosSimIndices": list,
    "topkCosSimValues": list, "pos_str": list, "pos_values": list, "neg_str": list,
    "neg_values": list, "freq_hist_data_bar_heights": list, "freq_hist_data_bar_values": list,
    "logits_hist_data_bar_heights": list, "logits_hist_data_bar_values": list,
    "neuron_alignment_indices": list, "correlated_features_indices": list,
}  # fmt: skip
ACTIVATION_FIELDS = {
    "id": str, "modelId": str, "layer": str, "index": str, "tokens": list, "values": list,
    "maxValue": float, "maxValueTokenIndex": int, "minValue": float,
    "qualifyingTokenIndex": int, "dataIndex": str, "dataSource": str,
}  # fmt: skip


def read_batches(dir: Path) -> list[dict]:
    import gzip

    files = sorted(dir.glob("batch-*.jsonl.gz"), key=lambda p: int(p.stem.split("-")[1][:-6]))
    return [
        json.loads(line) for p in files for line in gzip.decompress(p.read_bytes()).splitlines()
    ]


def test_neuronpedia_export_has_every_field_and_the_examples_activations(
    study, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from flows.pipeline import export_flow

    run_id, out = study["trained"]["run_id"], tmp_path / "np"
    export_flow([*TINY, f"eval.run_id={run_id}", "export.format=neuronpedia", f"export.dir={out}"])
    for name in ("release", "model", "sourceset", "source"):
        (record,) = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert record
    source = json.loads((out / "source.jsonl").read_text())
    assert source["id"] == "0-saeflow-residpost-relu-64" and source["modelId"] == "tiny-gpt2"
    features = read_batches(out / "features")
    assert [f["index"] for f in features] == [str(i) for i in range(64)]
    for f in features:
        for key, kind in FEATURE_FIELDS.items():
            assert isinstance(f[key], kind), (key, f[key])
        assert f["layer"] == source["id"] and f["hookName"] == "blocks.0.hook_resid_post"
        assert len(f["pos_str"]) == len(f["pos_values"]) == 10 and len(f["topkCosSimIndices"]) == 10
        assert f["pos_values"] == sorted(f["pos_values"], reverse=True)
        assert len(f["freq_hist_data_bar_heights"]) == len(f["freq_hist_data_bar_values"])
    stats = pq.read_table(
        Path(study["features"]["path"]), columns=["feature_id", "freq", "max_act", "top_examples"]
    ).to_pylist()
    by_id = {r["feature_id"]: r for r in stats}
    for f in features:
        row = by_id[int(f["index"])]
        assert f["frac_nonzero"] == pytest.approx(row["freq"])
        assert f["maxActApprox"] == pytest.approx(row["max_act"])
        fired = round(row["freq"] * study["metrics"]["tokens"])
        assert sum(f["freq_hist_data_bar_heights"]) == pytest.approx(fired, abs=1)
    acts = read_batches(out / "activations")
    examples = [(r["feature_id"], e) for r in stats for e in r["top_examples"]]
    assert len(acts) == len(examples) > 0
    for a, (feature, ex) in zip(acts, examples, strict=True):
        for key, kind in ACTIVATION_FIELDS.items():
            assert isinstance(a[key], kind), (key, a[key])
        assert a["index"] == str(feature) and len(a["tokens"]) == len(a["values"])
        assert a["values"][a["qualifyingTokenIndex"]] == pytest.approx(ex["activation"], rel=1e-4)
        assert a["maxValue"] == max(a["values"]) and a["dataIndex"] == str(ex["seq_id"])
        marked = ex["text"].split("«")[1].split("»")[0]
        assert a["tokens"][a["qualifyingTokenIndex"]] == marked


def test_a_sweeps_parent_exports_each_of_its_saes(study, tmp_path: Path) -> None:
    from sae_lens import SAE as LensSAE

    from flows.pipeline import export_flow, sweep

    out = sweep([*TINY, "sae=topk", "sae.k=2,4"], experiment="export-sweep")
    parent = out["study"]["parent_run_id"]
    exported = export_flow([*TINY, f"eval.run_id={parent}", f"export.dir={tmp_path}"])["exports"]
    children = {j["trained"]["run_id"] for j in out["jobs"]}
    assert {e["run_id"] for e in exported} == children
    for e in exported:
        assert e["dir"] == str(tmp_path / e["run_id"])
        lens = LensSAE.load_from_disk(e["dir"])
        assert lens.cfg.architecture() == "topk"
    assert sorted(LensSAE.load_from_disk(e["dir"]).cfg.k for e in exported) == [2, 4]
