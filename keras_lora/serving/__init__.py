"""Many adapters on one base in one batch: the per-example router, its layers
and the model.
"""
