"""The study's models and targets: trained, quantized, deployed and defended."""
