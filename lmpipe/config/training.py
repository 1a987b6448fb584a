"""Config of the model and of training: pretraining, fine-tuning (continue, SFT, LoRA), classification."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from lmpipe.config.base import SEED_MAX, Section, schema_only
from lmpipe.config.effects import EXECUTION, NO_EFFECT, Affects

# What ClassifyConfig.path must end in (any case), for the form; its validator says so in words.
CLASSIFY_SUFFIX = r"\.([Cc][Ss][Vv]|[Jj][Ss][Oo][Nn][Ll]?)$"


class ModelConfig(Section):
    """The model's architecture; ``arch`` picks the block design (this class is GPT-2's, nanoGPT's;
    :class:`Qwen3ModelConfig` the default). Its vocabulary size is the tokenizer's."""

    arch: Literal["gpt2"] = Field(
        "gpt2", description="Block design. 'gpt2': learned positions, LayerNorm, GELU MLP, tied embeddings "
                            "(nanoGPT's; exported as GPT2LMHeadModel). 'qwen3': rotary positions, RMSNorm, "
                            "QK-norm, SwiGLU MLP (exported as Qwen3ForCausalLM); it has more fields.")
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    # n_head comes before n_embd, whose check reads it.
    n_head: int = Field(4, ge=1, description="Attention heads per block; n_embd must be a multiple of it.")
    n_embd: int = Field(128, ge=1, description="Width of the residual stream (the embedding size); a multiple of "
                                               "n_head (each head gets n_embd / n_head dimensions).")
    block_size: int = Field(128, ge=2, description="Context length in tokens (the longest sequence the model "
                                                   "sees); each corpus's validation split needs more tokens.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability on attention, residual and "
                                                            "embedding outputs while training; 0: none.")
    bias: bool = Field(True, description="Biases in the linear layers and layer norms (GPT-2: true).")

    @field_validator("n_embd")
    @classmethod
    def _divisible(cls, v: int, info: ValidationInfo) -> int:
        n_head = info.data.get("n_head")
        if n_head and v % n_head:
            raise ValueError(f"{v} must be divisible by n_head={n_head}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _only_for_qwen3(cls, data: Any) -> Any:
        """A Qwen3 field in a GPT-2 section: say which arch it belongs to, not just 'unknown field'."""
        if cls is ModelConfig and isinstance(data, dict):
            other = sorted(set(data) & (set(Qwen3ModelConfig.model_fields) - set(ModelConfig.model_fields)))
            if other:
                one = len(other) == 1
                raise ValueError(f"{', '.join(other)} only appl{'ies' if one else 'y'} to model.arch='qwen3' "
                                 f"(model.arch is {data.get('arch', 'gpt2')!r}); set model.arch=qwen3 or leave "
                                 f"{'it' if one else 'them'} out")
        return data


def default_intermediate_size(n_embd: int) -> int:
    """SwiGLU's hidden width when not given: 8/3 n_embd (the parameters of GPT-2's 4 n_embd GELU MLP, as its three
    matrices hold 3 x n_embd x hidden), rounded up to a multiple of 64 for the matmul kernels."""
    return -(-8 * n_embd // (3 * 64)) * 64


class Qwen3ModelConfig(ModelConfig):
    """Qwen3's block (transformers' Qwen3ForCausalLM): RMSNorm before attention and MLP, rotary position
    embeddings, RMSNorm on each head's queries and keys, a SwiGLU MLP, no biases but optionally in attention.
    The default arch: with Muon (pretrain.optimizer) it reaches GPT-2's 600-step validation loss in about half
    the wall time on the demo (bench/recipe.py)."""

    arch: Literal["qwen3"] = Field(  # type: ignore[assignment]
        "qwen3", description="Block design. 'gpt2': learned positions, LayerNorm, GELU MLP, tied embeddings "
                             "(nanoGPT's; exported as GPT2LMHeadModel). 'qwen3': rotary positions, RMSNorm, "
                             "QK-norm, SwiGLU MLP (exported as Qwen3ForCausalLM).")
    bias: bool = Field(False, description="Biases in the attention's q, k, v and output projections "
                                          "(Qwen3's attention_bias); its MLP and norms have none.")
    n_kv_head: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention: each serves n_head / n_kv_head query "
                                "heads, and the KV cache shrinks by that factor); a divisor of n_head. None: "
                                "n_head (multi-head attention).")
    intermediate_size: int | None = Field(
        None, ge=1, description="Hidden width of the SwiGLU MLP. None: 8/3 n_embd rounded up to a multiple of "
                                "64 (as many MLP parameters as GPT-2's 4 n_embd).")
    rope_theta: float = Field(10000.0, gt=0.0, description="Base of the rotary embeddings' wavelengths (Qwen3 "
                                                           "uses 1e6 for its 32K context; 1e4 suits short ones).")
    rms_norm_eps: float = Field(1e-6, gt=0.0, lt=1.0, description="Epsilon of every RMSNorm (Qwen3: 1e-6).")
    tie_embeddings: bool = Field(True, description="The output head shares the token embedding's matrix; false: "
                                                   "a separate head (more parameters, often better at scale).")

    @model_validator(mode="after")
    def _check_heads(self) -> Qwen3ModelConfig:
        head_size = self.n_embd // self.n_head
        if head_size % 2:
            raise ValueError(f"n_embd / n_head = {self.n_embd} / {self.n_head} = {head_size} must be even: rotary "
                             "embeddings rotate pairs of each head's dimensions")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        return self


MODEL_ARCHS: dict[str, type[ModelConfig]] = {"gpt2": ModelConfig, "qwen3": Qwen3ModelConfig}
DEFAULT_ARCH = "qwen3"  # a model section without ``arch``


def _variant(value: Any, field: str, default: str) -> str:
    """The variant a section with variants validates as: its ``field`` (``default`` when not given), from a dict
    being parsed or a model already built."""
    name = value.get(field, default) if isinstance(value, dict) else getattr(value, field, default)
    return name if isinstance(name, str) else repr(name)


def _model_arch(value: Any) -> str:
    """The variant a model section validates as: its ``arch``, DEFAULT_ARCH when not given."""
    return _variant(value, "arch", DEFAULT_ARCH)


# The model section: one variant per arch, so the Qwen3-only fields exist only with arch "qwen3".
ModelSection = Annotated[
    Annotated[ModelConfig, Tag("gpt2")] | Annotated[Qwen3ModelConfig, Tag("qwen3")],
    Discriminator(_model_arch, custom_error_type="model_arch",
                  custom_error_message=f"arch must be one of {', '.join(map(repr, MODEL_ARCHS))}"),
]


def model_config(data: dict[str, Any]) -> ModelConfig:
    """A model section from its plain form (a spec file, a stored config): the variant its ``arch`` names."""
    arch = _model_arch(data)
    if arch not in MODEL_ARCHS:
        raise ValueError(f"model.arch must be one of {', '.join(map(repr, MODEL_ARCHS))}, got {arch}")
    return MODEL_ARCHS[arch].model_validate(data)


class DistributedConfig(Section):
    """More than one process: ``torchrun`` on this node, one process per GPU (or CPU process with gloo)."""

    nproc_per_node: int = Field(1, ge=1, description="Training processes; > 1 launches torchrun (DDP or FSDP).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="'ddp': a full replica per process; 'fsdp': FSDP2 fully_shard, for models whose "
                           "training state does not fit one GPU (their fp32 weights must)."
    )
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="'auto': nccl on CUDA, gloo on CPU.")


