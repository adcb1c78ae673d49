"""Faces in photos: detection, alignment and paste-back, fidelity modes, image I/O and the whole-photo restore."""
