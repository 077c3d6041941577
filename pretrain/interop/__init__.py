"""Trained models in and out of this project: weight files other tools read (safetensors,
Hugging Face transformers, timm), and pretrained weights a run starts from."""
