"""Integrations with training frameworks (Hugging Face Trainer, accelerate)."""
