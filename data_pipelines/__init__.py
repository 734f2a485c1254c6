"""TFDS builders and grain input pipelines for SlideInstruction, SlideBench, WSI-VQA and captions.

* :mod:`data_pipelines.examples` -- parsed records -> one flat example schema (pure functions)
* :mod:`data_pipelines.builders` -- TFDS ``GeneratorBasedBuilder`` classes writing array_record
* :mod:`data_pipelines.build` -- the Python build entry point (``python -m data_pipelines.build``)
* :mod:`data_pipelines.pipeline` -- the grain loader: lazy bags, caps, buckets, sharding, state

This package may import ``sparsewsi``; ``sparsewsi`` never imports it.
"""
