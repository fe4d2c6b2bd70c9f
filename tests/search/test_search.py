"""Index and search: galleries of every kind, the model check, and the HTTP service with its page.

The service tests register the trained model, index the test split with `models:/...@champion`
and query `zhclip serve` over HTTP on 127.0.0.1, as a user of the demo would.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zhclip.components.core.errors import ZhclipError
from zhclip.components.data.shards import read_pairs
from zhclip.components.registry.register import RegisterConfig, register
from zhclip.components.search.gallery import read_image
from zhclip.components.search.index_build import IndexConfig, build_index
from zhclip.components.search.index_store import (
    SearchIndex,
    find_index,
    fitting_search_params,
    publish_index,
    weights_folder_name,
)

from browser import CJK_FAMILY, chromium_page
from conftest import REPO, S3_CREDENTIALS, caption_recall_at_10, free_port, run_cli, serving

EXACT = IndexConfig(factory="Flat")


def _png(color: tuple[int, int, int], size: int = 24) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


def test_folder_gallery_indexes_each_image_with_its_location_and_reports_bad_files(tiny_models, tmp_path):
    gallery = tmp_path / "gallery"
    (gallery / "red").mkdir(parents=True)
    images = {"red/a.png": _png((255, 0, 0)), "blue.png": _png((0, 0, 255)), "green.png": _png((0, 200, 0))}
    for name, blob in images.items():
        (gallery / name).write_bytes(blob)
    (gallery / "broken.jpg").write_bytes(b"not an image")
    (gallery / "notes.txt").write_text("skipped: not an image suffix")

    summary = build_index(
        str(gallery), tmp_path / "index", str(tiny_models[0]), EXACT, summary_path=tmp_path / "index.json"
    )

    assert summary["images"] == 3 and summary["rejected"] == 1
    assert (
        summary["rejected_examples"][0]["id"] == "broken.jpg"
        and "not a decodable image" in summary["rejected_examples"][0]["reason"]
    )
    index = SearchIndex(tmp_path / "index")
    items = {index.item(row)["id"]: index.item(row)["location"] for row in range(index.size)}
    assert set(items) == set(images)
    assert all(read_image(items[name]) == blob for name, blob in images.items())
    from zhclip.components.registry.embed import embed

    vector = embed(str(tiny_models[0]), [], [gallery / "blue.png"])[0]["embedding"]
    ((row, score),) = index.search(np.asarray([vector], dtype=np.float32), 1)[0]
    assert index.item(row)["id"] == "blue.png" and score == pytest.approx(1.0, abs=1e-4)
    assert (
        json.loads((tmp_path / "index.json").read_text())["model"]["weights_hash"]
        == index.meta["model"]["weights_hash"]
    )


def test_tsv_and_prepared_galleries_index_each_image_once(tiny_models, raw_dir, prepared_dir, tmp_path):
    tsv = raw_dir / "test_imgs.tsv"
    from_tsv = build_index(str(tsv), tmp_path / "tsv", str(tiny_models[0]), EXACT)
    from_shards = build_index(str(prepared_dir / "test"), tmp_path / "shards", str(tiny_models[0]), EXACT)

    pairs = read_pairs(prepared_dir, "test")
    assert from_tsv["images"] == from_shards["images"] == pairs["image_id"].nunique()
    for folder, kind in ((tmp_path / "tsv", "tsv"), (tmp_path / "shards", "shards")):
        index = SearchIndex(folder)
        first = index.item(0)
        stored = pairs.loc[pairs["image_id"] == int(first["id"]), "image"].iloc[0]
        assert read_image(first["location"]) == stored, kind  # ingest keeps PNG bytes as they came
    caption = SearchIndex(tmp_path / "shards").item(0)["caption"]
    assert caption in set(pairs["text"])


@pytest.mark.slow
def test_ray_data_actors_index_the_same_images_as_one_process(tiny_models, prepared_dir, tmp_path):
    gallery = str(prepared_dir / "train")  # several shards: pieces for several actors
    here = build_index(gallery, tmp_path / "here", str(tiny_models[0]), EXACT)
    spread = build_index(gallery, tmp_path / "ray", str(tiny_models[0]), IndexConfig(factory="Flat", workers=2))
    assert here["images"] == spread["images"] == read_pairs(prepared_dir, "train")["image_id"].nunique()

    def vectors_by_id(folder: Path) -> dict[str, np.ndarray]:
        index = SearchIndex(folder)
        vectors = index.index.reconstruct_n(0, index.size)
        return {index.item(row)["id"]: vectors[row] for row in range(index.size)}

    one, many = vectors_by_id(tmp_path / "here"), vectors_by_id(tmp_path / "ray")
    assert set(one) == set(many)
    assert max(float(np.abs(one[key] - many[key]).max()) for key in one) < 1e-5


def test_index_on_object_store_loads_for_search(tiny_models, prepared_dir, s3_endpoint, monkeypatch):
    for name, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    from zhclip.components.core.storage import client

    client(s3_endpoint).make_bucket("zhclip-index")
    built = build_index(str(prepared_dir / "test"), "s3://zhclip-index/test", str(tiny_models[0]), IndexConfig())
    index = SearchIndex("s3://zhclip-index/test")
    assert index.size == built["images"] and index.meta["factory"] == "HNSW32"
    assert read_image(index.item(0)["location"])[:8] == b"\x89PNG\r\n\x1a\n"
    # published into a catalog on the object store (as the pipeline's index task does), found by its weights
    entry = publish_index("s3://zhclip-index/test", "s3://zhclip-index/catalog", built["model"]["weights_hash"])
    assert entry == f"s3://zhclip-index/catalog/{weights_folder_name(built['model']['weights_hash'])}"
    assert find_index("s3://zhclip-index/catalog", built["model"]) == entry
    assert SearchIndex(entry).meta["canary"] == index.meta["canary"]


@pytest.mark.parametrize(
    "factory, expected",
    [
        ("HNSW32", "efSearch=256"),
        ("HNSW32,SQ8", "efSearch=256"),
        ("IVF256,Flat", "nprobe=64"),
        ("IVF16,PQ8", "nprobe=16"),  # fewer lists than 64: all of them
        ("IVF4096_HNSW32,PQ16", "nprobe=64"),
        ("Flat", ""),
        ("SQ8", ""),
        ("PQ16", ""),
    ],
)
def test_search_settings_follow_the_factory(factory, expected):
    assert fitting_search_params(factory) == expected
    from zhclip.components.search.index_build import new_index
    from zhclip.components.search.index_store import set_search_params

    set_search_params(new_index(factory, 32), expected)  # FAISS accepts them for that index


def _colour_gallery(folder: Path, images: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for number, colour in enumerate(rng.integers(0, 256, size=(images, 3))):
        (folder / f"{number:04d}.png").write_bytes(_png(tuple(int(c) for c in colour), size=8))
    return folder


@pytest.mark.parametrize("factory, search_params", [("Flat", ""), ("IVF256,Flat", "nprobe=64")])
def test_exact_and_inverted_list_factories_index_with_the_projects_params(
    factory, search_params, tiny_models, tmp_path
):
    """The factories `zhclip index --help` offers work with params.yaml as it is: each gets the search
    settings that fit it, and finds a gallery image first when queried with its own embedding."""
    gallery = _colour_gallery(tmp_path / "gallery", 300)  # IVF256 trains on at least 256 images
    out = tmp_path / "index"
    result = run_cli(
        "index",
        "--gallery",
        str(gallery),
        "--out",
        str(out),
        "--model",
        str(tiny_models[0]),
        "--factory",
        factory,
        "--params",
        str(REPO / "params.yaml"),
        "--summary",
        str(tmp_path / "summary.json"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["factory"], summary["search_params"], summary["images"]) == (factory, search_params, 300)
    index = SearchIndex(out)
    assert index.meta["search_params"] == search_params
    from zhclip.components.registry.embed import embed

    vector = embed(str(tiny_models[0]), [], [gallery / "0123.png"])[0]["embedding"]
    ((row, score),) = index.search(np.asarray([vector], dtype=np.float32), 1)[0]
    assert index.item(row)["id"] == "0123.png" and score == pytest.approx(1.0, abs=1e-4)


def test_search_settings_that_do_not_fit_and_too_small_galleries_are_refused_clearly(tiny_models, tmp_path):
    gallery = _colour_gallery(tmp_path / "gallery", 40)
    with pytest.raises(ZhclipError, match=r"search params 'efSearch=256' do not fit this index"):
        build_index(
            str(gallery),
            tmp_path / "flat",
            str(tiny_models[0]),
            IndexConfig(factory="Flat", search_params="efSearch=256"),
        )
    with pytest.raises(ZhclipError, match=r"40 images are too few to train this index \(it needs 256\)"):
        build_index(str(gallery), tmp_path / "ivf", str(tiny_models[0]), IndexConfig(factory="IVF256,Flat"))


def test_a_model_other_than_the_indexing_one_is_refused(tiny_models, prepared_dir, tmp_path):
    build_index(str(prepared_dir / "test"), tmp_path / "index", str(tiny_models[0]), EXACT)
    from zhclip.components.registry.embed import model_identity

    with pytest.raises(
        ZhclipError,
        match=r"was built by .*seed0.*but the model given is .*seed1.*zhclip index --gallery .*test --model .*seed1",
    ):
        SearchIndex(tmp_path / "index").check_model(model_identity(str(tiny_models[1])))
    result = run_cli(
        "serve",
        "--index",
        str(tmp_path / "index"),
        "--model",
        str(tiny_models[1]),
        "--port",
        str(free_port()),
        timeout=120,
    )
    assert result.returncode == 2 and "their embeddings do not compare" in result.stderr, result.stderr
    result = run_cli(
        "serve",
        "--index",
        str(tmp_path / "missing"),
        "--model",
        str(tiny_models[0]),
        "--port",
        str(free_port()),
        timeout=120,
    )
    assert result.returncode == 2 and "neither an index folder nor a catalog" in result.stderr, result.stderr
    result = run_cli(
        "index",
        "--gallery",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "other"),
        "--model",
        str(tiny_models[0]),
        timeout=120,
    )
    assert (
        result.returncode == 2 and "is not an image folder, an *_imgs.tsv file or a prepared split" in result.stderr
    ), result.stderr


# --- the service, from the registry -------------------------------------------------------------------------------


def _answer(request: str | urllib.request.Request) -> tuple[int, dict]:
    """The status and JSON body of a request, an HTTP error status included."""
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _get(url: str) -> tuple[int, dict]:
    return _answer(url)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    return _answer(
        urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
    )


def _declared_upload(base: str, megabytes: int) -> tuple[int, dict]:
    """Announce an upload of `megabytes` and send none of it: the server must answer from the header."""
    import http.client

    host, port = urllib.parse.urlsplit(base).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/api/search/image")
    connection.putheader("Content-Length", str(megabytes * 2**20))
    connection.endheaders()
    response = connection.getresponse()
    try:
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _search(base: str, text: str, **params) -> tuple[int, dict]:
    return _get(f"{base}/api/search?" + urllib.parse.urlencode({"q": text, **params}))


@pytest.fixture(scope="module")
def served(trained, prepared_dir, tmp_path_factory):
    """The trained model registered as champion, the test split indexed by `zhclip index` with its
    registry URI, and `zhclip serve` over that index with the same URI."""
    root = tmp_path_factory.mktemp("served")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    evaluation = root / "evaluate.json"
    from zhclip.components.evaluation.evaluate import EvaluateConfig, evaluate

    scores = evaluate(trained["root"] / "stage2", prepared_dir, EvaluateConfig(split="test"), evaluation)
    registered = register(
        trained["root"] / "stage2", evaluation, RegisterConfig(model_name="zhclip-search", tracking_uri=tracking)
    )
    assert registered["promoted"]
    model = "models:/zhclip-search@champion"
    built = run_cli(
        "index",
        "--gallery",
        str(prepared_dir / "test"),
        "--out",
        str(root / "test"),
        "--model",
        model,
        "--tracking-uri",
        tracking,
        "--summary",
        str(root / "index.json"),
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    with serving(
        ["--index", str(root / "test"), "--model", model, "--tracking-uri", tracking], root / "serve.log"
    ) as base:
        yield {"base": base, "root": root, "scores": scores, "version": registered["version"]}


@pytest.mark.slow
def test_captions_find_their_images_as_often_as_evaluate_says(served, prepared_dir):
    recall = caption_recall_at_10(served["base"], read_pairs(prepared_dir, "test"))
    assert recall >= served["scores"]["t2i_r10"] - 1e-6, (recall, served["scores"]["t2i_r10"])
    status, ready = _get(f"{served['base']}/readyz")
    assert ready["model"]["version"] == str(served["version"]) and ready["model"]["name"] == "zhclip-search"


@pytest.mark.slow
def test_the_onnx_backend_finds_what_the_torch_backend_finds(served, prepared_dir, tmp_path, monkeypatch):
    """The same registered model and index served with serve.backend onnx: the same top 10 for every
    test caption and the same image query answer (the onnx server exports the graphs on its start)."""
    monkeypatch.setenv("ZHCLIP_ONNX_CACHE", str(tmp_path / "onnx"))
    tracking = f"sqlite:///{served['root'] / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text("serve:\n  backend: onnx\n")
    texts = read_pairs(prepared_dir, "test").groupby("text_id")["text"].first()
    args = ["--index", str(served["root"] / "test"), "--model", "models:/zhclip-search@champion"]
    with serving(
        [*args, "--tracking-uri", tracking, "--params", str(tmp_path / "params.yaml")], tmp_path / "log"
    ) as base:
        for text in texts:
            (_, onnx), (_, torch) = _search(base, text, k=10), _search(served["base"], text, k=10)
            assert {r["id"] for r in onnx["results"]} == {r["id"] for r in torch["results"]}, text
            assert [r["score"] for r in onnx["results"]] == pytest.approx(
                [r["score"] for r in torch["results"]], abs=1e-3
            )
        blob = read_pairs(prepared_dir, "test")["image"].iloc[0]
        onnx_image, torch_image = (
            _post(f"{base}/api/search/image?k=3", blob)[1],
            _post(f"{served['base']}/api/search/image?k=3", blob)[1],
        )
        assert [r["id"] for r in onnx_image["results"]] == [r["id"] for r in torch_image["results"]]
    assert [path.name for path in (tmp_path / "onnx").iterdir() if not path.name.startswith(".")]  # exported once


def _metric_samples(base: str) -> dict[tuple, float]:
    """/metrics parsed by prometheus_client's own parser: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.slow
