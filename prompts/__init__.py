"""Prompt templates shipped as data (JSON); see fsclip.prompts_io."""
