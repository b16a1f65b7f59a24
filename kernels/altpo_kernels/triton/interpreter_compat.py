"""Keeps the Triton interpreter working with numpy >= 2.4.

triton 3.6's interpreter turns a scalar tensor into a Python int with ``int(array)`` on a
one-element 1-D array (``tensor.__index__``), which is what a ``for`` loop with a run-time bound
calls. numpy 2.4 made that conversion an error, so every such loop fails under
``TRITON_INTERPRET=1`` (triton issue 9171, fixed upstream after 3.6). The patch below reads the one
element explicitly. It is applied only under the interpreter and only when the installed numpy
shows the problem; GPU compilation never sees it.
"""

from __future__ import annotations

import numpy as np

from .tile_configs import interpreting


def _numpy_refuses_1d_int() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def patch_interpreter_index() -> bool:
    """Make the interpreter's scalar-to-int conversion numpy-2.4 safe. Returns True if patched."""
    if not interpreting() or not _numpy_refuses_1d_int():
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_reads_one_element", False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._reads_one_element = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
