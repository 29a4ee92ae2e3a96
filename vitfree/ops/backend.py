"""The contract between attention layers, the dispatcher and the kernels.

* :class:`Query`: what a call asks for (grid, prefix tokens, batch, heads, head sizes, dtype,
  device, gradients, dropout, a caller's mask, the caller's backend override).  A small frozen
  value: the dispatcher's choice and everything prepared for it are keyed by it.
* :class:`Backend`: one kernel.  Each backend is one object in its own file (``vitfree/ops/<name>.py``,
  found by :mod:`vitfree.ops` at import): its name, what it can run (:meth:`Backend.supports`), what
  it prepares for some windows ahead of a call (:meth:`Backend.prepare`, cached in the backend's own
  :class:`PreparedCache`), how much work a call is (:meth:`Backend.work`, the unit its cost table
  is fitted in), the kernel itself (:meth:`Backend.run`) and, where it has one, a fused entry that
  reads a packed ``(B, T, 3, heads, head_dim)`` qkv projection in place (:meth:`Backend.run_qkv`).
* :class:`Plan`: what the dispatcher hands back: the backend, the windows resized to the query's
  grid and the prepared data.  Calling it runs the kernel in the query's dtype, outside autocast,
  with non-finite keys and values kept to the rows that can see them (:func:`contain_nonfinite`).

Every tensor a backend prepares is made by :func:`building`: outside inference mode, without
autograd history, autocast or any tensor mode (fake tensors of a compile trace), so one tensor
serves every later caller: inference, training, autocast, another thread, another model with the
same windows, a compiled graph and eager code after it.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple, Union

import torch

from ..windows import LayerWindows
from .bias import PositionBias, bias_parts, dense_position_bias

__all__ = ['Query', 'Plan', 'Backend', 'PreparedCache', 'building', 'contain_nonfinite', 'ProbsHook',
           'refuse_second_order', 'PositionBias']

ProbsHook = Callable[[torch.Tensor], torch.Tensor]


class Query(NamedTuple):
    """One kind of attention call (a plain tuple, so compiled graphs can pass it as constants).

    ``batch`` 0 means unknown (inside a compiled graph); ``dtype`` is the dtype the kernel
    computes in (autocast resolved); ``override`` is the calling module's ``backend=`` (``'auto'``
    when it has none; :func:`vitfree.use_backend` and ``VITFREE_BACKEND`` come on top in the
    dispatcher); ``explicit_softmax`` asks for the layer's own softmax path, whose probabilities
    pass the hook point (timm's ``fused_attn = False``); ``bias``: the names of the parts of the
    :class:`~vitfree.ops.bias.PositionBias` the call adds to the logits (``()``: none)."""
    grid: Tuple[int, int]
    prefix: int
    batch: int
    heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device
    grad: bool
    dropout: bool = False
    caller_mask: bool = False
    override: str = 'auto'
    explicit_softmax: bool = False
    bias: Tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    @property
    def batch_heads(self) -> int:
        """Batch times heads, the batch taken as 8 where it is unknown (compiled graphs)."""
        return (self.batch if self.batch > 0 else 8) * self.heads

    @property
    def precision(self) -> str:
        """The key of a cost fit: ``'lowp'`` (float16/bfloat16), else ``'fp32'`` (float64 is costed as
        float32: only the ratios between backends matter for the choice)."""
        return 'lowp' if self.dtype in (torch.float16, torch.bfloat16) else 'fp32'


class Backend:
    """One attention kernel (subclass it, one object per file; see the module docstring).

    Class attributes: ``name``; ``description`` (one line for ``vitfree.ops.list_backends``);
    ``auto`` (may the automatic choice pick it); ``takes_caller_mask`` (can add a caller's
    ``attn_mask`` on top of the windows); ``takes_dropout`` (runs attention dropout);
    ``exact_nonfinite`` (a non-finite key or value reaches only the queries whose window holds
    it, without help from the plan); ``takes_bias`` (adds a :class:`~vitfree.ops.bias.PositionBias`,
    passed to :meth:`run` as ``bias=``, and its gradients flow into the bias's tensors: ``True`` for
    every part, or the names of the parts it takes, e.g. ``('table', 'prefix', 'rows', 'cols')``).  The
    dispatcher checks dtypes, shapes, devices and the flags above for every backend;
    :meth:`supports` adds what is particular to this one."""
    name: str = ''
    description: str = ''
    auto: bool = True
    takes_caller_mask: bool = False
    takes_dropout: bool = True
    exact_nonfinite: bool = False
    takes_bias: Union[bool, Tuple[str, ...]] = False

    def supports(self, query: Query, windows: LayerWindows) -> Optional[str]:
        """None when this backend can run the query, else why not (one clause)."""
        return None

    def prepare(self, windows: LayerWindows, query: Query) -> Any:
        """What :meth:`run` reads for these windows (tile plans, biases ...), from the backend's
        own :class:`PreparedCache`; built once, outside any autograd or inference mode."""
        return None

    def work(self, query: Query, windows: LayerWindows) -> float:
        """The amount of work of one call, in the unit this backend's cost fits use."""
        raise NotImplementedError

    def run(self, plan: 'Plan', q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            dropout_p: float = 0.0, attn_mask: Optional[torch.Tensor] = None,
            probs_hook: Optional[ProbsHook] = None) -> torch.Tensor:
        """``(B, heads, T, head_dim)`` q, k (v: ``value_dim``) in the plan's dtype -> ``(B, heads, T, value_dim)``.
        A backend with ``takes_bias`` also takes ``bias=`` (a :class:`~vitfree.ops.bias.PositionBias`, or None);
        the others are never called with it."""
        raise NotImplementedError

    run_qkv: Optional[Callable[['Plan', torch.Tensor, float], torch.Tensor]] = None
    """Where set: ``run_qkv(plan, qkv, scale)`` from a ``(B, T, 3, heads, head_dim)`` projection read
    in place, returning ``(B, T, heads, head_dim)`` (the output projection's layout)."""

    def __repr__(self) -> str:
        return f'<vitfree backend {self.name!r}>'


@dataclass(frozen=True, eq=False)
class Plan:
    """The dispatcher's answer to a :class:`Query` (see :func:`vitfree.ops.dispatch.plan`)."""
    backend: Backend
    windows: LayerWindows  # at the query's grid
    query: Query
    data: Any = None       # what backend.prepare returned

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def has_qkv_entry(self) -> bool:
        q = self.query
        return self.backend.run_qkv is not None and not q.caller_mask and not q.dropout and not q.bias

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                 dropout_p: float = 0.0, attn_mask: Optional[torch.Tensor] = None,
                 probs_hook: Optional[ProbsHook] = None, bias: Optional[PositionBias] = None) -> torch.Tensor:
        """Run the kernel on ``(B, heads, T, d)`` tensors (plus the position ``bias`` the query was made
        with); returns ``(B, heads, T, value_dim)`` in the query's dtype."""
        dt = self.query.dtype
        if q.dtype != dt or k.dtype != dt or v.dtype != dt:
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if bias_parts(bias) != self.query.bias:
            raise ValueError(f'this plan was made for a call with position-bias parts {self.query.bias}, and is run '
                             f'with {bias_parts(bias)}')
        if q.shape[0] == 0:
            return v.new_empty(v.shape)
        with torch.autocast(q.device.type, enabled=False):
            if self.backend.exact_nonfinite or _graph_mode():
                return self.run_kernel(q, k, v, scale, dropout_p, attn_mask, probs_hook, bias)
            return contain_nonfinite(self, q, k, v, scale, dropout_p, attn_mask, probs_hook, bias)

    def run_kernel(self, q, k, v, scale: float, dropout_p: float, attn_mask: Optional[torch.Tensor],
                   probs_hook: Optional[ProbsHook], bias: Optional[PositionBias]) -> torch.Tensor:
        """The backend's kernel; ``bias=`` is passed only when there is one (backends without
        ``takes_bias`` never see it)."""
        if bias is None:
            return self.backend.run(self, q, k, v, scale, dropout_p, attn_mask, probs_hook)
        return self.backend.run(self, q, k, v, scale, dropout_p, attn_mask, probs_hook, bias=bias)

    def from_qkv(self, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        """The fused entry (only where :attr:`has_qkv_entry`): ``(B, T, 3, heads, d)`` -> ``(B, T, heads, d)``."""
        if qkv.dtype != self.query.dtype:
            qkv = qkv.to(self.query.dtype)
        with torch.autocast(qkv.device.type, enabled=False):
            return self.backend.run_qkv(self, qkv, float(scale))


def refuse_second_order(name: str) -> None:
    """Called at the start of a kernel's backward: raise one clear error when its result would be
    differentiated again (``create_graph=True``, or nested ``torch.func`` transforms), which a kernel
    with a hand-written backward cannot do exactly.  One ``torch.func.grad`` is fine."""
    functorch = torch._C._are_functorch_transforms_active()
    level = torch._C._functorch.maybe_current_level() if functorch else None
    if (not functorch and torch.is_grad_enabled()) or (level is not None and level > 1):
        raise RuntimeError(f'the {name!r} attention kernel has no second derivative (double backward, '
                           f'create_graph=True, nested torch.func transforms); run that part under '
                           f"vitfree.use_backend('eager') (plain autograd operations) instead")


def _graph_mode() -> bool:
    """While a graph is being traced: data-dependent checks would break it."""
    fx = torch.fx._symbolic_trace
    symbolic = getattr(fx, 'is_fx_symbolic_tracing', None) or fx.is_fx_tracing
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or symbolic())


