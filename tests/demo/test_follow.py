"""`zhclip serve --follow`: the server moves with the registry's alias, under load, behind a canary.

One server follows `models:/zhclip-follow@champion` over an index catalog of the demo's test split
for the whole module: the champion moves from the demo's stage-2 model to a second version while 8
clients query it, then to a broken one (random weights) that the canary refuses, then an operator
forces a reload. The demo's model is what makes the canary meaningful: it finds its captions' images
(a model trained for seconds on the tests' tiny data finds no more than random weights do).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zhclip.components.data.shards import read_pairs
from zhclip.components.registry.register import RegisterConfig, register
from zhclip.components.search.index_build import IndexConfig, build_index

from conftest import serving

MODEL_NAME = "zhclip-follow"
TOKEN = "test-admin-token"
CLIENTS = 8

pytestmark = pytest.mark.slow


def _same_answers_other_weights(model: Path, out: Path) -> Path:
    """A copy of `model` whose logit scale differs: other weights (another hash), the same embeddings."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    state = load_file(out / "model.safetensors")
    state["logit_scale"] = state["logit_scale"] + 0.5
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _register(model: Path, root: Path, tracking: str, mean_recall: float) -> int:
    figures = root / f"evaluation-{model.name}.json"
    figures.write_text(json.dumps({"mean_recall": mean_recall}))
    return register(model, figures, RegisterConfig(model_name=MODEL_NAME, tracking_uri=tracking))["version"]


def _move_champion(tracking: str, version: int) -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri=tracking).set_registered_model_alias(MODEL_NAME, "champion", str(version))


