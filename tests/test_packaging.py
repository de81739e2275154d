"""A regular (non-editable) install works on its own: the wheel carries the model code, the local metric modules
and the bundled sample data, and nothing reads the repository."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import sys
from pathlib import Path

import nepa_hf
from nepa_hf.data.images import bundled_photo_paths, load_image_dataset
from nepa_hf.evaluation.features import load_metric

site = Path(sys.argv[1]).resolve()
assert Path(nepa_hf.__file__).resolve().is_relative_to(site), nepa_hf.__file__
photos = bundled_photo_paths()
assert len(photos) == 7 and all(Path(p).resolve().is_relative_to(site) for p in photos), photos
train = load_image_dataset("bundled", split="train", max_samples=20)
test = load_image_dataset("bundled_photos")
assert len(train) == 20 and len(test) == 7
assert load_metric("accuracy").compute(predictions=[1, 0], references=[1, 1])["accuracy"] == 0.5
print("installed package OK")
"""


@pytest.mark.slow
def test_wheel_install_loads_the_bundled_data_outside_the_repository(tmp_path):
    # Build from a copy of the sources, so no build/ or egg-info folder of the checkout leaks into the wheel.
    project = tmp_path / "project"
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(project)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("nepa_hf-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # what `pip install --target site` lays out for a pure-Python wheel
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)], capture_output=True, text=True, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "HOME": str(tmp_path)},
    )
    assert run.returncode == 0 and "installed package OK" in run.stdout, run.stderr[-3000:]
