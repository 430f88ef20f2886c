"""What a trained SAE is checked with: metrics and evaluation, per-feature statistics,
steering, scaling laws and feature splitting across widths."""
