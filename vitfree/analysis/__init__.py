"""Analysis of ViT-family models: attention recording, interaction maps, ERFs, profiles,
head importance, SIFT-semantic lifts, reports.  Attaches to models from the outside, at the
layer's one hook point (``attn_drop`` on the explicit-softmax path) and through the standard
``attn_mask`` argument; nothing in ``windows``, ``ops``, ``layers`` or ``models`` imports this
package.

Layout, lowest first (each module imports only modules above it in this list; a test checks
that nothing outside ``report`` imports ``report``, and that there are no import circles):

``inputs``       images, data sets, labels, display conversion, and the one image loop every
                 analysis runs (:class:`~vitfree.analysis.inputs.ImageLoop`: eval mode, progress
                 bar, grid check, the error for empty input)
``plots``        every picture (reads result objects by their attributes; imports only ``inputs``)
``capture``      the recorder and attention overrides on the hook point, key masks
``interaction``, ``erf``, ``profiles``, ``heads``, ``patterns``, ``semantic``, ``removal``
                 one file per analysis
``report``       orchestration (:func:`analyze`) and the HTML page

matplotlib, tqdm and OpenCV are imported only by the functions that need them.
"""
from .capture import (Recorder, RecordingTooLarge, attention_modules, attention_override, capture_block_io,
                      mask_patch_keys, normalize_blocks, num_prefix_tokens, patch_grid, record, row_normalize)
from .inputs import iter_images
from .interaction import ESTIMATORS, InteractionResult, interaction
from .erf import BlockErf, ErfResult, erf_from_interaction, erf_rectangles, measure_erf, tendency_vectors
from .removal import RemovalResult, patch_removal

__all__ = [
    'attention_modules', 'attention_override', 'capture_block_io', 'normalize_blocks', 'num_prefix_tokens',
    'patch_grid',
    'Recorder', 'RecordingTooLarge', 'record',
    'ESTIMATORS', 'InteractionResult', 'interaction', 'iter_images', 'row_normalize',
    'BlockErf', 'ErfResult', 'erf_from_interaction', 'erf_rectangles', 'measure_erf', 'tendency_vectors',
    'RemovalResult', 'mask_patch_keys', 'patch_removal',
]