# ---- prepared data -----------------------------------------------------------------------------------
@contextlib.contextmanager
def building() -> Iterator[None]:
    """The context every cached tensor is made in: plain tensors, valid for every later caller."""
    from torch.utils._python_dispatch import _disable_current_modes
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        for dev in ('cpu', 'cuda'):
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        stack.enter_context(_disable_current_modes())
        yield


_MISSING = object()


class PreparedCache:
    """What one backend prepared for some windows.

    Keyed by the :class:`LayerWindows` (weakly: the entries go with the windows) and a key the
    backend chooses (prefix tokens, device, dtype, tile ...).  Values are made by ``make()``
    inside :func:`building`, so they never carry the autograd or inference mode, thread, autocast
    state or model of whoever asked first."""

    _all: 'weakref.WeakSet[PreparedCache]' = weakref.WeakSet()

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._store: 'weakref.WeakKeyDictionary[LayerWindows, Dict[Any, Any]]' = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        PreparedCache._all.add(self)

    def get(self, windows: LayerWindows, key: Any, make: Callable[[], Any]) -> Any:
        per = self._store.get(windows)
        if per is None:
            with self._lock:
                per = self._store.setdefault(windows, {})
        val = per.get(key, _MISSING)
        if val is _MISSING:
            with building():
                val = make()
            val = per.setdefault(key, val)  # a concurrent maker's value, if it came first
        return val

    def clear(self) -> None:
        self._store.clear()


