import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("ROBAL_TEST_THREADS", "1")))  # tiny models gain nothing from more

DIGITS_TINY = [
    "train.epochs=6", "train.lr_milestones=[]", "model.backbone_args.width=8", "train.batch_size=64",
]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A small PGD-AT model on long-tailed digits (a few seconds), shared by the tests that need one."""
    from robal.config import load_config
    from robal.demo import builtin_config
    from robal.train.trainer import train

    out = tmp_path_factory.mktemp("digits") / "run"
    cfg = load_config(builtin_config("digits_lt/pgd_at.yaml"), DIGITS_TINY)
    model = train(cfg, out, progress=False)
    return out, cfg, model.eval()


@pytest.fixture(scope="session")
def digits_data(digits_run):
    from robal.data import prepare_data

    return prepare_data(digits_run[1].data)
