"""``--device`` for the HashNet methods (COUPLE, source-only).

* The CPU path is bit-for-bit what it was before devices existed: golden SHA-256s of the codes and of the
  real-valued outputs of small fits, recorded with the code before the change.
* ``cuda`` without a usable GPU (and unknown devices) are one-line errors naming ``--device``, from the API
  and from the CLI.
* The device plumbing is checked without a GPU by an emulated one (:class:`FakeCudaMode`): tensors moved to
  ``cuda`` become CPU tensors tagged as CUDA, and every torch call that mixes tagged and untagged tensors,
  ``.numpy()`` of a tagged tensor, or saving a tagged tensor fails as it would on a real GPU. Since the
  emulated device computes on the CPU, a correct plumbing also gives the golden codes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

import crossret
from _cli import cli
from _couple_common import BITS, TINY, gaussian_domains, tiny
from _golden_cpu import RECORDING_CPU
from crossret.errors import ConfigError
from crossret.hashing.couple import CHECKPOINT_NAME, Couple, read_checkpoint
from crossret.hashing.deep import resolve_device
from crossret.hashing.networks import HashNet
from crossret.hashing.source_only import SourceOnly, SourceOnlyConfig

# ---------------------------------------------------------------------------------------------- golden codes
COUPLE_CASES: dict[str, dict[str, Any]] = {
    "default": {},  # diffusion selection, random-walk Mixup (both levels), target relation
    "ema-nearest-both": {"ema_decay": 0.9, "pairing": "nearest", "graph_features": "both", "coral_weight": 0.5,
                         "target_im_weight": 0.1, "high_mixup_loss": "soft-ce", "high_mixup_detach": False},
    "input-refine": {"graph_features": "input", "label_refine": "centroids", "mix_pairs": "endpoints",
                     "target_seed_weight": 0.5, "select_ratio_end": 0.8, "disagreement_weight": 0.1},
}
SOURCE_ONLY = {"epochs": 5, "batch_size": 32, "hash_hidden": 32, "encoder_dim": 32, "dropout": 0.2}

# sha256 of (codes, float32 tanh outputs) of the target then the source features (``_digests``), computed
# with the code before the device change (these very cases, run against that commit's ``src``): seed 0,
# 16 bits, ``gaussian_domains(seed=0)``, one torch thread, torch 2.13 on x86-64.
GOLDEN = {
    "couple/default": ("3e6d55f8f33f726e14c591d1ee2d6548dc78004e51457f62916d9eef803a5fde",
                       "a9f6739f646f4c68baa101b41b5c068008ff3207a186d08a9183bc78c3ef6ffa"),
    "couple/ema-nearest-both": ("b812bc6856a79c76dca3eaa150d8f02f44f9a6953bdfcb504df21d0672317a93",
                                "543b9fcebd01dcf698ca9eebd844ad3a3edfaad4b15880c6760114f99ca20912"),
    "couple/input-refine": ("7d4e3e0e014cc6b4e4504022b91eb9be961606d7172e41e1dfd7f15de3855960",
                            "6bd9d63732ef31fe552c27e459b492fd78e885cff5b21c2e7b1f8e11a09f9846"),
    "source-only": ("92d32ece004bff1495ea7d8a89b458aa0f1b7fcc4b248c928ed80b822046f547",
                    "966ec2b3034177fee3675d67177cf7dc6d73de10999ff1771135140c20c8d963"),
}


def _digests(method: Any, source: Any, target: Any) -> tuple[str, str]:
    codes, real = hashlib.sha256(), hashlib.sha256()
    for x, domain in ((target.features, "target"), (source.features, "source")):
        codes.update(method.encode(x, domain=domain).tobytes())
        real.update(np.ascontiguousarray(method.encode_real(x, domain=domain), dtype=np.float32).tobytes())
    return codes.hexdigest(), real.hexdigest()


def _method(case: str) -> Any:
    if case == "source-only":
        return SourceOnly(BITS, seed=0, config=SourceOnlyConfig(**SOURCE_ONLY))
    return Couple(BITS, seed=0, config=tiny(**COUPLE_CASES[case.split("/")[1]]))


def _fit(case: str, device: Any = None, **attrs: Any) -> tuple[Any, tuple[str, str]]:
    source, target = gaussian_domains(seed=0)
    method = _method(case)
    for key, value in attrs.items():
        setattr(method, key, value)
    if device is not None:
        method.to(device)
    method.fit(source, target.without_labels())
    return method, _digests(method, source, target)


@functools.cache
def _expected(case: str) -> tuple[str, str]:
    """The golden digests as this CPU computes them: the binary codes' digest is the recorded one on every CPU;
    the float outputs' is the recorded one on the recording kind of CPU, else this machine's own run on the
    default device (tests/_golden_cpu.py)."""
    if RECORDING_CPU:
        return GOLDEN[case]
    _, digests = _fit(case)
    assert digests[0] == GOLDEN[case][0]  # the codes do not depend on the CPU's float kernels
    return digests


@pytest.mark.parametrize("case", sorted(GOLDEN))
@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")], ids=["default", "cpu-str", "cpu-device"])
def test_cpu_path_is_bit_identical_to_the_code_before_devices(case: str, device: Any) -> None:
    method, digests = _fit(case, device)
    assert digests[0] == GOLDEN[case][0]
    assert digests == _expected(case)
    assert method.device == torch.device("cpu")
    assert method.diagnostics["device"] == "cpu"


# ---------------------------------------------------------------------------------------------- refusals
@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_line_device_error(text: str) -> None:
    assert "\n" not in text.strip(), text
    assert "--device" in text and "--device cpu" in text, text


@pytest.mark.parametrize("name", ["couple", "source-only"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_api_refuses_cuda_without_a_gpu(no_cuda: None, tmp_path: Path, name: str, device: str) -> None:
    source, target = gaussian_domains(seed=0)
    with pytest.raises(ConfigError) as info:
        crossret.fit(name, source, target.without_labels(), bits=BITS, device=device, out=tmp_path / "M")
    _one_line_device_error(str(info.value))
    assert not (tmp_path / "M").exists()
    with pytest.raises(ConfigError) as info:
        _method("source-only" if name == "source-only" else "couple/default").to(device)
    _one_line_device_error(str(info.value))


@pytest.mark.parametrize("device", ["tpu", "mps", "meta", "cuda:x", "", "gpu"])
def test_unknown_devices_are_one_line_errors(tmp_path: Path, device: str) -> None:
    source, target = gaussian_domains(seed=0)
    with pytest.raises(ConfigError) as info:
        crossret.fit("couple", source, target.without_labels(), bits=BITS, device=device, out=tmp_path / "M")
    text = str(info.value)
    assert "\n" not in text and text.startswith("--device must be cpu or cuda"), text
    if device:
        with pytest.raises(ConfigError, match=r"^--device must be cpu or cuda"):
            resolve_device(device)


def test_cuda_index_beyond_the_visible_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"^--device cuda:3: torch sees 1 CUDA device\(s\)"):
        resolve_device("cuda:3")


def test_non_torch_methods_refuse_cuda() -> None:
    source, target = gaussian_domains(seed=0)
    with pytest.raises(ConfigError, match="itq is not a torch method"):
        crossret.fit("itq", source, target.without_labels(), bits=BITS, device="cuda")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    source, target = gaussian_domains(seed=0)
    np.savez(tmp_path / "src.npz", features=source.features, labels=source.labels)
    np.savez(tmp_path / "tgt.npz", features=target.features, labels=target.labels)
    np.save(tmp_path / "tgt.npy", target.features.astype(np.float32))
    return tmp_path


def _tiny_sets(name: str) -> list[str]:
    config = TINY if name == "couple" else SOURCE_ONLY
    return [item for key, value in config.items() for item in ("--set", f"{key}={value}")]


@pytest.mark.parametrize("name", ["couple", "source-only"])
def test_cli_refuses_cuda_without_a_gpu(no_cuda: None, files: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str], name: str) -> None:
    monkeypatch.chdir(files)
    fit = ["fit", name, "--source", "src.npz", "--target", "tgt.npz", "--bits", BITS, *_tiny_sets(name)]
    run = ["run", name, "--source", "src.npz", "--target", "tgt.npz", "--bits", BITS, *_tiny_sets(name)]
    for args in ([*fit, "--out", "M", "--device", "cuda"], [*run, "--out", "R", "--device", "cuda"]):
        code, _out, err = cli(monkeypatch, capsys, *args)
        assert code == 2, err
        assert err.startswith("error: --device cuda"), err
        _one_line_device_error(err)
    assert not (files / "M").exists() and not (files / "R").exists()
    # encode: a model fitted on the CPU, asked to encode on a GPU that is not there
    assert cli(monkeypatch, capsys, *fit, "--out", "M")[0] == 0
    code, _out, err = cli(monkeypatch, capsys, "encode", "M", "--input", "tgt.npy", "--out", "codes.npy", "--device",
                          "cuda")
    assert code == 2, err
    _one_line_device_error(err)
    assert not (files / "codes.npy").exists()
    code, _out, err = cli(monkeypatch, capsys, "encode", "M", "--input", "tgt.npy", "--out", "codes.npy", "--device",
                          "gpu")
    assert code == 2 and err.startswith("error: --device must be cpu or cuda") and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------- emulated GPU
_CUDA = torch.device("cuda", 0)


def _plain(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor)


def _tagged(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(FakeCudaTensor)


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that plays a tensor on ``cuda:0`` (see :class:`FakeCudaMode`)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> torch.Tensor:  # AveragedModel deep-copies the network
        with torch.no_grad():
            copy = _tagged(_plain(self).clone())
        if getattr(self, "_is_param", False):
            copy.requires_grad_(self.requires_grad)
            copy._is_param = True
        memo[id(self)] = copy
        return copy


def _getter(func: Any, name: str) -> bool:
    return getattr(func, "__name__", "") == "__get__" and getattr(getattr(func, "__self__", None), "__name__",
                                                                    None) == name


def _as_device(value: Any) -> torch.device | None:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            return None
    return None


class FakeCudaMode(TorchFunctionMode):
    """Emulates one CUDA device on the CPU, strictly.

    ``.to(cuda)``, ``.cuda()`` and factory calls with ``device=cuda`` give :class:`FakeCudaTensor` (CPU data),
    ops on them stay tagged, ``.cpu()`` / ``.to("cpu")`` untag. Like CUDA, a call mixing tagged tensors with
    untagged ones (other than 0-dim scalars) raises "Expected all tensors to be on the same device", and
    ``.numpy()`` of a tagged tensor raises. Stricter than CUDA: a CPU index tensor into a tagged tensor is
    refused too (an implicit host-to-device copy per step).
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if _getter(func, "device"):
            return _CUDA if isinstance(args[0], FakeCudaTensor) else func(*args)
        if _getter(func, "is_cuda"):
            return isinstance(args[0], FakeCudaTensor)
        if _getter(func, "grad"):  # autograd writes plain gradients: they live where their parameter does
            grad = func(*args)
            tag = isinstance(args[0], FakeCudaTensor) and grad is not None
            return _tagged(grad) if tag and not isinstance(grad, FakeCudaTensor) else grad
        if func is torch.Tensor.numpy and isinstance(args[0], FakeCudaTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        if func is torch.Tensor.cpu:
            out = func(*args, **kwargs)
            return _plain(out) if isinstance(out, FakeCudaTensor) else out
        if func is torch.Tensor.cuda:
            return _tagged(args[0])
        if func is torch.Tensor.to:
            target = _as_device(kwargs.get("device"))
            rest = []
            for arg in args[1:]:
                found = _as_device(arg)
                if isinstance(arg, torch.Tensor):
                    found = _CUDA if isinstance(arg, FakeCudaTensor) else arg.device
                if found is not None:
                    target = found
                    arg = "cpu" if found.type == "cuda" else arg
                rest.append(arg)
            if target is not None and target.type == "cuda" and "device" in kwargs:
                kwargs["device"] = "cpu"
            out = func(args[0], *rest, **kwargs)
            if target is None:
                return out
            if target.type == "cuda":
                return out if isinstance(out, FakeCudaTensor) else _tagged(out)
            return _plain(out) if isinstance(out, FakeCudaTensor) else out
        requested = _as_device(kwargs.get("device"))
        if requested is not None and requested.type == "cuda":
            kwargs["device"] = "cpu"
            return tree_map(lambda t: _tagged(t) if isinstance(t, torch.Tensor) else t, func(*args, **kwargs))
        if func is not torch._has_compatible_shallow_copy_type:  # Module.to's own check
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if any(isinstance(t, FakeCudaTensor) for t in tensors):
                plain = [t for t in tensors if not isinstance(t, FakeCudaTensor) and t.dim() > 0]
                if plain:
                    raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                                       f"devices, cuda:0 and cpu! ({getattr(func, '__name__', func)})")
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[Any]]]:
    """Within the block ``cuda`` is an emulated GPU; yields what was seen: the devices ``fork_rng`` was asked to
    save, and per ``HashNet`` forward the devices of its input and of its parameters."""
    seen: dict[str, list[Any]] = {"fork_rng": [], "forward": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fork_rng = torch.random.fork_rng

    def fork_rng_cpu(devices: Any = None, *args: Any, **kwargs: Any) -> Any:
        seen["fork_rng"].append(list(devices or []))
        return fork_rng([], *args, **kwargs)  # there is no CUDA generator to save

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng_cpu)
    forward = HashNet.forward

    def checked_forward(self: HashNet, x: torch.Tensor) -> Any:
        seen["forward"].append((x.device, {p.device for p in self.parameters()}))
        return forward(self, x)

    monkeypatch.setattr(HashNet, "forward", checked_forward)
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # Module.to keeps the tagged tensors
    try:
        with FakeCudaMode():
            yield seen
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def test_the_emulated_gpu_catches_what_a_real_one_would(monkeypatch: pytest.MonkeyPatch) -> None:
    with emulated_gpu(monkeypatch):
        net = HashNet(8, 4, 3, encoder_dim=8, hash_hidden=8).to("cuda")
        x = torch.randn(5, 8)
        with pytest.raises(RuntimeError, match="same device"):
            net(x)  # input left on the CPU
        out = net(x.to("cuda"))
        assert out.hash.device == _CUDA
        with pytest.raises(TypeError, match="numpy"):
            out.hash.detach().numpy()
        assert out.hash.detach().cpu().numpy().shape == (5, 4)
        with pytest.raises(RuntimeError, match="same device"):
            out.logits[torch.tensor([0, 1])]  # a CPU index tensor


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_training_and_encoding_run_on_the_requested_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           case: str) -> None:
    checkpoints = {"checkpoint_dir": tmp_path} if case.startswith("couple") else {}
    with emulated_gpu(monkeypatch) as seen:
        method, digests = _fit(case, "cuda", **checkpoints)
        assert next(method.network.parameters()).device == _CUDA
    # Every forward pass (training steps, graph refreshes, Mixup, encoding) ran with its input on the network's
    # device, and that device is the GPU.
    assert seen["forward"] and all(x == _CUDA and params == {_CUDA} for x, params in seen["forward"])
    assert seen["fork_rng"] == [[torch.device("cuda")]]  # the GPU's generator is saved and restored
    assert method.diagnostics["device"] == "cuda"
    # Random draws stay on the CPU generators and the emulated GPU computes on the CPU: the golden codes.
    assert digests[0] == GOLDEN[case][0] and digests == _expected(case)
    if checkpoints:  # a checkpoint written on the GPU holds CPU tensors (weights_only load refuses others)
        payload = read_checkpoint(tmp_path / CHECKPOINT_NAME)
        tensors = [t for t in tree_flatten(payload)[0] if isinstance(t, torch.Tensor)]
        assert tensors and all(type(t) is torch.Tensor for t in tensors)


