from .winft import WinfT, create_winft, default_cfgs

__all__ = ['WinfT', 'create_winft', 'default_cfgs']
