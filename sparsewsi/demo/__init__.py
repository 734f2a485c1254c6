"""The end-to-end demo's data: a seeded synthetic sparse-evidence slide benchmark.

* :mod:`sparsewsi.demo.render` -- stain model, tissue textures, evidence foci and look-alikes
* :mod:`sparsewsi.demo.synthetic_slides` -- slides (SVS/TIFF), evidence boxes, questions, manifest;
  per-patch evidence flags for feature bags
* :mod:`sparsewsi.demo.probe` -- does a frozen encoder separate evidence patches? (measurement)
"""
