"""Micro-benchmarks of backprop_hooks against a plain forward+backward and against peer libraries.

Every figure is a ratio measured side by side in one run (this kind of machine is noisy): the candidates
are interleaved repeat by repeat and medians are compared. Run ``python -m bench --help``.
"""

import os as _os

_os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU memory measurement runs the profiler: keep its log quiet