# ---- non-finite keys and values ---------------------------------------------------------------------
def contain_nonfinite(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      dropout_p: float, attn_mask: Optional[torch.Tensor], probs_hook: Optional[ProbsHook],
                      bias: Optional[PositionBias] = None) -> torch.Tensor:
    """Run ``plan``'s kernel so that a NaN or Inf key or value reaches only the queries whose
    window (and caller mask) holds it, as a reference that sums over allowed keys only would.

    One reduction checks k and v (a sum that is not finite; an overflowing sum of finite values
    only takes the exact path needlessly).  When it fails, the kernel runs on k and v with the
    non-finite tokens set to zero, and the rows that can see one of them are recomputed exactly
    over their allowed keys (:func:`_exact_rows`); attention dropout is not applied to those rows."""
    acc = torch.float32 if k.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(k.sum(dtype=acc) + v.sum(dtype=acc))):
        return plan.run_kernel(q, k, v, scale, dropout_p, attn_mask, probs_hook, bias)
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, heads, T)
    keep = (~bad).unsqueeze(-1)
    out = plan.run_kernel(q, k.where(keep, 0), v.where(keep, 0), scale, dropout_p, attn_mask, probs_hook, bias)
    return _exact_rows(plan, q, k, v, bad, attn_mask, scale, out, bias)


