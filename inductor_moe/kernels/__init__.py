"""Triton kernels for the canonical ops: plain ``@triton.jit`` code with a launch function each,
importable without Inductor. The CPU path does not need them; the GPU kernels go here.
"""
