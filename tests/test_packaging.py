"""The project builds quietly and whole: no setuptools warnings (conf/'s YAML folders used to be
"installed as data", pages of warnings on first set-up), every subpackage and data file in."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_warnings_and_holds_every_package(tmp_path: Path) -> None:
    # A copy: setuptools leaves build/ and *.egg-info in the tree it builds.
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests")
    src = Path(shutil.copytree(ROOT, tmp_path / "src", ignore=skip))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "-w", str(tmp_path), str(src)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in (done.stdout + done.stderr).lower(), done.stderr[-3000:]
    (wheel,) = tmp_path.glob("saeflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = ["sae/models/topk.py", "sae/formats/saelens.py", "tasks/support/ui.py",
              "conf/sae/relu.yaml", "conf/config.yaml", "dashboards/dead_features.sql"]  # fmt: skip
    assert not [p for p in wanted if p not in names]
