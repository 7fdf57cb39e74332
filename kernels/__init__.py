"""Triton kernels of flr-engine, installed as ``flr_engine.kernels``.

Importing this package never requires triton; each kernel module imports it lazily and
the functional ops in ``flr_engine.ops`` choose an implementation (``impl=``).
"""
