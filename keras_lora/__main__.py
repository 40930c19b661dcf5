"""`python -m keras_lora`: the same CLI as the `keras-lora` script."""

from keras_lora.cli import main_exit

if __name__ == "__main__":
    main_exit()
