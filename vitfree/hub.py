"""Save, load and share WinfT models with their window spec (Hugging Face Hub, local folders).

An exported model is a folder in timm's format, so ``timm.create_model('local-dir:DIR',
pretrained=True)`` and ``timm.create_model('hf-hub:org/name', pretrained=True)`` rebuild it
(after ``import vitfree``):

* ``config.json``: ``architecture`` (a registered ``winft_*`` name, or ``vitfree_winft`` with
  ``model_args.base`` for a WinfT built on another timm ViT), ``num_classes``, ``num_features``,
  ``global_pool``, ``model_args`` (with ``windows``: the full window spec, at the model's
  current patch grid) and ``pretrained_cfg`` (input size, mean/std, crop);
* ``model.safetensors``: the weights (never a pickle);
* ``README.md``: a model card that states where the windows came from (the spec's provenance).

Loading rules (safe sources, SHA-256 checks) live in :mod:`vitfree.weights`; the WinfT
factories apply them whenever ``pretrained=True``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .weights import (CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, WeightsError, check_weights_file, network_error,
                      parse_windows, portable_text, prefetch_pretrained, recorded_weights, set_default_mode,
                      sha256_file)
from .windows import MAX_SPEC_BYTES, WindowSpec, file_problem, parse_json, read_text_file

__all__ = ['save_pretrained', 'load_pretrained', 'check_config', 'push_to_hub', 'prepare_push', 'PushPlan',
           'model_card', 'HubError']

CARD_NAME = 'README.md'


class HubError(OSError):
    """Talking to the Hugging Face Hub failed (network, offline mode, authentication, HTTP errors)."""


UPLOAD_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
# pretrained_cfg fields that describe the registry's weights (a tag, its notes, papers); an export
# holds other weights, so they are not copied into its config.json
BORROWED_CFG_KEYS = ('tag', 'notes', 'description', 'origin_url', 'paper_name', 'paper_ids', 'hf_hub_id',
                     'hf_hub_filename', 'url', 'file', 'source')


DATA_KEYS = ('dataset', 'data', 'train_data', 'val_data')  # training facts that name a data set


def dataset_name(value: Any) -> str:
    """How a model card names a data set: a built-in name (``digits``) as it is, a folder or file by
    its own name only (``/data/flowers/`` -> ``flowers``), never the machine's path to it."""
    text = str(value)
    stripped = text.rstrip('/\\')
    return Path(stripped).name if ('/' in stripped or '\\' in stripped) else text


# ---- export ---------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, '_orig_mod'):
            model = getattr(model, 'module', None) or getattr(model, '_orig_mod')
        else:
            return model


def _export_args(model: torch.nn.Module) -> Dict[str, Any]:
    """``model_args`` for config.json: the factory's arguments with the live window spec as a dict."""
    args = {k: v for k, v in dict(getattr(model, '_model_args', {})).items()
            if k not in ('attn_layer', 'pretrained_model_args', 'cache_dir')}
    args['windows'] = model.window_spec.to_dict()
    backend = getattr(model, 'attn_backend', None)
    if backend is None or backend == 'auto':
        args.pop('attn_backend', None)
    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError(f'model argument {key}={value!r:.60} cannot be written to config.json; create the model '
                             f'with JSON-friendly arguments (names, numbers, lists) to export it') from None
    return args


