"""Counting and comparing parameters: the LoRA tutorial's 4-layer network and
the comparison with Keras's built-in LoRA.
"""
