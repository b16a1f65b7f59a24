"""No model, tokenizer or config is ever loaded with remote code: every ``from_pretrained`` and
``from_config`` call in the product passes ``trust_remote_code=False`` explicitly (without it,
transformers may stop at an interactive "[y/N]" prompt)."""

import ast

import pytest

from helpers import REPO_ROOT

FOLDERS = ("altpo", "benchmarks", "examples", "kernels")


def _loader_calls():
    for folder in FOLDERS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("from_pretrained", "from_config")):
                    yield f"{path.relative_to(REPO_ROOT)}:{node.lineno}", node


def test_there_are_loader_calls_to_check():
    assert len(list(_loader_calls())) >= 8


@pytest.mark.parametrize("where, node", list(_loader_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_load_passes_trust_remote_code_false(where, node):
    flags = [k for k in node.keywords if k.arg == "trust_remote_code"]
    assert flags, f"{where}: from_pretrained without trust_remote_code=False"
    assert isinstance(flags[0].value, ast.Constant) and flags[0].value.value is False, where


def test_the_loaders_pass_it_at_run_time(tmp_path, monkeypatch):
    """The flag reaches transformers from both loaders (a fake records the keyword)."""
    import transformers

    from altpo.model import loading

    seen = []

    class Fake:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "missing"))
            raise OSError("stop here")

    monkeypatch.setattr(transformers, "AutoTokenizer", Fake)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Fake)
    (tmp_path / "config.json").write_text("{}")
    for call in (lambda: loading.load_tokenizer(str(tmp_path)),
                 lambda: loading.load_causal_lm(str(tmp_path), None),
                 lambda: loading.load_model_and_tokenizer(str(tmp_path), device="cpu")):
        with pytest.raises(loading.UserError):
            call()
    assert seen == [False, False, False]
