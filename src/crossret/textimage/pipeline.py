"""End-to-end GCKD runs on person-retrieval datasets: ``pretrain`` (source supervision), ``adapt``
(GCKD on source + unlabelled target) and ``evaluate`` (text→image on a test split), each writing a run
directory — what ``crossret gckd pretrain|adapt|eval`` call.

Run directory::

    config.yaml        the resolved run configuration (backbone, data, GckdConfig, evaluation)
    vocab.txt          the WordPiece vocabulary the model was trained with
    model.pt           the student, in ALBEF's checkpoint layout (loadable by ``load_albef_checkpoint``)
    checkpoints/       checkpoint.pt after every epoch (``--resume`` continues from it)
    metrics.json       history + evaluation; written last, its presence marks a finished run
    run.log
    .crossret-run      the marker of a crossret run directory (see crossret.runs: creation, the lock,
                       --resume and --overwrite)

Model selection never looks at target labels: training runs its configured epochs and the last
model is evaluated once (gckd.md A10).

Under ``torchrun`` (docs/distributed.md) every rank trains on its share of each global batch; rank 0
alone prepares the run directory, builds the vocabulary, writes the files and evaluates, and every rank
returns the same metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossret import distributed, runs
from crossret.config_keys import reject_unknown_keys
from crossret.data.person import (
    EvalView,
    ImageTransform,
    PersonDataset,
    build_eval_view,
    build_train_pairs,
    check_sampling_memory,
    load_person_dataset,
)
from crossret.errors import ConfigError, DataError
from crossret.limits import check_threads
from crossret.storage.atomic import write_json_atomic, write_yaml_atomic
from crossret.storage.safe_read import read_yaml_mapping
from crossret.textimage.albef import AlbefConfig, AlbefModel
from crossret.textimage.checkpoint import (
    albef_checkpoint_shapes,
    compare_albef_shapes,
    load_albef_checkpoint,
    save_albef_checkpoint,
)
from crossret.textimage.gckd import GckdConfig, GckdTrainer
from crossret.textimage.memory import check_bank_memory
from crossret.textimage.streams import ImageDecoder, PersonTrainingData
from crossret.textimage.tokenize import (
    CaptionTokenizer,
    check_vocab_fits,
    load_bert_vocab,
    mask_tokens,
    train_wordpiece_vocab,
)

log = logging.getLogger("crossret.gckd")
STAGES = ("pretrain", "adapt")
ProgressFn = Callable[[int, int, str], None]

TINY_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "head_lr": 1e-3}
"""Training defaults of the ``tiny`` preset that replace :class:`GckdConfig`'s (the paper's fine-tuning
rates, kept for ``base``): a small randomly initialised model barely moves at lr 1e-5 in a short run."""

# Run options that do not change what a run computes: a resumed run may change them.
_RESUME_FREE = ("workers",)


@dataclass
class GckdRunConfig:
    """A GCKD run on datasets in the CUHK-PEDES / ICFG-PEDES / RSTPReid formats.

    ``stage``: ``pretrain`` trains on the source only (``GckdConfig.source_only`` unless ``train``
    says otherwise); ``adapt`` runs GCKD with the unlabelled ``target_dir`` train split.
    ``model``: ``tiny`` | ``base`` (ALBEF ViT-B/16 + BERT-base) plus ``model_overrides``; ignored when
    ``init`` is a previous run directory (its architecture is used). ``init``: an ALBEF ``.pth`` file or
    a crossret GCKD run directory. ``vocab``: a BERT ``vocab.txt``; without it (and without an ``init``
    run that has one) a WordPiece vocabulary of ``vocab_size`` tokens is trained on the source and
    target *training* captions (no labels involved). An ``init`` file with a word-embedding table needs
    the vocabulary it was trained with: ``vocab`` of as many tokens, or the ``vocab.txt`` of the crossret
    run directory the file is in. ``init_strict``: refuse an ``init`` file whose keys differ from the
    model's; off, the shared keys are loaded and the others listed. ``max_tokens``: tokens per caption,
    ``[CLS]`` and ``[SEP]`` included. ``workers``: DataLoader processes that decode the images (0: the
    training process). The ``tiny`` preset trains with :data:`TINY_TRAIN_DEFAULTS` unless ``train`` sets them.
    ``delta_precision`` (``adapt`` with ``cd_itm_mining="banks"``): before training, δ is set on the cosine
    scale to the smallest cosine at which the starting model's mutual-nearest caption–image pairs of the
    source's ``delta_split`` (None: ``val`` where the source has one, else ``test``) are of one identity at least
    this often (:func:`~crossret.textimage.calibration.calibrate_delta`; no target label is used).
    """

    stage: str = "adapt"
    source_dir: str = ""
    target_dir: str | None = None
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    init_strict: bool = True
    vocab: str | None = None
    vocab_size: int = 1000
    max_words: int = 50
    max_tokens: int = 40
    train: dict[str, Any] = field(default_factory=dict)
    rerank_k: int = 128
    rerank_score: str = "itm"
    rerank_itc_weight: float = 1.0
    eval_batch_size: int = 64
    eval_split: str = "test"
    device: str = "cpu"
    workers: int = 0
    delta_precision: float | None = None
    delta_split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GckdRunConfig:
        reject_unknown_keys(cls, values.keys(), "GCKD run config")
        return cls(**dict(values)).validate()

    def validate(self) -> GckdRunConfig:
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r}; choose one of {', '.join(STAGES)}")
        if not self.source_dir:
            raise ConfigError("source_dir is required: the labelled source dataset directory")
        if self.stage == "adapt" and not self.target_dir:
            raise ConfigError("stage 'adapt' needs target_dir: the unlabelled target dataset directory")
        if self.model not in ("tiny", "base"):
            raise ConfigError(f"model={self.model!r}; choose 'tiny' or 'base' (and model_overrides)")
        for name in ("vocab_size", "max_words", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer")
        check_max_tokens(self.max_tokens)
        check_threads(self.workers, "workers (--workers)", minimum=0)
        if not isinstance(self.init_strict, bool):
            raise ConfigError(f"init_strict={self.init_strict!r} must be true or false")
        if not isinstance(self.rerank_k, int) or self.rerank_k < 0:
            raise ConfigError(f"rerank_k={self.rerank_k!r} must be an integer >= 0 (0: ITC ranking only)")
        from crossret.textimage.evaluate import check_rerank_score

        check_rerank_score(self.rerank_score, self.rerank_itc_weight)
        train = self.training_config()  # validates the GckdConfig keys early
        if self.delta_precision is not None:
            value = self.delta_precision
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ConfigError(f"delta_precision={value!r} (--delta-precision) must be a precision in (0, 1]")
            if self.stage != "adapt" or train.cd_itm_mining != "banks":
                raise ConfigError("delta_precision (--delta-precision) calibrates δ of the pseudo-pairs mined over the "
                                  "target banks: use it with stage 'adapt' and --set cd_itm_mining=banks")
        if self.delta_split is not None and self.delta_split not in ("train", "val", "test"):
            raise ConfigError(f"delta_split={self.delta_split!r} (--delta-split) must be train, val or test")
        return self

    def training_config(self, preset: str | None = None) -> GckdConfig:
        """The resolved training configuration; ``preset`` (default ``model``) is the architecture's preset,
        which chooses the defaults (:data:`TINY_TRAIN_DEFAULTS` for ``tiny``)."""
        values = {**(TINY_TRAIN_DEFAULTS if (preset or self.model) == "tiny" else {}), **self.train}
        if self.stage == "pretrain":
            return GckdConfig.source_only(**values)
        return GckdConfig.from_dict(values)


MAX_TOKENS_LIMIT = 4096
"""Largest accepted ``max_tokens``: far beyond any caption (ALBEF-base has 512 positions)."""


def check_max_tokens(value: Any, max_position: int | None = None, model: str = "the model") -> int:
    """``max_tokens`` (``--max-tokens``): an integer in [2, :data:`MAX_TOKENS_LIMIT`] and, with
    ``max_position``, at most the model's position embeddings (longer captions would have none)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_TOKENS_LIMIT:
        raise ConfigError(f"max_tokens={value!r} (--max-tokens): must be an integer in [2, {MAX_TOKENS_LIMIT}] "
                          "(tokens per caption, [CLS] and [SEP] included)")
    if max_position is not None and value > max_position:
        raise ConfigError(f"max_tokens={value} (--max-tokens) exceeds the {max_position} position embeddings of "
                          f"{model}: longer captions have no position; pass --max-tokens {max_position} or less")
    return value


