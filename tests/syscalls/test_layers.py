"""One-way layers: userland -> syscalls <- kernel -> drivers.

syscalls/ is the contract both sides share: it imports nothing of kernel/, drivers/,
userland/, torch or numpy, anywhere in a file. userland/ imports the kernel only inside
functions (the in-process engine of `llmos generate --model`). drivers/ import nothing of
kernel/ or userland/. No cycle among the four packages.
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKGS = ("kernel", "syscalls", "drivers", "userland")


def imports(path: Path):
    """(imported module, at module level?) of every absolute import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        top = node in tree.body
        if isinstance(node, ast.Import):
            yield from ((a.name, top) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module or "", top


def edges_and_violations():
    edges, bad = set(), []
    for pkg in PKGS:
        for path in (ROOT / pkg).rglob("*.py"):
            for mod, top in imports(path):
                parts = mod.split(".")
                target = parts[1] if parts[0] == "llmos" and len(parts) > 1 else None
                if target in PKGS and target != pkg:
                    edges.add((pkg, target))
                rel = path.relative_to(ROOT)
                if pkg == "syscalls" and (target in ("kernel", "drivers", "userland")
                                          or parts[0] in ("torch", "numpy", "triton")):
                    bad.append(f"{rel} imports {mod}")
                if pkg == "userland" and target == "kernel" and top:
                    bad.append(f"{rel} imports {mod} at module level")
                if pkg == "drivers" and target in ("kernel", "userland"):
                    bad.append(f"{rel} imports {mod}")
    return edges, bad


def test_imports_follow_the_layers():
    edges, bad = edges_and_violations()
    assert bad == []
    reach = {a: {b for x, b in edges if x == a} for a in PKGS}
    for _ in PKGS:                       # transitive closure
        for a in PKGS:
            reach[a] |= {c for b in reach[a] for c in reach[b]}
    assert [a for a in PKGS if a in reach[a]] == [], f"import cycle among {sorted(edges)}"


def test_the_abi_and_the_sdk_load_neither_torch_nor_the_kernel():
    code = ("import sys, llmos.syscalls, llmos.syscalls.types, llmos.syscalls.home, "
            "llmos.syscalls.specs, llmos.userland.sdk, llmos.userland.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy') "
            "or m.startswith('llmos.kernel') or m.startswith('llmos.drivers')]; "
            "print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
