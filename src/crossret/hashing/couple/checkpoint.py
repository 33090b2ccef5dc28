"""COUPLE's training checkpoints: written after every epoch, read back to resume bit for bit.

A checkpoint is a sealed container (kind :data:`CHECKPOINT_FORMAT`, version, size and SHA-256) holding
``{"header": json, "model", "optimizer", "arrays"[, "ema"]}``: the network, the optimiser, both random
generators, the current graph and selection, the refresh history and the epoch log. Tensors are
saved on the CPU, so a checkpoint written on a GPU resumes on any device.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from crossret.data.domain import Domain
from crossret.errors import ConfigError, FileFormatError
from crossret.hashing.couple.selection import Selection
from crossret.hashing.deep import cpu_state
from crossret.hashing.networks import HashNet
from crossret.storage.sealed import load_torch, save_torch

CHECKPOINT_FORMAT = "crossret.couple.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Trainee:
    """The live objects a checkpoint saves and restores in place."""

    net: HashNet
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # batch orders
    ema: torch.optim.swa_utils.AveragedModel | None


@dataclass
class Resumed:
    """What a checkpoint gives back besides the weights: where training stopped and its state there."""

    epochs_done: int
    selection: Selection | None
    epoch_log: list[dict[str, Any]]
    numpy_rng: dict[str, Any]  # ``np.random.Generator.bit_generator.state`` (walks, Mixup positions)
    history: list[dict[str, Any]]  # per refresh: epoch, selected target indices, pseudo-labels


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A COUPLE checkpoint's payload ``{"header": json, "model", "optimizer", "arrays"}``, read safely: the
    sealed container's kind, version, size and SHA-256 are verified, then ``torch.load(weights_only=True)``.
    Damaged or foreign files raise :class:`~crossret.errors.FileFormatError` naming the file."""
    payload = load_torch(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "COUPLE checkpoint")
    if not isinstance(payload, dict):
        raise FileFormatError(f"{path}: not a COUPLE checkpoint (the payload is a {type(payload).__name__})")
    return payload


def save_checkpoint(path: Path, identity: dict[str, Any], trainee: Trainee, rng: np.random.Generator,
                    epochs_done: int, selection: Selection | None, epoch_log: list[dict[str, Any]],
                    fingerprint: str, history: list[dict[str, Any]]) -> None:
    """Write the checkpoint after ``epochs_done`` epochs to ``path``.

    ``identity``: ``{"method", "bits", "seed", "config"}``, which a resume must match;
    ``fingerprint``: :func:`data_fingerprint` of the training data.
    """
    header = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **identity, "epochs_done": epochs_done,
        "data_fingerprint": fingerprint, "numpy_rng": rng.bit_generator.state, "epoch_log": epoch_log,
        "history_epochs": [h["epoch"] for h in history],
    }
    arrays: dict[str, torch.Tensor] = {"torch_rng": trainee.generator.get_state()}
    if selection is not None:
        arrays["pseudo_labels"] = torch.from_numpy(selection.pseudo_labels)
        arrays["selected"] = torch.from_numpy(selection.selected)
        if selection.graph is not None:
            csr = selection.graph
            arrays["graph_indptr"] = torch.from_numpy(csr.indptr.astype(np.int64))
            arrays["graph_indices"] = torch.from_numpy(csr.indices.astype(np.int64))
            arrays["graph_data"] = torch.from_numpy(csr.data.astype(np.float64))
            arrays["graph_shape"] = torch.tensor(csr.shape, dtype=torch.int64)
    for i, entry in enumerate(history):
        arrays[f"history_{i}_selected"] = torch.from_numpy(entry["selected"].astype(np.int64))
        arrays[f"history_{i}_pseudo"] = torch.from_numpy(entry["pseudo_labels"])
    # Sealed (kind, version, SHA-256) and written atomically: a kill mid-write leaves the previous one.
    # CPU tensors (a no-op on the CPU): a checkpoint written on a GPU resumes on any device.
    payload = {"header": json.dumps(header), "model": cpu_state(trainee.net.state_dict()),
               "optimizer": cpu_state(trainee.optimizer.state_dict()), "arrays": arrays}
    if trainee.ema is not None:
        payload["ema"] = cpu_state(trainee.ema.state_dict())
    save_torch(path, payload, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)


