"""Datasets (VOC layout readers, the toy world) and continual-learning protocols."""
