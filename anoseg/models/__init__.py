"""Plain ``nn.Module``s of AnoSeg: generator, discriminator and the downstream detector."""
