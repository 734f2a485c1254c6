"""sparsewsi: learnable token sparsification for gigapixel whole-slide image reasoning.

The package follows the data's journey through the method:

    slides/      slide files -> tissue mask -> patch grid -> tiles
    features/    patch encoders, feature extraction, feature-bag readers (TRIDENT/CLAM h5, CSV)
    selection/   scorer, Soft Top-K (OT, custom_vjp), Hard Top-K, VP noise gate, denoiser
    llm/         the Flax NNX decoder LLM, Hugging Face import/export, LoRA, generation
    cli.py       the ``sparsewsi`` command line, which only wires the stages together

Lower stages never import higher ones.
"""

__version__ = "0.1.0"