def _get(url: str, **headers) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _post(url: str, **headers) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=b"", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _metrics(base: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _wait_for(condition, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def following(demo, tiny_models, tmp_path_factory):
    """Version 1 (the demo's stage-2 model) as champion with its index in the catalog, version 2 (the
    same embeddings, other weights) and version 3 (random weights) registered but not indexed yet, and
    `zhclip serve --follow` checking the alias every second."""
    root = tmp_path_factory.mktemp("follow")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    stage2 = demo / "models" / "stage2"
    versions = {
        "first": _register(stage2, root, tracking, 0.9),
        "second": _register(_same_answers_other_weights(stage2, root / "second"), root, tracking, 0.0),
        "broken": _register(tiny_models[0], root, tracking, 0.0),
    }
    _move_champion(tracking, versions["first"])
    catalog, gallery = root / "catalog", demo / "data" / "validated" / "test"

    def publish(version: int) -> dict:
        return build_index(
            gallery,
            None,
            f"models:/{MODEL_NAME}/{version}",
            IndexConfig(factory="Flat"),
            tracking,
            catalog=str(catalog),
        )

    publish(versions["first"])
    captions = sorted(set(read_pairs(demo / "data" / "validated", "test")["text"]))
    log = root / "serve.log"
    with serving(
        ["--follow", f"models:/{MODEL_NAME}@champion", "--index", f"test={catalog}", "--tracking-uri", tracking]
        + ["--follow-seconds", "1"],
        log,
        env={**os.environ, "ZHCLIP_ADMIN_TOKEN": TOKEN},
    ) as base:
        yield {
            "base": base,
            "log": log,
            "tracking": tracking,
            "versions": versions,
            "publish": publish,
            "captions": captions,
        }


def _query_until(base: str, captions: list[str], stop: threading.Event, answers: list) -> None:
    """One client: query captions in turn until `stop`, recording (status, model version) per answer."""
    turn = 0
    while not stop.is_set():
        status, body = _get(f"{base}/api/search?" + urllib.parse.urlencode({"q": captions[turn % len(captions)]}))
        answers.append((status, (body.get("model") or {}).get("version")))
        turn += 1


def test_the_champion_moves_under_load_without_a_failed_request(following):
    base, versions = following["base"], following["versions"]
    first, second = str(versions["first"]), str(versions["second"])
    stop, answers = threading.Event(), [[] for _ in range(CLIENTS)]
    clients = [
        threading.Thread(target=_query_until, args=(base, following["captions"], stop, answers[i]))
        for i in range(CLIENTS)
    ]
    for client in clients:
        client.start()
    try:
        _wait_for(lambda: all(len(a) >= 3 for a in answers), "every client's first answers")
        _move_champion(following["tracking"], versions["second"])
        # no index for version 2 yet: the server says so and keeps version 1
        _wait_for(lambda: _get(f"{base}/readyz")[1]["last_check"]["outcome"] == "waiting", "the wait for an index")
        status, ready = _get(f"{base}/readyz")
        assert status == 200 and ready["model"]["version"] == first
        following["publish"](versions["second"])
        _wait_for(lambda: all(a and a[-1][1] == second for a in answers), "every client answered by version 2")
        settled = [len(a) for a in answers]
        _wait_for(lambda: all(len(a) >= n + 3 for a, n in zip(answers, settled)), "answers after the swap")
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=60)
    every = [answer for client in answers for answer in client]
    assert len(every) > 100 and {status for status, _ in every} == {200}  # zero failed requests
    assert {version for _, version in every} == {first, second}  # every answer names its model version
    for client in answers:  # each client saw version 1, then only version 2: one swap, never back
        versions_seen = [version for _, version in client]
        swapped_at = versions_seen.index(second)
        assert set(versions_seen[:swapped_at]) == {first} and set(versions_seen[swapped_at:]) == {second}
    status, ready = _get(f"{base}/readyz")
    assert status == 200 and ready["model"]["version"] == second
    assert ready["indexes"]["test"]["canary_recall_at_10"] >= ready["indexes"]["test"]["canary_recall_at_build"] - 1e-9
    metrics = _metrics(base)
    assert metrics[("zhclip_search_swaps_total", ())] == 1
    assert metrics[("zhclip_search_registry_checks_total", (("outcome", "waiting"),))] >= 1
    info = next(labels for (name, labels), _ in metrics.items() if name == "zhclip_search_model_info")
    assert dict(info)["version"] == second
    requests = sum(
        value
        for (name, labels), value in metrics.items()
        if name == "zhclip_search_requests_total" and dict(labels)["endpoint"] == "/api/search"
    )
    assert requests == len(every)
    log = following["log"].read_text()
    assert "no index for" in log and log.count("no index for") == 1  # said once, not at every check
    assert f"version {first}" in log and "swapped" in log


def test_a_broken_champion_is_refused_and_the_live_model_keeps_answering(following):
    base, versions = following["base"], following["versions"]
    live = _get(f"{base}/readyz")[1]["model"]["version"]
    following["publish"](versions["broken"])
    _move_champion(following["tracking"], versions["broken"])
    _wait_for(lambda: _get(f"{base}/readyz")[1]["last_check"]["outcome"] == "refused", "the canary's refusal")
    status, ready = _get(f"{base}/readyz")
    assert status == 200 and ready["model"]["version"] == live  # the old pair keeps serving
    (reason,) = ready["refused"].values()
    assert "canary recall@10" in reason and f"version {versions['broken']}" in reason
    status, answer = _get(f"{base}/api/search?" + urllib.parse.urlencode({"q": following["captions"][0]}))
    assert status == 200 and answer["model"]["version"] == live
    metrics = _metrics(base)
    assert metrics[("zhclip_search_refusals_total", (("reason", "canary"),))] == 1
    assert (
        metrics[("zhclip_search_canary_recall", (("role", "candidate"),))]
        < metrics[("zhclip_search_canary_recall", (("role", "live"),))]
    )
    assert "refused" in following["log"].read_text() and reason in following["log"].read_text()

    # an operator's forced reload: the token is required, and the canary refuses again
    assert _post(f"{base}/admin/reload")[0] == 401
    assert _post(f"{base}/admin/reload", Authorization="Bearer wrong")[0] == 401
    status, outcome = _post(f"{base}/admin/reload", Authorization=f"Bearer {TOKEN}")
    assert status == 409 and outcome["outcome"] == "refused"
    assert _metrics(base)[("zhclip_search_refusals_total", (("reason", "canary"),))] == 2
    _move_champion(following["tracking"], int(live))
    status, outcome = _post(f"{base}/admin/reload", Authorization=f"Bearer {TOKEN}")
    assert status == 200 and outcome["outcome"] == "unchanged"
