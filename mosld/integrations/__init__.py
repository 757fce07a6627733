"""mosld's adapters in other people's training loops: ``mosld.integrations.hf`` for Hugging Face's ``Trainer`` and
TRL's trainers. Import the submodule itself; this package imports nothing, so that ``import mosld`` stays light."""
