"""mosld against its peers: MoE-PEFT (MoLA, MixLoRA, LoRA) and peft, each side in its own environment."""
