"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before any kernel module is imported (``triton.jit`` reads it when
a kernel is defined). On a GPU host, ``DELTAHUB_KERNELS_GPU=1 pytest -m gpu tests/kernels`` runs the
compiled kernels instead.
"""

from __future__ import annotations

import os

if os.environ.get("DELTAHUB_KERNELS_GPU") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
