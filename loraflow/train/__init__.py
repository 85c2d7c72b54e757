"""Training: LoRA adapters with the transformers Trainer and peft, checkpointed and resumable."""
