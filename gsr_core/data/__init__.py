"""Scenes and views on disk: the views folder format, readers for real formats, synthetic scenes, resampling."""
