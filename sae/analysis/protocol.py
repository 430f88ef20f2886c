"""The metric definitions an evaluation can follow (`sae.analysis.evaluate`), torch-free so the
config (`eval.protocol`) checks against the same tuple."""

PROTOCOLS = ("saeflow", "saebench")
"""saeflow's definitions (DESIGN §6) or SAELens/SAEBench's (`sae.analysis.evaluate`)."""
