"""Moved to :mod:`vitfree.train.data`; this module keeps ``vitfree.data`` importable for scripts
written against the old place (``benchmarks/fmnist_study.py``)."""
from .train.data import *  # noqa: F401,F403
from .train.data import __all__  # noqa: F401
