"""The SAE architectures (one module each, equations in the class docstring), their shared base
and on-disk format, and `build_sae` / `load_sae` by name (`registry`)."""
