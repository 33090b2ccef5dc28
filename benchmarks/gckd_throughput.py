"""Training throughput of the ALBEF-base backbone (ViT-B/16 + BERT-base, 384×128 images, 50-token captions):
image–text pairs per second per optimisation step, source pre-training vs GCKD adaptation.

    python benchmarks/gckd_throughput.py [--device cpu|cuda] [--batch 8] [--steps 3] [--amp off|bf16]

Inputs are random pixels and token ids (throughput does not depend on their values). A "pair" is one
source pair; an adaptation step also processes ``batch`` target images and ``batch`` target captions,
reported separately as ``items_per_second`` (source pairs + target images + target captions).
The first ``--warmup`` steps are not timed. Results are merged into ``results/gckd_throughput.{json,md}``
keyed by device, so CPU and GPU figures live side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from crossret.storage.atomic import write_json_atomic, write_text_atomic
from crossret.textimage.albef import AlbefConfig, AlbefModel
from crossret.textimage.gckd import GckdConfig, GckdTrainer
from crossret.textimage.streams import StepBatch
from crossret.textimage.tokenize import mask_tokens

RESULTS = Path(__file__).resolve().parent / "results"


class RandomData:
    """``steps`` identical-shape random batches: ``p × k`` source pairs, ``batch`` target images/captions."""

    uses_tokens = True

    def __init__(self, config: AlbefConfig, batch: int, steps: int, text_length: int, adapt: bool) -> None:
        self.config, self.batch, self.steps, self.length = config, batch, steps, text_length
        self.has_target = adapt

    def steps_per_epoch(self) -> int:
        return self.steps

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "random"}

    def target_truth(self) -> None:
        return None

    def batches(self, epoch: int) -> Iterator[StepBatch]:
        g = torch.Generator().manual_seed(epoch)
        h, w = self.config.image_size
        for _ in range(self.steps):
            def images() -> torch.Tensor:
                return torch.randn(self.batch, 3, h, w, generator=g)

            def text() -> tuple[torch.Tensor, torch.Tensor]:
                ids = torch.randint(5, self.config.vocab_size, (self.batch, self.length), generator=g)
                ids[:, 0] = 2
                return ids, torch.ones_like(ids)

            ids, mask = text()
            batch = StepBatch(images(), ids, mask, torch.arange(self.batch) // 2)
            if self.has_target:
                t_ids, t_mask = text()
                batch = batch._replace(target_images=images(), target_text=t_ids, target_mask=t_mask)
            yield batch


def measure(device: str, batch: int, steps: int, warmup: int, amp: str, adapt: bool) -> dict[str, Any]:
    config = AlbefConfig.base()
    torch.manual_seed(0)
    model = AlbefModel(config)
    # Random batches cannot be fetched by index, so the banks start empty (no warm start): step time only.
    train = GckdConfig(epochs=1, ids_per_batch=batch // 2, pairs_per_id=2, target_batch=batch, amp=amp,
                       warmup_epochs=0.0, warm_start_banks=False) if adapt else GckdConfig.source_only(
        epochs=1, ids_per_batch=batch // 2, pairs_per_id=2, amp=amp, warmup_epochs=0.0)
    special = torch.tensor([0, 1, 2, 3, 4], device=device)

    def mask_fn(ids: torch.Tensor, attention: torch.Tensor | None, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(ids, vocab_size=config.vocab_size, mask_token_id=4, special_ids=special,
                           attention_mask=attention, generator=generator)

    trainer = GckdTrainer(model, train, device=device, mask_fn=mask_fn)
    stamps: list[float] = []

    def progress(step: int, total: int, stats: dict[str, float]) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    trainer.fit(RandomData(config, batch, warmup + steps, 50, adapt), progress=progress)
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)][warmup:]
    per_step = sorted(times)[len(times) // 2]  # median
    items = batch * (3 if adapt else 1)
    return {"stage": "adapt" if adapt else "pretrain", "device": device, "batch_source_pairs": batch,
            "target_items_per_step": 2 * batch if adapt else 0, "amp": amp, "steps_timed": len(times),
            "seconds_per_step_median": per_step, "pairs_per_second": batch / per_step,
            "items_per_second": items / per_step, "memory_size": train.memory_size,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="source pairs per step (target: as many images and "
                        "captions)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", default="off", choices=("off", "bf16"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", default=str(RESULTS / "gckd_throughput"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").exists() else []
    host = {"node": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    rows = []
    for adapt in (False, True):
        row = {**measure(args.device, args.batch, args.steps, args.warmup, args.amp, adapt), "host": host}
        rows.append(row)
        print(json.dumps(row), flush=True)
    key = (host["gpu"] or f"cpu x{host['threads']}", args.amp, args.batch)
    kept = [r for r in previous if (r["host"]["gpu"] or f"cpu x{r['host']['threads']}", r["amp"],
                                     r["batch_source_pairs"]) != key]
    all_rows = kept + rows
    write_json_atomic(out.with_suffix(".json"), {"script": "benchmarks/gckd_throughput.py", "model": "ALBEF-base "
                      "(ViT-B/16 384x128 + BERT-base 6+6 layers), 50 tokens", "rows": all_rows})
    lines = ["# GCKD training throughput, ALBEF-base", "", "Median seconds per optimisation step after warm-up; "
             "pairs/s counts source pairs; items/s adds the target images and captions of an adaptation step. "
             "Written by `benchmarks/gckd_throughput.py`.", "",
             "| hardware | amp | stage | source pairs/step | s/step | pairs/s | items/s | peak GPU GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in all_rows:
        hw = r["host"]["gpu"] or f"CPU, {r['host']['threads']} threads ({r['host']['cpus']} cores)"
        peak = "-" if r["peak_gpu_memory_gb"] is None else f"{r['peak_gpu_memory_gb']:.1f}"
        lines.append(f"| {hw} | {r['amp']} | {r['stage']} | {r['batch_source_pairs']} | "
                     f"{r['seconds_per_step_median']:.3f} | {r['pairs_per_second']:.2f} | "
                     f"{r['items_per_second']:.2f} | "
                     f"{peak} |")
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
