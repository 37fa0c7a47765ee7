"""The training-quality benchmark (``fastneg quality``), runnable from here:

    python benchmarks/bench_quality.py --out benchmarks/results/quality_cpu_<date>
"""

import sys

from fastneg.tools.quality import main

if __name__ == "__main__":
    sys.exit(main())
