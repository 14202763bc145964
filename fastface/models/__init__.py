"""SDXL model parts written for fastface: UNet, attention, text encoders, VAE, vision encoders, loading."""
