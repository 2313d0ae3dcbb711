"""attnctl: training-free attention control for diffusers pipelines."""
