"""Data: photos in, degraded samples and expert trajectories out.

Degradations and their registry, photo sources and synthesis, depth for haze, perception cues,
the expert search for SFT labels, and the SFT rows built from it.
"""