def test_metrics_count_the_requests_sent_and_name_the_live_model(served):
    base, search = served["base"], (("endpoint", "/api/search"),)
    before = _metric_samples(base)
    for text in ("红色的圆形", "蓝色的十字", "绿色三角形"):
        assert _search(base, text, k=3)[0] == 200
    assert _search(base, "", k=3)[0] == 400 and _search(base, "圆", k=0)[0] == 400
    after = _metric_samples(base)

    def sent(status: str) -> float:
        key = ("zhclip_search_requests_total", (("endpoint", "/api/search"), ("status", status)))
        return after.get(key, 0) - before.get(key, 0)

    assert (sent("200"), sent("400")) == (3, 2)
    count = ("zhclip_search_request_seconds_count", search)
    assert after[count] - before.get(count, 0) == 5
    assert (
        after[("zhclip_search_embed_batch_size_count", ())]
        >= before.get(("zhclip_search_embed_batch_size_count", ()), 0) + 3
    )
    (info,) = [labels for (name, labels) in after if name == "zhclip_search_model_info"]
    assert dict(info)["version"] == str(served["version"]) and dict(info)["backend"] == "torch"
    assert after[("zhclip_search_ready", ())] == 1


@pytest.mark.slow
def test_answers_name_their_model_and_the_access_log_has_a_line_per_request_without_queries(served):
    status, answer = _search(served["base"], "紫色的正方形", k=2)
    assert status == 200 and answer["index"] == "test"
    assert answer["model"]["name"] == "zhclip-search" and answer["model"]["version"] == str(served["version"])
    lines = [
        json.loads(line) for line in (served["root"] / "serve.log").read_text().splitlines() if line.startswith("{")
    ]
    searches = [line for line in lines if line["endpoint"] == "/api/search"]
    assert searches and all("query" not in line for line in lines)
    assert {"status", "duration_ms", "method", "time"} <= set(searches[-1])
    assert searches[-1]["model_version"] == str(served["version"]) and searches[-1]["index"] == "test"


