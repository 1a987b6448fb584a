"""SFT data: JSONL parsing with line-numbered errors, prompt masking, packing, and training on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmpipe.checkpoint import read_state
from lmpipe.config import EOT, FinetuneConfig, ModelConfig, TokenizerConfig, TrainConfig
from lmpipe.sft import SFTExample, SFTFormatError, build_sft_data, encode_examples, read_sft_jsonl, split_indices
from lmpipe.stage import StageResult
from lmpipe.tokenizer import load_tokenizer, run_train_tokenizer, tokenizer_fingerprint
from lmpipe.train import ArraySource, get_batch, run_finetune, train
from tests.test_tokenizer import write_documents

DATA = Path(__file__).resolve().parents[1] / "data"
LINES = [ln for ln in (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines() if ln.strip()][:400]
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> StageResult:
    """A real byte-level BPE (vocabulary 300) trained on the first lines of Tiny Shakespeare."""
    root = tmp_path_factory.mktemp("sft")
    docs = write_documents(root / "docs", LINES, ids=[f"l{i}" for i in range(len(LINES))])
    return run_train_tokenizer(TokenizerConfig(vocab_size=300), docs, root / "tok", "tok")


@pytest.fixture(scope="module")
def tok(tokenizer: StageResult):
    return load_tokenizer(tokenizer.path("tokenizer.json"))


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def dialogue(n: int) -> list[str]:
    """n examples: a line of the play as prompt, the next line as response."""
    return [json.dumps({"prompt": f"{LINES[i]}\n", "response": LINES[i + 1]}) for i in range(n)]


# ---------------------------------------------------------------- reading


def test_reads_examples_and_skips_blank_lines(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [dialogue(2)[0], "", "   ", dialogue(2)[1]])
    assert read_sft_jsonl(f) == [SFTExample(f"{LINES[0]}\n", LINES[1]), SFTExample(f"{LINES[1]}\n", LINES[2])]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "a", "response": ', r":3: not valid JSON"),
        ('{"prompt": "a"}', r":3: missing key 'response' \(keys: \['prompt'\]\)"),
        ('{"response": "b"}', r":3: missing key 'prompt'"),
        ('{"prompt": "a", "response": 7}', r":3: 'response' must be a string, got int"),
        ('["a", "b"]', r":3: expected an object with 'prompt' and 'response', got list"),
    ],
)
def test_bad_line_names_file_and_line_number(tmp_path: Path, bad_line: str, message: str) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [*dialogue(2), bad_line, *dialogue(3)])
    with pytest.raises(SFTFormatError, match=rf"finetune\.sft_path: {tmp_path}/d\.jsonl{message}"):
        read_sft_jsonl(f)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"finetune\.sft_path: SFT file .*nope\.jsonl' does not exist"):
        read_sft_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(SFTFormatError, match="holds no examples"):
        read_sft_jsonl(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_val_split_every_tenth_example_at_least_one() -> None:
    train_idx, val_idx = split_indices(25)
    assert val_idx == [9, 19] and len(train_idx) == 23 and not set(train_idx) & set(val_idx)
    assert split_indices(3) == ([0, 1], [2])
    with pytest.raises(ValueError, match="at least 2 examples"):
        split_indices(1)


# ---------------------------------------------------------------- encoding


def test_mask_is_zero_on_prompts_one_on_responses_and_eot(tok) -> None:
    eot = tok.token_to_id(EOT)
    examples = [SFTExample("ROMEO:\n", "But soft!"), SFTExample("JULIET:\n", "Ay me.")]
    tokens, mask = encode_examples(examples, tok, eot)
    expected_tokens: list[int] = []
    expected_mask: list[int] = []
    for e in examples:
        p = tok.encode(e.prompt, add_special_tokens=False).ids
        r = tok.encode(e.response, add_special_tokens=False).ids
        expected_tokens += p + r + [eot]
        expected_mask += [0] * len(p) + [1] * len(r) + [1]
    assert tokens.tolist() == expected_tokens and mask.tolist() == expected_mask
    assert tokens.dtype == mask.dtype == np.int64
    assert tok.decode(tokens.tolist()) == "ROMEO:\nBut soft!JULIET:\nAy me."


def test_literal_eot_text_is_not_an_example_boundary(tok) -> None:
    eot = tok.token_to_id(EOT)
    tokens, _ = encode_examples([SFTExample(f"say {EOT}", "ok")], tok, eot)
    assert tokens.tolist().count(eot) == 1 and tokens[-1] == eot


def test_training_targets_are_ignored_exactly_on_prompt_tokens(tmp_path: Path, tok) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", dialogue(30))
    data = build_sft_data(f, tok, tok.token_to_id(EOT))
    assert (data.train_examples, data.val_examples) == (27, 3)
    src, mask = ArraySource(data.train_tokens), ArraySource(data.train_mask)
    offsets = np.array([0, 17, 100])
    x, y = get_batch(src, offsets, 32, torch.device("cpu"), mask)
    for row, o in enumerate(offsets):
        window, m = data.train_tokens[o : o + 33], data.train_mask[o : o + 33]
        assert x[row].tolist() == window[:-1].tolist()
        assert y[row].tolist() == [t if keep else -1 for t, keep in zip(window[1:], m[1:])]
    assert (y == -1).any() and (y != -1).any()


def test_model_learns_responses_not_prompts(tmp_path: Path, tok) -> None:
    # Every response is the same line: with prompts masked out the loss can go to
    # ~0; were prompt tokens counted, it would stay near the text's entropy.
    eot = tok.token_to_id(EOT)
    examples = [SFTExample(f"{LINES[i]}\n", "Amen.") for i in range(60)]
    tokens, mask = encode_examples(examples, tok, eot)
    src, msk = ArraySource(tokens), ArraySource(mask)
    cfg = TrainConfig(max_steps=40, batch_size=8, learning_rate=1e-2, min_lr=1e-3, warmup_steps=5,
                      eval_interval=40, eval_batches=2, log_interval=10, checkpoint_interval=100, device="cpu")
    summary = train(MODEL, cfg, tok.get_vocab_size(), src, src, tmp_path, tokenizer_fingerprint="t",
                    target_mask_src=(msk, msk))
    # Observed: 5.63 at step 1 -> 0.14 (val, responses only); 3.3 when the same run counts prompts.
    assert summary.final_val_loss is not None and summary.final_val_loss < 0.5


# ---------------------------------------------------------------- the finetune stage in sft mode


def test_run_finetune_sft_mode(tmp_path: Path, tokenizer: StageResult, tok) -> None:
    fp = tokenizer_fingerprint(tokenizer.path("tokenizer.json"))
    stream = np.array(tok.encode("\n".join(LINES), add_special_tokens=False).ids, dtype=np.int64)
    base = train(MODEL, TrainConfig(max_steps=2, batch_size=4, eval_batches=1, device="cpu"), tok.get_vocab_size(),
                 ArraySource(stream[:-500]), ArraySource(stream[-500:]), tmp_path / "base", tokenizer_fingerprint=fp)

    sft = write_jsonl(tmp_path / "d.jsonl", dialogue(40))
    cfg = FinetuneConfig(mode="sft", sft_path=str(sft), max_steps=3, batch_size=4, eval_batches=1, device="cpu")
    result = run_finetune(cfg, MODEL, base.checkpoint, None, tokenizer, tmp_path / "ft", "fp")
    assert (result.meta["sft_train_examples"], result.meta["sft_val_examples"]) == (36, 4)
    assert result.metrics["steps"] == 3 and np.isfinite(result.metrics["final_val_loss"])
    assert read_state(result.path("model"))["train"]["mode"] == "sft"

    bad = write_jsonl(tmp_path / "bad.jsonl", [*dialogue(3), "{oops"])
    cfg_bad = cfg.model_copy(update={"sft_path": str(bad)})
    with pytest.raises(SFTFormatError, match=r"finetune\.sft_path: .*bad\.jsonl:4: not valid JSON"):
        run_finetune(cfg_bad, MODEL, base.checkpoint, None, tokenizer, tmp_path / "ft-bad", "fp")
