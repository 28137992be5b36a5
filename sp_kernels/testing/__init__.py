"""Testing and demo tooling, not library core (nothing in sp_kernels imports it): a gloo rank
launcher (``launch``), small reference models (``models``) and the demo (``python -m
sp_kernels.testing.demo``)."""
