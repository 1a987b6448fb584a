"""Stage fingerprints: one hash links the Prefect cache key, the MLflow tag and the files on disk.

A fingerprint covers the stage's config section, its upstream fingerprints and
its code version (a hash of the code of the module the stage runs and of every
lmpipe module that one imports), so a change to any of them re-runs the stage
and everything downstream, and nothing else. The code is hashed as its syntax
tree without docstrings, comments and config fields' ``description=`` texts:
editing a description re-runs nothing.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import threading
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# The modules each stage runs. Its code version covers them and every lmpipe module they import
# at module level, transitively, so a helper edited anywhere below a stage re-runs it. Imports
# inside functions are not followed: they reach code that does not decide the stage's output
# (distributed.py's rank 0 logging to MLflow, the served pyfunc model loading evaluate.py), or
# code only another stage runs (train.py imports sft.py in run_finetune: editing the SFT reader
# re-runs fine-tuning, not pretraining). lmpipe.config is followed: besides the values the
# fingerprint holds, it computes some (sequences_per_step), so editing its code re-runs every
# stage; editing a field's description (or any docstring or comment) re-runs none.
STAGE_ENTRY: dict[str, tuple[str, ...]] = {
    "download": ("lmpipe.stages.download",),
    "clean_chunk": ("lmpipe.stages.clean",),
    "clean": ("lmpipe.stages.clean",),
    "train_tokenizer": ("lmpipe.stages.tokenizer",),
    "encode_chunk": ("lmpipe.stages.shard",),
    "shard": ("lmpipe.stages.shard",),
    "pretrain": ("lmpipe.stages.pretrain", "lmpipe.stages.torchrun_worker"),
    "finetune": ("lmpipe.stages.finetune",),
    "classify": ("lmpipe.stages.classify",),
    "evaluate": ("lmpipe.stages.evaluate",),
    "register": ("lmpipe.stages.register",),
    "champion": ("lmpipe.stages.champion",),
    "continue": ("lmpipe.stages.continual",),
}
PACKAGE = "lmpipe"

FINGERPRINT_CHARS = 16


def _origin(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"module {name} not found")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    """Whether ``name`` is a module, found without running it (``pkg.module.attribute`` is not)."""
    parent = importlib.util.find_spec(name.rpartition(".")[0])  # imports only the parent's packages
    return parent is not None and parent.submodule_search_locations is not None \
        and importlib.util.find_spec(name) is not None


def _module_imports(name: str, source: str, package: str) -> set[str]:
    """Modules of ``package`` that ``source`` (module ``name``) imports in its top-level statements."""
    found: set[str] = set()
    for node in ast.parse(source, filename=name).body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                base = name.rsplit(".", node.level)[0]
                mod = f"{base}.{mod}" if mod else base
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module` names a module
    return {m for m in found if m.startswith(package + ".") and _is_module(m)}


def stage_modules(entry: str, package: str = PACKAGE) -> tuple[str, ...]:
    """``entry`` and the modules of ``package`` it imports at module level, transitively, sorted."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += sorted(_imports_of(_file_key(name), package) - seen)
    return tuple(sorted(seen))


def _file_key(name: str) -> tuple[str, str, int, int]:
    """A module's name, file, modification time and size: what the per-module caches below are keyed on."""
    origin = _origin(name)
    stat = origin.stat()
    return name, str(origin), stat.st_mtime_ns, stat.st_size


@cache
def _imports_of(key: tuple[str, str, int, int], package: str) -> frozenset[str]:
    name, origin = key[:2]
    return frozenset(_module_imports(name, Path(origin).read_text(encoding="utf-8"), package))


def _is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
        and isinstance(statement.value.value, str)


def _called_name(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def code_text(source: str, filename: str = "<module>") -> str:
    """What a module computes, as text: its syntax tree without docstrings, comments and field descriptions
    (``ast.dump`` leaves out line numbers, so moving code up or down does not count either).

    Dropped: docstrings (a string constant opening a module, class or function body) and the
    ``description=`` of pydantic ``Field(...)`` calls (text of the config's JSON schema and README);
    comments are not in the syntax tree at all.
    """
    tree = ast.parse(source, filename=filename)
    for node in ast.walk(tree):  # a node's children are queued before it is handed out: editing it here is safe
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]
        elif isinstance(node, ast.Call) and _called_name(node.func) == "Field":
            node.keywords = [k for k in node.keywords if k.arg != "description"]
    return ast.dump(tree)


@cache
def _module_code(key: tuple[str, str, int, int]) -> bytes:
    """A module's :func:`code_text`, once per version of its file (every stage's closure shares most modules)."""
    origin = key[1]
    return code_text(Path(origin).read_text(encoding="utf-8"), origin).encode()


def source_hash(modules: tuple[str, ...]) -> str:
    """sha256 over the names and code (:func:`code_text`) of ``modules`` (short)."""
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0" + _module_code(_file_key(name)) + b"\0")
    return h.hexdigest()[:FINGERPRINT_CHARS]


# ast.parse is not safe to call from two threads at once in CPython 3.11 ("AST constructor recursion depth
# mismatch"), and stage tasks run in threads (chunk tasks, concurrent stages): one at a time computes.
_PARSING = threading.Lock()


def code_version(stage: str) -> str:
    """Hash of the code of every module that decides the stage's output."""
    with _PARSING:
        return _code_version(stage)


@cache
def _code_version(stage: str) -> str:
    return source_hash(tuple(sorted({m for entry in STAGE_ENTRY[stage] for m in stage_modules(entry)})))


def _plain(obj: Any) -> Any:
    """json.dumps fallback: config sections become their JSON form, wherever they are nested."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}")


def stage_fingerprint(stage: str, config: Any, upstream: list[str] | tuple[str, ...] = ()) -> str:
    """Deterministic hash of (stage, config, upstream fingerprints, code version)."""
    payload = json.dumps(
        {"stage": stage, "config": config, "upstream": list(upstream), "code": code_version(stage)},
        sort_keys=True,
        separators=(",", ":"),
        default=_plain,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:FINGERPRINT_CHARS]
