"""Analysis of ViT-family models: attention recording, interaction maps, ERFs, profiles,
head importance, SIFT-semantic lifts, reports.  Attaches to models from the outside
(hooks, context managers); nothing in ``ops/`` or ``layers/`` imports this package."""
from .hooks import attention_modules, attention_override, normalize_blocks

__all__ = ['attention_modules', 'attention_override', 'normalize_blocks']
