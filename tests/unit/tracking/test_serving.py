"""The served model and the model commands against a real MLflow store: URI forms, shared generation
settings, the empty prompt, a missing store, no spurious MLflow warning. No pipeline run: one tiny
model is registered the way the register stage registers it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient

from flows.cli import main
from lmpipe.config.base import EOT
from lmpipe.model.generation_settings import GENERATION_DEFAULTS, generation_params
from lmpipe.tracking.uris import MODEL_URI_FORMS
from tests.conftest import REPO


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    """A tiny GPT registered as version 1 of 'm' (alias candidate) in a fresh SQLite store."""
    import torch

    from lmpipe.config.evaluation import TrackingConfig
    from lmpipe.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from lmpipe.model.checkpoint import export_model
    from lmpipe.model.gpt import GPT, GPTConfig
    from lmpipe.tracking.registry import register_model
    from lmpipe.tracking.runs import StageRun
    from lmpipe.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(root / "art").as_uri())
    run = StageRun(uri, client.create_run(exp).info.run_id)
    tok_file = tokenizer.path("tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=load_tokenizer(tok_file).get_vocab_size(), block_size=16, n_layer=1,
                          n_head=2, n_embd=16))
    ckpt = save_checkpoint(root / "ckpts", 1, model, torch.optim.AdamW(model.parameters()),
                           {"tokenizer_fingerprint": tokenizer_fingerprint(tok_file)})
    export_model(ckpt, root / "ft" / "model")
    info = register_model(run, TrackingConfig(registered_model="m"), root / "ft" / "model", Path(tokenizer.out_dir),
                          ["torch"])
    client.set_terminated(run.run_id)
    client.set_registered_model_alias("m", "candidate", info["version"])
    return SimpleNamespace(uri=uri, run_id=run.run_id, info=info, checkpoint=root / "ft" / "model",
                           tokenizer_dir=Path(tokenizer.out_dir), root=root)


def _reference(served, prompts: list[str], **params) -> list[str]:
    """What generate_samples gives for these prompts (an empty one starting at the end-of-text token)."""
    from lmpipe.data.tokenizer import load_tokenizer
    from lmpipe.eval.samples import generate_samples
    from lmpipe.model.checkpoint import load_model

    tok = load_tokenizer(served.tokenizer_dir / "tokenizer.json")
    samples = generate_samples(load_model(served.checkpoint), tok, prompts, **{**GENERATION_DEFAULTS, **params},
                               device="cpu", start_id=tok.token_to_id(EOT))
    return [s["completion"] for s in samples]


def test_generation_params_one_set_of_defaults_and_checks():
    assert GENERATION_DEFAULTS == {"max_new_tokens": 64, "temperature": 0.8, "top_k": None, "top_p": None, "seed": 0}
    assert generation_params() == GENERATION_DEFAULTS
    # None (JSON null) is the default; an integral float is an integer
    assert generation_params({"max_new_tokens": None, "top_k": 5.0, "top_p": 1, "seed": None}) == {
        "max_new_tokens": 64, "temperature": 0.8, "top_k": 5, "top_p": 1.0, "seed": 0}
    for params, message in [
        ({"top_p": 0.0}, "top_p must be in (0, 1] (or left out: no nucleus filtering), got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1] (or left out: no nucleus filtering), got 1.5"),
        ({"top_k": 0}, "top_k must be an integer >= 1 (or left out: no top-k filtering), got 0"),
        ({"max_new_tokens": -3}, "max_new_tokens must be an integer >= 0, got -3"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 0, got 2.5"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 0, got True"),
        ({"temperature": -0.1}, "temperature must be a number >= 0 (0: greedy), got -0.1"),
        ({"temperature": float("nan")}, "temperature must be a number >= 0 (0: greedy), got nan"),
        ({"seed": "7"}, "seed must be an integer, got '7'"),
        ({"topk": 5}, "unknown generation parameter(s) ['topk']; expected "
                      "['max_new_tokens', 'seed', 'temperature', 'top_k', 'top_p']"),
    ]:
        with pytest.raises(ValueError) as err:
            generation_params(params)
        assert str(err.value) == message


def test_every_advertised_model_uri_resolves_to_the_registered_files(served, tmp_path):
    from lmpipe.tracking.registry import download_model_files

    with (served.checkpoint / "model.safetensors").open("rb") as f:
        weights = f.read()
    uris = [f"runs:/{served.run_id}/model", served.info["logged_model_uri"], "models:/m/1", "models:/m/latest",
            "models:/m@candidate"]
    assert served.info["logged_model_uri"].startswith("models:/m-")
    for i, uri in enumerate(uris):
        checkpoint, tokenizer_dir = download_model_files(uri, served.uri, tmp_path / str(i))
        assert (checkpoint / "model.safetensors").read_bytes() == weights, uri
        assert (tokenizer_dir / "tokenizer.json").read_bytes() == (served.tokenizer_dir / "tokenizer.json").read_bytes()
    # A registered model's name alone names no version: the error lists what is accepted.
    with pytest.raises(ValueError) as err:
        download_model_files("models:/m", served.uri, tmp_path / "x")
    assert str(err.value) == f"model 'models:/m' names no version: accepted forms are {MODEL_URI_FORMS}"
    assert MODEL_URI_FORMS == ("models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest, "
                               "models:/m-<model id>, runs:/<run id>/model")
    with pytest.raises(FileNotFoundError) as err:
        download_model_files("models:/nope/latest", served.uri, tmp_path / "y")
    assert str(err.value) == f"model 'models:/nope/latest' could not be found in {served.uri}: Registered model " \
                             "'nope' has no versions"
    # The CLI takes them all (run id and logged model id included).
    for i, uri in enumerate((f"runs:/{served.run_id}/model", served.info["logged_model_uri"])):
        assert main(["export", uri, "--tracking-uri", served.uri, str(tmp_path / f"hf{i}")]) == 0
        assert (tmp_path / f"hf{i}" / "model.safetensors").is_file()


def test_a_missing_sqlite_store_is_named_and_not_created(served, tmp_path, capsys):
    from lmpipe.tracking.registry import download_model_files

    elsewhere = (tmp_path / "not-a-run").resolve()
    assert main(["generate", "models:/m@candidate", "--workdir", str(elsewhere), "-p", "x"]) == 1
    assert capsys.readouterr().err == (
        f"lmpipe generate: model 'models:/m@candidate': there is no MLflow store at {elsewhere / 'mlflow.db'} "
        f"(--workdir '{elsewhere}' is not a pipeline's work directory); pass the run's --workdir or --tracking-uri\n")
    missing = f"sqlite:///{tmp_path / 'typo.db'}"
    assert main(["evaluate", "models:/m@candidate", "--tracking-uri", missing, "-t", __file__]) == 1
    assert capsys.readouterr().err == (f"lmpipe evaluate: model 'models:/m@candidate': the MLflow store "
                                       f"{tmp_path / 'typo.db'} does not exist ({missing})\n")
    with pytest.raises(FileNotFoundError):
        download_model_files("models:/m/1", missing, tmp_path / "dl")
    assert not elsewhere.exists() and not (tmp_path / "typo.db").exists()


def test_served_model_checks_and_defaults_params_as_lmpipe_generate(served, tmp_path, capsys):
    mlflow.set_tracking_uri(served.uri)
    model = mlflow.pyfunc.load_model("models:/m@candidate")
    expected = _reference(served, ["ROMEO:"])
    # The defaults: the served model's and `lmpipe generate`'s are GENERATION_DEFAULTS; null is the default.
    assert model.predict(["ROMEO:"]) == expected
    assert model.predict(["ROMEO:"], params={"top_k": None, "top_p": None, "max_new_tokens": None}) == expected
    assert main(["generate", "models:/m@candidate", "--tracking-uri", served.uri, "-p", "ROMEO:"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + expected[0] + "\n"
    assert model.predict(["ROMEO:"], params={"top_k": 3, "top_p": 0.5, "max_new_tokens": 4, "seed": 9}) == \
        _reference(served, ["ROMEO:"], top_k=3, top_p=0.5, max_new_tokens=4, seed=9)
    # The checks, and their messages, are lmpipe generate's.
    for params, message in [({"top_p": 0.0}, "top_p must be in (0, 1] (or left out: no nucleus filtering), got 0.0"),
                            ({"top_k": 0}, "top_k must be an integer >= 1 (or left out: no top-k filtering), got 0"),
                            ({"max_new_tokens": -3}, "max_new_tokens must be an integer >= 0, got -3")]:
        with pytest.raises(ValueError) as err:
            model.predict(["ROMEO:"], params=params)
        assert str(err.value) == message
    # A prompt that is not a string is named by its index (None arrives as a missing value).
    for bad, what in [(None, "missing (null)"), (3, "3 (int)")]:
        with pytest.raises(ValueError) as err:
            model.predict(["ROMEO:", bad])
        assert str(err.value) == f'prompt 1 is {what}: every prompt must be a string ("" generates from the start ' \
                                 'of a document)'


def test_an_empty_prompt_generates_from_the_end_of_text_token(served, tmp_path, capsys):
    mlflow.set_tracking_uri(served.uri)
    expected = _reference(served, ["", "ROMEO:"], max_new_tokens=8)
    assert expected[0]  # something was generated from nothing
    assert mlflow.pyfunc.load_model("models:/m/1").predict(["", "ROMEO:"], params={"max_new_tokens": 8}) == expected
    assert main(["generate", str(served.checkpoint), "--tokenizer", str(served.tokenizer_dir), "--workdir",
                 str(tmp_path), "-p", "", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"


def test_served_model_loads_on_cuda_when_the_machine_has_it(served, monkeypatch):
    import torch

    import lmpipe.model.checkpoint
    from lmpipe.tracking.serving import GPTTextGenerator

    devices = []
    real = lmpipe.model.checkpoint.load_model

    def load_model(path, device="cpu"):  # records the device, loads on the CPU this test runs on
        devices.append(device)
        return real(path)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lmpipe.model.checkpoint, "load_model", load_model)
    generator = GPTTextGenerator()
    generator.load_context(SimpleNamespace(artifacts={
        "checkpoint": str(served.checkpoint), "tokenizer": str(served.tokenizer_dir / "tokenizer.json"),
        "tokenizer_meta": str(served.tokenizer_dir / "tokenizer_meta.json")}))
    assert devices == ["cuda"] and generator.device == "cuda"
    assert generator.start_id == generator.tokenizer.token_to_id(EOT)


def test_registry_commands_and_pyfunc_loading_print_no_mlflow_type_hint_warning(served, tmp_path):
    script = (
        "import sys, mlflow\n"
        "from flows.cli import main\n"
        "uri = sys.argv[1]\n"
        "assert main(['generate', 'models:/m@candidate', '--tracking-uri', uri, '-p', 'a',\n"
        "             '--max-new-tokens', '2']) == 0\n"
        "mlflow.set_tracking_uri(uri)\n"
        "print(mlflow.pyfunc.load_model('models:/m@candidate').predict(['a'], params={'max_new_tokens': 2}))\n"
    )
    done = subprocess.run([sys.executable, "-W", "default", "-c", script, served.uri], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "type hints" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_config_says_where_the_model_is_and_options_win_over_it(served, tmp_path, capsys):
    import shutil

    from lmpipe.data.tokenizer import tokenizer_fingerprint
    from tests.servers import free_port

    workdir = tmp_path / "run"  # a work directory with the model's tokenizer stage, and no MLflow store
    shutil.copytree(served.tokenizer_dir, workdir / "train_tokenizer" / "fp")
    preset = tmp_path / "run.yaml"
    preset.write_text(f"workdir: {workdir}\ntracking: {{uri: '{served.uri}', min_held_out_tokens: 5}}\n"
                      f"eval: {{eval_tokens: 5}}\n")
    args = ["-p", "ROMEO:", "--max-new-tokens", "4"]
    assert main(["generate", "models:/m@candidate", "--tracking-uri", served.uri, *args]) == 0
    expected = capsys.readouterr().out
    # The registry from tracking.uri; a checkpoint directory's tokenizer found under workdir.
    assert main(["generate", "models:/m@candidate", "--config", str(preset), *args]) == 0
    assert capsys.readouterr().out == expected
    assert main(["generate", str(served.checkpoint), "-c", str(preset), *args]) == 0
    assert capsys.readouterr().out == expected
    # evaluate scores eval.eval_tokens of the config; --eval-tokens wins.
    text = tmp_path / "speech.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n", encoding="utf-8")
    for extra, tokens in (([], "5"), (["--eval-tokens", "3"], "3")):
        assert main(["evaluate", "models:/m@candidate", "-c", str(preset), "-t", str(text), *extra]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["speech.txt", tokens]
    # export: the registered model from tracking.uri, and the checkpoint with its tokenizer found under workdir.
    exports = {"models:/m@candidate": tmp_path / "hf-registry", str(served.checkpoint): tmp_path / "hf-checkpoint"}
    for model, dest in exports.items():
        assert main(["export", model, "-c", str(preset), str(dest)]) == 0
        assert capsys.readouterr().out.startswith(f"exported {model} to {dest}\n")
    files = [{p.name: p.read_bytes() for p in sorted(dest.iterdir())} for dest in exports.values()]
    assert files[0] == files[1] and list(files[0]) == ["README.md", "config.json", "generation_config.json",
                                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]

    # --workdir wins over workdir: no tokenizer stage there.
    elsewhere = tmp_path / "elsewhere"
    fp = tokenizer_fingerprint(served.tokenizer_dir / "tokenizer.json")
    assert main(["generate", str(served.checkpoint), "-c", str(preset), "--workdir", str(elsewhere), *args]) == 1
    assert capsys.readouterr().err == (
        f"lmpipe generate: model '{served.checkpoint}' was trained with tokenizer {fp}, which is not among the "
        f"tokenizer stages under '{elsewhere / 'train_tokenizer'}'; pass --tokenizer DIR\n")
    # A config without tracking.uri: its workdir's store, which is not there; --tracking-uri wins.
    local = tmp_path / "local.yaml"
    local.write_text(f"workdir: {workdir}\n")
    assert main(["export", "models:/m@candidate", "-c", str(local), str(tmp_path / "hf")]) == 1
    assert capsys.readouterr().err == (
        f"lmpipe export: model 'models:/m@candidate': there is no MLflow store at {workdir / 'mlflow.db'} "
        f"(--config {local}: workdir '{workdir}' is not a pipeline's work directory); pass the run's --workdir "
        "or --tracking-uri\n")
    assert main(["export", "models:/m@candidate", "-c", str(local), "--tracking-uri", served.uri,
                 str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    # A server that is down is named by the config field that gave it.
    dead = f"http://127.0.0.1:{free_port()}"
    remote = tmp_path / "remote.yaml"
    remote.write_text(f"tracking: {{uri: '{dead}'}}\n")
    assert main(["generate", "models:/m@candidate", "-c", str(remote), *args]) == 1
    assert capsys.readouterr().err.startswith(
        f"lmpipe generate: --config {remote}: tracking.uri='{dead}': no MLflow tracking server answers at {dead}/health")
    # A config that cannot be read is a configuration error (exit 2), before anything is looked up.
    assert main(["evaluate", "models:/m@candidate", "-c", str(tmp_path / "nope.yaml"), "-t", str(text)]) == 2
    assert capsys.readouterr().err == f"lmpipe: config file '{tmp_path / 'nope.yaml'}' does not exist\n"
    assert not elsewhere.exists() and not (workdir / "mlflow.db").exists()