class Optimizer(Section):
    """AdamW with linear warmup then cosine decay to min_lr, and gradient clipping (every trained section)."""

    learning_rate: float = Field(2e-3, gt=0.0, description="Peak learning rate, reached after warmup_steps.")
    min_lr: float = Field(2e-4, ge=0.0, description="Where the cosine decay ends, at max_steps; at most "
                                                    "learning_rate.")
    warmup_steps: int = Field(30, ge=0, description="Optimizer steps of linear warmup from 0 to learning_rate.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW's decoupled weight decay of the weight matrices "
                                                         "and embeddings (not of biases and layer-norm gains).")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm; 0 disables clipping.")

    @model_validator(mode="after")
    def _check_min_lr(self) -> Optimizer:
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} exceeds learning_rate={self.learning_rate}")
        return self


class AdamBetas(Section):
    """AdamW's moment decay rates (the language-model trainings; classify keeps torch's defaults)."""

    beta1: float = Field(0.9, gt=0.0, lt=1.0, description="AdamW's decay rate of the gradient's running mean.")
    beta2: float = Field(0.95, gt=0.0, lt=1.0, description="AdamW's decay rate of the squared gradient's running "
                                                           "mean.")


class MuonConfig(Section):
    """torch.optim.Muon's settings: the optimizer of the hidden weight matrices when ``optimizer`` is 'muon'."""

    lr: float = Field(0.02, gt=0.0, description="Muon's peak learning rate, reached after warmup_steps; the schedule "
                                                "scales it as it scales learning_rate (warmup, then cosine decay "
                                                "to lr x min_lr / learning_rate).")
    momentum: float = Field(0.95, ge=0.0, lt=1.0, description="Decay rate of Muon's momentum buffer.")
    nesterov: bool = Field(True, description="Nesterov momentum: orthogonalize the gradient plus momentum x the "
                                             "buffer instead of the buffer.")
    ns_steps: int = Field(5, ge=1, le=99, description="Newton-Schulz iterations that orthogonalize each update.")
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = Field(
        "match_rms_adamw", description="How the update is scaled to the matrix's shape: 'original' (Keller Jordan: "
                                       "lr x sqrt(max(1, rows / cols))) or 'match_rms_adamw' (Moonshot: lr x 0.2 x "
                                       "sqrt(max(rows, cols)), the RMS of an AdamW update).")
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay of the Muon matrices (each step "
                                                         "multiplies them by 1 - lr x weight_decay).")


