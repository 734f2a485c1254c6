"""The assembled SparseWSI model: scorer -> Soft Top-K (training) / Hard Top-K (inference) -> projector -> LLM.

Entry points for evaluation (issue 6)::

    from sparsewsi.model import load_checkpoint, SparseWSIPredictor

    model, tokenizer, spec = load_checkpoint("runs/stage2")          # a trainer workdir (latest step)
    predictor = SparseWSIPredictor(model, tokenizer, k=32, max_new_tokens=64)
    pred = predictor.predict(features, feature_mask, questions, selector="learned")   # or "random",
    pred.texts, pred.tokens, pred.indices                            # "uniform", "spatial", "all"

* ``load_checkpoint(path)`` rebuilds the model from ``model.json`` in a trainer workdir (frozen LLM
  from its Hugging Face folder or seed, LoRA adapters) and restores the trained parameters of the
  latest valid checkpoint (or of ``<workdir>/checkpoints/<step>`` when given).
* ``SparseWSIPredictor.predict`` runs ONE jit-compiled function (``infer_jit``: scorer, Hard Top-K,
  gather, projector, splice, prefill, decode); host baseline selectors feed their indices to the same
  program. ``encode_chats(tokenizer, questions, prompt_only=True)`` gives the prompts it uses.

Training uses ``SparseWSI.training_loss`` (see ``sparsewsi.training``).
"""

from sparsewsi.model.build import ModelSpec, build_model, llm_config_from, load_tokenizer
from sparsewsi.model.checkpoint import load_checkpoint
from sparsewsi.model.config import SparseWSIConfig
from sparsewsi.model.inference import Prediction, SparseWSIPredictor, infer, infer_jit
from sparsewsi.model.params import ParamSplit, assign_params, flat_params, param_shardings, shard_params
from sparsewsi.model.prompts import (PromptError, TokenizedChat, build_messages, check_batch, encode_chats,
                                     image_token_id, tokenize_chat)
from sparsewsi.model.sparsewsi import Projector, SparseWSI, answer_loss, splice

__all__ = [
    "ModelSpec", "build_model", "llm_config_from", "load_tokenizer", "load_checkpoint", "SparseWSIConfig",
    "Prediction", "SparseWSIPredictor", "infer", "infer_jit", "ParamSplit", "assign_params", "flat_params",
    "param_shardings", "shard_params", "PromptError", "TokenizedChat", "build_messages", "check_batch",
    "encode_chats", "image_token_id", "tokenize_chat",
    "Projector", "SparseWSI", "answer_loss", "splice",
]
