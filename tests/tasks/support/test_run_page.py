"""What the MLflow run page shows of a study (tasks/support/tracking.py, figures.py): figures,
the activation caches as input datasets, the resolved config, source tags, parent run names."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import TINY


def test_an_sae_run_page_has_figures_datasets_config_and_source(study) -> None:
    from tasks.support import tracking

    c = tracking.client()
    run = c.get_run(study["trained"]["run_id"])
    figures = {a.path for a in c.list_artifacts(run.info.run_id, "figures")}
    assert figures == {
        "figures/feature_density.png", "figures/decoder_norms.png", "figures/top_features.png"
    }  # fmt: skip
    png = Path(c.download_artifacts(run.info.run_id, "figures/feature_density.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}  # context -> dataset
    assert inputs["training"].digest == study["train_cache"]["key"]
    assert inputs["evaluation"].digest == study["eval_cache"]["key"]
    assert "manifest.json" in inputs["training"].source
    config = yaml.safe_load(
        Path(c.download_artifacts(run.info.run_id, "config/config.yaml")).read_text()
    )
    assert config["sae"]["d_sae"] == 64 and config["hook"] == "blocks.0.resid_post"
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "saeflow" and tags["mlflow.user"]
    assert tags["mlflow.source.git.commit"] == tags["git_commit"]
    parent = c.get_run(study["study"]["parent_run_id"])
    assert parent.info.run_name == "pipeline relu-64"
    assert "config/config.yaml" in {a.path for a in c.list_artifacts(parent.info.run_id, "config")}


def test_a_sweep_parent_is_named_by_what_varies_and_shows_the_fronts(study) -> None:
    from flows.pipeline import sweep
    from tasks.support import tracking

    out = sweep([*TINY, "sae=topk", "sae.k=2,4"], experiment="run-page-sweep")
    c, parent = tracking.client(), out["study"]["parent_run_id"]
    assert c.get_run(parent).info.run_name == "sweep sae.k=2,4"
    figures = {a.path for a in c.list_artifacts(parent, "figures")}
    assert figures == {"figures/front_ev.png", "figures/front_loss_recovered.png"}


def test_system_metrics_are_sampled_while_training(tmp_path: Path, monkeypatch) -> None:
    import time

    from tasks.support import tracking

    monkeypatch.setattr(tracking, "SYSTEM_EVERY_S", 0.5)
    uri = f"sqlite:///{tmp_path}/m.db"
    run = tracking.start_run(tracking.ensure_experiment("sys", uri), "sys", uri=uri)
    with tracking.system_metrics(run, uri):
        time.sleep(2.5)
    metrics = tracking.client(uri).get_run(run).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_an_sae_runs_artifacts_are_in_folders(study) -> None:
    from tasks.support import tracking

    c = tracking.client()
    top = c.list_artifacts(study["trained"]["run_id"])
    assert all(a.is_dir for a in top), [a.path for a in top]  # nothing loose at the top
    assert {"checkpoint", "config", "features", "figures", "report"} <= {a.path for a in top}
