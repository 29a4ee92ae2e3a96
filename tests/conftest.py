import atexit
import os
import shutil
import tempfile
import warnings

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Inductor's compiled-kernel cache is shared by every process of the user by default
# (/tmp/torchinductor_<user>); two test sessions compiling the same graph at once can load each
# other's half-written .so ("file too short").  Each session gets its own, removed at exit.
if 'TORCHINDUCTOR_CACHE_DIR' not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix='vitfree-tests-inductor-')
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)
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
