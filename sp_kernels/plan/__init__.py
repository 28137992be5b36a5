"""The plan layer: what a model declares (``specs``), the hooks that apply it (``hooks``), the split
and gather of tensors (``sharding``) and the record of one forward's sharding (``context``).

Data flows one way: plan -> hooks -> attention (``sp_kernels.attn``) -> comm/kernels.
"""
