"""A library built from older sources (another C ABI version) is refused with "rebuild it", before
any of its entry points is looked up: an old build lacks the newer ones, and looking them up first
failed with a bare AttributeError."""

import shutil
import subprocess

import pytest

from altpo_kernels import cuda_backend

OLD_LIBRARY_SOURCE = """
int altpo_abi_version(void) { return 1; }
int altpo_is_cuda(void) { return 0; }
int altpo_forward_epilogue(void) { return 0; }
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the stand-in")
def test_a_library_of_another_abi_version_is_refused_with_the_rebuild_command(tmp_path, monkeypatch):
    source = tmp_path / "old.c"
    source.write_text(OLD_LIBRARY_SOURCE)
    library = tmp_path / "libaltpo_csrc_host.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    monkeypatch.setenv(cuda_backend.LIBRARY_ENV["host"], str(library))
    monkeypatch.setattr(cuda_backend, "_LOADED", {})
    with pytest.raises(cuda_backend.CsrcLibraryError) as err:
        cuda_backend.load_library("host")
    message = str(err.value)
    assert "C ABI version 1" in message and f"expects {cuda_backend.ABI_VERSION}" in message
    assert cuda_backend.BUILD_COMMAND in message