class OptimizerChoice(Section):
    """Which optimizer trains the hidden weight matrices (the language-model trainings)."""

    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="'adamw': AdamW for every weight; 'muon': torch.optim.Muon (the muon settings) for the "
                             "2-D weights of the linear layers inside the transformer blocks, AdamW for the "
                             "embeddings, the output head, norms and biases.")
    muon: Annotated[MuonConfig, Affects("none", output_when="optimizer", output_value="muon")] = Field(
        default_factory=MuonConfig, description="Muon's settings (read when optimizer is 'muon').")


class Batch(Section):
    """How big a step is and how it is split; only the global batch decides the steps taken."""

    batch_size: Annotated[Annotated[int, schema_only(minimum=1)] | Literal["auto"], EXECUTION] = Field(
        16, description="Sequences per micro-batch per process; 'auto' (needs batch_tokens): the largest "
                        "that fits the device."
    )
    grad_accum_steps: Annotated[int, EXECUTION] = Field(
        1, ge=1, description="Micro-batches per optimizer step (ignored when batch_tokens is set).")
    batch_tokens: Annotated[int | None, EXECUTION] = Field(
        None, ge=1, description="Global batch in tokens per optimizer step, a multiple of model.block_size; "
                                "gradient accumulation steps are derived: batch_tokens / (batch_size x "
                                "block_size x processes), which must be whole."
    )

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v

    @model_validator(mode="after")
    def _check_auto(self) -> Batch:
        if self.batch_size == "auto" and self.batch_tokens is None:
            raise ValueError("batch_size='auto' needs batch_tokens (the global batch the micro-batches add up to)")
        return self


class Runtime(Section):
    """Where and from which seed a section trains."""

    seed: int = Field(1337, ge=0, le=SEED_MAX, description="Seeds the weights' initialisation, dropout and the "
                                                           "order of the training windows.")
    device: Annotated[Literal["auto", "cpu", "cuda", "mps"], EXECUTION] = Field(
        "auto", description="'auto': CUDA if available, else MPS (Apple silicon), else CPU.")


