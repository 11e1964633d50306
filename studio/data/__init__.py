"""Photos in, dataset folder out: validation, orientation, cropping, captions, the training Dataset."""
