"""Section 3 of ``benchmarks/agent.py``: the size on disk of an agent-only install.

``python3 -m venv`` in a temp dir, then ``pip install "<copy of the repo>[agent]"``; the size is
the sum of file sizes under the venv (symlinks not followed). If pip fails (no network), an
estimate from the installed files of the agent dependencies in this environment, labelled so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from stat import S_ISLNK

from benchmarks.agent_report import VenvResult, normalize_name

REPO = Path(__file__).resolve().parents[1]
AGENT_REQUIREMENTS = ("onnxruntime", "numpy", "paho-mqtt", "psutil")

SIZES_BY_DISTRIBUTION = """
import json, os, sys
from importlib import metadata
out = {}
for dist in metadata.distributions():
    total = 0
    for f in dist.files or ():
        try:
            total += os.lstat(dist.locate_file(f)).st_size
        except OSError:
            pass
    out[dist.metadata["Name"]] = total
json.dump(out, sys.stdout)
"""


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tree_size(root: Path) -> int:
    """Sum of the sizes of the regular files under ``root``; symlinks are neither followed nor counted."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            stat = os.lstat(os.path.join(directory, name))
            if not S_ISLNK(stat.st_mode):
                total += stat.st_size
    return total


def copy_source(dest: Path) -> Path:
    """The distribution's sources without build artefacts, so pip's in-tree build leaves the repo alone."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    for package in ("edge_agent", "broker_server", "model_export", "fedflock"):
        shutil.copytree(REPO / package, dest / package, ignore=ignore)
    return dest


def measure_venv(work: Path) -> VenvResult:
    venv = work / "venv"
    progress("venv: python3 -m venv")
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    source = copy_source(work / "src")
    progress("venv: pip install <repo>[agent]")
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{source}[agent]"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if pip.returncode != 0:
        tail = " ".join((pip.stderr or pip.stdout).strip().splitlines()[-3:])
        progress(f"venv: pip install failed, falling back to an estimate: {tail}")
        return estimate_installed_size(f"pip install failed ({tail[:200]}); estimated from this environment")
    sizes = json.loads(
        subprocess.run([str(python), "-c", SIZES_BY_DISTRIBUTION], capture_output=True, text=True, check=True).stdout
    )
    names = {normalize_name(name) for name in sizes}
    site = next((venv / "lib").glob("python*/site-packages"))
    if "torch" in names or (site / "torch").exists():
        raise SystemExit("torch is in the agent-only venv: the `agent` extra must never pull it in")
    return VenvResult(
        total=tree_size(venv),
        distributions=sizes,
        estimate=False,
        note=f"fresh venv, pip install fedflock[agent]; {len(sizes)} distributions, torch absent",
    )


def estimate_installed_size(reason: str) -> VenvResult:
    """Installed file sizes of the agent dependency closure in this environment, plus fedflock's sources."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: dict[str, int] = {}
    pending = list(AGENT_REQUIREMENTS)
    while pending:
        name = normalize_name(pending.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        paths = (Path(str(dist.locate_file(f))) for f in dist.files or ())
        seen[name] = sum(path.lstat().st_size for path in paths if path.is_file() and not path.is_symlink())
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    if "torch" in seen:
        raise SystemExit("torch is in the agent dependency closure")
    seen["fedflock (sources)"] = sum(
        tree_size(REPO / p) for p in ("edge_agent", "broker_server", "model_export", "fedflock")
    )
    return VenvResult(total=sum(seen.values()), distributions=seen, estimate=True, note=reason)


# --------------------------------------------------------------------------------------------
# The table
