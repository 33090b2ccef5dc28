"""Where a GCKD training step spends its time on a GPU: the share of the step's wall time during which no
CUDA kernel runs (launch overhead, host synchronisation, Python), measured with ``torch.profiler``.

    python benchmarks/gckd_gpu_profile.py [--device cuda] [--model base|tiny] [--stage adapt|pretrain]
                                          [--batch 32] [--amp off|bf16] [--steps 5] [--warmup 2] [--out FILE]

The inputs are the random batches of ``gckd_throughput.py`` (ALBEF-base at 384×128, 50-token captions).
One trainer runs ``warmup + steps`` steps twice: first unprofiled (median wall time per step), then
under the profiler (the same number of steps; the first ``warmup`` are not recorded). Kernel time is the
profiler's total self device time of the recorded steps (kernels, copies and memsets), per step;

    outside_kernels = 1 - kernel_seconds_per_step / wall_seconds_per_step

with the unprofiled wall time (``outside_kernels_profiled`` uses the profiled steps' wall time, which
includes the profiler's own overhead). Kernels of several streams that overlap are counted twice, so the
share is a lower bound. On a CPU device there are no kernels: the shares are null. ``--model tiny``
exists to try the script on a CPU. Prints one JSON object (also written to ``--out`` when given) and
the profiler's top operators by self CPU time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from crossret.storage.atomic import write_json_atomic
from crossret.textimage.albef import AlbefConfig, AlbefModel
from crossret.textimage.gckd import GckdConfig, GckdTrainer
from crossret.textimage.tokenize import mask_tokens
from gckd_throughput import RandomData


def _trainer(model_size: str, device: str, batch: int, amp: str, adapt: bool) -> tuple[GckdTrainer, AlbefConfig]:
    config = AlbefConfig.base() if model_size == "base" else AlbefConfig.tiny(max_position=64)
    torch.manual_seed(0)
    model = AlbefModel(config)
    common: dict[str, Any] = dict(epochs=1, ids_per_batch=max(1, batch // 2), pairs_per_id=2, amp=amp,
                                  warmup_epochs=0.0)
    # Random batches cannot be fetched by index, so the banks start empty (no warm start): step time only.
    train = (GckdConfig(target_batch=batch, warm_start_banks=False, **common) if adapt
             else GckdConfig.source_only(**common))
    special = torch.tensor([0, 1, 2, 3, 4], device=device)

    def mask_fn(ids: torch.Tensor, attention: torch.Tensor | None, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(ids, vocab_size=config.vocab_size, mask_token_id=4, special_ids=special,
                           attention_mask=attention, generator=generator)

    return GckdTrainer(model, train, device=device, mask_fn=mask_fn), config


def _kernel_seconds(prof: Any) -> float:
    """Total self device time of the recorded events, counted as ``prof.key_averages().table()`` counts its
    "Self CUDA time total": over the events on the CUDA device (kernels, copies, memsets), whose CPU
    parents are not counted again."""
    from torch.autograd import DeviceType

    total_us = 0.0
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        value = getattr(event, "self_device_time_total", None)
        if value is None:  # torch < 2.4
            value = getattr(event, "self_cuda_time_total", 0.0)
        total_us += float(value or 0.0)
    return total_us / 1e6


def profile_steps(device: str, model_size: str, adapt: bool, batch: int, amp: str, steps: int, warmup: int
                  ) -> tuple[dict[str, Any], str]:
    """The measurement described in the module docstring; returns (row, the profiler's operator table)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.startswith("cuda")
    trainer, config = _trainer(model_size, device, batch, amp, adapt)
    data = RandomData(config, batch, warmup + steps, 50, adapt)
    stamps: list[float] = []

    def stamp(*_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    stamp()
    trainer.fit(data, progress=stamp)
    plain = sorted(b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1:], strict=True))
    wall = plain[len(plain) // 2]

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiled: list[float] = []
    with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1)) as prof:
        def step(*_: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            profiled.append(time.perf_counter())
            prof.step()  # ends a step of the profiler's schedule: the first `warmup` are not recorded

        profiled.append(time.perf_counter())
        trainer.fit(data, progress=step)
    profiled_wall = (profiled[warmup + steps] - profiled[warmup]) / steps
    kernels = _kernel_seconds(prof) / steps if cuda else None
    row = {
        "stage": "adapt" if adapt else "pretrain", "model": model_size, "device": device, "amp": amp,
        "batch_source_pairs": batch, "steps_profiled": steps,
        "wall_seconds_per_step": wall, "profiled_wall_seconds_per_step": profiled_wall,
        "kernel_seconds_per_step": kernels,
        "outside_kernels": None if kernels is None else max(0.0, 1.0 - kernels / wall),
        "outside_kernels_profiled": None if kernels is None else max(0.0, 1.0 - kernels / profiled_wall),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "host": {"node": platform.node(), "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(torch.device(device)) if cuda else None},
    }
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return row, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="base", choices=("base", "tiny"))
    parser.add_argument("--stage", default="adapt", choices=("adapt", "pretrain"))
    parser.add_argument("--batch", type=int, default=32, help="source pairs per step (adapt: as many target "
                        "images and captions)")
    parser.add_argument("--amp", default="off", choices=("off", "bf16"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON row to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.batch < 2:
        parser.error("--steps and --warmup must be >= 1 and --batch >= 2")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is False")
    row, table = profile_steps(args.device, args.model, args.stage == "adapt", args.batch, args.amp, args.steps,
                               args.warmup)
    print(table, flush=True)
    print(json.dumps(row), flush=True)
    if args.out:
        write_json_atomic(Path(args.out), row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
