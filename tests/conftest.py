"""Tests import the tools beside the scripts (benchmark, sweep, acceptance, ...) as top-level modules, and run
offline.

``quickstart_run``: one short quickstart run through the canonical command (``accelerate launch`` with
recipes/accelerate_configs/cpu.yaml), shared by every test that only reads what it left behind."""
import os
import sys
from pathlib import Path

import pytest

# before anything imports huggingface_hub or datasets (they read these once): no test reaches the network,
# including the entry points the tests call in this process
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """The quickstart, 2 epochs of 256 Fashion-MNIST images (16 steps): read it, never write into it."""
    from data_utils import fashion_mnist_available
    from train_utils import SMALL, TRAIN, accelerate_cmd, run

    if not fashion_mnist_available():
        pytest.skip("needs the Debian dataset-fashion-mnist package (make test installs it)")
    out = tmp_path_factory.mktemp("quickstart") / "run"
    run(accelerate_cmd("--config_file", "recipes/accelerate_configs/cpu.yaml", TRAIN)
        + ["recipes/quickstart.yaml", f"output_dir={out}", *SMALL])
    return out