def _allowed(plan: Plan, device: torch.device, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(1 or heads, T, T)`` (or the caller mask's broadcast shape) bool: window and caller mask."""
    allowed = plan.windows.mask(plan.query.prefix, device)
    if allowed.dim() == 2:
        allowed = allowed.unsqueeze(0)
    if attn_mask is not None:
        caller = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float('-inf')
        allowed = allowed & caller
    return allowed


def _exact_rows(plan: Plan, q, k, v, bad: torch.Tensor, attn_mask, scale: float, out: torch.Tensor,
                bias: Optional[PositionBias] = None) -> torch.Tensor:
    """``out`` with every query row that can see a non-finite token recomputed over its allowed keys.

    Per (batch, head) slice: the finite keys go through one matmul (the non-finite ones zeroed),
    and each pair of a row with a non-finite token is masked on its inputs (``where`` before the
    product), so neither the outputs nor the gradients of other rows or pairs meet a NaN."""
    b, h, t, _ = q.shape
    allowed = _allowed(plan, q.device, attn_mask).expand(b, h, t, t)
    hit = (allowed & bad.unsqueeze(-2)).any(-1)  # (B, heads, T): rows that see a non-finite token
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos = None if bias is None else dense_position_bias(bias, plan.query.grid, plan.query.prefix, q.to(wide))
    for bi, hi in hit.any(-1).nonzero().tolist():
        rows = hit[bi, hi].nonzero().squeeze(1)
        cols = bad[bi, hi].nonzero().squeeze(1)
        a = allowed[bi, hi].index_select(0, rows)                      # (R, T)
        ab = a.index_select(1, cols).unsqueeze(-1)                     # (R, J, 1): allowed pairs with a bad token
        qr = q[bi, hi].index_select(0, rows).to(wide) * scale          # (R, d)
        kk, vv = k[bi, hi].to(wide), v[bi, hi].to(wide)
        ok = (~bad[bi, hi]).unsqueeze(-1)
        logits = qr @ kk.where(ok, 0).transpose(0, 1)                  # (R, T)
        kb = kk.index_select(0, cols).unsqueeze(0).where(ab, 0)        # (R, J, d)
        lb = (qr.unsqueeze(1) * kb).sum(-1)
        if pos is not None:
            pb = pos[bi % pos.shape[0], hi % pos.shape[1]].index_select(0, rows)  # (R, T)
            logits, lb = logits + pb, lb + pb.index_select(1, cols)
        lb = lb.masked_fill(~ab.squeeze(-1), float('-inf'))
        logits = logits.masked_fill(~a, float('-inf')).index_copy(1, cols, lb)
        probs = logits.softmax(-1)
        vb = vv.index_select(0, cols).unsqueeze(0).where(ab, 0)        # (R, J, dv)
        res = probs @ vv.where(ok, 0) + (probs.index_select(1, cols).unsqueeze(-1) * vb).sum(1)
        out = out.index_put((torch.full_like(rows, bi), torch.full_like(rows, hi), rows), res.to(out.dtype))
    return out