def save_pretrained(
        model: torch.nn.Module,
        save_directory: Union[str, os.PathLike],
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Mapping[str, Any]] = None,
        training: Optional[Mapping[str, Any]] = None,
        card: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and a model card ``README.md`` to a folder.

    ``config.json`` records the architecture as built (``model_args``: every constructor argument
    and the window spec), the SHA-256 and size of ``model.safetensors`` (field ``weights``, checked
    when the folder is loaded again) and no registry tag: the weights are new, not the tag's.

    Args:
        model: a WinfT (DDP / ``torch.compile`` wrappers are taken off).
        save_directory: created if missing; files of the same names are replaced.
        label_names: class names in label order (stored as timm's ``label_names``; default: the
            model's own ``pretrained_cfg['label_names']`` when they fit its number of classes).
        data_config: preprocessing the weights were trained with (``input_size``, ``mean``, ...).
        training: facts for the model card (``dataset``, ``epochs``, ``metrics``, ``initialised_from``).
        card: model card front-matter overrides (``license``, ``tags``, ``description``).

    Returns:
        the folder.
    """
    from safetensors import SafetensorError
    from timm.models._hub import save_for_hf

    model = _unwrap(model)
    if not hasattr(model, 'window_spec'):
        raise TypeError(f'save_pretrained expects a WinfT, got {type(model).__name__}; '
                        f'make one with vitfree.create_winft(...) or timm.create_model("winft_...")')
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, 'exists and is not a folder (an export is a folder)', str(out))
    if label_names is None:
        own = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
        label_names = own if own is not None and len(own) == model.num_classes else None
    elif len(label_names) != model.num_classes:
        raise ValueError(f'{len(label_names)} label names for a model with {model.num_classes} classes')
    args = _export_args(model)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ('pytorch_model.bin',):
        if (out / stale).exists():
            (out / stale).unlink()
    model_config: Dict[str, Any] = {}
    if 'base' in args:  # a WinfT on another timm ViT: rebuilt through the vitfree_winft entry point
        model_config['pretrained_cfg'] = {'architecture': 'vitfree_winft'}
    if label_names is not None:
        model_config['label_names'] = [str(n) for n in label_names]
    dc = None
    if data_config:
        dc = {k: data_config[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
              if k in data_config}
    weights = out / WEIGHTS_NAME
    try:
        save_for_hf(model, str(out), model_config=model_config, model_args=args, safe_serialization=True,
                    data_config=dc)
    except SafetensorError as e:
        raise WeightsError(f'cannot write {weights}: {e}') from None
    set_default_mode(weights)
    cpath = out / CONFIG_NAME
    config = json.loads(cpath.read_text())
    pretrained_cfg = config.get('pretrained_cfg', {})
    for key in BORROWED_CFG_KEYS:  # facts about the registry's weights, not about these
        pretrained_cfg.pop(key, None)
    config['weights'] = {'file': WEIGHTS_NAME, 'sha256': sha256_file(weights), 'size': weights.stat().st_size}
    tmp = cpath.with_name(cpath.name + '.tmp')
    tmp.write_text(json.dumps(config, indent=2) + '\n')
    os.replace(tmp, cpath)
    (out / CARD_NAME).write_text(model_card(config, training=training, card=card))
    return out


def model_card(config: Mapping[str, Any], training: Optional[Mapping[str, Any]] = None,
               card: Optional[Mapping[str, Any]] = None) -> str:
    """A Hub model card (``README.md``) for an exported WinfT, stating its window spec's provenance.

    The card names no path of the machine it was written on: data sets by name or folder name
    (:func:`dataset_name`), checkpoints and other paths relative to the project or by their last
    two parts (:func:`~vitfree.weights.portable_text`)."""
    card = dict(card or {})
    spec = WindowSpec.from_dict(config['model_args']['windows'], source='model_args.windows')
    prov = spec.provenance
    arch = config['architecture']
    base = config['model_args'].get('base')
    tags = card.get('tags') or ['image-classification', 'timm', 'vitfree', 'winft']
    lines = ['---', 'tags:'] + [f'- {t}' for t in tags]
    title = card.get('name', arch + (f' ({base})' if base else ''))
    lines += ['library_name: timm', 'pipeline_tag: image-classification',
              f'license: {card.get("license", "apache-2.0")}', '---', f'# {title}', '']
    lines.append(card.get('description', (
        'A window-free Vision Transformer (WinfT): every patch attends only to the patches inside its own '
        'rectangular window, block by block, plus the class/register tokens. The windows are masks, not weights: '
        'they are stored in `config.json` (`model_args.windows`) and rebuilt with the model.')))
    lines += ['', '## Window spec', '']
    kind = prov.get('kind')
    what = {'measured': 'measured from the attention of a trained model',
            'prior': 'a hand-set prior, **not measured**',
            'uniform': 'one uniform window size, **not measured**'}.get(kind, kind)
    lines.append(f'- **Provenance:** `{kind}`: {what}.')
    for key, value in prov.items():
        if key != 'kind':
            lines.append(f'- **{key}:** {json.dumps(value) if not isinstance(value, str) else portable_text(value)}')
    lines.append(f'- **Patch grid:** {spec.grid[0]}x{spec.grid[1]}, {spec.depth} blocks '
                 f'({sum(spec.is_global(i) for i in range(spec.depth))} global)')
    lines += ['', '| block | window | mean area (patches) | share of grid |', '|---:|:---|---:|---:|']
    for row in spec.summary():
        lines.append(f'| {row["block"]} | {"global" if row["global"] else "local"} | {row["mean_area"]:.1f} | '
                     f'{100 * row["fraction"]:.1f}% |')
    arch_args = {k: v for k, v in config['model_args'].items() if k not in ('windows', 'base')}
    labels = config.get('label_names')
    lines += ['', '## Model', '',
              f'- **Built with:** `{arch}`' + (f' on `{base}`' if base else '') + ' and these architecture '
              'arguments (`model_args` in `config.json`; they override the entry point\'s defaults): '
              + ', '.join(f'`{k}={json.dumps(v)}`' for k, v in arch_args.items()),
              f'- **Classes:** {config.get("num_classes")}'
              + (f' ({", ".join(str(n) for n in labels)})' if labels else ''),
              f'- **Input size:** {config.get("pretrained_cfg", {}).get("input_size")}']
    if config.get('weights'):
        lines.append(f'- **Weights:** `{config["weights"]["file"]}`, SHA-256 `{config["weights"]["sha256"]}` '
                     f'(checked on load)')
    if training:
        lines += ['', '## Training', '']
        for key, value in training.items():
            if value is None:
                continue
            if isinstance(value, Mapping):
                value = ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in value.items())
            elif key in DATA_KEYS:
                value = dataset_name(value)
            elif isinstance(value, str):
                value = portable_text(value)
            lines.append(f'- **{key}:** {value}')
    lines += ['', '## Usage', '', '```python', 'import timm, vitfree',
              "model = timm.create_model('hf-hub:ORG/NAME', pretrained=True)  # or 'local-dir:PATH'",
              'model.window_spec  # the windows, rebuilt from config.json', '```', '']
    return '\n'.join(lines)


def load_pretrained(name_or_path: Union[str, os.PathLike], **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(..., pretrained=True)`` for an export folder (``local-dir:``) or Hub id (``hf-hub:``).

    A plain path is taken as a folder and a ``org/name`` that is not a folder as a Hub id.  When the
    Hub cannot be reached (and the files are not cached) this raises
    :class:`~vitfree.weights.HubUnreachableError` at once.
    """
    import timm

    name = str(name_or_path)
    if not name.startswith(('local-dir:', 'hf-hub:')):
        if Path(name).is_dir():
            check_config(Path(name) / CONFIG_NAME)
            name = f'local-dir:{name}'
        else:
            name = f'hf-hub:{name}'
    prefetch_pretrained(name, kwargs)  # an unreachable Hub: HubUnreachableError at once, not timm's retries
    return timm.create_model(name, pretrained=True, **kwargs)


def check_config(config: Union[str, os.PathLike, Mapping[str, Any]], source: Optional[str] = None) -> Dict[str, Any]:
    """Validate an exported ``config.json`` (path or dict); errors name the file and the field."""
    import timm

    if isinstance(config, Mapping):
        cfg, src = dict(config), source or 'config.json'
    else:
        path = Path(config)
        src = source or str(path)
        if file_problem(path) == 'not found':
            raise FileNotFoundError(f'{src}: not found (an exported model folder holds {CONFIG_NAME}, '
                                    f'{WEIGHTS_NAME} and {CARD_NAME})')
        cfg = parse_json(read_text_file(path, 'config', ValueError, MAX_SPEC_BYTES), src, ValueError)
    if not isinstance(cfg, dict):
        raise ValueError(f'{src}: expected a JSON object, got {type(cfg).__name__}')
    arch = cfg.get('architecture')
    if not isinstance(arch, str) or not arch:
        raise ValueError(f'{src}: field "architecture" is missing; expected a timm model name such as '
                         f'"winft_small_patch16_224" or "vitfree_winft"')
    if not timm.is_model(arch):
        raise ValueError(f'{src}: field "architecture" is {arch!r}, which is not a registered timm model '
                         f'(did you `import vitfree`?)')
    args = cfg.get('model_args', {})
    if not isinstance(args, dict):
        raise ValueError(f'{src}: field "model_args" must be an object, got {type(args).__name__}')
    if arch == 'vitfree_winft' and not isinstance(args.get('base'), str):
        raise ValueError(f'{src}: field "model_args.base" is missing; vitfree_winft needs the timm ViT it is '
                         f'built on, e.g. "vit_small_patch16_224"')
    if 'windows' in args:
        parse_windows(args['windows'], f'{src}: model_args.windows')
    if not isinstance(config, Mapping):
        recorded_weights(Path(config).parent, cfg)  # a malformed "weights" record is named
    return cfg


# ---- push -----------------------------------------------------------------------------------
@dataclass
class PushPlan:
    """Everything a push will do, prepared without touching the network."""
    folder: Path
    repo_id: str
    files: List[str]
    create_repo: Dict[str, Any] = field(default_factory=dict)
    upload_folder: Dict[str, Any] = field(default_factory=dict)
    sha256: Optional[str] = None  # of model.safetensors, checked against config.json (None: an older export)


def _export_folder(folder: Union[str, os.PathLike]) -> Path:
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() and (folder / 'model' / CONFIG_NAME).is_file():
        return folder / 'model'  # a `vitfree finetune` output folder
    return folder


def prepare_push(
        folder: Union[str, os.PathLike],
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
) -> PushPlan:
    """Check an export folder and prepare the ``create_repo`` / ``upload_folder`` arguments.

    The folder must hold a readable ``model.safetensors``; when its ``config.json`` records the
    weights' SHA-256 and size (every export :func:`save_pretrained` writes), the file is checked
    against them, so a corrupted or swapped file is never uploaded
    (:class:`~vitfree.weights.WeightsIntegrityError`)."""
    folder = _export_folder(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder}: no such folder (expected the output of vitfree.hub.save_pretrained)')
    if not isinstance(repo_id, str) or repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f'repo id must look like "org/name", got {repo_id!r}')
    check_config(folder / CONFIG_NAME)
    if not (folder / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        raise FileNotFoundError(f'{folder} has no {WEIGHTS_NAME}'
                                + (f' (only pickle files {pickles}, which vitfree does not upload)' if pickles else '')
                                + '; export with vitfree.hub.save_pretrained')
    from safetensors import safe_open
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework='pt') as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001
        raise ValueError(f'{folder / WEIGHTS_NAME} is not a readable safetensors file ({e})') from None
    if not keys:
        raise ValueError(f'{folder / WEIGHTS_NAME} holds no tensors')
    record = recorded_weights(folder)
    if record is not None:
        if record['file'] != WEIGHTS_NAME:
            raise ValueError(f'{folder / CONFIG_NAME} records the weights as {record["file"]!r}, but an export '
                             f'uploads {WEIGHTS_NAME}; export again with vitfree.hub.save_pretrained')
        check_weights_file(folder / WEIGHTS_NAME, record['sha256'], record['size'],
                           recorded_in=str(folder / CONFIG_NAME))
    files = [n for n in UPLOAD_PATTERNS if (folder / n).is_file()]
    message = commit_message or f'Upload WinfT ({json.loads((folder / CONFIG_NAME).read_text())["architecture"]})'
    return PushPlan(
        folder=folder, repo_id=repo_id, files=files,
        create_repo=dict(repo_id=repo_id, private=private, exist_ok=True, repo_type='model'),
        upload_folder=dict(folder_path=str(folder), revision=revision, commit_message=message, create_pr=create_pr,
                           allow_patterns=list(files), repo_type='model'),
        sha256=None if record is None else record['sha256'],
    )


