"""Shared test set-up: offline Hugging Face, the repository on sys.path, and access to ../shared."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared next to the repository root (official wheel files, parity cases, real model outputs)."""
    path = ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip(f"needs the shared folder next to the repository ({path} is absent)")
    return path


@pytest.fixture(scope="session")
def official_lexicon(shared):
    import reward
    folder = shared / "emotion_wheel"
    if not folder.is_dir():
        pytest.skip(f"needs the official wheel files in {folder}")
    return reward.load_lexicon(str(folder))


@pytest.fixture(scope="session")
def parity_cases(shared) -> dict:
    path = shared / "ew_parity" / "cases.json"
    if not path.is_file():
        pytest.skip(f"needs the parity cases {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic OV-MER benchmark (48 train, 8 val, 16 test clips), made once per test session."""
    import data
    out = tmp_path_factory.mktemp("synth_small")
    data.synthesize(str(out), n_train=48, n_test=16, seed=0, progress=False, n_val=8)
    return out


def run_script(script: str, *args, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the stage scripts as users do (torchrun when nproc > 1); fail the test with its output."""
    cmd = [sys.executable, str(ROOT / script)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(ROOT / script)]
    r = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r
