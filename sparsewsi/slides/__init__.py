"""Slide files -> tissue mask -> patch grid -> tiles.

Modules (import what you need; this package imports nothing heavy on its own):

    wsi.py        open a slide (tiffslide), resolve microns-per-pixel, choose a pyramid level
    tissue.py     tissue detection on a low-resolution level, thumbnail with mask and grid
    grid.py       level-0 patch coordinates at a target mpp / patch size / stride
    tiles.py      block reads cut into patches, in background threads, with prefetch
    synthetic.py  tifffile writers for synthetic pyramidal TIFF / Aperio-style SVS test slides
"""
