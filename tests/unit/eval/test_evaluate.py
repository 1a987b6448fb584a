"""Evaluation: loss / bits per byte against reference computations, the token budget,
seeded samples, and the whole stage on real corpora with real tokenizer, shards and checkpoints."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmpipe.artifacts import StageResult
from lmpipe.config.data import CorpusConfig, ShardConfig, SourceConfig, TokenizerConfig
from lmpipe.config.evaluation import EvalConfig
from lmpipe.data.documents import ChunkWriter
from lmpipe.data.shards import TokenSplit
from lmpipe.data.tokenizer import (
    TokenizerMismatchError,
    encode_ordinary,
    load_tokenizer,
    token_byte_lengths,
    tokenizer_fingerprint,
)
from lmpipe.eval.heldout import evaluate_loss, score_text
from lmpipe.eval.samples import generate_samples
from lmpipe.model.checkpoint import load_model
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.stages.evaluate import run_evaluate
from lmpipe.stages.tokenizer import run_train_tokenizer
from lmpipe.training.checkpoint import save_checkpoint
from tests.conftest import DATA, REPO
from tests.unit.data.test_shards import encode_and_shard

VOCAB = 260
BLOCK = 8


class ArraySplit:
    """A token sequence in memory with TokenSplit's reading interface (num_tokens, window)."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = tokens.astype(np.int64)
        self.num_tokens = len(tokens)

    def window(self, start: int, length: int) -> np.ndarray:
        assert 0 <= start and start + length <= self.num_tokens
        return self.tokens[start : start + length].copy()


def tiny_gpt(seed: int = 0, vocab_size: int = VOCAB) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16)).eval()


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=100)


@pytest.fixture(scope="module")
def token_bytes() -> np.ndarray:
    lengths = np.arange(VOCAB, dtype=np.int64) % 4 + 1  # 1..4 bytes per token
    lengths[0] = 0  # a special token
    return lengths


# ---------------------------------------------------------------- evaluate_loss


def test_uniform_model_gives_log_vocab_nats_and_exact_bits_per_byte(tokens, token_bytes):
    # All-zero weights give all-zero logits: every token costs exactly ln(V) nats.
    model = tiny_gpt()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    r = evaluate_loss(model, ArraySplit(tokens), token_bytes, eval_tokens=30, batch_size=2, device="cpu")
    n_bytes = int(token_bytes[tokens[1:31]].sum())
    assert r["tokens"] == 30
    assert r["bytes"] == n_bytes
    torch.testing.assert_close(r["loss"], math.log(VOCAB), rtol=1e-6, atol=0)
    torch.testing.assert_close(r["perplexity"], float(VOCAB), rtol=1e-6, atol=0)
    torch.testing.assert_close(r["bits_per_byte"], 30 * math.log2(VOCAB) / n_bytes, rtol=1e-6, atol=0)


def reference_loss(model: GPT, tokens: np.ndarray, n_targets: int, token_bytes: np.ndarray) -> tuple[float, int]:
    """Summed nats and bytes, one window at a time through the model's own mean loss."""
    total, n_bytes = 0.0, 0
    for start in range(0, n_targets, BLOCK):
        n = min(BLOCK, n_targets - start)
        w = torch.from_numpy(tokens[start : start + n + 1].astype(np.int64))
        with torch.no_grad():
            _, loss = model(w[None, :-1], w[None, 1:])
        total += loss.item() * n
        n_bytes += int(token_bytes[w[1:].numpy()].sum())
    return total, n_bytes


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_matches_reference_computation(tokens, token_bytes, batch_size):
    model = tiny_gpt(seed=1)
    model.train()
    # 45 targets = 5 full windows of 8 and a last window of 5 (padded in a batch).
    r = evaluate_loss(model, ArraySplit(tokens), token_bytes, eval_tokens=45, batch_size=batch_size, device="cpu")
    assert model.training  # the caller's mode is restored
    model.eval()
    total, n_bytes = reference_loss(model, tokens, 45, token_bytes)
    assert (r["tokens"], r["bytes"]) == (45, n_bytes)
    torch.testing.assert_close(r["loss"], total / 45, rtol=1e-6, atol=0)
    torch.testing.assert_close(r["perplexity"], math.exp(total / 45), rtol=1e-6, atol=0)
    torch.testing.assert_close(r["bits_per_byte"], total / math.log(2) / n_bytes, rtol=1e-6, atol=0)
    assert r["loss"] > 0.5 * math.log(VOCAB)  # a real, untrained model: near ln(V), not 0


@pytest.mark.parametrize("eval_tokens", [1, 7, 8, 9, 45, 99, 100, 10_000])
def test_token_budget_is_exact(tokens, token_bytes, eval_tokens):
    r = evaluate_loss(tiny_gpt(), ArraySplit(tokens), token_bytes, eval_tokens=eval_tokens, batch_size=4, device="cpu")
    expected = min(eval_tokens, len(tokens) - 1)  # the first token is never a target
    assert r["tokens"] == expected
    assert r["bytes"] == int(token_bytes[tokens[1 : expected + 1]].sum())


def test_same_result_for_every_batch_size(tokens, token_bytes):
    model = tiny_gpt(seed=2)
    runs = [
        evaluate_loss(model, ArraySplit(tokens), token_bytes, eval_tokens=99, batch_size=b, device="cpu")
        for b in (1, 2, 5, 13)
    ]
    for r in runs[1:]:
        assert (r["tokens"], r["bytes"]) == (runs[0]["tokens"], runs[0]["bytes"])
        torch.testing.assert_close(r["loss"], runs[0]["loss"], rtol=1e-6, atol=0)