class TrainRuntime(Runtime):
    threads: Annotated[int | None, NO_EFFECT] = Field(
        None, ge=1, description="torch CPU threads; None keeps torch's default.")
    compile: Annotated[bool | None, EXECUTION] = Field(
        None, description="torch.compile the model; None: on for CUDA, off elsewhere.")
    precision: Annotated[Literal["auto", "fp32", "bf16"], EXECUTION] = Field(
        "auto", description="'auto': bf16 autocast on CUDA, fp32 elsewhere (CPU runs bitwise reproducible); "
                            "'bf16': bf16 autocast on CUDA and CPU (faster on CPUs with AVX-512, most with "
                            "AVX512-BF16 or AMX; weights and optimizer stay fp32); 'fp32': no autocast.")
    peak_flops: Annotated[float | None, NO_EFFECT] = Field(
        None, gt=0.0, description="Device peak FLOP/s for MFU; None: known GPUs' dense bf16 peak, else no MFU."
    )


class Cadence(Section):
    """How often training validates. Only early stopping (a section with early_stopping_patience set) lets
    that decide anything: its patience counts validations and its best checkpoint is a validated one."""

    eval_interval: Annotated[int, Affects("none", output_when="early_stopping_patience")] = Field(
        100, ge=1, description="Steps between validation losses.")


class TrainCadence(Cadence):
    eval_batches: Annotated[int, EXECUTION] = Field(8, ge=1, description="Micro-batches of the validation split "
                                                                     "each validation loss averages.")
    log_interval: Annotated[int, NO_EFFECT] = Field(10, ge=1, description="Steps between metric flushes.")
    checkpoint_interval: Annotated[int, NO_EFFECT] = Field(200, ge=1, description="Steps between checkpoints "
                                                                                  "an interrupted run resumes "
                                                                                  "from.")


class EarlyStopping(Section):
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without a better val loss; the best "
                                "checkpoint, not the last, becomes the stage's model. None: train max_steps."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0.0, description="Improvement a val loss needs to count.")


class Training(EarlyStopping, TrainCadence, TrainRuntime, Batch, OptimizerChoice, AdamBetas, Optimizer):
    """A language-model training run (pretrain, finetune): the sections they share.

    The sections are listed last-first: pydantic orders fields from the last base on, so the config, its YAML
    and the Prefect form start with the steps and the optimizer and end with early stopping."""

    SECTION: ClassVar[str] = "pretrain"  # the config section, for messages
    max_steps: int = Field(600, ge=1, description="Optimizer steps.")

    @property
    def processes(self) -> int:
        """Training processes the global batch is split over."""
        return 1

    def sequences_per_step(self, block_size: int) -> int:
        """Global batch in sequences: what one optimizer step trains on, however it is split."""
        if self.batch_tokens is not None:
            return self.batch_tokens // block_size
        assert isinstance(self.batch_size, int)
        return self.batch_size * self.grad_accum_steps * self.processes


class TrainConfig(Training):
    """Pretraining: the one stage that may launch several processes.

    Its defaults are the demo's recipe, measured by bench/recipe.py: Muon for the hidden matrices, and AdamW at
    a higher peak (6e-3; fine-tuning keeps 6e-4) for the embeddings, head and norms, which AdamW alone at 2e-3
    kept slow: about 0.5x GPT-2 + AdamW's wall time to its 600-step loss, against 0.7x at 2e-3."""

    optimizer: Literal["adamw", "muon"] = Field(
        "muon", description=OptimizerChoice.model_fields["optimizer"].description)  # only the default differs
    learning_rate: float = Field(6e-3, gt=0.0, description="Peak learning rate (AdamW's; Muon's is muon.lr), "
                                                           "reached after warmup_steps.")

    distributed: Annotated[DistributedConfig, EXECUTION] = Field(
        default_factory=DistributedConfig, description="Processes and how they split the work (one by default).")

    @property
    def processes(self) -> int:
        return self.distributed.nproc_per_node


