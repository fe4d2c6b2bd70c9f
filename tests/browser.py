"""Headless Chromium driven over the DevTools protocol: load a page, screenshot it, and ask the browser
which fonts drew its Chinese text (a Han character drawn by a font without Han glyphs is an empty box)."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

HAN = re.compile(r"[\u4e00-\u9fff]")
# Families with Han glyphs that Chromium may pick (the reports' font stack, components/core/fonts.py).
CJK_FAMILY = re.compile(r"CJK|Source Han|WenQuanYi|PingFang|YaHei|SimHei|Noto Sans SC", re.IGNORECASE)


class Page:
    """One tab; `call` sends a DevTools command and returns its result."""

    def __init__(self, socket):
        self.socket, self.ids = socket, itertools.count(1)

    def call(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str, timeout_s: float = 30) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while self.call("Runtime.evaluate", expression="document.readyState")["result"]["value"] != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading in {timeout_s} s")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        size = self.call(
            "Runtime.evaluate", expression="[document.body.scrollWidth, document.body.scrollHeight]", returnByValue=True
        )["result"]["value"]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=max(800, size[0] + 40),
            height=min(size[1] + 40, 8000),
            deviceScaleFactor=1,
            mobile=False,
        )
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def fonts_of_chinese_text(self) -> dict[str, set[str]]:
        """Each element's own Chinese text -> the families Chromium drew it with."""
        self.call("DOM.enable")
        self.call("CSS.enable")
        root = self.call("DOM.getDocument", depth=-1)["root"]
        found: dict[str, set[str]] = {}
        for node in _elements_with_own_han_text(root):
            fonts = self.call("CSS.getPlatformFontsForNode", nodeId=node["nodeId"])["fonts"]
            text = "".join(child["nodeValue"] for child in node.get("children", []) if child["nodeType"] == 3).strip()
            found.setdefault(text, set()).update(font["familyName"] for font in fonts)
        return found


def _elements_with_own_han_text(node: dict) -> Iterator[dict]:
    children = node.get("children", [])
    if node.get("nodeName") not in ("SCRIPT", "STYLE", "TITLE", "HEAD") and any(
        child["nodeType"] == 3 and HAN.search(child["nodeValue"]) for child in children
    ):
        yield node
    for child in children:
        yield from _elements_with_own_han_text(child)


@contextmanager
def chromium_page(profile: Path, timeout_s: float = 30, env: dict | None = None) -> Iterator[Page]:
    """A headless Chromium on 127.0.0.1 (a free port it picks), stopped afterwards; `env` replaces its environment."""
    import websocket

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Chromium is not installed (`make system-deps` installs it)")
    process = subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout_s
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"Chromium did not open its DevTools port within {timeout_s} s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout_s) as response:
            target = next(t for t in json.load(response) if t["type"] == "page")
        socket = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=timeout_s, suppress_origin=True)
        try:
            yield Page(socket)
        finally:
            socket.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def assert_chinese_renders(html: Path, screenshot: Path, profile: Path, env: dict | None = None) -> dict[str, set[str]]:
    """Open `html`, save a screenshot, and fail naming any Chinese text drawn without a CJK font (empty boxes)."""
    with chromium_page(profile, env=env) as page:
        page.open(html.resolve().as_uri())
        page.screenshot(screenshot)
        fonts = page.fonts_of_chinese_text()
    assert fonts, f"{html} shows no Chinese text"
    missing = {
        text: sorted(families) for text, families in fonts.items() if not any(CJK_FAMILY.search(f) for f in families)
    }
    assert not missing, (
        f"Chinese text drawn without a CJK font (empty boxes; install fonts-noto-cjk, `make system-deps`): "
        f"{dict(list(missing.items())[:5])}"
    )
    return fonts
