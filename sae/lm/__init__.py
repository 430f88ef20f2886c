"""Language models: hook points on Hugging Face causal LMs (`hooks`), text sources and packing
(`text`), and the offline default model the project trains itself (`builtin`)."""