class LoraConfig(Section):
    """LoRA adapters (lmpipe.model.lora): the base weights stay frozen, low-rank updates of the targeted layers
    learn."""

    r: int = Field(8, ge=1, description="Rank of each update.")
    alpha: float = Field(16.0, gt=0.0, description="The update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"], min_length=1,
        description="Linear layers to adapt, by name or name suffix (model.arch gpt2: c_attn, c_proj, c_fc, "
                    "attn.c_proj, transformer.h.0.mlp.c_fc; qwen3: q_proj, k_proj, v_proj, o_proj, gate_proj, "
                    "up_proj, down_proj) or 'all-linear' (the default: every linear layer but the output head).")
    save_adapter: bool = Field(False, description="Also publish adapter/: only the adapter weights, in peft's "
                                                  "format for the transformers export. The merged weights are "
                                                  "always published (model/), for evaluation and serving.")


class FinetuneConfig(Training):
    """Fine-tuning, in one process, in either mode: :class:`ContinueFinetuneConfig` or :class:`SFTFinetuneConfig`
    (``finetune.mode`` picks one: :data:`FinetuneSection`)."""

    SECTION: ClassVar[str] = "finetune"
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(6e-4, gt=0.0, description="Peak learning rate, reached after warmup_steps.")
    min_lr: float = Field(6e-5, ge=0.0, description="Where the cosine decay ends, at max_steps; at most "
                                                    "learning_rate.")
    warmup_steps: int = Field(10, ge=0, description="Optimizer steps of linear warmup from 0 to learning_rate.")
    init_checkpoint: str | None = Field(
        None, description="Checkpoint directory to start from; default: this pipeline's pretrained model."
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of every weight; None: full "
                                                      "fine-tuning.")

    @model_validator(mode="after")
    def _check_optimizer(self) -> FinetuneConfig:
        if self.optimizer == "muon" and self.lora is not None:
            raise ValueError("optimizer 'muon' does not train LoRA adapters: they are low-rank factors, not the "
                             "hidden weight matrices Muon orthogonalizes, and the base weights are frozen; set "
                             "optimizer=adamw or lora=null")
        return self


class ContinueFinetuneConfig(FinetuneConfig):
    """Fine-tuning that continues language-model training on the data.finetune corpus (the demo)."""

    mode: Literal["continue"] = Field(
        "continue", description="'continue': train on data.finetune; 'sft': the chat examples of sft_path.")


class SFTFinetuneConfig(FinetuneConfig):
    """Supervised fine-tuning on chat or instruction examples (a JSON lines or JSON array file), the loss on the
    replies only."""

    mode: Literal["sft"] = Field(
        "sft", description="'continue': train on data.finetune; 'sft': the chat examples of sft_path.")
    sft_path: str = Field(
        min_length=1,
        description="SFT examples: JSON lines (one record per line) or one JSON array of records (a file "
                    "starting with '['), in any of the shapes {prompt, completion or response}, Alpaca "
                    "{instruction, input or context (optional), output or response}, {messages: [{role: "
                    "system|user|assistant, content}, ...]} or ShareGPT {conversations: [{from: human|gpt|system, "
                    "value}, ...]}; rendered with the chat template on the tokenizer's reserved tokens, the loss "
                    "only on the assistant's replies.")
    sft_layout: Literal["padded", "packed"] = Field(
        "padded", description="'padded': each example fills one model.block_size window (end-of-text padding, no "
                              "loss), so no example attends to another; 'packed': examples back to back, cheaper "
                              "for examples much shorter than the context; a window may span several examples, "
                              "but each attends only within itself (block-diagonal causal mask split at the "
                              "end-of-text tokens) with positions restarting at its start, as at inference.")
    sft_skip_long: bool = Field(False, description="Skip and count SFT examples longer than model.block_size tokens "
                                                   "instead of failing on the first.")
    sft_skip_bad: bool = Field(False, description="Skip and count malformed SFT lines instead of failing on the "
                                                  "first.")


