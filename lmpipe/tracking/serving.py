"""The served model: an MLflow pyfunc that generates text with a registered GPT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.pyfunc import PythonModel

from lmpipe.model.generation_settings import GENERATION_DEFAULTS

# ---------------------------------------------------------------------------------------------
# The served model: a pyfunc that generates text, registered with an alias.


class GPTTextGenerator(PythonModel):
    """Serves a checkpoint as text generation: a list of prompts in, a list of completions out.

    A chat SFT model takes each prompt as a user turn in its chat template and
    returns the assistant's reply (``lmpipe.eval.samples.generate_samples``'s chat mode).
    The params are checked, and default, as ``lmpipe generate``'s options
    (``lmpipe.tracking.handoff.generation_params``); an empty prompt generates from the
    end-of-text token. The model runs on CUDA when the machine has it.
    """

    def load_context(self, context: Any) -> None:
        import torch

        from lmpipe.data.tokenizer import load_tokenizer, meta_eot_id
        from lmpipe.model.checkpoint import is_chat_model, load_model, read_state

        checkpoint = Path(context.artifacts["checkpoint"])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(checkpoint, device=self.device)
        self.chat = is_chat_model(read_state(checkpoint))
        self.tokenizer = load_tokenizer(Path(context.artifacts["tokenizer"]))
        meta = context.artifacts.get("tokenizer_meta")  # absent from models registered before it was logged
        self.start_id = meta_eot_id(self.tokenizer, Path(meta) if meta else None, missing_ok=True)

    # The type hint is one MLflow infers no signature from (it would replace the explicit one, which declares
    # the params), and what the model gets once MLflow has checked the input against that signature. With no
    # hint at all, MLflow warns "Add type hints to the `predict` method" whenever this class is defined.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Prompts (a one-column DataFrame, or a list of strings when called directly) -> list[str] of completions."""
        from lmpipe.eval.samples import generate_samples
        from lmpipe.model.generation_settings import check_prompts, generation_params

        if hasattr(model_input, "iloc"):  # a DataFrame, as MLflow hands the input over
            model_input = model_input.iloc[:, 0].tolist()
        elif isinstance(model_input, str):
            model_input = [model_input]
        prompts = check_prompts(model_input)
        samples = generate_samples(
            self.model, self.tokenizer, prompts, **generation_params(params),
            device=getattr(self, "device", "cpu"), start_id=getattr(self, "start_id", None),
            chat=getattr(self, "chat", False),
        )
        return [s["completion"] for s in samples]


def served_signature() -> Any:
    """The served model's signature: strings in and out, and the params of ``lmpipe generate`` with its defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    types = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "top_p": "double", "seed": "long"}
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec(key, types[key], default)
                                              for key, default in GENERATION_DEFAULTS.items()]))


def served_requirements() -> list[str]:
    """Exact versions of what the served model imports, so MLflow need not infer them (~8 s a call)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("torch", "tokenizers", "safetensors", "numpy", "pydantic", "pyyaml", "pandas", "pyarrow")]
