"""Add the dev part of every labeled routing set to the routes' examples (run after writing a set).

    .venv/bin/python -m tools.merge_routing_examples [CONFIG.yaml ...]

Rules written from phrasings transfer only partly to prompts nobody on the team wrote;
examples from many writers and voices do better (leave-one-source-out, README). Every
tests/data/routing*.jsonl set is split by prompt hash (services/router/evaluate.py): the
dev part becomes examples here, the frozen held-out part never does, so the held-out
figure stays a measurement. Prompts routed by metadata (risk=high) teach nothing about
text and are skipped, as are prompts already among a route's examples. Idempotent: the
added examples sit in one marked block per route, rewritten on every run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from services.router.evaluate import LabeledPrompt, in_split, load_labeled

ROOT = Path(__file__).resolve().parents[1]
SETS = sorted((ROOT / "tests" / "data").glob("routing*.jsonl"))
CONFIGS = (ROOT / "shared" / "default_config.yaml", ROOT / "deploy" / "k8s" / "base" / "config.yaml")
BEGIN = "      # dev part of tests/data/routing*.jsonl (tools/merge_routing_examples.py): several writers and voices"
END = "      # end of the dev-part examples"
_ROUTE = re.compile(r"^  ([a-z_][\w-]*):\s*$")


def dev_examples(paths: list[Path] = SETS) -> dict[str, list[str]]:
    """Each route's dev-part prompts, in file order, without duplicates."""
    items: list[LabeledPrompt] = [item for path in paths for item in load_labeled(path)]
    routes: dict[str, list[str]] = {}
    for item in in_split(items, "dev"):
        if not item.metadata and item.prompt not in routes.setdefault(item.route, []):
            routes[item.route].append(item.prompt)
    return routes


def merge(text: str, examples: dict[str, list[str]]) -> str:
    """The config text with each route's block of added examples (re)written after its own examples."""
    lines = _without_blocks(text.split("\n"))
    out: list[str] = []
    route, in_examples, own = None, False, set[str]()
    for line in lines:
        if in_examples and not line.startswith("      - ") and not line.startswith("      #"):
            out.extend(_block([p for p in examples.get(route or "", []) if p not in own]))
            in_examples = False
        found = _ROUTE.match(line)
        if found:
            route = found.group(1)
        if route and line == "    examples:":
            in_examples, own = True, set[str]()
        elif in_examples and line.startswith("      - "):
            own.add(_scalar(line[8:]))
        out.append(line)
    return "\n".join(out)


def _without_blocks(lines: list[str]) -> list[str]:
    kept, skipping = [], False
    for line in lines:
        if line == BEGIN:
            skipping = True
        elif line == END:
            skipping = False
        elif not skipping:
            kept.append(line)
    return kept


def _block(prompts: list[str]) -> list[str]:
    if not prompts:
        return []
    return [BEGIN, *(f"      - {json.dumps(p, ensure_ascii=False)}" for p in prompts), END]


def _scalar(raw: str) -> str:
    import yaml

    return str(yaml.safe_load(raw))


def main(argv: list[str]) -> int:
    examples = dev_examples()
    for path in [Path(p) for p in argv] or list(CONFIGS):
        before = path.read_text()
        path.write_text(merge(before, examples))
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {sum(len(v) for v in examples.values())} dev prompts from {len(SETS)} sets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
