"""How many B x N x D matrix products one forward+backward of the Triton op costs, per mode,
dtype and D, with the tile shape the host picks on a compute-capability-9 GPU, counted under
the Triton interpreter (``fastneg.tools.profiling.triton_products``; no GPU needed).

    python benchmarks/count_products.py --out benchmarks/results/products_<date>.md

Units: multiply-adds / (B N D), padding of partial tiles included (the GPU computes it too).
"positives" is the gathered tiles of the positives' scores, B x BLOCK_M x D (BLOCK_M / N of a
product); a guide's products (width DG) are counted apart in units of B x N x DG.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

import fastneg  # noqa: E402
from fastneg.tools.benchmark import device_name  # noqa: E402
from fastneg.tools.profiling import triton_products  # noqa: E402

GUIDE_WIDTH = 192  # not one of the D below, so the guide's products are told apart by width

MODES: dict[str, dict] = {
    "plain": {},
    "masked SimANS (labels, relative margin, SimANS)": dict(
        query_labels="random", relative_margin=0.05, weighting=fastneg.SimANS()),
    "Hardness": dict(weighting=fastneg.Hardness(1.0)),
    "guide (GIST)": dict(guide_width=GUIDE_WIDTH, guide_margin=0.0),
    "DCL (debias)": dict(debias=0.1),
    "HCL + DCL": dict(weighting=fastneg.HCL(1.0), debias=0.1),
    "GCSE": dict(weighting=fastneg.GCSE(), guide_width=GUIDE_WIDTH, guide_margin=None),
    "soft labels + SimANS": dict(soft_labels=fastneg.SoftLabels(weight=0.5), weighting=fastneg.SimANS(),
                                 guide_width=GUIDE_WIDTH, guide_margin=None),
    "symmetric": dict(symmetric=True),
    "symmetric masked SimANS": dict(symmetric=True, query_labels="random", relative_margin=0.05,
                                    weighting=fastneg.SimANS()),
}
DIMS = (16, 64, 128, 256, 768, 1024, 4096, 8192)


def count(mode: str, B: int, N: int, D: int, dtype: torch.dtype) -> dict[str, float]:
    options = dict(MODES[mode])
    work = triton_products(B, N, D, dtype, **options)
    unit = B * N * D
    guide = work.sum(width=GUIDE_WIDTH) if "guide_width" in MODES[mode] else 0
    positives = work.sum(site="positives") - (work.sum(site="positives", width=GUIDE_WIDTH) if guide else 0)
    main = work.total - guide
    return dict(products=(main - positives) / unit, positives=positives / unit, guide=guide / (B * N * GUIDE_WIDTH),
                total=main / unit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="B (two row blocks of 128)")
    parser.add_argument("--keys", type=int, default=512, help="N")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"], choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--out", default=None, help="markdown file to write")
    args = parser.parse_args()
    start = time.time()
    lines = [f"# Matrix products per forward+backward of the Triton op ({datetime.date.today()})", "",
             f"`python benchmarks/count_products.py` on {device_name(torch.device('cpu'))}, "
             f"torch {torch.__version__}, triton {triton.__version__} interpreter; B = {args.rows}, "
             f"N = {args.keys}, tile shape of a compute-capability-9 GPU (`cuda_block_config(D, dtype, 9)`). "
             "Each cell: products excluding the positives' gathered tiles (units of B x N x D); "
             f"in brackets the gathered tiles (BLOCK_M / N: {128 / args.keys:.3f} here with 128-row tiles, "
             f"{64 / args.keys:.3f} with 64-row tiles (float32, heavy modes); 1.6 % or 0.8 % of a product at "
             "N = 8192) and, for modes with a guide, its products in units of B x N x DG "
             f"(DG = {GUIDE_WIDTH}).", ""]
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        lines += [f"## {dtype_name}", "", "| mode | " + " | ".join(f"D={d}" for d in args.dims) + " |",
                  "|---" * (len(args.dims) + 1) + "|"]
        for mode in args.modes:
            cells = []
            for D in args.dims:
                c = count(mode, args.rows, args.keys, D, dtype)
                extra = f"+{c['positives']:.2f}" + (f", guide {c['guide']:.2f}" if c["guide"] else "")
                cells.append(f"{c['products']:.2f} ({extra})")
                print(f"{dtype_name} {mode} D={D}: {c}", flush=True)
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Counted in {time.time() - start:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
