"""The fonts of Chinese documents: the HTML reports, the search page and the figures name these."""

# Chinese documents: fonts with Han glyphs first, on Linux, macOS and Windows, then any sans-serif.
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "PingFang SC",
    "Microsoft YaHei",
    "SimHei",
)
CSS_FONT_STACK = ", ".join([*(f'"{name}"' for name in CJK_FONTS), "sans-serif"])
