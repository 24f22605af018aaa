"""The README's architecture picture matches the tree: every module it lists exists, and every module of a listed
folder is listed (so the picture cannot silently go stale)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def picture() -> dict[str, set[str]]:
    """{folder: module names} from the code block under `## Architecture`."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Architecture", 1)[1].split("```", 2)[1]
    out, top = {}, None
    for line in block.splitlines():
        m = re.match(r"^(\d\s+)?(\s*)([a-z_]+/)(\s+.*)?$", line)
        if not m:  # the CLI line (`trainers/cli.py`) and the data line
            continue
        indent, folder, rest = len(m.group(2)) + len(m.group(1) or ""), m.group(3), m.group(4) or ""
        if m.group(1) or indent <= 3:
            top, path = folder, folder
        else:
            path = f"{top}{folder}"
        names = {
            re.sub(r"\(.*?\)", "", n).split()[0] for n in rest.split("·") if re.sub(r"\(.*?\)", "", n).strip()
        }
        if names:
            out[path.rstrip("/")] = names
    return out


def test_architecture_picture_matches_the_tree():
    pic = picture()
    assert {"common", "policy", "kernels", "envs", "rollout", "trainers/rl", "rollout/bench"} <= set(pic)
    for folder, names in pic.items():
        actual = {p.stem for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}
        assert names == actual, (
            f"README architecture, {folder}/: lists {sorted(names)}, tree has {sorted(actual)}"
        )
