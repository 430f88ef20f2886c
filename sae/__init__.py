"""saeflow's core: pure torch, no tracking or orchestration (STYLE.md boundaries).

- `sae.models`      the SAE architectures, building and loading them
- `sae.training`    the trainer (`fit`), its trainer states and its config
- `sae.activations` the activation cache on disk, filling it, reading shuffled batches from it
- `sae.lm`          language models: hook points, text and tokenisation, the builtin offline LM
- `sae.analysis`    evaluation metrics, feature statistics, steering, scaling laws, splitting
"""
