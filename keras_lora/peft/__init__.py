"""Hugging Face PEFT interop: import, export and the keras-hub <-> Hugging Face
name tables.
"""
