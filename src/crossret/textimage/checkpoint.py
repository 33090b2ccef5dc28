"""Official ALBEF checkpoints ↔ :class:`~crossret.textimage.albef.AlbefModel`.

An ALBEF checkpoint (``ALBEF.pth``, ``ALBEF_4M.pth``, RaSa/retrieval fine-tunes) is a ``torch.save``
of ``{"model": state_dict, "config": ..., "optimizer": ..., ...}``; only ``"model"`` is read. Files
are read with ``torch.load(map_location="cpu", weights_only=True)``: no arbitrary object is ever
unpickled, and a file that needs one is refused with a :class:`~crossret.errors.FileFormatError`.
Before loading, the CRC-32 of every member of the zip archive is verified (``torch.load`` does not),
so a truncated or altered file is refused with a message naming it. Files written here keep ALBEF's
layout (ALBEF's own code loads them); their version is ``payload["crossret"]["version"]``.

Key mapping (ALBEF layout → this package's module names; ``T`` = ``AlbefConfig.text_layers``)
------------------------------------------------------------------------------------------------
=====================================================  ===============================================
ALBEF key                                              AlbefModel key
=====================================================  ===============================================
``visual_encoder.patch_embed.proj.{weight,bias}``      ``vision.patch_embed.{weight,bias}``
``visual_encoder.cls_token`` / ``.pos_embed``          ``vision.cls_token`` / ``vision.pos_embed`` (†)
``visual_encoder.blocks.{i}.{rest}``                   ``vision.blocks.{i}.{rest}``  (norm1, attn.qkv,
                                                       attn.proj, norm2, mlp.fc1, mlp.fc2)
``visual_encoder.norm.*``                              ``vision.norm.*``
``text_encoder.bert.embeddings.*``                     ``text.embeddings.*``
``text_encoder.bert.encoder.layer.{i}.{rest}``, i < T  ``text.layers.{i}.{rest}``
``text_encoder.bert.encoder.layer.{i}.{rest}``, i ≥ T  ``fusion.layers.{i−T}.{rest}`` (with
                                                       ``crossattention.*``)
``text_encoder.cls.predictions.transform.*``           ``mlm_head.transform.*``
``text_encoder.cls.predictions.bias``                  ``mlm_head.bias``
``text_encoder.cls.predictions.decoder.bias``          ``mlm_head.decoder.bias`` (same parameter)
``text_encoder.cls.predictions.decoder.weight``        ``mlm_head.decoder.weight`` (tied to
                                                       ``text.embeddings.word_embeddings.weight``)
``vision_proj.*``, ``text_proj.*``, ``itm_head.*``,    the same names
``temp``
=====================================================  ===============================================

(†) ``pos_embed`` is resized with :func:`~crossret.textimage.albef.interpolate_pos_embed` when the
checkpoint's patch grid differs from the config's.

Also understood on load:

* the retrieval/fine-tune layout without ``bert.`` (``text_encoder.embeddings.*``,
  ``text_encoder.encoder.layer.*``; ALBEF ``Retrieval.py`` strips it) is read as if it had it;
* ignored, and reported in :attr:`AlbefCheckpoint.ignored_keys`: the momentum copies
  ``visual_encoder_m.*``, ``text_encoder_m.*``, ``vision_proj_m.*``, ``text_proj_m.*`` (unless
  ``momentum=True``), the queues ``image_queue``, ``text_queue``, ``idx_queue``, ``queue_ptr``
  (returned with ``queues=True``), the constant buffer ``…embeddings.position_ids`` and an unused
  BERT ``…bert.pooler.*``.

With ``momentum=True`` the ``*_m`` copies become a second :class:`AlbefModel` (the EMA teacher):
``X_m.k`` maps like ``X.k``. ALBEF's momentum model has no ITM head and no temperature, and the
fine-tune layout has no momentum MLM head: those teacher parameters are taken from the student keys.

Saving writes the same ALBEF layout (including ``…embeddings.position_ids`` and both tied names,
as ALBEF's own ``state_dict()`` has), plus a ``"crossret"`` entry recording the config, so that
``pos_embed`` of a non-square grid can be resized on load.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossret.errors import DataError, FileFormatError
from crossret.storage.atomic import atomic_open
from crossret.storage.sealed import is_zip_file, verify_zip
from crossret.textimage.albef import AlbefConfig, AlbefModel, interpolate_pos_embed
from crossret.textimage.tokenize import load_bert_vocab  # re-export: moved to tokenize, kept here for one release

__all__ = [
    "CHECKPOINT_FORMAT",
    "KEY_MAPPING",
    "AlbefCheckpoint",
    "AlbefShapeReport",
    "AlbefStateMapping",
    "albef_checkpoint_shapes",
    "albef_key_to_model_key",
    "albef_state_to_model",
    "compare_albef_shapes",
    "load_albef_checkpoint",
    "load_bert_vocab",
    "model_key_to_albef_key",
    "model_to_albef_state",
    "save_albef_checkpoint",
]

CHECKPOINT_FORMAT = "crossret.albef"
CHECKPOINT_VERSION = 1

KEY_MAPPING: tuple[tuple[str, str], ...] = (
    ("visual_encoder.patch_embed.proj.", "vision.patch_embed."),
    ("visual_encoder.cls_token", "vision.cls_token"),
    ("visual_encoder.pos_embed", "vision.pos_embed"),
    ("visual_encoder.blocks.", "vision.blocks."),
    ("visual_encoder.norm.", "vision.norm."),
    ("text_encoder.bert.embeddings.", "text.embeddings."),
    ("text_encoder.bert.encoder.layer.{i}.", "text.layers.{i}.  (i < text_layers)"),
    ("text_encoder.bert.encoder.layer.{i}.", "fusion.layers.{i - text_layers}.  (i >= text_layers)"),
    ("text_encoder.cls.predictions.", "mlm_head."),
    ("vision_proj.", "vision_proj."),
    ("text_proj.", "text_proj."),
    ("itm_head.", "itm_head."),
    ("temp", "temp"),
)
"""The mapping above as (ALBEF prefix, model prefix) pairs, for documentation and reports."""

# Plain prefix renames (ALBEF → model), applied in order; BERT encoder layers are handled separately.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("visual_encoder.patch_embed.proj.", "vision.patch_embed."),
    ("visual_encoder.", "vision."),
    ("text_encoder.bert.embeddings.", "text.embeddings."),
    ("text_encoder.cls.predictions.", "mlm_head."),
    ("vision_proj.", "vision_proj."),
    ("text_proj.", "text_proj."),
    ("itm_head.", "itm_head."),
)
_LAYER = re.compile(r"^text_encoder\.bert\.encoder\.layer\.(\d+)\.(.+)$")
_MODEL_LAYER = re.compile(r"^(text|fusion)\.layers\.(\d+)\.(.+)$")
_MOMENTUM_MODULES = ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m")
_QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
# Teacher parameters ALBEF's momentum model has no copy of: taken from the student's keys.
_TEACHER_FROM_STUDENT = ("itm_head.", "temp", "mlm_head.")
# Tied pairs: (model key, model key) that are one tensor in AlbefModel.
_TIED = (
    ("mlm_head.decoder.weight", "text.embeddings.word_embeddings.weight"),
    ("mlm_head.decoder.bias", "mlm_head.bias"),
)


# ----------------------------------------------------------------------------------------------------------------
# key mapping
# ----------------------------------------------------------------------------------------------------------------


def albef_key_to_model_key(key: str, config: AlbefConfig) -> str | None:
    """Map one ALBEF (student, ``bert.``-layout) key to an :class:`AlbefModel` key; ``None`` if the key is
    not part of that layout. A layer index beyond ``text_layers + fusion_layers`` still maps (to a
    fusion layer that does not exist), so the loader reports it as unexpected."""
    if key == "temp":
        return "temp"
    match = _LAYER.match(key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if index < config.text_layers:
            return f"text.layers.{index}.{rest}"
        return f"fusion.layers.{index - config.text_layers}.{rest}"
    for albef_prefix, model_prefix in _PREFIXES:
        if key.startswith(albef_prefix):
            return model_prefix + key[len(albef_prefix):]
    return None


def model_key_to_albef_key(key: str, config: AlbefConfig, *, momentum: bool = False) -> str:
    """Inverse of :func:`albef_key_to_model_key`; ``momentum=True`` gives the ``*_m`` copy's name
    (``visual_encoder_m.…``, ``text_encoder_m.…``, ``vision_proj_m.…``, ``text_proj_m.…``)."""
    match = _MODEL_LAYER.match(key)
    if match:
        part, index, rest = match.group(1), int(match.group(2)), match.group(3)
        index += config.text_layers if part == "fusion" else 0
        albef = f"text_encoder.bert.encoder.layer.{index}.{rest}"
    elif key == "temp":
        albef = "temp"
    else:
        for albef_prefix, model_prefix in _PREFIXES:
            if key.startswith(model_prefix):
                albef = albef_prefix + key[len(model_prefix):]
                break
        else:
            raise KeyError(f"no ALBEF name for model key {key!r}")
    if momentum:
        head, _, tail = albef.partition(".")
        albef = f"{head}_m.{tail}"
    return albef


def _normalise_layout(key: str) -> str:
    """Retrieval fine-tunes store ``text_encoder.{embeddings,encoder}.*`` (BertModel, no ``bert.``)."""
    for module in ("text_encoder", "text_encoder_m"):
        for part in ("embeddings.", "encoder."):
            if key.startswith(f"{module}.{part}"):
                return f"{module}.bert.{key[len(module) + 1:]}"
    return key


def _is_ignorable(key: str) -> bool:
    """Keys of ALBEF's layout that have no counterpart in AlbefModel and are safe to drop."""
    if key in _QUEUE_KEYS:
        return True
    if key.endswith("embeddings.position_ids"):  # the constant arange(max_position) buffer
        return True
    return ".bert.pooler." in key  # ALBEF never uses BERT's pooler