@pytest.mark.slow
def test_paging_and_image_queries(served, prepared_dir):
    base = served["base"]
    _, first = _search(base, "红色的圆形", k=5)
    _, second = _search(base, "红色的圆形", k=5, offset=5)
    _, both = _search(base, "红色的圆形", k=10)
    assert [r["id"] for r in first["results"] + second["results"]] == [r["id"] for r in both["results"]]
    assert [r["rank"] for r in second["results"]] == [6, 7, 8, 9, 10]
    thumbnail = urllib.request.urlopen(base + first["results"][0]["image_url"], timeout=30).read()
    assert Image.open(io.BytesIO(thumbnail)).format == "JPEG"
    image_id = read_pairs(prepared_dir, "test")["image_id"].iloc[0]
    blob = read_pairs(prepared_dir, "test")["image"].iloc[0]
    status, similar = _post(f"{base}/api/search/image?k=3", blob)
    assert status == 200 and similar["results"][0]["id"] == str(image_id) and similar["results"][0]["score"] > 0.999


def _huge_png() -> bytes:
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, format="PNG")  # 100 megapixels in a few kB
    return out.getvalue()


@pytest.mark.slow
def test_bad_input_is_refused_with_its_reason_while_good_queries_keep_being_answered(served):
    base = served["base"]
    bad = {
        "empty query": (lambda: _search(base, "  "), 400, "the query is empty"),
        "over-long query": (lambda: _search(base, "很长" * 300), 400, "600 characters long; at most 200"),
        "k too large": (lambda: _search(base, "圆形", k=1000), 400, "k must be an integer from 1 to 100, got '1000'"),
        "k not a number": (lambda: _search(base, "圆形", k="十"), 400, "k must be an integer"),
        "paging too deep": (lambda: _search(base, "圆形", k=100, offset=950), 400, "goes past the deepest result"),
        "missing index": (
            lambda: _search(base, "圆形", index="gallery2"),
            404,
            "no index named 'gallery2'; this server has: test",
        ),
        "not an image": (lambda: _post(f"{base}/api/search/image", "这不是图片".encode()), 415, "is not an image"),
        "empty upload": (lambda: _post(f"{base}/api/search/image", b""), 400, "the upload is empty"),
        "100 megapixels": (
            lambda: _post(f"{base}/api/search/image", _huge_png()),
            413,
            "100.0 megapixels, above the limit of 25.0",
        ),
        "upload too big": (lambda: _declared_upload(base, 21), 413, "the upload is 21.0 MB; at most 20 MB"),
        "missing thumbnail": (lambda: _get(f"{base}/api/images/test/100000"), 404, "row must be an integer from 0 to"),
    }
    good = [lambda: _search(base, "蓝色的三角形", k=3) for _ in range(24)]
    calls = [*bad.values()] * 2
    with ThreadPoolExecutor(8) as pool:  # bad and good requests interleaved, eight at a time
        bad_answers = [pool.submit(call) for call, _, _ in calls]
        good_answers = [pool.submit(call) for call in good]
        for (name, (_, status, message)), future in zip([*bad.items()] * 2, bad_answers):
            got_status, answer = future.result(timeout=120)
            assert (got_status, message in answer.get("error", "")) == (status, True), (name, got_status, answer)
        assert all(future.result(timeout=120)[0] == 200 for future in good_answers)
    assert _search(base, "蓝色的三角形", k=3)[0] == 200
    assert _get(f"{base}/healthz") == (200, {"status": "alive"})


