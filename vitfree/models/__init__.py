from .build import Family, WinfTMixin, create_winft, family_of, is_winft, register_family, to_winft
from .winft import WinfT, default_cfgs
from .eva import WinfTEva  # each family module registers itself and its winft_* entry points
from .sam import WinfTSam, sam_pattern
from .beit import WinfTBeit

__all__ = ['WinfT', 'WinfTEva', 'WinfTSam', 'WinfTBeit', 'WinfTMixin', 'create_winft', 'to_winft', 'is_winft',
           'family_of', 'register_family', 'Family', 'default_cfgs', 'sam_pattern']
