"""The browser check itself: it passes Chinese drawn with a CJK font and fails the empty boxes of a
machine without one (simulated by a fontconfig that sees only the DejaVu fonts)."""

import os
from pathlib import Path

import pytest

from zhclip.components.core.fonts import CSS_FONT_STACK

from browser import assert_chinese_renders

PAGE = (
    f"<!DOCTYPE html><html lang=\"zh\"><body style='font-family: {CSS_FONT_STACK}'>"
    "<p>红色的圆形</p><p>手写数字七</p></body></html>"
)
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")


def test_chinese_drawn_with_a_cjk_font_passes(tmp_path):
    (tmp_path / "page.html").write_text(PAGE, encoding="utf-8")
    fonts = assert_chinese_renders(tmp_path / "page.html", tmp_path / "shot.png", tmp_path / "profile")
    assert set(fonts) == {"红色的圆形", "手写数字七"}


@pytest.mark.skipif(not DEJAVU.is_dir(), reason="needs the DejaVu fonts (installed with Chromium)")
def test_a_machine_without_cjk_fonts_fails_with_the_fix(tmp_path):
    (tmp_path / "page.html").write_text(PAGE, encoding="utf-8")
    (tmp_path / "fonts.conf").write_text(
        f'<?xml version="1.0"?><fontconfig><dir>{DEJAVU}</dir><cachedir>{tmp_path / "cache"}</cachedir></fontconfig>',
        encoding="utf-8",
    )
    env = {**os.environ, "FONTCONFIG_FILE": str(tmp_path / "fonts.conf")}
    with pytest.raises(AssertionError, match="without a CJK font .* install fonts-noto-cjk"):
        assert_chinese_renders(tmp_path / "page.html", tmp_path / "shot.png", tmp_path / "profile", env=env)
