from .build import Family, WinfTMixin, create_winft, family_of, is_winft, register_family, to_winft
from .winft import WinfT, default_cfgs

__all__ = ['WinfT', 'WinfTMixin', 'create_winft', 'to_winft', 'is_winft', 'family_of', 'register_family', 'Family',
           'default_cfgs']
