"""Hash networks and the losses shared by the deep hashing methods.

:class:`HashNet` follows the network of COUPLE (class ``DDPA`` of the released code):

* encoder ``E``: Linear(d → e) → BatchNorm → ReLU (COUPLE: ``e = d``);
* hash head ``H``: Linear(e → m) → BatchNorm → ReLU → Linear(m → L) → tanh (COUPLE: ``m = 1024``);
* classifier ``Cl``: Linear(e → C) on the encoder features ``f = E(x)``, not on the codes.

Codes at test time are ``sign(H(E(x)))``. The widths are configurable so that 4,096-d inputs do not
need a 4,096 × 4,096 encoder (the default ``e = min(d, 1024)``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from crossret.errors import ConfigError, DataError, NumericalError
from crossret.threads import use_threads

PAIR_LOSSES = ("couple", "cosine", "dpsh")


def check_finite_loss(total: torch.Tensor, terms: Mapping[str, torch.Tensor], *, where: str, lr: float) -> None:
    """Raise :class:`NumericalError` if the training loss ``total`` is NaN or inf, *before* the optimiser
    step (so the weights of the last good step are kept). ``terms`` name the loss terms; the message lists
    the non-finite ones. One host sync per call."""
    if bool(torch.isfinite(total)):
        return
    bad = [name for name, value in terms.items() if not bool(torch.isfinite(value).all())]
    raise NumericalError(
        f"{where}: the training loss became {float(total.detach())} (non-finite terms: {', '.join(bad) or 'the sum'}); "
        f"training has diverged. Lower the learning rate (lr is {lr:g}) and, if the input features have very "
        "different scales, standardise them")


def check_finite_network(net: nn.Module, *, where: str, lr: float) -> None:
    """Raise :class:`NumericalError` naming the parameters/buffers of ``net`` that hold NaN or inf (e.g. after
    an optimiser step that overflowed): a network that cannot give finite codes is never returned."""
    bad = [name for name, tensor in [*net.named_parameters(), *net.named_buffers()]
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        lr_text = "" if math.isnan(lr) else f" (lr is {lr:g})"
        raise NumericalError(f"{where}: the trained network holds NaN or inf in {', '.join(bad[:5])}"
                             f"{' and more' if len(bad) > 5 else ''}; training has diverged. Lower the learning "
                             f"rate{lr_text}")


class HashNetOutput(NamedTuple):
    features: torch.Tensor  # encoder output f = E(x), (B, e)
    hash: torch.Tensor  # tanh outputs h = H(f) in (-1, 1), (B, L)
    logits: torch.Tensor  # classifier output Cl(f), (B, C)


def default_encoder_dim(input_dim: int) -> int:
    """COUPLE uses ``e = d``; capped at 1024 so that 4,096-d features stay cheap on a CPU."""
    return min(input_dim, 1024)


class HashNet(nn.Module):
    """Encoder → tanh hash head, plus a classifier on the encoder features (COUPLE §3.3).

    Args:
        input_dim: feature size ``d``.
        bits: code length ``L``.
        num_classes: classifier outputs ``C``.
        encoder_dim: encoder width ``e`` (``None`` → ``min(d, 1024)``).
        hash_hidden: hidden width ``m`` of the hash head; ``0`` makes the head one Linear(e → L).
        dropout: dropout after each hidden ReLU (0 = none, as COUPLE).
        encoder_layers: number of Linear → BN → ReLU blocks in the encoder (COUPLE: 1).
    """

    def __init__(
        self,
        input_dim: int,
        bits: int,
        num_classes: int,
        encoder_dim: int | None = None,
        hash_hidden: int = 1024,
        dropout: float = 0.0,
        encoder_layers: int = 1,
    ) -> None:
        super().__init__()
        encoder_dim = default_encoder_dim(input_dim) if encoder_dim is None else encoder_dim
        for name, value in (
            ("input_dim", input_dim),
            ("bits", bits),
            ("num_classes", num_classes),
            ("encoder_dim", encoder_dim),
            ("encoder_layers", encoder_layers),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"HashNet: {name} must be a positive integer, got {value!r}")
        if not isinstance(hash_hidden, int) or hash_hidden < 0:
            raise ConfigError(f"HashNet: hash_hidden must be an integer >= 0, got {hash_hidden!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"HashNet: dropout must be in [0, 1), got {dropout!r}")
        self.input_dim, self.bits, self.num_classes = input_dim, bits, num_classes
        self.encoder_dim, self.hash_hidden = encoder_dim, hash_hidden

        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(encoder_layers):
            layers += [nn.Linear(width, encoder_dim), nn.BatchNorm1d(encoder_dim), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = encoder_dim
        self.encoder = nn.Sequential(*layers)

        head: list[nn.Module] = []
        if hash_hidden > 0:
            head += [nn.Linear(encoder_dim, hash_hidden), nn.BatchNorm1d(hash_hidden), nn.ReLU()]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            head.append(nn.Linear(hash_hidden, bits))
        else:
            head.append(nn.Linear(encoder_dim, bits))
        head.append(nn.Tanh())
        self.hash_head = nn.Sequential(*head)
        self.classifier = nn.Linear(encoder_dim, num_classes)

    def forward(self, x: torch.Tensor) -> HashNetOutput:
        features = self.encoder(x)
        out = HashNetOutput(features, self.hash_head(features), self.classifier(features))
        if not self.training:  # inference: never hand NaN codes on (training checks its loss instead)
            _check_finite_outputs(self, x, out)
        return out

    def hash(self, x: torch.Tensor) -> torch.Tensor:
        """tanh outputs ``H(E(x))``; their sign is the code."""
        return self.hash_head(self.encoder(x))


def _check_finite_outputs(net: nn.Module, x: torch.Tensor, out: HashNetOutput) -> None:
    """NaN/inf outputs in eval mode: :class:`NumericalError` if the network's own weights are not finite
    (diverged training), else :class:`DataError`: the inputs are so far outside the training range that
    float32 overflows inside the network."""
    finite = torch.isfinite(out.hash).all(dim=1) & torch.isfinite(out.logits).all(dim=1)
    if bool(finite.all()):
        return
    check_finite_network(net, where="HashNet", lr=float("nan"))
    bad = (~finite).nonzero().flatten()
    largest = float(x[bad].abs().max()) if x.numel() else float("nan")
    raise DataError(f"HashNet: {bad.numel()} of {x.shape[0]} input row(s) give NaN or inf outputs (their largest "
                    f"normalised |x| is {largest:.3g}): float32 overflows inside the network for inputs this far "
                    "outside the training range; encode features of the same kind and scale as the training data")


# ---------------------------------------------------------------------------------------- losses
def label_similarity(labels_a: torch.Tensor, labels_b: torch.Tensor | None = None) -> torch.Tensor:
    """``S_ij = 1[y_i = y_j]`` as a float matrix."""
    labels_b = labels_a if labels_b is None else labels_b
    return (labels_a[:, None] == labels_b[None, :]).float()


def pairwise_similarity_loss(h: torch.Tensor, labels: torch.Tensor, kind: str = "couple") -> torch.Tensor:
    """Similarity-preserving loss on hash outputs ``h`` (B × L) of one labelled batch.

    * ``couple``: ``MSE(max(0, cos(h_i, h_j)), 1.1 · S_ij)`` — COUPLE's source semantic term
      (from the PWCF/DAPH-lineage code): same-class codes are pulled together
      (the target 1.1 keeps pulling past cos = 1, i.e. towards saturation), different-class codes
      pushed to orthogonal or beyond (negative cosines cost nothing).
    * ``cosine``: ``MSE(cos(h_i, h_j), 2 S_ij − 1)`` — the ±1 target of Hamming-distance
      preserving hashing (e.g. KSH: Liu et al., CVPR 2012, on code inner products).
    * ``dpsh``: the pairwise likelihood of DPSH (Li, Zhao, Kang, IJCAI 2016),
      ``mean(log(1 + e^θ) − S θ)`` with ``θ_ij = ½ h_iᵀ h_j``.
    """
    sim = label_similarity(labels)
    if kind == "dpsh":
        theta = 0.5 * h @ h.T
        return (F.softplus(theta) - sim * theta).mean()
    unit = F.normalize(h, dim=1)
    cos = unit @ unit.T
    if kind == "couple":
        return F.mse_loss(F.relu(cos), 1.1 * sim)
    if kind == "cosine":
        return F.mse_loss(cos, 2.0 * sim - 1.0)
    raise ConfigError(f"unknown pair loss {kind!r}; choose one of {', '.join(PAIR_LOSSES)}")


def quantization_loss(h: torch.Tensor) -> torch.Tensor:
    """``mean((h − sign(h))²)`` (COUPLE's ``MSE(h, sign h)``); sign is a constant target."""
    return F.mse_loss(h, torch.where(h >= 0, 1.0, -1.0).detach())


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run a block with ``num_threads`` torch threads (the ``train`` phase of :mod:`crossret.threads`) and
    restore the caller's settings.

    ``0`` leaves the setting alone. Small MLP training on CPU is fastest single-threaded.
    """
    if num_threads <= 0:
        yield
        return
    with use_threads("train", num_threads):
        yield