@pytest.mark.parametrize("name", ["couple", "source-only"])
def test_a_model_trained_on_a_gpu_loads_and_encodes_on_the_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               name: str) -> None:
    source, target = gaussian_domains(seed=0)
    config = TINY if name == "couple" else SOURCE_ONLY
    with emulated_gpu(monkeypatch):
        model = crossret.fit(name, source, target.without_labels(), bits=BITS, config=dict(config), device="cuda",
                             out=tmp_path / "M")
        on_gpu = model.encode(target.features)
        source_on_gpu = model.encode(source.features, domain="source")
        again = crossret.load(tmp_path / "M", device="cuda")
        assert again.hash_method.device == torch.device("cuda")
        np.testing.assert_array_equal(again.encode(target.features), on_gpu)
    assert model.config["device"] == "cuda"
    monkeypatch.undo()  # no GPU, no emulation: a plain CPU machine
    loaded = crossret.load(tmp_path / "M")
    assert loaded.hash_method.device == torch.device("cpu")
    assert all(p.device.type == "cpu" and type(p.data) is torch.Tensor
               for p in loaded.hash_method.network.parameters())
    np.testing.assert_array_equal(loaded.encode(target.features), on_gpu)
    np.testing.assert_array_equal(loaded.encode(source.features, domain="source"), source_on_gpu)
    assert loaded.diagnostics["device"] == "cuda"


