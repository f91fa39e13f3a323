import os
from pathlib import Path

import pytest

from datamodules.shapes import generate_shapes_dataset, shapes_sizes

os.environ.setdefault("PYTHONWARNINGS", "ignore")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small embedded shapes data set, generated once per test session."""
    root = tmp_path_factory.mktemp("shapes")
    # the sizes EmbeddedShapesDataModule(num_train=1024, num_val=256, num_transfer_train=128, num_transfer_test=128)
    # asks for, so the tests' data modules find the folder complete instead of drawing it again
    sizes = shapes_sizes(1024, 256, 128, 128, num_sketch_train=500)
    return generate_shapes_dataset(root, sizes, seed=0)


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1, for a torch.distributed rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
