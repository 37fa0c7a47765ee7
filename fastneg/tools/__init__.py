"""What runs around the op: the ``fastneg`` command line (:mod:`.cli`), the benchmark
(:mod:`.benchmark`), the quality study (:mod:`.quality`), the demo (:mod:`.demo`) and the
memory and matrix-product counters (:mod:`.profiling`)."""
