from .window_attention import WindowAttention, graph_window_bias, is_fx_tracing

__all__ = ['WindowAttention', 'graph_window_bias', 'is_fx_tracing']
