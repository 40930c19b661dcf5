"""The fine-tuning experiments on real data: digits, transfer, capacity."""
