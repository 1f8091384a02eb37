"""Backbones: a timm Vision Transformer returning features at any level (``vit``), a CNN + FPN
feature pyramid for MCL's original setting (``pyramid``), and export / loading in timm format."""
