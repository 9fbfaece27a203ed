"""fsclip beyond one process: `world.py` (the ranks of torchrun / accelerate launch, via Accelerate) and
runners that hand work to existing distributed engines (`ray.py`: Ray Data)."""