# ---------------------------------------------------------------------------------------------- model + vocab
def _init_run_dir(init: str | None) -> Path | None:
    if init and Path(init).is_dir():
        run = Path(init)
        if not runs.run_file(run, "model.pt").is_file():
            raise DataError(f"{run}: not a finished crossret GCKD run (no model.pt)")
        return run
    return None


def _albef_config(config: GckdRunConfig, vocab_size: int | None) -> AlbefConfig:
    """The architecture of a model that does not come from an earlier run (validated, memory included)."""
    preset = AlbefConfig.tiny if config.model == "tiny" else AlbefConfig.base
    overrides = dict(config.model_overrides)
    if vocab_size is not None and not config.init:
        overrides.setdefault("vocab_size", vocab_size)
    if config.model == "tiny":
        overrides.setdefault("max_position", max(32, config.max_tokens))
    return preset(**overrides)


@dataclass
class InitPlan:
    """Where a run's model and vocabulary come from, worked out (and checked) before anything is written.

    ``kind``: ``run`` (a crossret run directory), ``albef`` (a checkpoint file) or ``random``. ``albef``:
    the architecture (None for ``random``: sized by the vocabulary once it exists). ``preset``: the
    architecture's preset, which chooses the training defaults. ``vocab``: the vocabulary file to copy
    (None: one is trained) and ``vocab_from`` where it comes from. ``missing_keys`` / ``unexpected_keys``:
    the ALBEF keys a non-strict ``init`` file lacks / has beyond the model."""

    kind: str
    preset: str
    albef: AlbefConfig | None = None
    vocab: Path | None = None
    vocab_from: str = "trained"
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def _vocab_tokens(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the vocabulary ({exc})") from exc


def _table_rows(shapes: Mapping[str, tuple[int, ...]], table: str) -> int | None:
    """Rows of the text encoder's ``word_embeddings`` / ``position_embeddings`` in an ALBEF state (either layout)."""
    for prefix in ("text_encoder.bert.embeddings.", "text_encoder.embeddings."):
        shape = shapes.get(f"{prefix}{table}.weight")
        if shape is not None and len(shape) == 2:
            return int(shape[0])
    return None


def _run_vocab_beside(path: Path) -> Path | None:
    """The ``vocab.txt`` of the crossret GCKD run directory that holds the checkpoint file ``path``."""
    folder = path.parent
    if runs.run_kind(folder) != "gckd":
        return None
    vocab = runs.run_file(folder, "vocab.txt")
    return vocab if vocab.is_file() else None


def _listing(keys: list[str], limit: int = 20) -> str:
    return ", ".join(keys[:limit]) + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def plan_init(config: GckdRunConfig) -> InitPlan:
    """Check ``init``, ``vocab`` and ``max_tokens`` against each other and return the :class:`InitPlan`.

    Refused with a one-line :class:`ConfigError`: an ``init`` file with a word-embedding table and no
    vocabulary of its own (a freshly trained vocabulary's ids would pick unrelated embeddings), a
    vocabulary whose size differs from that table, a ``vocab`` that differs from an ``init`` run's,
    shape mismatches, missing or unexpected keys unless ``init_strict`` is off, and ``max_tokens`` beyond
    the position embeddings."""
    init_run = _init_run_dir(config.init)
    if init_run is not None:
        saved = read_yaml_mapping(runs.run_file(init_run, "config.yaml"), "run config")
        albef = AlbefConfig.from_dict(saved["albef"])
        run_vocab = runs.run_file(init_run, "vocab.txt")
        if not run_vocab.is_file():
            raise DataError(f"--init {init_run}: not a finished crossret GCKD run (no vocab.txt)")
        if config.vocab and _vocab_tokens(Path(config.vocab)) != _vocab_tokens(run_vocab):
            raise ConfigError(f"--vocab {config.vocab} differs from the vocabulary the --init run {init_run} was "
                              f"trained with ({run_vocab}); drop --vocab to use the run's")
        check_max_tokens(config.max_tokens, albef.max_position, f"the --init run {init_run}'s model")
        preset = saved.get("run", {}).get("model") if isinstance(saved.get("run"), Mapping) else None
        return InitPlan("run", preset if preset in ("tiny", "base") else config.model, albef, run_vocab,
                        f"the --init run {init_run}")
    if not config.init:
        check_max_tokens(config.max_tokens, _albef_config(config, None).max_position,
                         f"--model {config.model}" + (" (with --model-set)" if config.model_overrides else ""))
        vocab = Path(config.vocab) if config.vocab else None
        return InitPlan("random", config.model, None, vocab, "--vocab" if vocab else "trained")

    path = Path(config.init)
    shapes, _ = albef_checkpoint_shapes(path)
    rows, positions = _table_rows(shapes, "word_embeddings"), _table_rows(shapes, "position_embeddings")
    vocab, vocab_from = (Path(config.vocab), "--vocab") if config.vocab else (_run_vocab_beside(path), "")
    if vocab is not None and not vocab_from:
        vocab_from = f"the run directory of --init {path}"
    if rows is not None:
        if vocab is None:
            raise ConfigError(f"--init {path}: the checkpoint's text encoder has a {rows}-token word-embedding table "
                              "but no --vocab was given, and a newly trained vocabulary's ids would pick unrelated "
                              "embeddings; pass --vocab with the checkpoint's vocab.txt (bert-base-uncased's for "
                              "ALBEF)")
        size = len(load_bert_vocab(vocab))
        if size != rows:
            raise ConfigError(f"--vocab {vocab} has {size} tokens but the word-embedding table of --init {path} has "
                              f"{rows} rows; pass --vocab with the vocab.txt the checkpoint was trained with")
    overrides = dict(config.model_overrides)
    if rows is not None:
        overrides.setdefault("vocab_size", rows)
    if positions is not None:
        overrides.setdefault("max_position", positions)
    albef = (AlbefConfig.tiny if config.model == "tiny" else AlbefConfig.base)(**overrides)
    check_max_tokens(config.max_tokens, albef.max_position, f"the model of --init {path}")
    report = compare_albef_shapes(shapes, albef)
    if report.mismatched:
        raise ConfigError(f"--init {path}: tensor shapes differ from the model of --model {config.model} "
                          f"(and --model-set): {_listing(report.mismatched, 5)}; choose the --model / --model-set "
                          "of the checkpoint's architecture")
    if config.init_strict and (report.missing or report.unexpected):
        raise ConfigError(f"--init {path}: the checkpoint's keys differ from the model's: "
                          f"{len(report.missing)} missing ({_listing(report.missing)}), {len(report.unexpected)} "
                          f"unexpected ({_listing(report.unexpected)}); pass --no-strict to load the shared keys "
                          "(missing ones keep their random initialisation, unexpected ones are ignored)")
    return InitPlan("albef", config.model, albef, vocab, vocab_from or "trained", report.missing, report.unexpected)


def check_sizes(config: GckdRunConfig, source: PersonDataset, plan: InitPlan | None = None) -> None:
    """What the run would allocate (model, memory banks, identity-balanced epochs), checked against memory
    before the run directory is opened, so that a refused size leaves nothing behind."""
    plan = plan if plan is not None else plan_init(config)
    albef = plan.albef if plan.albef is not None else _albef_config(config, None)
    train_config = config.training_config(plan.preset)
    check_bank_memory(train_config.memory_size, albef.embed_dim)
    n_ids = len(np.unique(build_train_pairs(source, "train", max_words=config.max_words).person_ids))
    check_sampling_memory(n_ids, train_config.pairs_per_id)


def build_model(config: GckdRunConfig, vocab_size: int | None = None, plan: InitPlan | None = None
                ) -> tuple[AlbefModel, dict[str, Any]]:
    """The student model: from ``init`` (run dir or ALBEF file) or freshly initialised. ``vocab_size``
    (the tokenizer's) sizes a new model's embeddings unless ``model_overrides`` sets it, and the tiny
    preset's ``max_position`` grows to ``max_tokens`` when needed. A non-strict load and a random ``base``
    model are logged as warnings."""
    plan = plan if plan is not None else plan_init(config)
    if plan.kind == "run":
        assert plan.albef is not None and config.init is not None
        loaded = load_albef_checkpoint(Path(config.init) / "model.pt", plan.albef)
        return loaded.model, {"init": config.init, "kind": "run", "vocab": plan.vocab_from}
    if plan.kind == "albef":
        assert plan.albef is not None and config.init is not None
        loaded = load_albef_checkpoint(config.init, plan.albef, strict=False)
        info: dict[str, Any] = {"init": config.init, "kind": "albef", "ignored": len(loaded.ignored_keys),
                                "strict": config.init_strict, "vocab": plan.vocab_from,
                                "missing_keys": loaded.missing_keys, "unexpected_keys": loaded.unexpected_keys}
        if loaded.missing_keys or loaded.unexpected_keys:
            log.warning("--init %s loaded with --no-strict: %d missing keys keep their random initialisation: %s; "
                        "%d unexpected keys are ignored: %s", config.init, len(loaded.missing_keys),
                        ", ".join(loaded.missing_keys) or "none", len(loaded.unexpected_keys),
                        ", ".join(loaded.unexpected_keys) or "none")
        return loaded.model, info
    albef = _albef_config(config, vocab_size)
    if plan.preset == "base":
        log.warning("--model base without --init: the ALBEF-base image and text encoders are randomly initialised "
                    "(not pre-trained); pass --init ALBEF_4M.pth --vocab bert-base-uncased/vocab.txt to start from "
                    "ALBEF's weights")
    torch.manual_seed(int(config.train.get("seed", 0)))
    return AlbefModel(albef), {"init": None, "kind": "random", "vocab": plan.vocab_from}


def resolve_vocab(config: GckdRunConfig, run_dir: Path, plan: InitPlan | None = None) -> Path:
    """Copy (from ``plan.vocab``) or train the vocabulary into ``run_dir/vocab.txt`` and return that path."""
    plan = plan if plan is not None else plan_init(config)
    target = run_dir / "vocab.txt"
    source = plan.vocab
    if source is not None:
        if not source.is_file():
            raise DataError(f"{source}: vocabulary file not found")
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        return target
    captions = [c for root in (config.source_dir, config.target_dir) if root
                for c in build_train_pairs(load_person_dataset(None, root, check_images=False), "train",
                                           max_words=config.max_words).captions]
    return train_wordpiece_vocab(captions, target, vocab_size=config.vocab_size)


# ---------------------------------------------------------------------------------------------- evaluation
def _batched(n: int, size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, size):
        yield np.arange(start, min(n, start + size))


def evaluate_view(model: AlbefModel, tokenizer: CaptionTokenizer, view: EvalView, *, rerank_k: int = 128,
                  batch_size: int = 64, device: str = "cpu", workers: int = 0, rerank_score: str = "itm",
                  rerank_itc_weight: float = 1.0) -> dict[str, Any]:
    """Text→image metrics of ``model`` on ``view`` (all captions vs all images), ITC and, with
    ``rerank_k`` > 0, re-ranking of each query's top-k by ``rerank_score`` (``"itm"``: the ITM logit, as
    ALBEF and RaSa; ``"itm+itc"``: plus ``rerank_itc_weight`` times the ITC cosine, as BLIP; docs/gckd.md).
    ``workers`` > 0 decodes the gallery images in that many worker processes."""
    from crossret.textimage.evaluate import evaluate_model

    decoder, image_batches, text_batches = _view_batches(model, tokenizer, view, batch_size, device, workers)
    try:
        return evaluate_model(model, image_batches, text_batches, view.caption_person_ids, view.image_person_ids,
                              rerank_k=rerank_k, device=device, batch_size=batch_size, rerank_score=rerank_score,
                              itc_weight=rerank_itc_weight)
    finally:
        decoder.close()


def _view_batches(model: AlbefModel, tokenizer: CaptionTokenizer, view: EvalView, batch_size: int, device: str,
                  workers: int) -> tuple[ImageDecoder, Iterator[torch.Tensor], Iterator[tuple[Any, ...]]]:
    """The gallery images (decoded by ``workers`` processes) and the tokenized captions of ``view``, in batches
    of ``batch_size``; the caller closes the decoder."""
    transform = ImageTransform.eval(tuple(model.config.image_size))
    decoder = ImageDecoder({"gallery": view.image_paths}, transform, workers=workers,
                           pin_memory=device.startswith("cuda"))
    jobs = [(("gallery", rows, None, 0),) for rows in _batched(view.num_gallery, batch_size)]
    image_batches = (images for (images,) in decoder.stream(jobs))
    text_batches = (tuple(tokenizer([view.captions[i] for i in rows]))
                    for rows in _batched(view.num_queries, batch_size))
    return decoder, image_batches, text_batches


def encode_view(model: AlbefModel, tokenizer: CaptionTokenizer, view: EvalView, *, batch_size: int = 64,
                device: str = "cpu", workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit-norm ITC features of ``view``: ``(text_feat (Q, E), image_feat (G, E))`` float32 on the CPU, in
    the view's caption and gallery order (eval mode, no gradient)."""
    from crossret.textimage.evaluate import encode_gallery, encode_queries

    decoder, image_batches, text_batches = _view_batches(model, tokenizer, view, batch_size, device, workers)
    try:
        gallery = encode_gallery(model, image_batches, device=device, keep_tokens=False)
        queries = encode_queries(model, text_batches, device=device, keep_tokens=False)
    finally:
        decoder.close()
    return queries.text_feat, gallery.image_feat


# ---------------------------------------------------------------------------------------------- runs
def _check_resumable(run_dir: Path, config: GckdRunConfig) -> None:
    """A resumed run must have been started with the same run configuration."""
    saved_path = run_dir / "config.yaml"
    if not os.path.lexists(saved_path):
        return  # nothing was started there yet: a fresh run
    saved = read_yaml_mapping(saved_path, "the interrupted run's config").get("run")
    if _resume_view(saved) != _resume_view(config.to_dict()):
        raise ConfigError(f"--resume: {run_dir} was started with a different configuration; use the same "
                          "options or a new --out")


def _resume_view(values: Any) -> Any:
    """A run configuration as ``--resume`` compares it: options added since the run started take their
    defaults, and options that do not change the result (:data:`_RESUME_FREE`) are left out."""
    if not isinstance(values, Mapping):
        return values
    defaults = {f.name: f.default for f in dataclasses.fields(GckdRunConfig)
                if f.default is not dataclasses.MISSING}
    return {k: v for k, v in {**defaults, **values}.items() if k not in _RESUME_FREE}


def _check_target(run_dir: Path, config: GckdRunConfig, overwrite: bool, resume: bool) -> None:
    """Refuse a run directory early, before the model is built (nothing is changed)."""
    if runs.check_run_target(run_dir, "gckd", overwrite=overwrite, resume=resume) == "resume":
        _check_resumable(run_dir, config)


def run_gckd(config: GckdRunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
             progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train (pretrain or adapt), save the model, evaluate on ``eval_split`` of the target (the source
    for ``pretrain`` without a target) and write the run directory. Returns the metrics dict.

    ``resume`` continues an interrupted run in ``out_dir``; ``overwrite`` replaces the crossret run there
    once the new one has finished (it is built beside it). The run directory is locked for the whole
    run; see :mod:`crossret.runs` for what is refused.

    Launched by ``torchrun`` with several processes, training is data-parallel (nccl for ``cuda``,
    each rank on its ``LOCAL_RANK`` GPU; gloo on CPU) and rank 0 writes the run directory."""
    config = config.validate()
    device = distributed.local_device(config.device)
    with distributed.process_group("nccl" if device.type == "cuda" else "gloo"):
        return _run_gckd(config, Path(out_dir), str(device), resume, overwrite, progress, should_stop)


def _run_gckd(config: GckdRunConfig, final_dir: Path, device: str, resume: bool, overwrite: bool,
              progress: ProgressFn | None, should_stop: Callable[[], bool] | None) -> dict[str, Any]:
    # Everything that can fail on bad input happens before the run directory is touched.
    source = load_person_dataset(None, config.source_dir)
    target = load_person_dataset(None, config.target_dir) if config.target_dir else None
    plan = plan_init(config)
    train_config = config.training_config(plan.preset)
    check_sizes(config, source, plan)
    calibration_view = None
    if config.delta_precision is not None:
        calibration_split = config.delta_split or calibration_split_of(source)
        if not source.split_counts().get(calibration_split):
            raise ConfigError(f"--delta-split {calibration_split}: the source {source.name} has no records in that "
                              "split; choose a split it has (train, val or test)")
        calibration_view = build_eval_view(source, calibration_split, max_words=config.max_words)
    distributed.run_on_main(partial(_check_target, final_dir, config, overwrite, resume))
    main = distributed.is_main()  # rank 0 (or the only process) writes files, evaluates and reports progress
    if not main:
        progress = None
    handle: runs.RunDirectory | None = None

    def open_run_dir() -> Path:
        nonlocal handle
        handle = runs.open_run(final_dir, "gckd", overwrite=overwrite, resume=resume,
                               check_resume=partial(_check_resumable, config=config))
        return handle.path

    # Under --overwrite the run is written into a staging directory beside the old run (rank 0 names it).
    run_dir = distributed.run_on_main(open_run_dir)
    handler = None
    data: PersonTrainingData | None = None
    try:
        handler = runs.attach_run_log(run_dir) if main else None
        vocab = distributed.run_on_main(partial(resolve_vocab, config, run_dir, plan))  # trained once, read by all
        tokenizer = CaptionTokenizer.from_vocab(vocab, max_length=config.max_tokens)
        model, init_info = build_model(config, tokenizer.vocab_size, plan)
        check_vocab_fits(tokenizer, model.config.vocab_size, model.config.max_position)
        calibration: dict[str, Any] | None = None
        if calibration_view is not None:
            assert config.delta_precision is not None
            train_config, calibration = _calibrated(train_config, model, tokenizer, calibration_view, config, device,
                                                    source.name, calibration_split)
        distributed.run_on_main(partial(
            write_yaml_atomic, run_dir / "config.yaml",
            {"run": config.to_dict(), "albef": model.config.to_dict(), "train": train_config.to_dict(),
             "init": init_info}))
        size = tuple(model.config.image_size)
        data = PersonTrainingData(
            build_train_pairs(source, "train", max_words=config.max_words), tokenizer,
            ImageTransform.train(size),
            # PersonTrainingData drops the target ids from every batch; it keeps them aside only for the
            # pseudo-pair precision in the training report.
            target=build_train_pairs(target, "train", max_words=config.max_words)
            if target is not None and train_config.adapts else None,
            ids_per_batch=train_config.ids_per_batch, pairs_per_id=train_config.pairs_per_id,
            target_batch=train_config.target_batch, seed=train_config.seed,
            target_pairing=train_config.target_pairing, workers=config.workers,
            pin_memory=device.startswith("cuda"))

        def mask_fn(ids: torch.Tensor, attention: torch.Tensor | None, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            return mask_tokens(ids, vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_token_id,
                               special_ids=tokenizer.special_ids.to(ids.device), attention_mask=attention,
                               mask_prob=train_config.mlm_prob, generator=generator)

        trainer = GckdTrainer(model, train_config, device=device, mask_fn=mask_fn,
                              checkpoint_dir=run_dir / "checkpoints")
        step_progress = None
        if progress is not None:
            def step_progress(step: int, total: int, stats: dict[str, float]) -> None:
                progress(step, total, f"{config.stage} loss {stats.get('loss', float('nan')):.3f}")
        result = trainer.fit(data, resume=resume, progress=step_progress, should_stop=should_stop)
        data.close()
        finished = len(result.history) == train_config.epochs

        def finish() -> dict[str, Any]:  # rank 0 under torchrun: save, evaluate once, write metrics
            save_albef_checkpoint(model, run_dir / "model.pt")
            eval_dataset = target if target is not None else source
            view = build_eval_view(eval_dataset, config.eval_split, max_words=config.max_words)
            started = time.perf_counter()
            if progress is not None:
                progress(0, 1, "evaluating")
            evaluation = evaluate_view(model, tokenizer, view, rerank_k=config.rerank_k,
                                       batch_size=config.eval_batch_size, device=device, workers=config.workers,
                                       rerank_score=config.rerank_score, rerank_itc_weight=config.rerank_itc_weight)
            metrics = {
                "stage": config.stage, "finished_all_epochs": finished,
                "source": source.name, "target": target.name if target is not None else None,
                "evaluated_on": f"{eval_dataset.name}:{config.eval_split}",
                "protocol": "text-to-image; queries = every caption of the split, gallery = every image; relevant = "
                            "same person id; no model selection (last epoch)",
                # "unpaired": GCKD's unlabelled target; "paired": the target's image-caption pairing was used in
                # training (another protocol, not comparable); None: no target term
                "target_pairing": result.target_pairing,
                "evaluation": evaluation, "eval_seconds": time.perf_counter() - started,
                "train_seconds": result.train_seconds, "resumed_from_epoch": result.resumed_from_epoch,
                "history": result.history, "train_config": train_config.to_dict(), "init": init_info,
                "albef": model.config.to_dict(), "seed": train_config.seed,
                **({"delta_calibration": calibration} if calibration is not None else {}),
            }
            write_json_atomic(run_dir / "metrics.json", metrics)
            return metrics

        metrics = distributed.run_on_main(finish)
        distributed.run_on_main(lambda: handle.commit() if handle is not None else None)
        return metrics
    except BaseException:
        if handle is not None:
            handle.abort()
        raise
    finally:
        if data is not None:
            data.close()
        runs.detach_run_log(handler)
        if handle is not None:
            handle.release()


def calibration_split_of(source: PersonDataset) -> str:
    """The source split δ is calibrated on by default: ``val`` where the source has one, else ``test``."""
    return "val" if source.split_counts().get("val") else "test"


def _calibrated(train_config: GckdConfig, model: AlbefModel, tokenizer: CaptionTokenizer, view: EvalView,
                config: GckdRunConfig, device: str, source_name: str, split: str
                ) -> tuple[GckdConfig, dict[str, Any]]:
    """``train_config`` with δ calibrated on ``view`` (the source's ``split``) by the starting model, and the
    calibration's record for the run's metrics."""
    from crossret.textimage.calibration import calibrate_delta

    assert config.delta_precision is not None
    text_feat, image_feat = encode_view(model, tokenizer, view, batch_size=config.eval_batch_size, device=device,
                                        workers=config.workers)
    result = calibrate_delta(text_feat, image_feat, view.caption_person_ids, view.image_person_ids,
                             precision=float(config.delta_precision))
    record = {"split": f"{source_name}:{split}", **result.to_dict()}
    if result.reached:
        log.info("delta calibrated on %s:%s: cosine >= %.4f keeps %d of %d mutual-nearest pairs at precision %.3f",
                 source_name, split, result.delta, result.pairs, result.mutual_pairs, result.pair_precision)
    else:
        log.warning("delta calibration on %s:%s: no mutual-nearest caption-image pairs reach precision %.2f (%d "
                    "pairs, precision %s); delta = 1.0, so the cross-domain ITM will find almost no pseudo-pairs",
                    source_name, split, result.precision, result.mutual_pairs,
                    "n/a" if result.overall_precision is None else f"{result.overall_precision:.3f}")
    return dataclasses.replace(train_config, delta=result.delta, delta_on="cosine"), record


def evaluate_run(run_dir: str | Path, dataset_dir: str | Path, *, split: str = "test", rerank_k: int = 128,
                 batch_size: int = 64, device: str = "cpu", max_tokens: int | None = None,
                 workers: int = 0, rerank_score: str = "itm", rerank_itc_weight: float = 1.0) -> dict[str, Any]:
    """Evaluate a finished run's model on ``split`` of another (or the same) dataset. Captions are cut
    at the run's ``max_tokens`` unless ``max_tokens`` is given (at most the model's position embeddings)."""
    run = Path(run_dir)
    model_file, vocab_file = runs.run_file(run, "model.pt"), runs.run_file(run, "vocab.txt")
    if not model_file.is_file() or not vocab_file.is_file():
        raise DataError(f"{run}: not a finished crossret GCKD run (model.pt and vocab.txt are needed)")
    check_threads(workers, "workers (--workers)", minimum=0)
    from crossret.textimage.evaluate import check_rerank_score

    check_rerank_score(rerank_score, rerank_itc_weight)
    saved = read_yaml_mapping(runs.run_file(run, "config.yaml"))
    albef = AlbefConfig.from_dict(saved["albef"])
    tokens = int(saved["run"]["max_tokens"]) if max_tokens is None else max_tokens
    check_max_tokens(tokens, albef.max_position, f"the model of {run}")
    model = load_albef_checkpoint(model_file, albef).model
    tokenizer = CaptionTokenizer.from_vocab(vocab_file, max_length=tokens)
    dataset = load_person_dataset(None, dataset_dir)
    view = build_eval_view(dataset, split, max_words=int(saved["run"]["max_words"]))
    result = evaluate_view(model, tokenizer, view, rerank_k=rerank_k, batch_size=batch_size, device=device,
                           workers=workers, rerank_score=rerank_score, rerank_itc_weight=rerank_itc_weight)
    return {"run": str(run), "evaluated_on": f"{dataset.name}:{split}", "max_tokens": tokens, "evaluation": result}


__all__ = ["TINY_TRAIN_DEFAULTS", "GckdRunConfig", "InitPlan", "build_model", "calibration_split_of",
           "check_max_tokens", "encode_view", "evaluate_run", "evaluate_view", "plan_init", "resolve_vocab", "run_gckd"]