def test_cli_routes_the_device(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                               files: Path) -> None:
    monkeypatch.chdir(files)
    data = ["--source", "src.npz", "--target", "tgt.npz", "--bits", BITS, *_tiny_sets("couple")]
    with emulated_gpu(monkeypatch) as seen:
        code, _out, err = cli(monkeypatch, capsys, "fit", "couple", *data, "--out", "M", "--device", "cuda")
        assert code == 0, err
        code, _out, err = cli(monkeypatch, capsys, "encode", "M", "--input", "tgt.npy", "--out", "gpu.npy",
                              "--device", "cuda")
        assert code == 0, err
        code, _out, err = cli(monkeypatch, capsys, "run", "couple", *data, "--out", "R", "--device", "cuda")
        assert code == 0, err
    assert seen["forward"] and all(x == _CUDA and params == {_CUDA} for x, params in seen["forward"])
    assert cli(monkeypatch, capsys, "encode", "M", "--input", "tgt.npy", "--out", "cpu.npy")[0] == 0
    np.testing.assert_array_equal(np.load("gpu.npy"), np.load("cpu.npy"))
    assert json.loads((files / "M" / "diagnostics.json").read_text())["device"] == "cuda"
    assert json.loads((files / "R" / "metrics.json").read_text())["diagnostics"]["device"] == "cuda"


def test_torchrun_with_a_gpu_device_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Data-parallel COUPLE runs on CPU processes (gloo): a GPU device under torchrun is one line, before any
    file is written or any step is taken."""
    from crossret import distributed
    from crossret.experiment import RunConfig, run_experiment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "active", lambda: True)
    source, target = gaussian_domains(seed=0)
    np.savez(tmp_path / "src.npz", features=source.features, labels=source.labels)
    np.savez(tmp_path / "tgt.npz", features=target.features, labels=target.labels)
    config = RunConfig(method="couple", bits=BITS, source=str(tmp_path / "src.npz"),
                       target=str(tmp_path / "tgt.npz"), method_config=dict(TINY), out_dir=str(tmp_path / "R"))
    with pytest.raises(ConfigError) as info:
        run_experiment(config, device="cuda")
    assert "torchrun" in str(info.value) and "--device cpu" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "R").exists()
    method = _method("couple/default").to("cuda")
    with pytest.raises(ConfigError, match=r"^--device cuda: COUPLE trains data-parallel under torchrun"):
        method.fit(source, target.without_labels())
