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


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Each test compiles from scratch: dynamo's per-process recompile limit (8 graphs per code
    object) is about one program's distinct models, not about a whole test session's."""
    yield
    if 'torch._dynamo' in __import__('sys').modules:
        torch._dynamo.reset()


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids waiting on a busy second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
