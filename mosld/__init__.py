"""mosld: mixture of shared LoRA experts with dropout (MoSLD, COLING 2025) for Hugging Face causal LMs."""
