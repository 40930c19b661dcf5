"""A model's layer tree: walking and swapping layers, copying, freezing, layers
kept trainable, and the saved record of LoRA layers.
"""