def test_bad_inputs_fail_clearly(tokens, token_bytes):
    model = tiny_gpt()
    with pytest.raises(ValueError, match="eval.eval_tokens must be >= 1, got 0"):
        evaluate_loss(model, ArraySplit(tokens), token_bytes, eval_tokens=0, batch_size=1, device="cpu")
    with pytest.raises(ValueError, match="split has 1 token"):
        evaluate_loss(model, ArraySplit(tokens[:1]), token_bytes, eval_tokens=10, batch_size=1, device="cpu")
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary of 200"):
        evaluate_loss(model, ArraySplit(tokens), token_bytes[:200], eval_tokens=99, batch_size=1, device="cpu")
    with pytest.raises(ValueError, match="0 bytes"):
        evaluate_loss(model, ArraySplit(np.zeros(20, dtype=np.int64)), token_bytes, eval_tokens=10, batch_size=1, device="cpu")


# ---------------------------------------------------------------- real data: tokenizer, shards, checkpoints


def test_score_text_scores_every_byte_of_a_text_after_a_document_start(tok):
    text = "To be, or not to be: <|endoftext|> that is the question.\n" * 3
    model = tiny_gpt(seed=3, vocab_size=tok.get_vocab_size())
    eot = tok.token_to_id("<|endoftext|>")
    [ids] = encode_ordinary(tok, [text])
    assert eot not in ids  # the literal special-token text stays text, as in the shards
    r = score_text(model, tok, text, start_id=eot, eval_tokens=10_000, batch_size=4, device="cpu")
    assert (r["tokens"], r["bytes"]) == (len(ids), len(text.encode("utf-8")))
    assert r == evaluate_loss(model, ArraySplit(np.array([eot, *ids])), token_byte_lengths(tok), eval_tokens=10_000,
                              batch_size=4, device="cpu")
    assert score_text(model, tok, text, start_id=eot, eval_tokens=5, batch_size=4, device="cpu")["tokens"] == 5
    with pytest.raises(ValueError, match="the text encodes to no tokens"):
        score_text(model, tok, "", start_id=eot, eval_tokens=5, batch_size=4, device="cpu")


def blocks(path: Path, n_chars: int) -> list[str]:
    """The start of a real corpus, one document per blank-line block."""
    text = path.read_text(encoding="utf-8")[:n_chars]
    return [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]


