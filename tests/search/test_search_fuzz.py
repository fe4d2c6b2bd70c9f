"""Generated requests to the search API (Hypothesis): query strings, bodies, paths and headers no one
tried. The service answers only 2xx or 4xx, and keeps answering real queries afterwards. The
example count follows the Hypothesis profile (tests/conftest.py)."""

import io
import urllib.parse

import pytest
from fastapi.testclient import TestClient
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from zhclip.components.search.http_app import create_app
from zhclip.components.search.index_build import IndexConfig, build_index
from zhclip.components.search.service import SearchService, ServeConfig

from conftest import fewer_examples

# Text a URL or header can carry (no lone surrogates, which no client can encode)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
params = st.dictionaries(
    st.sampled_from(["q", "k", "offset", "index"]) | texts, texts | st.integers().map(str), max_size=5
)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=100)
headers = st.dictionaries(
    st.sampled_from(["content-type", "content-length", "authorization", "accept", "x-forwarded-for", "range"])
    | st.from_regex(r"x-[a-z]{1,10}", fullmatch=True),
    header_values,
    max_size=4,
)


def _png(size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
bodies = st.one_of(
    st.binary(max_size=3000),
    st.just(PNG),
    st.binary(max_size=200).map(lambda junk: PNG[:40] + junk),  # a PNG header, then garbage
    st.just(_png((1, 4000))),
)


@pytest.fixture(scope="module")
def client(trained, prepared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("search_fuzz")
    model = str(trained["root"] / "stage2")
    build_index(prepared_dir / "test", root / "index", model, IndexConfig(factory="Flat"))
    service = SearchService({"test": str(root / "index")}, model, ServeConfig(access_log=str(root / "access.log")))
    service.live.check()
    assert service.pair is not None, service.live.last
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client
    assert client.get("/api/search", params={"q": "红色的圆形"}).status_code == 200  # still serving


def _answered(response) -> None:
    """2xx or 4xx, never a server error, and a JSON answer shaped as its status promises: a refusal
    says why, and a page of results is ranked from offset + 1, at most k long, each with its image."""
    status = response.status_code
    assert 200 <= status < 300 or 400 <= status < 500, (status, response.text[:500])
    if not response.headers.get("content-type", "").startswith("application/json"):
        return
    body = response.json()
    if status >= 400:
        assert body.get("error") or body.get("detail"), body
    elif "results" in body:
        ranks = [result["rank"] for result in body["results"]]
        assert ranks == list(range(body["offset"] + 1, body["offset"] + 1 + len(ranks))) and len(ranks) <= body["k"]
        assert all(result["image_url"].startswith("/api/images/") for result in body["results"]), body


@settings(max_examples=fewer_examples(2))
@given(query=params, sent=headers)
@example(query={"q": "红色", "k": "99999999999999999999"}, sent={})
@example(query={"q": "红色", "offset": "-1", "k": "nan"}, sent={})
@example(query={"q": "\x00" * 10}, sent={})
def test_text_search_answers_every_query_string(client, query, sent):
    _answered(client.get("/api/search", params=query, headers=sent))


@settings(max_examples=fewer_examples(4))
@given(body=bodies, query=params, sent=headers)
@example(body=b"", query={}, sent={"content-length": "0"})
def test_image_search_answers_every_body(client, body, query, sent):
    sent = {key: value for key, value in sent.items() if key != "content-length"}  # the client sets the true one
    _answered(client.post("/api/search/image", content=body, params=query, headers=sent))


@settings(max_examples=fewer_examples(2))
@given(index=texts, row=texts, path=texts, sent=headers)
@example(index="test", row="-1", path="", sent={})
@example(index="test", row="99999999999999999999999", path="", sent={})
def test_other_paths_answer_every_request(client, index, row, path, sent):
    quoted = [urllib.parse.quote(part, safe="") or "x" for part in (index, row)]
    _answered(client.get(f"/api/images/{quoted[0]}/{quoted[1]}", headers=sent))
    _answered(client.post("/admin/reload", headers=sent))
    _answered(client.get("/" + urllib.parse.quote(path), headers=sent))
