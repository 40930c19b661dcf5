"""Adapter files, named adapters (add, set, delete, disable) and combining
adapters.
"""