def load_checkpoint(path: Path, identity: dict[str, Any], fingerprint: str, trainee: Trainee) -> Resumed:
    """Restore ``trainee`` from the checkpoint at ``path`` and return the rest of its state.

    Refused with a :class:`~crossret.errors.ConfigError` when ``identity`` (method, bits, seed, config)
    or the data ``fingerprint`` differ from the checkpoint's, with a
    :class:`~crossret.errors.FileFormatError` naming the file when it is damaged or foreign.
    """
    payload = read_checkpoint(path)
    header = _checked_header(path, payload, identity, fingerprint)
    try:
        trainee.net.load_state_dict(payload["model"], strict=True)
        if trainee.ema is not None:
            trainee.ema.load_state_dict(payload["ema"], strict=True)
        trainee.optimizer.load_state_dict(payload["optimizer"])
        arrays = payload["arrays"]
        trainee.generator.set_state(arrays["torch_rng"])
        selection = _selection_from(arrays)
        history = [
            {"epoch": epoch, "selected": arrays[f"history_{i}_selected"].numpy().copy(),
             "pseudo_labels": arrays[f"history_{i}_pseudo"].numpy().copy()}
            for i, epoch in enumerate(header["history_epochs"])
        ]
        return Resumed(int(header["epochs_done"]), selection, list(header["epoch_log"]), header["numpy_rng"],
                       history)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise FileFormatError(f"{path}: the COUPLE checkpoint is inconsistent ({type(exc).__name__}: {exc})") \
            from exc


def _checked_header(path: Path, payload: dict[str, Any], identity: dict[str, Any],
                    fingerprint: str) -> dict[str, Any]:
    """The checkpoint's header, once it is known to be this format and to match this run."""
    try:
        header = json.loads(payload["header"])
    except Exception as exc:  # an untrusted / damaged file: refuse, naming it
        raise FileFormatError(f"{path}: cannot read the COUPLE checkpoint ({type(exc).__name__}: {exc}); "
                              "delete it to start over") from exc
    if header.get("format") != CHECKPOINT_FORMAT or header.get("version") != CHECKPOINT_VERSION:
        raise FileFormatError(f"{path}: not a COUPLE checkpoint of format version {CHECKPOINT_VERSION}")
    bits, seed, config = identity["bits"], identity["seed"], identity["config"]
    if header.get("config") != config or header.get("bits") != bits or header.get("seed") != seed:
        raise ConfigError(f"{path}: the checkpoint was written with a different configuration, bits or seed"
                          f"{config_differences(header, bits, seed, config)}; "
                          "resume with the same settings or start a new run")
    if header.get("data_fingerprint") != fingerprint:
        raise ConfigError(f"{path}: the checkpoint was trained on different data; refusing to resume")
    return header


def _selection_from(arrays: dict[str, torch.Tensor]) -> Selection | None:
    """The saved selection (``None`` if the checkpoint precedes the first refresh)."""
    if "pseudo_labels" not in arrays:
        return None
    graph = None
    if "graph_indptr" in arrays:
        shape = tuple(int(v) for v in arrays["graph_shape"].tolist())
        graph = sp.csr_matrix((arrays["graph_data"].numpy(), arrays["graph_indices"].numpy(),
                               arrays["graph_indptr"].numpy()), shape=shape)
    return Selection(arrays["pseudo_labels"].numpy().copy(), arrays["selected"].numpy().copy(), graph)


def config_differences(header: dict[str, Any], bits: int, seed: int, config: dict[str, Any]) -> str:
    """`` (differs: a, b; not in the checkpoint: c)`` naming what keeps a checkpoint from resuming; a
    setting missing from the checkpoint means an older crossret wrote it (before that option existed)."""
    saved = header.get("config") if isinstance(header.get("config"), dict) else {}
    differs = [k for k in ("bits", "seed") if header.get(k) != {"bits": bits, "seed": seed}[k]]
    differs += sorted(k for k in config if k in saved and saved[k] != config[k])
    missing = sorted(k for k in config if k not in saved)
    parts = ([f"differs: {', '.join(differs)}"] if differs else []) + (
        [f"not in the checkpoint (written by an older crossret): {', '.join(missing)}"] if missing else [])
    return f" ({'; '.join(parts)})" if parts else ""


def data_fingerprint(source: Domain, target: Domain) -> str:
    """SHA-256 of the source features and labels and the target features (shapes included): a
    checkpoint resumes only on the data it was trained on."""
    digest = hashlib.sha256()
    for array in (source.features, source.labels, target.features):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
