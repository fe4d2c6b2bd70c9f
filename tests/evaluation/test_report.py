"""The HTML/Markdown report: self-contained, and captions cannot inject markup."""

import base64
import io

from PIL import Image

from zhclip.components.evaluation import report


def test_report_embeds_its_images_and_escapes_captions(tmp_path):
    page = report.Report(
        title="t",
        notes={"model_dir": "m"},
        tables=[report.Table("Recall (%)", [["", "R@1"], ["text → image", "12.50"]])],
        examples=[
            report.Example(
                query="<script>alert(1)</script>红色的圆形",
                results=[
                    report.Result("image 7", True, Image.new("RGB", (300, 200), "red")),
                    report.Result("image 9", False, None),
                ],
            )
        ],
    )
    html_path, markdown_path = report.write(page, tmp_path)
    html = html_path.read_text(encoding="utf-8")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;红色的圆形" in html
    assert html.count("data:image/png;base64,") == 1 and 'src="http' not in html  # nothing fetched from elsewhere
    assert '<div class="result hit">' in html and html.count('class="result') == 2
    markdown = markdown_path.read_text(encoding="utf-8")
    assert "| text → image | 12.50 |" in markdown and "✓ image 7, image 9" in markdown


def test_thumbnails_keep_the_aspect_ratio_within_the_size():
    uri = report.image_uri(Image.new("RGB", (300, 150)), size=96)
    thumbnail = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumbnail.size == (96, 48)
