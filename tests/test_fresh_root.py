"""Nothing in the repository shadows an installed package when the repository root is first on
``sys.path`` (``python -m pytest``, ``python -m benchmarks.step``, ``torchrun -m altpo.cli`` from the
root all put it there).

transformers 5.x depends on Hugging Face's package ``kernels``; the kernel sources live under
``kernels/altpo_kernels/`` so that the repository's ``kernels/`` folder is no package and
``import kernels`` finds the installed one.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys

from helpers import REPO_ROOT, TOFU_FIXTURE, base_settings, build_model_folder, cli_flags, torchrun


def _from_root(code: str) -> subprocess.CompletedProcess:
    """``python -c CODE`` run in the repository root: '' (the root) is first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_transformers_llama_imports_from_the_repo_root():
    proc = _from_root("import sys; assert sys.path[0] == '', sys.path[:2]\n"
                      "import transformers.models.llama.modeling_llama\n"
                      "import altpo_kernels, altpo.cli\n")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_import_kernels_from_the_root_never_finds_the_repo_folder():
    proc = _from_root("import json\n"
                      "try:\n"
                      "    import kernels\n"
                      "    print(json.dumps([getattr(kernels, '__file__', None), list(kernels.__path__)]))\n"
                      "except ModuleNotFoundError:\n"
                      "    print(json.dumps(None))\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    repo_kernels = str(REPO_ROOT / "kernels")
    if found is not None:
        file, paths = found
        assert file is not None and not file.startswith(repo_kernels), found
        assert repo_kernels not in paths, found
    # the transformers release in use depends on `kernels` (5.x does), so the case above is real
    requires = md.requires("transformers") or []
    if any(r.split()[0].split(";")[0].strip().lower() == "kernels" for r in requires if "extra ==" not in r):
        assert found is not None, "transformers requires `kernels` but it is not importable"


def test_no_top_level_folder_is_a_package_of_an_installed_distribution():
    ours = {"altpo", "benchmarks"}
    installed = md.packages_distributions()
    for folder in REPO_ROOT.iterdir():
        if folder.is_dir() and (folder / "__init__.py").exists():
            assert folder.name in ours, f"{folder.name}/ is a package in the repository root"
            others = set(installed.get(folder.name, ())) - {"altpo-fast"}
            assert not others, f"{folder.name}/ shadows the installed {sorted(others)}"


def test_torchrun_from_the_repo_root_trains_two_steps(tmp_path):
    model = build_model_folder(TOFU_FIXTURE, tmp_path / "model")
    settings = base_settings(TOFU_FIXTURE, model, tmp_path / "run", max_steps=2)
    # no PYTHONPATH: the repository root itself must be enough
    torchrun("-m", "altpo.cli", "train", *cli_flags(settings), nproc=1, timeout=600, pythonpath=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 for r in records)
