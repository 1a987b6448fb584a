"""The whole pipeline's configuration: one typed model, one section per stage.

A config is loaded from a YAML preset with dotted command-line overrides::

    >>> cfg = load_config("configs/demo.yaml", ["pretrain.max_steps=200"])
    >>> cfg.pretrain.max_steps
    200

Every value is validated when the model is built, so a bad value fails before
any work starts, with an error that names the dotted field and the value.
The defaults of ``PipelineConfig()`` *are* the demo: WikiText-2 pretraining and
Tiny Shakespeare fine-tuning from the corpora bundled in ``data/``.
"""

from __future__ import annotations

from lmpipe.config.base import CHAT_TOKENS, DEMO_HELD_OUT_AT, EOT, SFT_HELD_OUT, ConfigError, Section
from lmpipe.config.data import (
    C4Config,
    CleanConfig,
    CorpusConfig,
    DataConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    MinHashConfig,
    PIIConfig,
    RunnerConfig,
    ShardConfig,
    SourceConfig,
    TokenizerConfig,
)
from lmpipe.config.effects import Affects, field_effect, fingerprinted, trajectory
from lmpipe.config.evaluation import BenchmarkConfig, EvalConfig, TrackingConfig
from lmpipe.config.loading import apply_override, build_config, load_config
from lmpipe.config.pipeline import PipelineConfig, check_batch
from lmpipe.config.training import (
    FINETUNE_MODES,
    MODEL_ARCHS,
    ClassifyConfig,
    ContinueFinetuneConfig,
    DistributedConfig,
    FinetuneConfig,
    FinetuneSection,
    LoraConfig,
    ModelConfig,
    ModelSection,
    Qwen3ModelConfig,
    SFTFinetuneConfig,
    TrainConfig,
)

__all__ = [
    "Affects",
    "ContinueFinetuneConfig",
    "FINETUNE_MODES",
    "FinetuneSection",
    "MODEL_ARCHS",
    "ModelSection",
    "Qwen3ModelConfig",
    "SFTFinetuneConfig",
    "field_effect",
    "fingerprinted",
    "trajectory",
    "BenchmarkConfig",
    "C4Config",
    "CHAT_TOKENS",
    "ClassifyConfig",
    "CleanConfig",
    "ConfigError",
    "CorpusConfig",
    "DEMO_HELD_OUT_AT",
    "DataConfig",
    "DistributedConfig",
    "EOT",
    "EvalConfig",
    "FinetuneConfig",
    "GopherQualityConfig",
    "GopherRepetitionConfig",
    "LanguageConfig",
    "LoraConfig",
    "MinHashConfig",
    "ModelConfig",
    "PIIConfig",
    "PipelineConfig",
    "RunnerConfig",
    "SFT_HELD_OUT",
    "Section",
    "ShardConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_override",
    "build_config",
    "check_batch",
    "load_config",
]
