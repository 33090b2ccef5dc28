"""What every :class:`~crossret.hashing.networks.HashNet`-based method shares: normalise → network
→ codes at inference, classifier predictions, and the saved state (normaliser + ``state_dict``).

Subclasses (source-only, COUPLE) implement ``fit`` and set ``normalizer``, ``network``,
``num_classes`` and ``input_dim`` (and ``source_normalizer`` when the source domain has its own
input statistics: ``encode(x, domain="source")`` then uses it, every other call ``normalizer``);
their config has ``encoder_dim``, ``hash_hidden`` and ``num_threads`` (and optionally ``dropout``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from crossret._limits import check_memory
from crossret.data.domain import Domain, class_count
from crossret.hashing._state import PersistentMethod
from crossret.hashing.base import HashMethod, check_domain
from crossret.hashing.networks import HashNet, default_encoder_dim, torch_threads
from crossret.hashing.preprocessing import FeatureNormalizer

ENCODE_BATCH = 4096
# float32 copies of every weight while training: the weights, their gradients, Adam's two moments and
# an averaged (EMA) copy.
TRAINING_COPIES = 5
SOURCE_PREFIX = "srcnorm_"  # saved arrays of the source domain's own normaliser


class HashNetMethod(PersistentMethod, HashMethod):
    """Base of the deep hashing methods: inference and persistence of one ``HashNet``."""

    storage = "torch"

    def __init__(self, bits: int, seed: int = 0, config: Any | None = None) -> None:
        super().__init__(bits, seed, config)
        self.config.validate()
        self.normalizer: FeatureNormalizer | None = None
        self.source_normalizer: FeatureNormalizer | None = None
        self.network: HashNet | None = None
        self.num_classes: int | None = None

    def _build(self, input_dim: int, num_classes: int, encoder_dim: int | None = None) -> HashNet:
        cfg = self.config
        encoder_dim = cfg.encoder_dim if encoder_dim is None else encoder_dim
        self._check_network_memory(input_dim, num_classes, encoder_dim)
        return HashNet(input_dim, self.bits, num_classes, encoder_dim=encoder_dim,
                       hash_hidden=cfg.hash_hidden, dropout=float(getattr(cfg, "dropout", 0.0)))

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
        """``(tanh hash outputs, logits)`` in eval mode, in batches of ``ENCODE_BATCH`` rows."""
        assert self.network is not None
        self.network.eval()
        hashes, logits = [], []
        for lo in range(0, x.shape[0], ENCODE_BATCH):
            out = self.network(x[lo:lo + ENCODE_BATCH])
            hashes.append(out.hash)
            logits.append(out.logits)
        if not hashes:  # zero rows: empty outputs of the right width
            return torch.zeros(0, self.bits), torch.zeros(0, self.network.classifier.out_features)
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
        return {**self.normalizer.state(), **source, "arch": arch}, self.network.state_dict()

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
