"""What do the v3 stand-in's image features see? Linear attribute probes on the source's own splits.

    python benchmarks/gckd_probe.py [--sources C I R] [--seed 100]

Per source of protocol v3 (benchmarks/gckd.py: the same datasets, generic model and source training as its
rows) and the development data seed (``SYNTH_V3_DEV_SEED``, not a benchmark seed), two models encode the
source's training and test images: the generic model and the source-trained model every v3 variant starts
adapting from. For each attribute a caption can name, a logistic regression on the training images' ITC
features (the space retrieval and pseudo-pair mining use) predicts the test images' attribute; its accuracy
is compared with the majority class of the training images and with the same probe on the raw pixels (at
the model's input size): what the rendering makes linearly visible. The labels are the source's own (a labelled
domain); no target data enters.

Writes ``results/gckd_probe.{json,md}`` with the environment (benchmarks/_repro.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import _repro
import gckd as bench
import gckd_calibration as calibration
from crossret.storage.atomic import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
# The attributes v3 captions name (crossret.data.synthetic_person.Identity; colours of a bag or a hat only
# exist with one, so they are left out).
FIELDS = ("gender", "hair_length", "hair_colour", "upper_type", "upper_colour", "lower_type", "lower_colour",
          "shoes_colour", "bag", "hat")


def attribute_labels(person_ids: np.ndarray, identities: list[Any], first: int, field: str) -> np.ndarray:
    """``field`` of each image's identity. A split's person ids rise with the generator's identity index (the
    annotation files number them ``pid`` or ``pid + 1``), so the k-th smallest id is identity ``first + k``."""
    person_ids = np.asarray(person_ids)
    rank = np.searchsorted(np.unique(person_ids), person_ids)
    return np.array([str(getattr(identities[first + int(r)], field)) for r in rank])


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict[str, float]:
    """Test accuracy of a logistic regression fitted on the training features, and of the training majority class."""
    from sklearn.linear_model import LogisticRegression

    values, counts = np.unique(train_y, return_counts=True)
    majority = float(np.mean(test_y == values[counts.argmax()]))
    if values.size < 2:
        return {"accuracy": majority, "majority": majority}
    model = LogisticRegression(max_iter=2000, C=10.0).fit(train_x, train_y)
    return {"accuracy": float(np.mean(model.predict(test_x) == test_y)), "majority": majority}


def pixel_features(view: Any, dataset_dir: Path, size: tuple[int, int]) -> np.ndarray:
    """``(images, height · width · 3)`` float32 pixels in [0, 1] of ``view``'s gallery, resized to ``size``
    (height, width)."""
    from PIL import Image

    rows = []
    for path in view.image_paths:
        file = Path(path) if Path(path).is_absolute() else dataset_dir / "imgs" / path
        with Image.open(file) as image:
            pixels = image.convert("RGB").resize((size[1], size[0]))
            rows.append(np.asarray(pixels, dtype=np.float32).ravel() / 255.0)
    return np.stack(rows)


def one(source: str, seed: int, generic: dict[str, Any]) -> dict[str, Any]:
    from crossret.data.synthetic_person import sample_identities

    proto = bench.SYNTH_V3
    with tempfile.TemporaryDirectory(prefix="crossret-gckd-probe-") as tmp:
        root = Path(tmp)
        pre = calibration.source_trained_model(root, source, seed, generic)
        data = root / "data" / bench.DIRS[source]
        identities = sample_identities(proto["train_ids"] + proto["test_ids"], bench.DATASET[source], seed)
        features = {}
        for name, run_dir in (("generic", Path(generic["run_dir"])), ("source-trained", pre)):
            _, train_x, train_view = calibration._features(run_dir, data, "train")
            _, test_x, test_view = calibration._features(run_dir, data, "test")
            features[name] = (train_x.numpy(), test_x.numpy())
        size = tuple(proto["model"]["image_size"])
        features["pixels"] = (pixel_features(train_view, data, size), pixel_features(test_view, data, size))
        models = {
            name: {field: probe(train_x, attribute_labels(train_view.image_person_ids, identities, 0, field), test_x,
                                attribute_labels(test_view.image_person_ids, identities, proto["train_ids"], field))
                   for field in FIELDS}
            for name, (train_x, test_x) in features.items()}
    return {"source": source, "seed": seed, "train_images": proto["train_ids"] * proto["images_per_id"],
            "test_images": proto["test_ids"] * proto["images_per_id"], "models": models}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["# What the GCKD v3 stand-in's image features see: linear attribute probes", "",
             "Logistic regression on the ITC image features of a source's training images, accuracy on its test "
             "images (development data seed; the source's own labels). Majority = the training split's most "
             "common value. pixels = the same probe on the raw pixels at the model's input size (what the "
             "rendering makes linearly visible); generic = the generic pre-trained model; source-trained = the "
             "model every v3 variant starts adapting from.", "",
             "| source | attribute | majority | pixels | generic | source-trained |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        for field in FIELDS:
            cells = [r["models"][m][field]["accuracy"] for m in ("pixels", "generic", "source-trained")]
            lines.append(f"| {r['source']} | {field} | {100 * r['models']['pixels'][field]['majority']:.1f} % | "
                         + " | ".join(f"{100 * c:.1f} %" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = calibration.v3_parser(__doc__.splitlines()[0], "gckd_probe")
    parser.add_argument("--seed", type=int, default=bench.SYNTH_V3_DEV_SEED,
                        help="data seed (default: the v3 development seed, not a benchmark seed)")
    args = parser.parse_args(argv)
    started = time.time()
    generic = calibration.v3_generic_model()
    rows = []
    for source in args.sources:
        rows.append(one(source, args.seed, generic))
        print(f"{source}: done", file=sys.stderr, flush=True)
    payload = {"protocol": "synthetic v3 (benchmarks/gckd.py SYNTH_V3)", "generic_digest": generic["digest"],
               "fields": list(FIELDS), "rows": rows, "environment": _repro.environment(),
               "wall_seconds": round(time.time() - started, 1),
               "command": "python benchmarks/gckd_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_json_atomic(args.out.with_suffix(".json"), payload)
    write_text_atomic(args.out.with_suffix(".md"), table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
