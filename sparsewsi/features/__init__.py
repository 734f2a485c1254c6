"""Patch features: encoders, extraction to TRIDENT-layout HDF5, and feature-bag readers.

Import-free on purpose: import the submodule you need (``sparsewsi.features.readers``,
``sparsewsi.features.bag``) so that reading a bag never pulls in the encoders.
"""
