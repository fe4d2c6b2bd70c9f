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
from zhclip.components.search.index_store import SearchIndex

from browser import CJK_FAMILY, chromium_page
from conftest import S3_CREDENTIALS, caption_recall_at_10, free_port, run_cli, serving

EXACT = IndexConfig(factory="Flat", search_params="")


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
    spread = build_index(
        gallery, tmp_path / "ray", str(tiny_models[0]), IndexConfig(factory="Flat", search_params="", workers=2)
    )
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
    assert result.returncode == 2 and "is not an index folder" in result.stderr, result.stderr
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
