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