FINETUNE_MODES: dict[str, type[FinetuneConfig]] = {"continue": ContinueFinetuneConfig, "sft": SFTFinetuneConfig}


def _finetune_mode(value: Any) -> str:
    """The variant a finetune section validates as: its ``mode``, "continue" when not given."""
    return _variant(value, "mode", "continue")


# The finetune section: one variant per mode, so the SFT-only fields exist only with mode "sft".
FinetuneSection = Annotated[
    Annotated[ContinueFinetuneConfig, Tag("continue")] | Annotated[SFTFinetuneConfig, Tag("sft")],
    Discriminator(_finetune_mode, custom_error_type="finetune_mode",
                  custom_error_message=f"mode must be one of {', '.join(map(repr, FINETUNE_MODES))}"),
]


class ClassifyConfig(Cadence, Runtime, Optimizer):
    """Sequence classification fine-tuning, GPT-1 style (lmpipe.model.classifier): the hidden state of the last token
    (an end-of-text "extract" token appended to each text) goes through a linear head."""

    path: Annotated[str, schema_only(pattern=CLASSIFY_SUFFIX)] = Field(
        description="Labelled examples: a CSV file with a header row (.csv) or JSONL, one object a line (.jsonl or "
                    ".json); the format follows the suffix.")
    text_field: str = Field("text", min_length=1, description="Column / key holding the text; not label_field.")
    label_field: str = Field("label", min_length=1, description="Column / key holding the label (a string; JSON "
                                                                "integers are read as their decimal string).")
    labels: Annotated[list[Annotated[str, schema_only(minLength=1)]], schema_only(minItems=2, uniqueItems=True)] \
        | None = Field(
        None, description="The classes, in the head's output order. None: the sorted set of labels of the "
                          "training split. Given: a line with another label is an error (or skipped with skip_bad). "
                          "Integers are taken as their decimal string, as in the data.")
    val_every: int = Field(5, ge=2, description="Every val_every-th example (in file order) is held out for "
                                                "validation, at least one.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Examples per step.")
    learning_rate: float = Field(5e-4, gt=0.0, description="Peak learning rate, reached after warmup_steps.")
    min_lr: float = Field(5e-5, ge=0.0, description="Where the cosine decay ends, at max_steps; at most "
                                                    "learning_rate.")
    warmup_steps: int = Field(10, ge=0, description="Optimizer steps of linear warmup from 0 to learning_rate.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decay of matrices (not of biases and gains).")
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the pooled hidden state (GPT-1: 0.1).")
    lm_loss_weight: float = Field(0.0, ge=0.0, description="GPT-1's auxiliary language-modelling loss on the texts, "
                                                           "added with this weight; 0 trains the classifier alone.")
    eval_interval: int = Field(50, ge=1, description="Steps between validations (and after the last step).")
    skip_bad: bool = Field(False, description="Skip and count malformed lines (and labels outside `labels`) "
                                              "instead of failing on the first.")
    skip_long: bool = Field(False, description="Skip and count texts longer than model.block_size tokens (with "
                                               "the extract token); default: keep their LAST tokens (the ones "
                                               "the classifying token sees) and count them as truncated.")
    init_checkpoint: str | None = Field(
        None, description="Checkpoint directory of the body to start from; default: this pipeline's pretrained "
                          "model (GPT-1: pretrain, then fine-tune on the task).")

    @field_validator("labels", mode="before")
    @classmethod
    def _integer_labels(cls, v: Any) -> Any:
        """`labels: [0, 1]` in YAML means the labels a JSON file writes as 0 and 1 (read as "0" and "1")."""
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @model_validator(mode="after")
    def _check(self) -> ClassifyConfig:
        if Path(self.path).suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise ValueError(f"path {self.path!r} must end in .csv, .jsonl or .json (the format follows the suffix)")
        if self.text_field == self.label_field:
            raise ValueError(f"text_field and label_field are both {self.text_field!r}")
        if self.labels is not None:
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or not all(self.labels):
                raise ValueError(f"labels must be at least 2 distinct non-empty strings, got {self.labels}")
        return self
