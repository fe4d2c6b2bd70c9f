"""The prompt templates of Chinese-CLIP's zero-shot evaluation, and which of them a dataset gets.

The lists are the reference's own (`cn_clip/eval/cvinw_zeroshot_templates.py` and
`imagenet_zeroshot_templates.py` of the installed cn-clip wheel), read as format strings with one
'{}' for the class name. The choice by dataset name is `zeroshot_evaluation.py`'s `template_dict`,
which that script builds in its `__main__` and no module exports, so it is repeated here: ELEVATER's
aircraft, food, flower, EuroSAT, RESISC45 and Country211 folders have their own lists, every other
name (ImageNet included) the 183 `openai` templates. Duplicates in a list stay, as the reference
averages them twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zhclip.components.core.errors import ZhclipError

# zeroshot_evaluation.py's template_dict (cn-clip 1.6.0, lines 235-247): dataset folder name -> list
TEMPLATE_SET_OF_DATASET = {
    "fgvc-aircraft-2013b-variants102": "aircraft",
    "food-101": "food",
    "oxford-flower-102": "flower",
    "eurosat_clip": "eurosat",
    "resisc45_clip": "eurosat",
    "country211": "country211",
}
DEFAULT_TEMPLATE_SET = "openai"


def template_sets() -> dict[str, list[str]]:
    """Every list the reference ships, by name: `openai`, `food`, ... and `imagenet` (its 80 ImageNet
    prompts, which `zeroshot_evaluation.py` itself does not use)."""
    from cn_clip.eval import cvinw_zeroshot_templates as cvinw
    from cn_clip.eval.imagenet_zeroshot_templates import openai_imagenet_template

    sets = {
        name.removesuffix("_templates"): _as_format_strings(value)
        for name, value in vars(cvinw).items()
        if name.endswith("_templates")
    }
    return sets | {"imagenet": _as_format_strings(openai_imagenet_template)}


def _as_format_strings(templates: Sequence[Callable[[str], str]]) -> list[str]:
    return [template("{}") for template in templates]


def templates_for(dataset: str, template_set: str = "", templates: Sequence[str] = ()) -> tuple[str, list[str]]:
    """The prompts a dataset is scored with and what they are called.

    Explicit `templates` win, then a named `template_set`, then the reference's choice by the dataset's
    folder name.
    """
    if templates:
        return "custom", list(templates)
    sets = template_sets()
    name = template_set or TEMPLATE_SET_OF_DATASET.get(dataset, DEFAULT_TEMPLATE_SET)
    if name not in sets:
        raise ZhclipError(f"template set {name!r} does not exist; choose one of {', '.join(sorted(sets))}")
    return name, sets[name]
