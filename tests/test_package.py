"""`pip install -e .` works from a clone: the wheel builds offline and carries the package data the code reads."""

import os
import subprocess
import sys
import zipfile

from helpers import REPO


def test_the_package_builds_with_its_data_files(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), REPO], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    for needed in ("dp_sapf/schemas/mask.schema.json", "dp_sapf/data/sensitive_fingerprints.npz",
                   "dp_sapf/privacy.py", "train_dp_sapf.py", "select_salient.py", "sample.py", "evaluate.py",
                   "private_evolution.py", "dp_mepf.py", "dp_sapf/mepf.py"):
        assert needed in names, needed
    for line in open(os.path.join(REPO, "constraints.txt")):  # every pin is a real "name==version"
        line = line.split("#")[0].strip()
        assert not line or ("==" in line and all(line.split("==")))
