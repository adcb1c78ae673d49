"""Training data: the UTKFace face set, its committed splits and its loader."""