def push_to_hub(
        folder: Union[str, os.PathLike],
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
        api: Optional[Any] = None,
):
    """Upload an export folder (config.json, model.safetensors, README.md) to the Hub.

    Uses ``huggingface_hub.HfApi().create_repo(..., exist_ok=True)`` then ``upload_folder``
    restricted to those three files; returns the ``CommitInfo``.  Pass ``api`` to use your own
    ``HfApi`` (or a stand-in in tests).
    """
    plan = prepare_push(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                        create_pr=create_pr)
    if api is None:
        from huggingface_hub import HfApi
        from .version import __version__
        api = HfApi(token=token, library_name='vitfree', library_version=__version__)
    with _hub_call(f'create hf-hub:{plan.repo_id}'):
        repo_url = api.create_repo(**plan.create_repo)
    target = getattr(repo_url, 'repo_id', None) or plan.repo_id  # the Hub may fill in the owner
    with _hub_call(f'upload {", ".join(plan.files)} to hf-hub:{target}'):
        return api.upload_folder(repo_id=target, **plan.upload_folder)


@contextlib.contextmanager
def _hub_call(what: str):
    """Turn what the network and the Hub raise (no connection, offline mode, HTTP errors) into one
    :class:`HubError` that says what failed; programming errors pass through."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - filtered below by where the exception class comes from
        if not network_error(e):
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f'cannot {what}: {detail} ({type(e).__name__}). Check the network connection (and that '
                       f'HF_HUB_OFFLINE is not set) and your Hub token (HF_TOKEN or `hf auth login`)') from None
