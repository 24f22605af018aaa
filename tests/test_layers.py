"""The house plan holds: imports go down the layers, never up, and no two modules import each other in a cycle.

Layers, bottom up (docs/architecture.md): common -> policy, kernels, envs -> rollout -> trainers (CLI on top). Every
import counts, also one inside a function: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "policy", "kernels", "envs", "rollout", "trainers")
LAYER = {"common": 0, "policy": 1, "kernels": 1, "envs": 1, "rollout": 2, "trainers": 3}
FORBIDDEN = {  # package -> packages it must not import (beyond "no higher layer")
    "policy": {"envs", "rollout", "trainers", "ray", "trl", "wandb"},
    "kernels": {"envs", "policy", "rollout", "trainers", "ray", "trl", "wandb"},
    "envs": {"rollout", "trainers", "ray", "trl"},
    "common": set(PACKAGES) - {"common"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules imported by the module `name` (the deepest known module of each `import` / `from`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = name.split(".")[: -node.level] if path.name != "__init__.py" else name.split(".")
                base = ".".join([*pkg, base] if base else pkg)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, m, set(mods)) for m, p in mods.items()}


def third_party(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_imports_go_down_the_layers():
    bad = []
    for mod, deps in graph().items():
        pkg = mod.split(".")[0]
        for dep in deps:
            dpkg = dep.split(".")[0]
            if LAYER[dpkg] > LAYER[pkg] or dpkg in FORBIDDEN.get(pkg, ()):
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_lower_packages_use_no_ray_trl_or_wandb():
    bad = []
    for mod, path in modules().items():
        pkg = mod.split(".")[0]
        used = third_party(path) & FORBIDDEN.get(pkg, set()) & {"ray", "trl", "wandb"}
        bad += [f"{mod} imports {u}" for u in sorted(used)]
    assert not bad, "\n".join(bad)


def test_only_the_pool_and_job_drivers_import_ray():
    allowed = {
        "rollout.pool",
        "rollout.batch.job",
        "trainers.rl.run",
        "trainers.rl.group",
        "trainers.rl.demo",
    }
    users = {mod for mod, path in modules().items() if "ray" in third_party(path)}
    assert users <= allowed, f"Ray used outside the pool and job drivers: {sorted(users - allowed)}"


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d) :], d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path):
    """The checker is not vacuous: an upward import in a policy module is reported."""
    p = tmp_path / "bad.py"
    p.write_text("def f():\n    from trainers.rl.run import train\n")
    known = set(modules())
    assert imports(p, "policy.bad", known) == {"trainers.rl.run"}
