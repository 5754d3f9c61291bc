import os
import shutil
import sys
from pathlib import Path

# Triton decides at decoration time whether kernels run compiled or interpreted, so this
# must happen before anything imports tagpr_kernels/: without a GPU driver, interpret on the CPU.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL = {"train": (12, 2), "dev": (8, 2), "test": (6, 1)}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """Small synthetic LaMP folder shared by the tests (deterministic, seed 0)."""
    from tagpr import synthetic

    out = tmp_path_factory.mktemp("lamp")
    synthetic.generate(out, seed=0, sizes=SMALL)
    return out


@pytest.fixture(scope="session")
def tiny():
    from tagpr.models import load_model

    return load_model("tiny", device="cpu")
