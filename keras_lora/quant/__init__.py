"""The low-precision (int8, NF4) frozen base: formats, matmul, storage on a
layer, and the entry that quantises a layer.
"""
