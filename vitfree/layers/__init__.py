from .window_attention import WindowAttention

__all__ = ['WindowAttention']
