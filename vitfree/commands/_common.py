"""Small helpers shared by the sub-commands."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Tuple


def key_value(text: str) -> Tuple[str, Any]:
    """``key=value`` with the value read as YAML (``depth=2``, ``img_size=64``, ``class_token=false``)."""
    import yaml
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r}')
    k, v = text.split('=', 1)
    return k.strip(), yaml.safe_load(v)


def load_state_dict_file(model, path: str) -> None:
    """Load a ``.safetensors`` state dict (or a local ``.pth`` with ``weights_only=True``) strictly."""
    import torch
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f'error: checkpoint file not found: {path!r}')
    if p.suffix == '.safetensors':
        from safetensors.torch import load_file
        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location='cpu', weights_only=True)
        sd = sd.get('state_dict', sd.get('model', sd)) if isinstance(sd, dict) else sd
    model.load_state_dict(sd, strict=True)


def create_model(args):
    """The model named by ``args.model`` (seeded with ``args.seed``, extra ``args.model_kwargs``,
    ``args.pretrained``), with ``args.checkpoint`` loaded when given; errors exit with a message."""
    import timm
    import torch

    import vitfree  # noqa: F401  (registers the winft_* models)
    torch.manual_seed(args.seed)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **dict(args.model_kwargs))
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise SystemExit(f'error: cannot create model {args.model!r}: {e}') from None
    if args.checkpoint:
        load_state_dict_file(model, args.checkpoint)
    return model
