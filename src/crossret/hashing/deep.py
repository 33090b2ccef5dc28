"""The base of the deep hashing methods, :class:`DeepHashMethod`: what every
:class:`~crossret.hashing.networks.HashNet`-based method shares: normalise → network → codes at
inference, classifier predictions, and the saved state (normaliser + ``state_dict``).

Subclasses (source-only, COUPLE) implement ``fit`` and set ``normalizer``, ``network``,
``num_classes`` and ``input_dim`` (and ``source_normalizer`` when the source domain has its own
input statistics: ``encode(x, domain="source")`` then uses it, every other call ``normalizer``);
their config has ``encoder_dim``, ``hash_hidden`` and ``num_threads`` (and optionally ``dropout``).

Device: ``method.to("cuda")`` (before ``fit``, or after loading) trains and encodes on that device. Only
the network, its inputs and its losses live there: initial weights, batch orders and every other random
draw come from CPU generators, graphs and diffusion stay numpy on the CPU, outputs come back to the CPU,
and saved models and checkpoints hold CPU tensors, so a model trained on a GPU loads and encodes anywhere.
On the CPU every move is a no-op: the same tensors, the same arithmetic, the same codes.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from crossret.data.domain import Domain, class_count
from crossret.errors import ConfigError
from crossret.hashing.base import HashMethod, check_domain
from crossret.hashing.networks import HashNet, default_encoder_dim, torch_threads
from crossret.hashing.persistence import PersistentMethod
from crossret.hashing.preprocessing import FeatureNormalizer
from crossret.limits import check_memory

ENCODE_BATCH = 4096
# float32 copies of every weight while training: the weights, their gradients, Adam's two moments and
# an averaged (EMA) copy.
TRAINING_COPIES = 5
SOURCE_PREFIX = "srcnorm_"  # saved arrays of the source domain's own normaliser
CPU = torch.device("cpu")


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device ``device`` names, if the hashing networks can run there: ``cpu``, or ``cuda`` /
    ``cuda:N`` with a CUDA build of torch that sees that GPU. Anything else is a one-line
    :class:`~crossret.errors.ConfigError` naming ``--device`` and the fix."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda (cuda:N for one GPU), got {str(device)!r}")
    if resolved.type == "cpu":
        return resolved
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch has no usable CUDA device (torch.cuda.is_available() is "
                          "False); use --device cpu or install a CUDA build of torch on a machine with a GPU")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ConfigError(f"--device {device}: torch sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1}); "
                          "use --device cuda or one of those")
    return resolved


def rng_devices(device: torch.device) -> list[torch.device]:
    """What ``torch.random.fork_rng`` must save besides the CPU: the GPU trained on, whose generator
    ``torch.manual_seed`` reseeds too (dropout draws from it there)."""
    return [device] if device.type == "cuda" else []


def cpu_state(state: Any) -> Any:
    """``state`` (a tensor, or a state dict nested in dicts, lists and tuples) with every tensor on the CPU,
    so saved files load on machines without the GPU. Objects already on the CPU are returned as they are."""
    if isinstance(state, torch.Tensor):
        return state.cpu()  # the tensor itself when it is on the CPU already
    if isinstance(state, dict):
        items = {key: cpu_state(value) for key, value in state.items()}
        if all(items[key] is value for key, value in state.items()):
            return state
        moved = copy.copy(state)  # keeps the type (OrderedDict) and its attributes (state-dict _metadata)
        moved.update(items)
        return moved
    if isinstance(state, (list, tuple)):
        values = [cpu_state(value) for value in state]
        if all(a is b for a, b in zip(values, state, strict=True)):
            return state
        return type(state)(values)
    return state


class DeepHashMethod(PersistentMethod, HashMethod):
    """Base of the deep hashing methods: inference and persistence of one ``HashNet``."""

    storage = "torch"

    def __init__(self, bits: int, seed: int = 0, config: Any | None = None) -> None:
        super().__init__(bits, seed, config)
        self.config.validate()
        self.normalizer: FeatureNormalizer | None = None
        self.source_normalizer: FeatureNormalizer | None = None
        self.network: HashNet | None = None
        self.num_classes: int | None = None
        self.device: torch.device = CPU

    def to(self, device: str | torch.device) -> DeepHashMethod:
        """Train and encode on ``device`` (``cpu``, ``cuda`` or ``cuda:N``) from now on; a fitted network moves
        there. Refused with a one-line :class:`~crossret.errors.ConfigError` where torch cannot use it.

        A seed gives the same initial weights and batches on every device (they are drawn on the CPU), but
        GPU arithmetic is not bit-identical to the CPU's: codes trained on a GPU differ slightly.
        """
        self.device = resolve_device(device)
        if self.network is not None:
            self.network.to(self.device)
        return self

    def _build(self, input_dim: int, num_classes: int, encoder_dim: int | None = None) -> HashNet:
        cfg = self.config
        encoder_dim = cfg.encoder_dim if encoder_dim is None else encoder_dim
        self._check_network_memory(input_dim, num_classes, encoder_dim)
        with CPU:  # initialised from the CPU generator on every device: a seed gives the same weights
            net = HashNet(input_dim, self.bits, num_classes, encoder_dim=encoder_dim,
                          hash_hidden=cfg.hash_hidden, dropout=float(getattr(cfg, "dropout", 0.0)))
        return net.to(self.device)

    def check_sizes(self, source: Domain, target: Domain) -> None:
        super().check_sizes(source, target)
        if source.n and source.dim:
            classes = class_count(source.labels, f"{self.name} source labels") if source.labels.max() >= 0 else 1
            self._check_network_memory(source.dim, classes, self.config.encoder_dim)

    def _check_network_memory(self, input_dim: int, num_classes: int, encoder_dim: int | None) -> None:
        """Refuse widths (``encoder_dim``, ``hash_hidden``) whose network cannot be trained in the
        available memory, before torch allocates the weights."""
        width = default_encoder_dim(input_dim) if encoder_dim is None else encoder_dim
        hidden = self.config.hash_hidden
        if not all(isinstance(v, int) and v >= 0 for v in (width, hidden, input_dim, num_classes)):
            return  # HashNet names the invalid value
        head = width * hidden + hidden * self.bits if hidden else width * self.bits
        parameters = input_dim * width + head + width * num_classes
        activations = ENCODE_BATCH * (input_dim + 3 * width + 3 * hidden + self.bits + num_classes)
        check_memory(4 * (TRAINING_COPIES * parameters + 4 * activations),
                     f"{self.name}: a network with encoder_dim={width}, hash_hidden={hidden} on {input_dim} input "
                     f"features ({parameters} weights)", "lower encoder_dim / hash_hidden (--set)")

    @torch.no_grad()
    def _forward_eval(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tanh hash outputs, logits)`` on the CPU, computed in eval mode on the method's device in batches
        of ``ENCODE_BATCH`` rows (``x`` may be on either)."""
        assert self.network is not None
        self.network.eval()
        hashes, logits = [], []
        for lo in range(0, x.shape[0], ENCODE_BATCH):
            out = self.network(x[lo:lo + ENCODE_BATCH].to(self.device))
            hashes.append(out.hash.cpu())
            logits.append(out.logits.cpu())
        if not hashes:  # zero rows: empty outputs of the right width
            return (torch.zeros(0, self.bits, device=CPU),
                    torch.zeros(0, self.network.classifier.out_features, device=CPU))
        return torch.cat(hashes), torch.cat(logits)

    def _normalizer_for(self, domain: str) -> FeatureNormalizer:
        check_domain(domain)
        assert self.normalizer is not None
        if domain == "source" and self.source_normalizer is not None:
            return self.source_normalizer
        return self.normalizer

    def _outputs(self, features: np.ndarray, domain: str = "target") -> tuple[torch.Tensor, torch.Tensor]:
        normalizer = self._normalizer_for(domain)
        features = self._check_features(features)
        with torch_threads(self.config.num_threads):
            return self._forward_eval(torch.from_numpy(normalizer.transform(features, dtype=np.float32)))

    def encode_real(self, features: np.ndarray, domain: str = "target") -> np.ndarray:
        return self._outputs(features, domain)[0].numpy()

    def predict(self, features: np.ndarray, domain: str = "target") -> np.ndarray:
        """Class predictions of the classifier head (diagnostics)."""
        return self._outputs(features, domain)[1].argmax(1).numpy()

    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        assert self.normalizer is not None and self.network is not None and self.num_classes is not None
        arch = np.array([self.num_classes, self.network.encoder_dim], dtype=np.int64)
        source = self.source_normalizer.state(SOURCE_PREFIX) if self.source_normalizer is not None else {}
        return {**self.normalizer.state(), **source, "arch": arch}, cpu_state(self.network.state_dict())

    def _set_state(self, arrays: dict[str, np.ndarray], state_dict: dict[str, Any]) -> None:
        self.normalizer = FeatureNormalizer.from_state(arrays)
        # Files written before per-domain statistics existed have none: both domains use ``normalizer``.
        self.source_normalizer = (FeatureNormalizer.from_state(arrays, SOURCE_PREFIX)
                                  if f"{SOURCE_PREFIX}mean" in arrays else None)
        if self.source_normalizer is not None and self.source_normalizer.dim != self.normalizer.dim:
            raise ValueError("the source normaliser's size does not match the target normaliser's")
        num_classes, encoder_dim = (int(v) for v in np.asarray(arrays["arch"]).reshape(-1)[:2])
        if self.input_dim is None or self.normalizer.dim != self.input_dim:
            raise ValueError("normaliser size does not match input_dim")
        net = self._build(self.input_dim, num_classes, encoder_dim)
        net.load_state_dict(state_dict, strict=True)
        net.eval()
        self.network, self.num_classes = net, num_classes


# Alias of DeepHashMethod, the name existing importers use.
HashNetMethod = DeepHashMethod
