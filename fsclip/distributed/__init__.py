"""Runners that hand fsclip's work to existing distributed engines (`ray.py`: Ray Data)."""