@pytest.mark.slow
def test_page_searches_a_typed_chinese_query_and_shows_images_and_chinese_text(served, tmp_path):
    with chromium_page(tmp_path / "profile") as page:
        page.open(served["base"] + "/")
        page.call("Runtime.evaluate", expression="document.getElementById('query').focus()")
        page.call("Input.insertText", text="红色的圆形")  # typed, as an input method commits Chinese text
        page.call("Runtime.evaluate", expression="document.getElementById('search').click()")
        shown = (
            "(() => { const imgs = [...document.querySelectorAll('#results img')];"
            " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0; })()"
        )
        deadline = time.monotonic() + 60
        while not page.call("Runtime.evaluate", expression=shown, returnByValue=True)["result"]["value"]:
            assert time.monotonic() < deadline, page.call("Runtime.evaluate", expression="document.body.innerText")[
                "result"
            ]
            time.sleep(0.3)
        status = page.call("Runtime.evaluate", expression="document.getElementById('status').textContent")["result"][
            "value"
        ]
        page.screenshot(served["root"] / "search_page.png")
        fonts = page.fonts_of_chinese_text()
    assert status.startswith("“红色的圆形”：第 1–20 个结果"), status
    captions = [
        text for text in fonts if "相似度" not in text and text not in ("zhclip 图像检索", "以文搜图", "以图搜图")
    ]
    assert captions, fonts  # the results' captions are Chinese text too
    missing = {
        text: sorted(families) for text, families in fonts.items() if not any(CJK_FAMILY.search(f) for f in families)
    }
    assert not missing, f"Chinese text drawn without a CJK font (empty boxes): {missing}"
