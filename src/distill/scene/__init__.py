"""Scenes: what is optimised (a 2D image, an implicit volume) and how it is rendered."""