@dataclass
class AlbefStateMapping:
    """Result of :func:`albef_state_to_model`.

    ``state``: model key → tensor. ``sources``: model key → the ALBEF key it came from.
    ``unexpected``: ALBEF keys not understood (not in the layout). ``ignored``: known ALBEF keys
    deliberately skipped (momentum copies unless mapped, queues, position_ids, pooler).
    """

    state: dict[str, Tensor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def albef_state_to_model(state: Mapping[str, Tensor], config: AlbefConfig, *,
                         momentum: bool = False) -> AlbefStateMapping:
    """Rename an ALBEF ``state_dict`` to :class:`AlbefModel` keys (see the module docstring's table).

    ``momentum=False``: the student keys are mapped and the ``*_m`` copies ignored. ``momentum=True``:
    the ``*_m`` copies are mapped (as the teacher), completed with the student's ITM head,
    temperature and — when the checkpoint has no momentum MLM head — MLM head; other student keys
    are then "ignored". Tensors are not copied, and ``pos_embed`` is not resized here.
    """
    out = AlbefStateMapping()
    fallback: dict[str, tuple[str, Tensor]] = {}
    for raw_key, tensor in state.items():
        key = _normalise_layout(raw_key)
        head = key.split(".", 1)[0]
        if head in _MOMENTUM_MODULES:
            if not momentum:
                out.ignored.append(raw_key)
                continue
            key = head[:-2] + key[len(head):]  # visual_encoder_m.x → visual_encoder.x
        elif momentum and not _is_ignorable(key):
            model_key = albef_key_to_model_key(key, config)
            if model_key == "mlm_head.decoder.weight":
                out.ignored.append(raw_key)  # tied to the teacher's own word embeddings, not the student's
            elif model_key is not None and model_key.startswith(_TEACHER_FROM_STUDENT):
                fallback[model_key] = (raw_key, tensor)
            elif model_key is None:
                out.unexpected.append(raw_key)
            else:
                out.ignored.append(raw_key)
            continue
        if _is_ignorable(key):
            out.ignored.append(raw_key)
            continue
        model_key = albef_key_to_model_key(key, config)
        if model_key is None:
            out.unexpected.append(raw_key)
            continue
        out.state[model_key] = tensor
        out.sources[model_key] = raw_key
    for model_key, (raw_key, tensor) in fallback.items():
        if model_key in out.state:
            out.ignored.append(raw_key)
        else:
            out.state[model_key] = tensor
            out.sources[model_key] = raw_key
    return out


def model_to_albef_state(model: AlbefModel, *, momentum: bool = False) -> dict[str, Tensor]:
    """The model's ``state_dict`` under ALBEF's key names (see the module docstring's table).

    Both names of each tied tensor are written (``text_encoder.cls.predictions.decoder.weight`` and
    ``…word_embeddings.weight``; ``…predictions.bias`` and ``…decoder.bias``), plus the constant
    ``text_encoder.bert.embeddings.position_ids`` buffer, exactly as ALBEF's own ``state_dict()``.
    ``momentum=True`` names the tensors as ALBEF's momentum copies (``*_m``) and leaves out the ITM
    head and temperature, which ALBEF's momentum model does not have. Tensors share storage with the
    model (as ``state_dict()``).
    """
    config = model.config
    out: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        if momentum and (key == "temp" or key.startswith("itm_head.")):
            continue
        out[model_key_to_albef_key(key, config, momentum=momentum)] = tensor
    prefix = "text_encoder_m" if momentum else "text_encoder"
    out[f"{prefix}.bert.embeddings.position_ids"] = torch.arange(config.max_position).unsqueeze(0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# reading / writing files
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AlbefCheckpoint:
    """What :func:`load_albef_checkpoint` returns.

    ``missing_keys`` / ``unexpected_keys`` use ALBEF names (empty after a strict load);
    ``ignored_keys`` lists the known-but-unused ALBEF keys; ``teacher`` is the momentum model
    (``momentum=True``); ``queues`` the ALBEF queue buffers (``queues=True``), e.g. ``image_queue``
    ``(embed_dim, queue_size)``; ``interpolated`` the ALBEF names of resized ``pos_embed`` tensors.
    """

    model: AlbefModel
    teacher: AlbefModel | None = None
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    queues: dict[str, Tensor] = field(default_factory=dict)
    interpolated: list[str] = field(default_factory=list)


def _read_payload(path: Path) -> Any:
    if not path.is_file():
        raise FileFormatError(f"{path}: no such checkpoint file")
    # ALBEF's layout has no room for our sealed container (ALBEF's own code must load the file), so the
    # integrity check is the zip archive's CRC-32 of every member, which torch.load never verifies.
    if is_zip_file(path):
        verify_zip(path, "checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()]
        # torch's message is mostly advice to disable the check; keep the line that says what was refused.
        reason = next((line for line in lines if "WeightsUnpickler error" in line), next(iter(lines), "")) or "?"
        raise FileFormatError(
            f"{path}: refused to load: the file needs objects other than tensors and plain containers, which "
            f"torch.load(weights_only=True) does not unpickle ({reason[:300]}). If you trust the file, re-save "
            "its 'model' state_dict alone with torch.save({'model': state_dict}, path)"
        ) from exc
    except Exception as exc:  # an untrusted file: any parse failure is a format error
        raise FileFormatError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {str(exc)[:300]}); "
                              "the file is corrupt, truncated or not a torch checkpoint") from exc


def _extract_state(payload: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, crossret metadata)`` from a loaded payload; a bare state_dict is accepted too."""
    meta: dict[str, Any] = {}
    if isinstance(payload, Mapping) and "model" in payload:
        state = payload["model"]
        extra = payload.get("crossret")
        if isinstance(extra, Mapping) and extra.get("format") == CHECKPOINT_FORMAT:
            meta = dict(extra)
    elif isinstance(payload, Mapping) and any(str(k).startswith("visual_encoder.") for k in payload):
        state = payload
    else:
        found = sorted(map(str, payload))[:10] if isinstance(payload, Mapping) else type(payload).__name__
        raise FileFormatError(f"{path}: not an ALBEF checkpoint: expected a dict with a 'model' state_dict, "
                              f"found {found}")
    if not isinstance(state, Mapping):
        raise FileFormatError(f"{path}: 'model' is a {type(state).__name__}, not a state_dict")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise FileFormatError(f"{path}: 'model' entries that are not tensors: {bad[:10]}")
    return dict(state), meta


def _source_grid(meta: Mapping[str, Any], source_grid: tuple[int, int] | None) -> tuple[int, int] | None:
    if source_grid is not None:
        return int(source_grid[0]), int(source_grid[1])
    config = meta.get("config")
    if isinstance(config, Mapping):
        try:
            size, patch = config["image_size"], int(config["patch_size"])
            return int(size[0]) // patch, int(size[1]) // patch
        except (KeyError, TypeError, ValueError, IndexError):
            return None
    return None


def _listing(keys: list[str], limit: int = 60) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _apply(model: AlbefModel, mapping: AlbefStateMapping, *, path: Path, momentum: bool, strict: bool,
           grid: tuple[int, int] | None, result: AlbefCheckpoint) -> None:
    """Check names, shapes and ties of a mapped state, resize ``pos_embed``, and load it into ``model``."""
    config = model.config
    target = model.state_dict()
    state = dict(mapping.state)

    # Tied tensors: one is enough; two must agree (the model cannot hold two different values).
    for a, b in _TIED:
        if a in state and b in state:
            if state[a].shape == state[b].shape and not torch.equal(state[a], state[b]):
                raise FileFormatError(f"{path}: {mapping.sources[a]} and {mapping.sources[b]} differ, but the model "
                                      "ties them (one tensor); the checkpoint is inconsistent")
        elif a in state:
            state[b] = state[a]
        elif b in state:
            state[a] = state[b]

    unexpected = sorted(mapping.sources.get(k, k) for k in state if k not in target)
    for key in [k for k in state if k not in target]:
        del state[key]
    unexpected = sorted(set(mapping.unexpected) | set(unexpected))
    missing = sorted(model_key_to_albef_key(k, config, momentum=momentum and not k.startswith(_TEACHER_FROM_STUDENT))
                     for k in target if k not in state)

    pos_key = "vision.pos_embed"
    if pos_key in state and state[pos_key].shape != target[pos_key].shape:
        try:
            state[pos_key] = interpolate_pos_embed(state[pos_key], config.grid_size, grid)
        except ValueError as exc:
            raise FileFormatError(f"{path}: cannot resize {mapping.sources.get(pos_key, pos_key)} "
                                  f"{tuple(mapping.state[pos_key].shape)} to the grid {config.grid_size} of "
                                  f"AlbefConfig.image_size={config.image_size}: {exc}; pass source_grid=(gh, gw) "
                                  "of the checkpoint's image size") from exc
        result.interpolated.append(mapping.sources.get(pos_key, pos_key))

    mismatched = [f"{mapping.sources.get(k, k)}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in state.items() if v.shape != target[k].shape]
    if mismatched:
        raise FileFormatError(f"{path}: tensor shapes do not match AlbefConfig (check vocab_size, widths, "
                              f"depths, max_position): {mismatched[:20]}")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        raise FileFormatError(f"{path}: checkpoint does not match the ALBEF layout for this AlbefConfig: "
                              + "; ".join(parts) + ". Load with strict=False to accept a partial match")
    model.load_state_dict(state, strict=False)
    result.missing_keys.extend(missing)
    result.unexpected_keys.extend(k for k in unexpected if k not in result.unexpected_keys)


def load_albef_checkpoint(
    path: str | os.PathLike,
    config: AlbefConfig | None = None,
    *,
    strict: bool = True,
    momentum: bool = False,
    queues: bool = False,
    source_grid: tuple[int, int] | None = None,
    model: AlbefModel | None = None,
) -> AlbefCheckpoint:
    """Load an official ALBEF checkpoint (or one written by :func:`save_albef_checkpoint`).

    Args:
        path: the ``.pth`` file; read with ``torch.load(map_location="cpu", weights_only=True)``.
        config: the architecture to build (default :meth:`AlbefConfig.base`); ignored when ``model`` is
            given. Its ``image_size`` may differ from the checkpoint's: ``pos_embed`` is interpolated.
        strict: missing or unexpected keys raise :class:`FileFormatError` listing them; with
            ``strict=False`` they are returned in the result and missing parameters keep their init.
        momentum: also build the momentum (teacher) model from the ``*_m`` copies.
        queues: also return ``image_queue``, ``text_queue``, ``idx_queue``, ``queue_ptr`` when present.
        source_grid: the checkpoint's patch grid ``(gh, gw)`` if it cannot be inferred (a non-square
            grid in a file without crossret metadata).
        model: load into this model instead of a new one.

    Raises:
        FileFormatError: unreadable, truncated, foreign or unsafe file, shape mismatches, or (strict)
            missing/unexpected keys — the message names the file and the keys.
    """
    path = Path(path)
    model = model if model is not None else AlbefModel(config or AlbefConfig.base())
    config = model.config
    state, meta = _extract_state(_read_payload(path), path)
    grid = _source_grid(meta, source_grid)

    result = AlbefCheckpoint(model=model)
    mapping = albef_state_to_model(state, config)
    _apply(model, mapping, path=path, momentum=False, strict=strict, grid=grid, result=result)
    result.ignored_keys = sorted(mapping.ignored)
    if momentum:
        teacher_mapping = albef_state_to_model(state, config, momentum=True)
        if not any(k.split(".", 1)[0] in _MOMENTUM_MODULES for k in state):
            raise FileFormatError(f"{path}: momentum=True but the checkpoint has no momentum copies "
                                  f"({', '.join(m + '.*' for m in _MOMENTUM_MODULES)})")
        teacher = AlbefModel(config)
        _apply(teacher, teacher_mapping, path=path, momentum=True, strict=strict, grid=grid, result=result)
        teacher.requires_grad_(False)
        result.teacher = teacher
        result.ignored_keys = sorted(set(mapping.ignored) & set(teacher_mapping.ignored))
    if queues:
        result.queues = {k: state[k] for k in _QUEUE_KEYS if k in state}
    return result


def albef_checkpoint_shapes(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """The shape of every tensor of a checkpoint's ``"model"`` (its own key names) and its crossret metadata,
    read without loading the tensors where the file allows it (a zip checkpoint is memory-mapped after its
    CRC check), so that a run can check a checkpoint against the model and the vocabulary before it starts."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such checkpoint file")
    payload: Any = None
    if is_zip_file(path):
        verify_zip(path, "checkpoint")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # any refusal is reported by the full read below, with its message
            payload = None
    if payload is None:
        payload = _read_payload(path)
    state, meta = _extract_state(payload, path)
    return {key: tuple(tensor.shape) for key, tensor in state.items()}, meta


