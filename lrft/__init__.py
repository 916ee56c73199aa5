"""lrft: fine-tune transformer models with low-rank adapters (LoRA, TLoRA, task-aware TLoRA, LoRTA)."""

__version__ = "0.1.0"
