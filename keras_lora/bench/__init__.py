"""The speed and memory benchmark behind `keras-lora bench`."""