@dataclass
class AlbefShapeReport:
    """What :func:`compare_albef_shapes` finds, in ALBEF key names: keys the model has and the checkpoint
    lacks (``missing``), keys the checkpoint has and the model lacks (``unexpected``) and shared keys of
    another shape (``mismatched``, as ``"key: checkpoint (..) vs model (..)"``)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def _model_shapes(config: AlbefConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # names and shapes only: no memory is allocated
        model = AlbefModel(config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def compare_albef_shapes(shapes: Mapping[str, tuple[int, ...]], config: AlbefConfig) -> AlbefShapeReport:
    """Compare a checkpoint's tensor shapes (:func:`albef_checkpoint_shapes`) with the student model of
    ``config`` the way :func:`load_albef_checkpoint` matches them: tied names stand for each other and a
    ``pos_embed`` of another patch grid (same width) counts as matching, since it is interpolated."""
    mapping = albef_state_to_model(shapes, config)  # type: ignore[arg-type]  # renames keys only
    state: dict[str, tuple[int, ...]] = dict(mapping.state)  # type: ignore[arg-type]
    for a, b in _TIED:
        if a in state and b not in state:
            state[b] = state[a]
        elif b in state and a not in state:
            state[a] = state[b]
    target = _model_shapes(config)
    report = AlbefShapeReport()
    report.unexpected = sorted(set(mapping.unexpected) | {mapping.sources.get(k, k) for k in state if k not in target})
    report.missing = sorted(model_key_to_albef_key(k, config) for k in target if k not in state)
    for key, shape in state.items():
        expected = target.get(key)
        if expected is None or tuple(shape) == expected:
            continue
        if key == "vision.pos_embed" and len(shape) == 3 and shape[0] == 1 and shape[2] == expected[2]:
            continue  # another grid: interpolated on load
        report.mismatched.append(f"{mapping.sources.get(key, key)}: checkpoint {tuple(shape)} vs model {expected}")
    return report


def save_albef_checkpoint(
    model: AlbefModel,
    path: str | os.PathLike,
    *,
    teacher: AlbefModel | None = None,
    queues: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``{"model": ALBEF-layout state_dict, "crossret": {format, version, config}}`` atomically
    (temporary file + ``os.replace``). ``teacher`` adds the ``*_m`` momentum copies and ``queues`` the
    named queue buffers (``image_queue``, ``text_queue``, ``idx_queue``, ``queue_ptr``), so the file
    has ALBEF's layout and loads with ALBEF's own code as well as :func:`load_albef_checkpoint`."""
    path = Path(path)
    state = model_to_albef_state(model)
    if teacher is not None:
        state.update(model_to_albef_state(teacher, momentum=True))
    for name, tensor in (queues or {}).items():
        if name not in _QUEUE_KEYS:
            raise DataError(f"save_albef_checkpoint: unknown queue {name!r}; ALBEF's are {list(_QUEUE_KEYS)}")
        state[name] = tensor.detach().cpu()
    payload = {
        "model": state,
        "crossret": {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": model.config.to_dict()},
    }
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return path
