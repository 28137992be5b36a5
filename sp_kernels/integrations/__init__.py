"""Integrations with other libraries. Each submodule imports its library lazily; importing
sp_kernels never imports any of them."""
