"""Text → image search with a GCKD run: the encoder API, ``index build --gallery`` / ``index search --text``,
the ``/search/text`` service route, agreement with the evaluation's ITC ranking, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests._cli import cli

from crossret.data.person import ImageTransform, build_eval_view, load_image, load_person_dataset
from crossret.data.synthetic_person import generate_person_dataset
from crossret.errors import ConfigError, DataError
from crossret.retrieval.index import BinaryIndex, DenseIndex
from crossret.runs import open_run
from crossret.textimage.evaluate import encode_gallery, encode_queries, stable_topk
from crossret.textimage.pipeline import GckdRunConfig, evaluate_run, run_gckd
from crossret.textimage.search import GalleryIndex, GckdEncoder, search_texts

TRAIN = {"epochs": 1, "lr": 1e-3, "head_lr": 1e-3, "ids_per_batch": 3, "pairs_per_id": 2, "memory_size": 16}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gckd_search")
    data = generate_person_dataset("cuhk-pedes", root / "data", n_train_ids=6, n_test_ids=5, images_per_id=2,
                                   seed=3, image_size=(32, 16))
    run_gckd(GckdRunConfig(stage="pretrain", source_dir=str(data), vocab_size=200, train=TRAIN, rerank_k=0),
             root / "run")
    hashing = open_run(root / "hashing", "hashing")  # a marked hashing run directory
    hashing.commit()
    hashing.release()
    encoder = GckdEncoder.from_run(root / "run")
    gallery = GalleryIndex.build(encoder, data)
    gallery.save(root / "gallery.crdi")
    view = build_eval_view(load_person_dataset(None, data), "test")
    return {"root": root, "data": data, "run": root / "run", "hashing": root / "hashing",
            "index": root / "gallery.crdi", "encoder": encoder, "view": view}


def _itc_reference(setup: dict[str, Any]) -> np.ndarray:
    """ITC scores (Q, G) of every test caption and image, encoded as ``evaluate_view`` does."""
    encoder, view = setup["encoder"], setup["view"]
    transform = ImageTransform.eval(tuple(encoder.model.config.image_size))
    images = [torch.stack([transform(load_image(p)) for p in view.image_paths])]
    texts = [tuple(encoder.tokenizer(list(view.captions)))]
    gallery = encode_gallery(encoder.model, images, keep_tokens=False)
    queries = encode_queries(encoder.model, texts, keep_tokens=False)
    return (queries.text_feat @ gallery.image_feat.T).numpy()


def test_encoder_gives_unit_norm_embeddings_batch_independent(setup: dict[str, Any]) -> None:
    encoder, view = setup["encoder"], setup["view"]
    texts = encoder.encode_texts(list(view.captions[:3]))
    images = encoder.encode_images(view.image_paths[:3])
    assert texts.shape == images.shape == (3, encoder.embed_dim) and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    # one at a time (no padding) agrees with the padded batch; captions are cleaned as evaluation does
    np.testing.assert_allclose(encoder.encode_texts([view.captions[1]])[0], texts[1], atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts([view.captions[1].upper() + "!!"])[0], texts[1], atol=1e-5)
    assert not np.allclose(texts[0], texts[1])
    for bad in ([], ["  ?! "], [3]):
        with pytest.raises(DataError):
            encoder.encode_texts(bad)


def test_search_agrees_with_the_itc_ranking_of_evaluation(setup: dict[str, Any], monkeypatch, capsys) -> None:
    view, root = setup["view"], setup["root"]
    scores = _itc_reference(setup)
    k = 5
    captions = root / "captions.txt"
    captions.write_text("\n".join(view.captions) + "\n\n", encoding="utf-8")
    code, out, err = cli(monkeypatch, capsys, "index", "search", setup["index"], "--run", setup["run"],
                         "--text-file", captions, "-k", k, "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["k"] == k and len(result["results"]) == view.num_queries
    ids = np.array([r["ids"] for r in result["results"]])
    np.testing.assert_array_equal(ids, stable_topk(scores, k))
    np.testing.assert_allclose(np.array([r["scores"] for r in result["results"]]),
                               np.take_along_axis(scores, ids, 1), atol=1e-5)
    assert result["results"][0]["paths"][0] == str(Path(view.image_paths[ids[0, 0]]).resolve())
    assert result["results"][0]["person_ids"][0] == int(view.image_person_ids[ids[0, 0]])
    # Rank-1 / Rank-5 of the search results are those `gckd eval` reports for ITC.
    hits = np.array([r["person_ids"] for r in result["results"]]) == view.caption_person_ids[:, None]
    itc = evaluate_run(setup["run"], setup["data"], rerank_k=0)["evaluation"]["itc"]
    assert hits[:, 0].mean() == pytest.approx(itc["rank1"])
    assert hits.any(axis=1).mean() == pytest.approx(itc["rank5"])


def test_cli_text_repeated_equals_python_api(setup: dict[str, Any], monkeypatch, capsys) -> None:
    texts = ["A man in a GREEN jacket.", "woman with a red bag"]
    code, out, err = cli(monkeypatch, capsys, "index", "search", setup["index"], "--run", setup["run"],
                         "--text", texts[0], "--text", texts[1], "-k", 3, "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    api = search_texts(setup["encoder"], GalleryIndex.load(setup["index"]), texts, k=3)
    assert [r["ids"] for r in result["results"]] == [r["ids"] for r in api["results"]]
    assert [r["text"] for r in result["results"]] == texts
    code, out, _ = cli(monkeypatch, capsys, "index", "search", setup["index"], "--run", setup["run"],
                       "--text", texts[0], "-k", 2)
    assert code == 0 and str(api["results"][0]["ids"][0]) in out


def test_cli_build_writes_a_dense_gallery_index(setup: dict[str, Any], monkeypatch, capsys, tmp_path: Path) -> None:
    out_file = tmp_path / "g.crdi"
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--run", setup["run"], "--gallery", setup["data"],
                       "--out", out_file)
    assert code == 0, err
    built = DenseIndex.load(out_file)
    reference = DenseIndex.load(setup["index"])
    assert built.ntotal == setup["view"].num_gallery and built.meta["image_paths"] == reference.meta["image_paths"]
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--run", setup["run"], "--gallery", setup["data"],
                       "--out", out_file)
    assert code == 2 and "--overwrite" in err


def _refused(monkeypatch, capsys, *args: object) -> str:
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_cli_refusals_write_nothing(setup: dict[str, Any], monkeypatch, capsys, tmp_path: Path) -> None:
    run, hashing, index, data = setup["run"], setup["hashing"], setup["index"], setup["data"]
    out = tmp_path / "out.crdi"
    # a GCKD run without a gallery; a gallery with a hashing run; options of code indexes
    assert "--gallery" in _refused(monkeypatch, capsys, "index", "build", "--run", run, "--out", out)
    assert "hashing run" in _refused(monkeypatch, capsys, "index", "build", "--run", hashing, "--gallery", data,
                                     "--out", out)
    assert "--kind" in _refused(monkeypatch, capsys, "index", "build", "--run", run, "--gallery", data, "--out", out,
                                "--kind", "ivf")
    # texts for a hashing model / a binary (hashing) index
    assert "hashing run" in _refused(monkeypatch, capsys, "index", "search", index, "--run", hashing, "--text", "a man")
    binary = tmp_path / "codes.crbi"
    BinaryIndex.from_packed(np.zeros((4, 1), np.uint8), 8).save(binary)
    assert "binary" in _refused(monkeypatch, capsys, "index", "search", binary, "--run", run, "--text", "a man")
    # feature / code files for a GCKD model or gallery index
    features = tmp_path / "x.npy"
    np.save(features, np.zeros((2, 4), np.float32))
    assert "GCKD run" in _refused(monkeypatch, capsys, "index", "encode", "--run", run, "--features", features,
                                  "--out", tmp_path / "codes.npy")
    assert "gallery index" in _refused(monkeypatch, capsys, "index", "search", index, "--queries", features)
    # empty captions, k out of range
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    assert "no captions" in _refused(monkeypatch, capsys, "index", "search", index, "--run", run, "--text-file", empty)
    assert "empty" in _refused(monkeypatch, capsys, "index", "search", index, "--run", run, "--text", "?!")
    size = setup["view"].num_gallery
    assert "gallery size" in _refused(monkeypatch, capsys, "index", "search", index, "--run", run, "--text", "a",
                                      "-k", size + 1)
    assert "-k" in _refused(monkeypatch, capsys, "index", "search", index, "--run", run, "--text", "a", "-k", 0)
    assert "--text" in _refused(monkeypatch, capsys, "index", "search", index, "--text", "a man")
    assert "--gallery" in _refused(monkeypatch, capsys, "serve", hashing, "--gallery", data)
    assert "GCKD gallery index" in _refused(monkeypatch, capsys, "serve", "--index", index)
    assert not any(p.name in ("out.crdi", "codes.npy", "codes.npy.json") for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="hashing run"):
        GckdEncoder.from_run(hashing)


def test_gallery_index_refuses_another_model(setup: dict[str, Any], tmp_path: Path) -> None:
    other = DenseIndex.load(setup["index"])
    other.meta = {**other.meta, "model_sha256": "0" * 64}
    other.save(tmp_path / "other.crdi")
    with pytest.raises(ConfigError, match="not the model"):
        search_texts(setup["encoder"], GalleryIndex.load(tmp_path / "other.crdi"), ["a man"], k=1)


# ---------------------------------------------------------------------------------------------- the service
def test_service_search_text(setup: dict[str, Any]) -> None:
    pytest.importorskip("fastapi", reason="pip install 'crossret[serve]'")
    pytest.importorskip("httpx", reason="pip install 'crossret[serve]'")
    from fastapi.testclient import TestClient

    from crossret.serve.app import TEXT_ROUTES, create_text_app
    from crossret.serve.state import ServiceLimits

    limits = ServiceLimits(max_k=5, max_batch=3, max_body_bytes=4096, max_concurrent=2)  # body: 2001-char texts fit
    client = TestClient(create_text_app(setup["run"], index=setup["index"], limits=limits))
    from_data = TestClient(create_text_app(setup["run"], gallery=setup["data"], limits=limits))
    texts = ["a man in a green jacket", "woman with a red bag"]
    answer = client.post("/search/text", json={"texts": texts, "k": 4})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    api = search_texts(setup["encoder"], GalleryIndex.load(setup["index"]), texts, k=4)
    assert [r["ids"] for r in body["results"]] == [r["ids"] for r in api["results"]]
    np.testing.assert_allclose([r["scores"] for r in body["results"]], [r["scores"] for r in api["results"]],
                               atol=1e-6)
    assert from_data.post("/search/text", json={"texts": texts, "k": 4}).json()["results"] == body["results"]
    size = setup["view"].num_gallery
    assert client.get("/health").json() == {"status": "ok", "size": size, "dim": setup["encoder"].embed_dim,
                                            "generation": 0}
    assert client.get("/info").json()["limits"]["max_k"] == 5
    schema = client.get("/openapi.json").json()
    assert schema["components"]["schemas"]["TextRequest"]["properties"]["k"]["maximum"] == 5
    paths = {(m.upper(), p) for p, item in schema["paths"].items() for m in item}
    assert paths | {("GET", "/openapi.json")} == set(TEXT_ROUTES)
    assert client.post("/search/codes", json={"hex": ["00"]}).status_code == 404  # hashing routes are not served

    cases = [({"texts": [], "k": 1}, "empty_batch"), ({"texts": ["a"] * 4}, "batch_too_large"),
             ({"texts": ["a"], "k": 0}, "invalid_k"), ({"texts": ["a"], "k": 6}, "invalid_k"),
             ({"texts": ["a"], "k": True}, "invalid_request"), ({"texts": [1]}, "invalid_request"),
             ({"texts": ["a"], "extra": 1}, "invalid_request"), ({"texts": ["?!"], "k": 1}, "invalid_text"),
             ({"texts": ["a" * 2001], "k": 1}, "invalid_request")]
    for request, kind in cases:
        answer = client.post("/search/text", json=request)
        assert answer.status_code == 422 and answer.json()["error"] == kind, (request, answer.text)
    assert client.post("/search/text", content=b'{"texts": ["' + b"a" * 5000 + b'"]}',
                       headers={"content-type": "application/json"}).status_code == 413
    assert client.post("/search/text", content=b'{"texts": ["a"]}',
                       headers={"content-type": "text/plain"}).status_code == 415
    small = TestClient(create_text_app(setup["run"], index=setup["index"],
                                       limits=ServiceLimits(max_k=size, max_results=5)))
    assert small.post("/search/text", json={"texts": ["a", "b"], "k": 3}).json()["error"] == "too_many_results"
    with pytest.raises(ConfigError, match="exactly one of"):
        create_text_app(setup["run"], limits=limits)


def test_service_deadline(setup: dict[str, Any]) -> None:
    pytest.importorskip("fastapi", reason="pip install 'crossret[serve]'")
    from crossret.serve.state import RequestError
    from crossret.serve.text import TextSearchState

    state = TextSearchState(setup["run"], index=setup["index"])
    with pytest.raises(RequestError) as info:
        state.search(["a man"], 1, deadline=0.0)
    assert info.value.status == 503 and info.value.kind == "timeout"
