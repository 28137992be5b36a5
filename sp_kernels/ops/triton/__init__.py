"""Triton kernels of sp_kernels, one module per kernel family (imported lazily by sp_kernels.ops).

Importing a module here imports triton; whether its kernels run compiled or interpreted is fixed
then (``TRITON_INTERPRET=1`` must be set before that import to run them on CPU tensors).
"""