def write_documents(out_dir: Path, parts: list[tuple[str, list[str]]]) -> StageResult:
    """A document set (several chunks) of (source, blocks) parts, ids <source>-00000, ..."""
    with ChunkWriter(out_dir, chunk_bytes=16_384) as w:
        for source, texts in parts:
            w.add_many([f"{source}-{i:05d}" for i in range(len(texts))], texts, [source] * len(texts))
    return StageResult(stage="clean", fingerprint="docs", out_dir=str(out_dir))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Tokenizer, two sharded corpora and two checkpoints, built once for the module."""
    root = tmp_path_factory.mktemp("eval")
    parts = {"wikitext2": blocks(DATA / "wikitext2-valid.txt", 60_000),
             "tinyshakespeare": blocks(DATA / "tinyshakespeare.txt", 40_000)}
    both = write_documents(root / "docs-both", list(parts.items()))
    tok = run_train_tokenizer(TokenizerConfig(vocab_size=400), both, root / "tok", "tokfp")
    corpora = {}
    for name, texts in parts.items():
        docs = write_documents(root / f"docs-{name}", [(name, texts)])
        corpus = CorpusConfig(name=name, sources=[SourceConfig(uri="unused.txt")], val_fraction=0.2)
        corpora[name] = encode_and_shard(ShardConfig(shard_tokens=1024), corpus, docs, tok, root / f"shards-{name}",
                                         corpus_field=f"data.{name}", fingerprint=f"fp-{name}")
    tok_fp = tokenizer_fingerprint(tok.path("tokenizer.json"))
    vocab = load_tokenizer(tok.path("tokenizer.json")).get_vocab_size()
    models = {}
    for i, name in enumerate(("base", "finetuned")):
        model = tiny_gpt(seed=10 + i, vocab_size=vocab)
        opt = torch.optim.AdamW(model.parameters())
        models[name] = save_checkpoint(root / f"ckpt-{name}", 0, model, opt, {"tokenizer_fingerprint": tok_fp})
    return {"root": root, "tokenizer": tok, "corpora": corpora, "models": models}


def test_samples_are_reproducible_per_prompt(pipeline):
    tok = load_tokenizer(pipeline["tokenizer"].path("tokenizer.json"))
    model = tiny_gpt(seed=3, vocab_size=tok.get_vocab_size())
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=None, device="cpu")
    a = generate_samples(model, tok, ["ROMEO:", "The history of"], seed=7, **kw)
    assert [s["prompt"] for s in a] == ["ROMEO:", "The history of"]
    assert a == generate_samples(model, tok, ["ROMEO:", "The history of"], seed=7, **kw)
    # Each prompt has its own generator: a sample does not depend on the prompts before it.
    assert a[1:] == generate_samples(model, tok, ["The history of"], seed=7, **kw)
    b = generate_samples(model, tok, ["ROMEO:", "The history of"], seed=8, **kw)
    assert [s["completion"] for s in a] != [s["completion"] for s in b]
    # The completion is exactly the decoded continuation model.generate produces.
    ids = tok.encode("ROMEO:", add_special_tokens=False).ids
    out = model.generate(torch.tensor([ids]), 20, generator=torch.Generator().manual_seed(7))
    assert tok.decode(out[0].tolist(), skip_special_tokens=False) == "ROMEO:" + a[0]["completion"]


def test_empty_prompt_needs_a_start_token(pipeline):
    tok = load_tokenizer(pipeline["tokenizer"].path("tokenizer.json"))
    model = tiny_gpt(vocab_size=tok.get_vocab_size())
    kw = dict(max_new_tokens=3, temperature=1.0, top_k=5, seed=0, device="cpu")
    with pytest.raises(ValueError, match=r"eval.prompts\[1\] = '' encodes to no tokens"):
        generate_samples(model, tok, ["x", ""], **kw)
    [s] = generate_samples(model, tok, [""], start_id=0, **kw)
    # The start token is context, not part of the completion.
    out = model.generate(torch.tensor([[0]]), 3, top_k=5, generator=torch.Generator().manual_seed(0))
    assert s == {"prompt": "", "completion": tok.decode(out[0, 1:].tolist(), skip_special_tokens=False)}
    assert len(s["completion"]) > 0


# No benchmark by default here (the demo's shakespeare_cloze has choices longer than these models' context).
EVAL = EvalConfig(eval_tokens=300, batch_size=4, prompts=["ROMEO:", "The history of"], max_new_tokens=6, seed=5,
                  benchmarks=[])


def test_run_evaluate_end_to_end(pipeline, tmp_path):
    corpora, models, tok = pipeline["corpora"], pipeline["models"], pipeline["tokenizer"]
    curves = {}
    for name, n in (("pretrain", 30), ("finetune", 10)):
        curves[name] = tmp_path / f"{name}.jsonl"
        curves[name].write_text("".join(json.dumps({"step": i, "loss": 5.0 / i, "lr": 1e-3}) + "\n"
                                        for i in range(1, n + 1)))
    result = run_evaluate(EVAL, models, corpora, tok, tmp_path / "eval", "evalfp", curves=curves)

    names = [(m, c) for m in ("base", "finetuned") for c in ("wikitext2", "tinyshakespeare")]
    # The figures, and how many tokens each was scored on (what a later report checks before comparing).
    assert set(result.metrics) == {f"{m}.{c}.{k}" for m, c in names
                                   for k in ("loss", "perplexity", "bits_per_byte", "tokens")}
    assert set(result.files) == {"report.json", "report.md", "samples.json", "loss_curves.png"}
    assert result.path("loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training loss](loss_curves.png)" in result.meta["markdown"]
    report = json.loads(result.path("report.json").read_text())
    assert set(report) == {"models", "corpora", "results", "multiple_choice", "samples", "reference",
                           "compared_with_reference", "sft"}
    assert report["reference"] is None and report["compared_with_reference"] == []
    assert report["sft"] is None and "sft/val" not in result.meta["markdown"]  # not an SFT run
    assert report["multiple_choice"] == [] and "Multiple choice" not in result.meta["markdown"]
    assert [(r["model"], r["corpus"]) for r in report["results"]] == names

    token_bytes = token_byte_lengths(load_tokenizer(tok.path("tokenizer.json")))
    for r in report["results"]:
        split = TokenSplit(Path(corpora[r["corpus"]].out_dir), "val")
        assert split.num_tokens > EVAL.eval_tokens + 1  # so the budget, not the split, decides
        # Recomputed directly: the stage reports exactly what evaluate_loss gives.
        model = load_model(models[r["model"]])
        direct = evaluate_loss(model, split, token_bytes, eval_tokens=EVAL.eval_tokens, batch_size=4, device="cpu")
        assert {k: r[k] for k in direct} == direct
        assert r["tokens"] == EVAL.eval_tokens
        for k in ("loss", "perplexity", "bits_per_byte"):
            assert result.metrics[f"{r['model']}.{r['corpus']}.{k}"] == r[k]
    assert report["models"]["base"] == {
        "checkpoint": str(models["base"]), "step": 0, "params": load_model(models["base"]).num_params(),
    }
    assert report["corpora"]["wikitext2"]["fingerprint"] == "fp-wikitext2"

    md = result.path("report.md").read_text()
    assert result.meta["markdown"] == md
    lines = md.splitlines()
    assert [line for line in lines if line.startswith("| model |")] == [  # a table per corpus
        "| model | wikitext2 loss | wikitext2 ppl | wikitext2 bpb |",
        "| model | tinyshakespeare loss | tinyshakespeare ppl | tinyshakespeare bpb |"]
    by = {(r["model"], r["corpus"]): r for r in report["results"]}
    base_row = next(line for line in lines if line.startswith("| base |"))
    assert base_row.split(" | ")[1] == f"{by['base', 'wikitext2']['loss']:.4f}"
    delta_row = [line for line in lines if line.startswith("| Δ finetuned − base |")][1]  # tinyshakespeare's table
    delta = by["finetuned", "tinyshakespeare"]["bits_per_byte"] - by["base", "tinyshakespeare"]["bits_per_byte"]
    assert delta_row.rstrip(" |").split(" | ")[-1] == f"{delta:+.4f}"

    samples = json.loads(result.path("samples.json").read_text())
    assert samples["samples"] == report["samples"]
    assert [s["prompt"] for s in report["samples"]["finetuned"]] == EVAL.prompts
    first = report["samples"]["base"][0]
    assert "> " + (first["prompt"] + first["completion"]).split("\n")[0] in lines
    assert "## Samples" in lines and "### finetuned" in lines
    assert ("No earlier registered model to compare with: there was no champion when this model was first "
            "evaluated.") in lines

    # Deterministic: a second run elsewhere writes byte-identical reports.
    again = run_evaluate(EVAL, models, corpora, tok, tmp_path / "eval2", "evalfp", curves=curves)
    assert again.files == result.files


def test_whole_val_split_scores_all_its_bytes(pipeline, tmp_path):
    # With a budget beyond the split, every token after the first is scored, and the
    # bytes add up to the split's text bytes (end-of-text tokens count 0).
    corpora, tok = pipeline["corpora"], pipeline["tokenizer"]
    cfg = EVAL.model_copy(update={"eval_tokens": 10**6, "max_new_tokens": 0})
    result = run_evaluate(cfg, {"base": pipeline["models"]["base"]}, corpora, tok, tmp_path / "e", "fp")
    token_bytes = token_byte_lengths(load_tokenizer(tok.path("tokenizer.json")))
    for r in json.loads(result.path("report.json").read_text())["results"]:
        split = TokenSplit(Path(corpora[r["corpus"]].out_dir), "val")
        assert r["tokens"] == split.num_tokens - 1
        assert r["bytes"] == split.num_bytes - token_bytes[split.window(0, 1)[0]]
    assert "Δ" not in result.meta["markdown"]  # no delta row without both models


def test_tokenizer_mismatch_fails_before_any_work(pipeline, tmp_path):
    # A tokenizer whose file differs by one byte has another fingerprint.
    other = tmp_path / "other-tok"
    shutil.copytree(pipeline["tokenizer"].out_dir, other)
    with open(other / "tokenizer.json", "a") as f:
        f.write("\n")
    other_tok = StageResult(stage="train_tokenizer", fingerprint="other", out_dir=str(other))
    with pytest.raises(TokenizerMismatchError, match=r"corpus 'wikitext2': .*manifest.json was tokenized with tokenizer"):
        run_evaluate(EVAL, pipeline["models"], pipeline["corpora"], other_tok, tmp_path / "e", "fp")
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()


def test_checkpoint_from_another_tokenizer_is_refused(pipeline, tmp_path):
    vocab = load_tokenizer(pipeline["tokenizer"].path("tokenizer.json")).get_vocab_size()
    model = tiny_gpt(vocab_size=vocab)
    ckpt = save_checkpoint(tmp_path / "ckpt", 0, model, torch.optim.AdamW(model.parameters()), {"tokenizer_fingerprint": "0" * 64})
    models = {"base": pipeline["models"]["base"], "stranger": ckpt}
    with pytest.raises(TokenizerMismatchError, match="model 'stranger': .*state.json was trained with tokenizer '0000"):
        run_evaluate(EVAL, models, pipeline["corpora"], pipeline["tokenizer"], tmp_path / "e", "fp")


FIXTURES = REPO / "tests" / "fixtures" / "mc"


def test_multiple_choice_benchmarks_are_scored_for_every_model(pipeline, tmp_path):
    from lmpipe.config.evaluation import BenchmarkConfig
    from lmpipe.eval.benchmark_files import load_benchmark
    from lmpipe.eval.multiple_choice import score_mc

    # arc-mini comes from the Hub: the flow resolves it (lmpipe.eval.benchmark_files.resolve_benchmarks) to a file.
    benches = [BenchmarkConfig(name="arc-mini", kind="arc", hub="allenai/ai2_arc", hub_config="ARC-Easy"),
               BenchmarkConfig(name="piqa-mini", kind="piqa", path=str(FIXTURES / "piqa.jsonl"), limit=4)]
    files = {"arc-mini": FIXTURES / "arc.jsonl"}
    cfg = EVAL.model_copy(update={"benchmarks": benches, "max_new_tokens": 0})
    tok_fp = tokenizer_fingerprint(pipeline["tokenizer"].path("tokenizer.json"))
    models = {}
    for i, name in enumerate(("base", "finetuned")):  # a context long enough for the benchmarks' choices
        torch.manual_seed(20 + i)
        model = GPT(GPTConfig(vocab_size=load_tokenizer(pipeline["tokenizer"].path("tokenizer.json")).get_vocab_size(),
                              block_size=256, n_layer=2, n_head=2, n_embd=16))
        models[name] = save_checkpoint(tmp_path / f"ckpt-{name}", 0, model, torch.optim.AdamW(model.parameters()),
                                       {"tokenizer_fingerprint": tok_fp})
    with pytest.raises(ValueError, match=re.escape("eval.benchmarks.0 (arc-mini): no file to score: it has no path "
                                                   "and its Hub download was not resolved")):
        run_evaluate(cfg, models, pipeline["corpora"], pipeline["tokenizer"], tmp_path / "e", "fp")
    reference = {"name": "lmpipe-gpt", "alias": "champion", "version": "7", "run_id": "abc",
                 "metrics": {"finetuned.arc-mini.acc": 0.125, "finetuned.arc-mini.n": 6.0,
                             "finetuned.piqa-mini.acc_norm": 0.5, "finetuned.piqa-mini.n": 3.0}}
    result = run_evaluate(cfg, models, pipeline["corpora"], pipeline["tokenizer"], tmp_path / "e", "fp",
                          benchmark_files=files, reference=reference)
    report = json.loads(result.path("report.json").read_text())
    assert report["reference"] == reference
    assert [(r["model"], r["benchmark"], r["n"]) for r in report["multiple_choice"]] == [
        ("base", "arc-mini", 6), ("base", "piqa-mini", 4), ("finetuned", "arc-mini", 6), ("finetuned", "piqa-mini", 4)]
    tok = load_tokenizer(pipeline["tokenizer"].path("tokenizer.json"))
    eot = json.loads(Path(pipeline["corpora"]["wikitext2"].out_dir, "manifest.json").read_text())["eot_id"]
    for r in report["multiple_choice"]:
        bench = next(b for b in benches if b.name == r["benchmark"])
        examples, _ = load_benchmark(files.get(bench.name, bench.path), bench.kind, limit=bench.limit)
        direct = score_mc(load_model(models[r["model"]]), tok, examples, device="cpu", eot_id=eot)
        assert (r["acc"], r["acc_norm"]) == (direct.acc, direct.acc_norm)
        for m in ("acc", "acc_norm"):
            assert result.metrics[f"{r['model']}.{r['benchmark']}.{m}"] == r[m]
    lines = result.meta["markdown"].splitlines()
    assert "| model | arc-mini acc | arc-mini acc_norm | piqa-mini acc | piqa-mini acc_norm |" in lines
    by = {(r["model"], r["benchmark"]): r for r in report["multiple_choice"]}
    delta = next(line for line in lines if line.startswith("| Δ finetuned − base |") and line.count("|") == 6)
    assert delta.split(" | ")[1] == f"{by['finetuned', 'arc-mini']['acc'] - by['base', 'arc-mini']['acc']:+.4f}"
    # The champion's figures: arc-mini's acc on the same 6 examples gets a delta; piqa-mini was scored on 3
    # examples then and 4 now, so its acc_norm is marked and gets none.
    ft_arc, ft_piqa = by["finetuned", "arc-mini"], by["finetuned", "piqa-mini"]
    assert "| champion v7 | 0.1250 |  |  | 0.5000 † |" in lines
    assert f"| Δ finetuned − champion v7 | {ft_arc['acc'] - 0.125:+.4f} |  |  |  |" in lines
    assert "- piqa-mini: 3 examples then, 4 here" in lines
    assert report["compared_with_reference"] == [
        {"metric": "finetuned.arc-mini.acc", "kind": "multiple_choice", "name": "arc-mini", "stat": "acc",
         "finetuned": ft_arc["acc"], "reference": 0.125, "delta": ft_arc["acc"] - 0.125, "comparable": True,
         "scored": 6, "reference_scored": 6},
        {"metric": "finetuned.piqa-mini.acc_norm", "kind": "multiple_choice", "name": "piqa-mini", "stat": "acc_norm",
         "finetuned": ft_piqa["acc_norm"], "reference": 0.5, "delta": None, "comparable": False,
         "scored": 4, "reference_scored": 3}]
    assert result.metrics["finetuned.arc-mini.n"] == 6.0 and result.metrics["base.piqa-mini.n"] == 4.0


def test_a_bad_benchmark_file_fails_before_any_model_is_loaded(pipeline, tmp_path):
    from lmpipe.config.evaluation import BenchmarkConfig

    bad = BenchmarkConfig(name="bad", kind="hellaswag", path=str(FIXTURES / "hellaswag_bad.jsonl"))
    cfg = EVAL.model_copy(update={"benchmarks": [bad]})
    with pytest.raises(ValueError, match=r"eval\.benchmarks\.0 \(bad\): .*hellaswag_bad\.jsonl:\d+: "):
        run_evaluate(cfg, pipeline["models"], pipeline["corpora"], pipeline["tokenizer"], tmp_path / "e", "fp")
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()


def test_preflight_checks_benchmark_files_before_any_stage(tmp_path):
    from lmpipe.config.loading import load_config
    from lmpipe.stages.preflight import check_inputs

    missing = load_config(None, [f"eval.benchmarks=[{{name: b, kind: arc, path: '{tmp_path / 'nope.jsonl'}'}}]"])
    with pytest.raises(FileNotFoundError, match=r"eval\.benchmarks\.0\.path: file '.*nope\.jsonl' does not exist"):
        check_inputs(missing)
    bad = load_config(None, [f"eval.benchmarks=[{{name: b, kind: piqa, path: '{FIXTURES / 'piqa_bad.jsonl'}'}}]"])
    with pytest.raises(ValueError, match=r"piqa_bad\.jsonl:\d+: "):
        check_inputs(bad)
    check_inputs(load_config(None, [f"eval.benchmarks=[{{name: b, kind: piqa, path: '{FIXTURES / 'piqa.jsonl'}'}}]"]))
    # A Hub-only benchmark is fetched just before evaluation; a Hub benchmark's fallback file must exist.
    check_inputs(load_config(None, ["eval.benchmarks=[{name: b, kind: arc, hub: allenai/ai2_arc, "
                                    "hub_config: ARC-Easy}]"]))
    with pytest.raises(FileNotFoundError, match=r"eval\.benchmarks\.0\.path: file '.*nope\.jsonl' does not exist"):
        check_inputs(load_config(None, ["eval.benchmarks=[{name: b, kind: arc, hub: allenai/ai2_arc, "
                                        f"hub_config: ARC-Easy, path: '{tmp_path / 'nope.jsonl'}'}}]"]))


def test_a_tiny_top_p_samples_the_greedy_continuation(pipeline):
    tok = load_tokenizer(pipeline["tokenizer"].path("tokenizer.json"))
    model = tiny_gpt(seed=3, vocab_size=tok.get_vocab_size())
    kw = dict(max_new_tokens=12, top_k=None, device="cpu")
    nucleus = generate_samples(model, tok, ["ROMEO:"], temperature=1.0, top_p=1e-9, seed=1, **kw)
    assert nucleus == generate_samples(model, tok, ["ROMEO:"], temperature=0.0, seed=2, **kw)  # only the top token
    assert nucleus != generate_samples(model, tok, ["ROMEO:"], temperature=1.0, top_p=1.0, seed=1, **kw)


# ---------------------------------------------------------------- the report against an earlier registered model


def _report_rows() -> tuple[list[dict], list[dict]]:
    def row(model: str, corpus: str, loss: float, ppl: float, bpb: float) -> dict:
        return {"model": model, "corpus": corpus, "loss": loss, "perplexity": ppl, "bits_per_byte": bpb,
                "tokens": 300, "bytes": 1000}

    results = [row("base", "shake", 2.0, 7.25, 1.5), row("base", "wiki", 3.0, 20.0, 2.0),
               row("finetuned", "shake", 1.5, 4.5, 1.25), row("finetuned", "wiki", 2.5, 12.0, 1.75)]
    choice = [{"model": m, "benchmark": "piqa", "kind": "piqa", "n": 4, "acc": a, "acc_norm": an}
              for m, a, an in (("base", 0.5, 0.25), ("finetuned", 0.75, 0.5))]
    return results, choice


def test_report_shows_the_champion_and_the_deltas_to_it():
    from lmpipe.eval.report import render_markdown

    results, choice = _report_rows()
    # wiki was scored on 200 tokens at the champion's registration and 300 here: marked, no delta.
    reference = {"name": "lmpipe-gpt", "alias": "champion", "version": "3", "run_id": "r1", "metrics": {
        "finetuned.shake.loss": 1.75, "finetuned.shake.perplexity": 5.75, "finetuned.shake.bits_per_byte": 1.375,
        "finetuned.shake.tokens": 300.0, "finetuned.wiki.loss": 2.25, "finetuned.wiki.perplexity": 9.5,
        "finetuned.wiki.bits_per_byte": 1.5, "finetuned.wiki.tokens": 200.0,
        "finetuned.piqa.acc": 0.5, "finetuned.piqa.acc_norm": 0.5, "finetuned.piqa.n": 4.0}}
    lines = render_markdown(results, {}, eval_tokens=300, choice=choice, reference=reference).splitlines()
    # One table per corpus (TABLE_COLUMNS), each with its delta and champion rows.
    shake = lines[lines.index("| model | shake loss | shake ppl | shake bpb |"):]
    assert shake[2:7] == [
        "| base | 2.0000 | 7.25 | 1.5000 |",
        "| finetuned | 1.5000 | 4.50 | 1.2500 |",
        "| Δ finetuned − base | -0.5000 | -2.75 | -0.2500 |",
        "| champion v3 | 1.7500 | 5.75 | 1.3750 |",
        "| Δ finetuned − champion v3 | -0.2500 | -1.25 | -0.1250 |",
    ]
    wiki = lines[lines.index("| model | wiki loss | wiki ppl | wiki bpb |"):]
    assert wiki[2:7] == [
        "| base | 3.0000 | 20.00 | 2.0000 |",
        "| finetuned | 2.5000 | 12.00 | 1.7500 |",
        "| Δ finetuned − base | -0.5000 | -8.00 | -0.2500 |",
        "| champion v3 | 2.2500 † | 9.50 † | 1.5000 † |",
        "| Δ finetuned − champion v3 |  |  |  |",
    ]
    mc = lines[lines.index("| model | piqa acc | piqa acc_norm |"):]
    assert mc[2:7] == [
        "| base | 0.5000 | 0.2500 |",
        "| finetuned | 0.7500 | 0.5000 |",
        "| Δ finetuned − base | +0.2500 | +0.2500 |",
        "| champion v3 | 0.5000 | 0.5000 |",
        "| Δ finetuned − champion v3 | +0.2500 | +0.0000 |",
    ]
    note = lines.index("- wiki: 200 tokens then, 300 here")
    assert lines[note - 1] == (
        "champion v3: version 3 of lmpipe-gpt, @champion when this model was first evaluated. Its figures are those "
        "logged at its registration (run r1): they compare only under the same evaluation settings and data. † marks "
        "a figure scored on another amount than here, which gets no delta:")
    assert not any(line.startswith("No earlier registered model") for line in lines)

    # A champion registered before the amounts were logged: its figures are shown, none compared.
    old = {**reference, "metrics": {k: v for k, v in reference["metrics"].items() if not k.endswith((".tokens", ".n"))}}
    lines = render_markdown(results, {}, eval_tokens=300, choice=choice, reference=old).splitlines()
    assert lines.count("| Δ finetuned − champion v3 |  |  |  |") == 2  # a table per corpus
    first = lines.index("- shake: none logged tokens then, 300 here")
    assert lines[first + 1 : first + 3] == ["- wiki: none logged tokens then, 300 here",
                                            "- piqa: none logged examples then, 4 here"]

    # A champion that shares no corpus or benchmark with this evaluation: one line says so, no rows.
    other = {**reference, "metrics": {"finetuned.other.loss": 1.0, "finetuned.other.tokens": 300.0}}
    lines = render_markdown(results, {}, eval_tokens=300, choice=choice, reference=other).splitlines()
    assert "- champion v3 has no figure for any corpus or benchmark evaluated here." in lines
    assert not any(line.startswith("| champion v3") for line in lines)


def test_report_without_a_champion_says_so_in_one_line():
    from lmpipe.eval.report import render_markdown

    results, choice = _report_rows()
    lines = render_markdown(results, {}, eval_tokens=300, choice=choice).splitlines()
    assert [line for line in lines if "champion" in line] == [
        "No earlier registered model to compare with: there was no champion when this model was first evaluated."
    ]


# ---------------------------------------------------------------- held-out SFT examples (finetune.mode=sft)

SFT_BLOCK = 64


def write_sft(path: Path, n: int = 60) -> Path:
    """n short chat examples from Tiny Shakespeare's lines, every 7th a multi-turn conversation with a system turn."""
    lines = [" ".join(line.split()[:4]) for line in (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
             .splitlines() if line.strip()]
    rows = []
    for i in range(n):
        a, b, c = lines[3 * i : 3 * i + 3]
        short = [" ".join(x.split()[:2]) for x in (a, b, c)]
        rows.append({"messages": [{"role": "system", "content": "Verse."}, {"role": "user", "content": short[0]},
                                  {"role": "assistant", "content": short[1]}, {"role": "user", "content": "Again."},
                                  {"role": "assistant", "content": short[2]}]} if i % 7 == 3
                    else {"prompt": a, "completion": b + "\n" + c[: i % 9]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_gpt(seed: int, vocab_size: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=SFT_BLOCK, n_layer=2, n_head=2, n_embd=16)).eval()


def hand_sft_score(model: GPT, path: Path, tok, eot: int, token_bytes: np.ndarray) -> tuple[float, int, int, int]:
    """(summed nats, scored targets, their bytes, examples) of the held-out examples, each run through the model
    alone from position 0: the cross-entropy of every target whose loss mask is 1, as fine-tuning trains it."""
    from lmpipe.data.sft import chat_token_ids, encode_chat, read_sft_examples, split_indices

    examples = read_sft_examples(path).examples
    encoded = encode_chat([e.messages for e in examples], tok, chat_token_ids(tok, eot))
    _, val = split_indices(len(examples))
    nats, count, n_bytes = 0.0, 0, 0
    for i in val:
        ids, mask = (torch.tensor(v) for v in encoded[i])
        with torch.no_grad():
            logits, _ = model(ids[None, :-1], ids[None, 1:])  # (1, n-1, V)
        ce = torch.nn.functional.cross_entropy(logits[0].double(), ids[1:], reduction="none")  # (n-1,)
        keep = mask[1:] == 1
        nats += float(ce[keep].sum())
        count += int(keep.sum())
        n_bytes += int(token_bytes[ids[1:][keep].numpy()].sum())
    return nats, count, n_bytes, len(val)


def test_sft_score_is_the_masked_cross_entropy_of_each_held_out_example_alone_in_either_layout(pipeline, tmp_path):
    from lmpipe.data.sft import build_sft_data
    from lmpipe.eval.heldout import score_sft

    tok = load_tokenizer(pipeline["tokenizer"].path("tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    token_bytes = token_byte_lengths(tok)
    path = write_sft(tmp_path / "sft.jsonl")
    model = sft_gpt(seed=4, vocab_size=tok.get_vocab_size())
    nats, count, n_bytes, n_val = hand_sft_score(model, path, tok, eot, token_bytes)
    assert n_val == 6 and 0 < count and 0 < n_bytes

    scores = {}
    for layout in ("padded", "packed"):
        data = build_sft_data(path, tok, eot, SFT_BLOCK, layout=layout)
        scores[layout] = r = score_sft(model, data, token_bytes, eot_id=eot, batch_size=3, device="cpu")
        assert (r["tokens"], r["bytes"], r["examples"]) == (count, n_bytes, n_val)
        torch.testing.assert_close(r["loss"], nats / count, rtol=1e-5, atol=0)
        torch.testing.assert_close(r["perplexity"], math.exp(nats / count), rtol=1e-5, atol=0)
        torch.testing.assert_close(r["bits_per_byte"], nats / math.log(2) / n_bytes, rtol=1e-5, atol=0)
        if layout == "packed":  # the examples share windows: fewer windows than examples
            assert len(data.val_tokens) - 1 < n_val * SFT_BLOCK
    # The same examples, seen alone in both layouts: the same figures (to float rounding).
    torch.testing.assert_close(scores["packed"]["loss"], scores["padded"]["loss"], rtol=1e-5, atol=0)
    # Unmasked, the packed windows would score other targets (user turns, padding): the mask decides.
    data = build_sft_data(path, tok, eot, SFT_BLOCK, layout="packed")
    whole = evaluate_loss(model, ArraySplit(data.val_tokens), token_bytes, eval_tokens=10**6, batch_size=3,
                          device="cpu", doc_sep=eot)
    assert whole["tokens"] == len(data.val_tokens) - 1 > count
    with pytest.raises(ValueError, match="laid out for another block_size"):
        score_sft(GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=40, n_layer=1, n_head=1, n_embd=8)),
                  data, token_bytes, eot_id=eot, batch_size=3, device="cpu")


def sft_checkpoints(pipeline, root: Path) -> dict[str, Path]:
    tok_path = pipeline["tokenizer"].path("tokenizer.json")
    vocab = load_tokenizer(tok_path).get_vocab_size()
    models = {}
    for i, name in enumerate(("base", "finetuned")):
        model = sft_gpt(seed=20 + i, vocab_size=vocab)
        models[name] = save_checkpoint(root / f"ckpt-{name}", 0, model, torch.optim.AdamW(model.parameters()),
                                       {"tokenizer_fingerprint": tokenizer_fingerprint(tok_path)})
    return models


def held_out(tok_stage, tmp_path: Path, layout: str, block_size: int = SFT_BLOCK) -> Path:
    """The held-out SFT examples of write_sft's file as the fine-tuning stage writes them (lmpipe.stages.finetune)."""
    from lmpipe.data.sft import HELD_OUT_FILE, build_sft_data, write_held_out

    tok = load_tokenizer(tok_stage.path("tokenizer.json"))
    path = write_sft(tmp_path / "sft.jsonl")
    data = build_sft_data(path, tok, tok.token_to_id("<|endoftext|>"), block_size, layout=layout)
    out = tmp_path / "finetune-out"
    out.mkdir()
    assert write_held_out(data, out, {"path": str(path), "layout": layout, "block_size": block_size,
                                      "skip_long": False, "skip_bad": False}) == {"sft_held_out": HELD_OUT_FILE}
    return out / HELD_OUT_FILE


def test_held_out_sft_examples_round_trip(pipeline, tmp_path):
    from lmpipe.data.sft import build_sft_data, read_held_out

    tok = load_tokenizer(pipeline["tokenizer"].path("tokenizer.json"))
    data = build_sft_data(write_sft(tmp_path / "sft.jsonl"), tok, tok.token_to_id("<|endoftext|>"), SFT_BLOCK,
                          layout="packed")
    (tmp_path / "h").mkdir()
    back = read_held_out(held_out(pipeline["tokenizer"], tmp_path / "h", "packed"))
    assert np.array_equal(back.data.val_tokens, data.val_tokens) and np.array_equal(back.data.val_mask, data.val_mask)
    assert back.data.val_tokens.dtype == data.val_tokens.dtype and back.data.meta() == data.meta()
    assert back.block_size == SFT_BLOCK and back.source["layout"] == "packed"
    assert len(back.data.train_tokens) == 0  # only what evaluation scores is handed over


def test_run_evaluate_scores_every_model_on_the_held_out_sft_examples(pipeline, tmp_path):
    import lmpipe.stages.evaluate as evaluate
    from lmpipe.data.sft import build_sft_data
    from lmpipe.eval.heldout import score_sft

    corpora, tok_stage = pipeline["corpora"], pipeline["tokenizer"]
    models = sft_checkpoints(pipeline, tmp_path)
    sft = held_out(tok_stage, tmp_path, "packed")
    result = run_evaluate(EVAL, models, corpora, tok_stage, tmp_path / "eval", "evalfp", sft=sft)

    stats = ("loss", "perplexity", "bits_per_byte", "tokens", "examples")
    assert {k for k in result.metrics if "sft/val" in k} == {f"{m}.sft/val.{s}" for m in ("base", "finetuned")
                                                              for s in stats}
    tok = load_tokenizer(tok_stage.path("tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    data = build_sft_data(tmp_path / "sft.jsonl", tok, eot, SFT_BLOCK, layout="packed")  # as fine-tuning built it
    report = json.loads(result.path("report.json").read_text())
    rows = {r["model"]: r for r in report["results"] if r["corpus"] == "sft/val"}
    for name in ("base", "finetuned"):
        direct = score_sft(load_model(models[name]), data, token_byte_lengths(tok), eot_id=eot, batch_size=4,
                           device="cpu")
        assert {k: rows[name][k] for k in direct} == direct
        assert {s: result.metrics[f"{name}.sft/val.{s}"] for s in stats} == {s: float(direct[s]) for s in stats}
    assert rows["base"]["examples"] == 6 and rows["base"]["tokens"] == rows["finetuned"]["tokens"]
    assert report["sft"] == {"path": str(tmp_path / "sft.jsonl"), "layout": "packed", "block_size": SFT_BLOCK,
                             "skip_long": False, "skip_bad": False, **data.meta()}
    assert report["sft"]["sft_val_examples"] == 6
    # The corpora are scored as before, beside it.
    assert [(r["model"], r["corpus"]) for r in report["results"]] == [
        (m, c) for m in ("base", "finetuned") for c in ("wikitext2", "tinyshakespeare", "sft/val")]

    lines = result.meta["markdown"].splitlines()
    assert [line for line in lines if line.startswith("| model |")][-1] == "| model | sft/val loss | sft/val ppl | sft/val bpb |"
    finetuned_row = [line for line in lines if line.startswith("| finetuned |")][-1]
    assert finetuned_row.rstrip(" |").split(" | ")[-3:] == [
        f"{rows['finetuned']['loss']:.4f}", f"{rows['finetuned']['perplexity']:.2f}",
        f"{rows['finetuned']['bits_per_byte']:.4f}"]
    delta_row = [line for line in lines if line.startswith("| Δ finetuned − base |")][-1]
    delta = rows["finetuned"]["bits_per_byte"] - rows["base"]["bits_per_byte"]
    assert delta_row.rstrip(" |").split(" | ")[-1] == f"{delta:+.4f}"
    assert (f"- finetuned on sft/val: {rows['finetuned']['tokens']:,} assistant target tokens in 6 examples, "
            f"{rows['finetuned']['bytes']:,} bytes") in lines
    assert any(line.startswith("`sft/val`: all the held-out examples of the fine-tuning run's finetune.sft_path (every "
                                   "10th example it kept, or more when those are too few for the champion gate)")
               for line in lines)

    # A champion's sft/val figures get its row and delta like a corpus's (lmpipe.tracking.registry.champion_metrics).
    reference = {"name": "m", "alias": "champion", "version": "2", "run_id": "r", "metrics": {
        "finetuned.sft/val.loss": 1.0, "finetuned.sft/val.perplexity": 2.0, "finetuned.sft/val.bits_per_byte": 0.5,
        "finetuned.sft/val.tokens": float(rows["finetuned"]["tokens"])}}
    md = evaluate.render_markdown(report["results"], {}, eval_tokens=EVAL.eval_tokens, reference=reference)
    champion_delta = next(line for line in md.splitlines() if line.startswith("| Δ finetuned − champion v2 |"))
    assert champion_delta.rstrip(" |").split(" | ")[-1] == f"{rows['finetuned']['bits_per_byte'] - 0.5:+.4f}"


def test_sft_held_out_needs_models_of_its_block_size_and_its_file_before_any_work(pipeline, tmp_path):
    sft = held_out(pipeline["tokenizer"], tmp_path, "padded")
    with pytest.raises(ValueError, match=r"model 'base': .*state.json has block_size 8, but the held-out SFT "
                                         r"examples are laid out in windows of model.block_size=64"):
        run_evaluate(EVAL, pipeline["models"], pipeline["corpora"], pipeline["tokenizer"], tmp_path / "e", "fp",
                     sft=sft)
    with pytest.raises(FileNotFoundError, match="held-out SFT examples .*nope.npz' do not exist"):
        run_evaluate(EVAL, sft_checkpoints(pipeline, tmp_path), pipeline["corpora"], pipeline["tokenizer"],
                     tmp_path / "e", "fp", sft=tmp_path / "nope.npz")
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()


def test_the_evaluation_fingerprint_follows_the_fine_tuned_model():
    from tasks.stages import EVALUATE

    def fp(finetuned: str) -> str:
        up = StageResult(stage="x", fingerprint="up", out_dir="unused")
        tuned = StageResult(stage="finetune", fingerprint=finetuned, out_dir="unused",
                            meta={"sft_held_out": "sft_val.npz"})
        return EVALUATE.fingerprint({"cfg": EVAL, "benchmark_sha256": None, "reference": None,
                                     "models": {"base": up, "finetuned": tuned}, "corpora": {}, "tokenizer": up})

    # the SFT file's content and settings are the fine-tuning stage's inputs: they reach evaluation through it
    assert fp("a") == fp("a") != fp("b")
