import os
import warnings

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
warnings.filterwarnings('ignore', category=UserWarning, module='timm')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids waiting on a busy second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
