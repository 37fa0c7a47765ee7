"""How the source is laid out, as numbers: files and their lengths, the Triton kernels' parameter
counts, the registered ops' schema arguments, and how many places write each rule.

    python benchmarks/structure.py [--root DIR]

``--root`` is a source tree (``fastneg/`` and ``csrc/`` inside it; default: this checkout). The
op schemas are read from the fastneg importable from that root, so point ``PYTHONPATH`` at it
when it is another tree with its own build. A "place" is a source line that writes the rule's
formula (the regular expressions below, on code with comments and strings blanked out), not a
line that calls a function computing it.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import sys
import tokenize
from pathlib import Path

# One expression per rule; each matches the lines that compute it, in Python, Triton and C++.
RULES = {
    "SimANS log-weight -a (s - s+ - b)^2": r"(weight_a|\ba)\s*\*\s*(d\s*\*\s*d|\(.*\)\s*\*\*\s*2)",
    "relative threshold x+ - |x+| m (score and guide)": r"-\s*(std::|tl\.)?(abs\(\w+\)|\w+\.abs\(\))\s*\*",
    "guide threshold t+ - margin": r"guide\w*\s*-\s*[\w.()*]*\s*\bguide_margin\b|-\s*(T\()?\w*\.?guide_margin",
    "label match (query label == key label)": (r"^(?!.*(\.size\(|\.dim\(|\.shape))"
                                                r"(?=.*((key|corpus)_?label.*==.*query_?label|query_?label.*==.*(key|corpus)_?label))"),
    "weighting / strategy enum value": (r"\b(WEIGHTING_|WEIGHT_|kWeight|STRATEGY_|kStrategy)?"
                                        r"(NONE|SIMANS|SimANS|HARDNESS|Hardness|GUIDE_HARDNESS|GuideHardness|HCL|GCSE|"
                                        r"TOP|Top|UNIFORM|Uniform)\b"
                                        r"(\s*:\s*tl\.constexpr)?\s*=\s*(tl\.constexpr\()?\d"
                                        r"|\bSTRATEGY_\w+(,\s*\w+)+\s*=\s*\d"),
}


def source_files(root: Path) -> list[Path]:
    files = [p for p in (root / "fastneg").rglob("*.py")]
    files += [p for p in (root / "csrc").rglob("*") if p.suffix in (".cpp", ".h")]
    return sorted(files)


def line_counts(root: Path) -> list[tuple[str, int]]:
    return [(str(p.relative_to(root)), len(p.read_text().splitlines())) for p in source_files(root)]


def triton_kernels(root: Path) -> list[tuple[str, str, int]]:
    """(file, function, parameters) of every ``@triton.jit`` function: the launched kernels (names
    ending in _kernel) and the device functions they call."""
    out = []
    for p in source_files(root):
        if p.suffix != ".py":
            continue
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                out.append((str(p.relative_to(root)), node.name, len(node.args.args)))
    return out


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, code) with comments and string literals (docstrings included) blanked out."""
    text = path.read_text()
    if path.suffix != ".py":
        text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
        return [(n, line.split("//")[0]) for n, line in enumerate(text.splitlines(), 1)]
    lines = text.splitlines()
    for tok in reversed(list(tokenize.generate_tokens(io.StringIO(text).readline))):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            (r0, c0), (r1, c1) = tok.start, tok.end
            if r0 == r1:
                lines[r0 - 1] = lines[r0 - 1][:c0] + '""' + lines[r0 - 1][c1:]
            else:
                lines[r0 - 1] = lines[r0 - 1][:c0] + '""'
                for r in range(r0, r1 - 1):
                    lines[r] = ""
                lines[r1 - 1] = lines[r1 - 1][c1:]
    return list(enumerate(lines, 1))


def rule_places(root: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {name: [] for name in RULES}
    for p in source_files(root):
        for n, code in code_lines(p):
            for name, pattern in RULES.items():
                if re.search(pattern, code):
                    found[name].append(f"{p.relative_to(root)}:{n}")
    return found


def op_schemas() -> list[tuple[str, int]]:
    import torch

    import fastneg  # noqa: F401  (registers the C++ ops)

    try:  # the Triton ops, when triton is installed
        import importlib
        for name in ("fastneg.backends.triton", "fastneg.triton_ops"):  # this layout, the one before it
            try:
                importlib.import_module(name)
                break
            except ImportError:
                continue
    except Exception:  # pragma: no cover - a broken triton install: report the C++ ops only
        pass
    out = []
    for name in sorted(dir(torch.ops.fastneg)):
        packet = getattr(torch.ops.fastneg, name)
        if hasattr(packet, "default"):
            out.append((name, len(packet.default._schema.arguments)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args()
    root = Path(args.root).resolve()
    counts = line_counts(root)
    print(f"## Source files ({len(counts)}; lines)\n")
    for name, n in counts:
        print(f"    {n:5d}  {name}")
    largest = max(counts, key=lambda c: c[1])
    print(f"\nlargest: {largest[0]}, {largest[1]} lines; files over 500 lines: "
          f"{sum(1 for _, n in counts if n > 500)}\n")
    print("## Triton kernels and device functions (parameters, constexpr flags included)\n")
    jit = triton_kernels(root)
    for f, k, n in sorted(jit, key=lambda x: (not x[1].endswith("_kernel"), -x[2])):
        print(f"    {n:3d}  {k}  ({f})")
    print("\n## Op schemas (arguments)\n")
    sys.path.insert(0, str(root))
    for name, n in op_schemas():
        print(f"    {n:3d}  fastneg::{name}")
    print("\n## Places each rule is written\n")
    for name, places in rule_places(root).items():
        files = sorted({place.split(":")[0] for place in places})
        print(f"    {len(places):2d} lines in {len(files)} files  {name}: {', '.join(places)}")
    os.sys.stdout.flush()


if __name__ == "__main__":
    main()
