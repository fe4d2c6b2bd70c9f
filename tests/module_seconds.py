"""Rewrite tests/module_seconds.json, the order in which `make test` hands test modules to its workers
(longest first; tests/conftest.py), from the per-test times of a run: `python tests/module_seconds.py
logs/junit.xml` after `make test`."""

import json
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path


def module_seconds(junit: Path) -> dict[str, int]:
    """Each test module's seconds (setup, call and teardown of its tests), longest first."""
    seconds: Counter[str] = Counter()
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").split("@")[0].split("::")[0]
        seconds[module.replace(".", "/") + ".py"] += float(case.get("time") or 0)
    return {module: round(total) for module, total in seconds.most_common()}


if __name__ == "__main__":
    out = Path(__file__).with_name("module_seconds.json")
    out.write_text(json.dumps(module_seconds(Path(sys.argv[1])), indent=1) + "\n", encoding="utf-8")
    print(f"{out}: {len(json.loads(out.read_text()))} modules")
