"""Millions of features (issue 19): a whole study at d_in 768 for growing d_sae, each stage in a
process of its own, with its wall time and peak RSS, and the growth from one size to the next.

The model is the builtin recipe at width 768 (2 blocks, the tiny corpus: built once, seconds
of training; the numbers here are about the SAE side). Per size: `saeflow train` a few steps
(the CLI, Prefect and MLflow included: the memory need it logs is shown beside what it used),
then in fresh processes the tasks' own functions: evaluation (`evaluate_saes`), feature
statistics (`feature_stats`), the HTML report, and SQL (the four dashboards over the feature
table). "setup" is what every stage process holds before its stage starts (torch, Prefect,
the model, the SAE's run found): stage RSS includes it. Nearest neighbours beyond 16,384
latents are approximate; their agreement with the exact ones is measured on the 16,384 SAE.

    python benchmarks/bench_features_scale.py                # 16,384 / 65,536 / 262,144
    python benchmarks/bench_features_scale.py --sizes 1048576 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmd import ROOT, cpu, write_section

START, END = "<!-- bench_features_scale:start -->", "<!-- bench_features_scale:end -->"
COMMON = [
    "model=tiny", "model.name=wide-768", "model.n_embd=768", "model.n_head=12",
    "hook=blocks.1.resid_post", "cache.tokens=16384", "cache.shard_tokens=8192",
    "eval.tokens=8192", "eval.batch_size=16", "sae=topk", "train.batch_size=1024",
    "train.tokens=4096", "train.log_every=1", "train.shuffle_rows=4096",
    "tracking.experiment=features-scale",
]  # fmt: skip
STAGES = ("setup", "evaluate", "features", "report", "sql")


def stage(name: str, overrides: list[str]) -> dict:
    """Run one stage in this process (after the shared setup); seconds and what it made."""
    from flows.config import load
    from tasks.cache import finish_cache, plan_cache
    from tasks.model import prepare_model
    from tasks.study import find_sae

    cfg, _ = load(overrides)
    model = prepare_model.fn(cfg)
    plan = plan_cache.fn(cfg, model, "eval", False)
    eval_cache = finish_cache.fn(plan)
    trained = find_sae.fn(cfg)
    path = Path(os.environ["SAEFLOW_HOME"]) / "features" / f"run_id={trained['run_id']}"
    t = time.perf_counter()
    out: dict = {}
    if name == "evaluate":
        from tasks.evaluate import evaluate_many

        out = evaluate_many.fn(cfg, model, eval_cache, [trained])[0]
    elif name == "features":
        from tasks.evaluate import features

        out = features.fn(cfg, model, eval_cache, trained)
    elif name == "report":
        from tasks.report import report

        made = report.fn(cfg, trained, {"path": str(path / "feature_stats.parquet")})
        out = {"report_mb": Path(made["report"]).stat().st_size / 1e6}
        if browser := shutil.which("chromium"):  # how long the page takes to open and render
            t0 = time.perf_counter()
            dom = subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                 f"file://{made['report']}"], capture_output=True, text=True, timeout=600,
            ).stdout  # fmt: skip
            out |= {"render_s": time.perf_counter() - t0, "cards": dom.count('class="card"')}
    elif name == "neighbours":
        out = neighbour_agreement(Path(trained["checkpoint"]))
    elif name == "sql":
        from tasks.support.sql import sql

        rows = 0
        run = trained["run_id"]
        for query, params in [("dead_features", []), ("nearest_clusters", [run]),
                              ("features_with_token", [" the"]),
                              ("select count(*) from examples", [])]:  # fmt: skip
            rows += sql(query, params).num_rows
        out = {"rows": rows}
    return {"seconds": time.perf_counter() - t, **{k: v for k, v in out.items() if k != "path"}}


def child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, stdout+stderr) of a child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)  # fmt: skip
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{out[-3000:]}")
    return time.perf_counter() - t, usage.ru_maxrss / 1e6, out


def neighbour_agreement(checkpoint: Path) -> dict[str, float]:
    """On one SAE: the share of latents whose approximate neighbour is the exact one, and the
    mean cosine the approximation gives up (the inverted-file search forced against all pairs)."""
    import sae.analysis.features as F
    from sae.models.registry import load_sae

    W = load_sae(checkpoint).W_dec.detach().float()
    _, probes = F._kmeans(W, probe=F.PROBE)
    exact_i, exact_c = F._nearest(W, probes)
    F.EXACT_NEIGHBOURS = 0
    ivf_i, ivf_c = F._nearest(W, probes)
    return {"same": (ivf_i == exact_i).float().mean().item(),
            "cos_lost": (exact_c - ivf_c).mean().item()}  # fmt: skip


def run(sizes: list[int], device: str) -> str:
    home = Path(tempfile.mkdtemp(prefix="features-scale-"))
    env = os.environ | {"SAEFLOW_HOME": str(home), "PYTHONPATH": str(ROOT)}
    extra = [f"train.device={device}", f"model.device={device}"]
    subprocess.run([sys.executable, "-m", "flows.cli", "cache", *COMMON, *extra], env=env,
                   check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    table: dict[int, dict[str, tuple[float, float]]] = {}
    notes: dict[int, str] = {}
    extras: dict[int, dict[str, float]] = {n: {} for n in sizes}
    agree = None
    for n in sizes:
        job = [*COMMON, *extra, f"sae.d_sae={n}"]
        wall, rss, out = child([sys.executable, "-m", "flows.cli", "train", *job], env)
        need = re.search(r"memory for .*? = ([\d.,]+) GB", out)
        table[n] = {"train": (wall, rss)}
        notes[n] = need.group(1) if need else "?"
        for name in ("evaluate", *STAGES) if n == sizes[0] else STAGES:  # the first evaluation
            code = f"import json,sys; sys.path.insert(0, 'benchmarks'); from bench_features_scale import stage; print('RESULT', json.dumps(stage({name!r}, {job!r})))"  # noqa: E501
            wall, rss, out = child([sys.executable, "-c", code], env)
            result = json.loads(out[out.rindex("RESULT ") + 7 :].splitlines()[0])
            table[n][name] = (result["seconds"], rss)
            extras[n] |= {k: v for k, v in result.items() if k in ("report_mb", "render_s")}
            print(n, name, f"{result['seconds']:.1f}s {rss:.2f}GB", result, flush=True)
        if n <= 16_384 and agree is None:
            code = f"import json,sys; sys.path.insert(0, 'benchmarks'); from bench_features_scale import stage; print('RESULT', json.dumps(stage('neighbours', {job!r})))"  # noqa: E501
            out = child([sys.executable, "-c", code], env)[2]
            agree = json.loads(out[out.rindex("RESULT ") + 7 :].splitlines()[0])
            agree["n"] = n
    return section(sizes, table, notes, agree, device, extras)


def section(sizes, table, notes, agree, device: str, extras) -> str:
    head = "| stage | " + " | ".join(f"{n:,}: s / GB" for n in sizes)
    head += "".join(f" | ×{sizes[i + 1] // sizes[i]} time / RSS" for i in range(len(sizes) - 1))
    rows = [head + " |", "|---" * (1 + len(sizes) + len(sizes) - 1) + "|"]
    for name in ("train", *STAGES):
        cells = [f"{table[n][name][0]:.1f} / {table[n][name][1]:.2f}" for n in sizes]
        for a, b in itertools.pairwise(sizes):
            (ta, ra), (tb, rb) = table[a][name], table[b][name]
            cells.append(f"{tb / max(ta, 1e-9):.2f} / {rb / ra:.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    need = ", ".join(f"{n:,}: {notes[n]} GB" for n in sizes)
    pages = ", ".join(
        f"{n:,}: {e['report_mb']:.1f} MB" + (f", {e['render_s']:.1f} s" if "render_s" in e else "")
        for n, e in extras.items()
        if "report_mb" in e
    )
    agreement = (
        f" On the {agree['n']:,}-latent SAE the inverted-file neighbour search (used beyond "
        f"16,384 latents) finds the exact neighbour of {agree['same']:.1%} of latents (mean "
        f"cosine given up {agree['cos_lost']:.4f})."
        if agree
        else ""
    )
    return (
        f"{START}\n## Millions of features (`python benchmarks/bench_features_scale.py`)\n\n"
        f"{datetime.date.today()}, {cpu()}, device {device}. A study at d_in 768 (builtin recipe "
        "at width 768, hook blocks.1.resid_post), topk (k=16), 4 steps of 1,024 tokens, 8,192 "
        "evaluation tokens; each stage in a process of its own: its time (the stage alone; "
        "train: the whole `saeflow train` command) and the process's peak RSS (GB, setup "
        "included), and the growth from each size to the next (linear = the size ratio)."
        " evaluate excludes the one-time ablation baselines (computed by a first, discarded run)."
        f" Training's logged memory need: {need}. The report's size (and the time headless "
        f"Chromium takes to open and render its first page): {pages}.{agreement}\n\n"
        + "\n".join(rows)
        + f"\n\n{END}\n"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16_384, 65_536, 262_144])
    p.add_argument("--device", default="cpu")
    p.add_argument("--print", action="store_true", help="print only, do not write")
    args = p.parse_args()
    text = run(args.sizes, args.device)
    print(text)
    if not args.print:
        write_section(text, START, END)
