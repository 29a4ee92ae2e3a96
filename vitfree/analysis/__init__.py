"""Analysis of ViT-family models: attention recording, interaction maps, ERFs, profiles,
head importance, SIFT-semantic lifts, reports.  Attaches to models from the outside
(hooks, context managers); nothing in ``ops/`` or ``layers/`` imports this package.

matplotlib, tqdm and OpenCV are imported only by the functions that need them.
"""
from .hooks import attention_modules, attention_override, capture_block_io, normalize_blocks, num_prefix_tokens, \
    patch_grid
from .recorder import Recorder, RecordingTooLarge, record
from .interaction import ESTIMATORS, InteractionResult, interaction, iter_images, row_normalize
from .erf import BlockErf, ErfResult, erf_from_interaction, erf_rectangles, measure_erf, tendency_vectors
from .removal import RemovalResult, mask_patch_keys, patch_removal

__all__ = [
    'attention_modules', 'attention_override', 'capture_block_io', 'normalize_blocks', 'num_prefix_tokens',
    'patch_grid',
    'Recorder', 'RecordingTooLarge', 'record',
    'ESTIMATORS', 'InteractionResult', 'interaction', 'iter_images', 'row_normalize',
    'BlockErf', 'ErfResult', 'erf_from_interaction', 'erf_rectangles', 'measure_erf', 'tendency_vectors',
    'RemovalResult', 'mask_patch_keys', 'patch_removal',
]
