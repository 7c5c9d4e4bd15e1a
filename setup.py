"""Build of the optional native CPU kernel (``torchrec_ext._C``); metadata is in pyproject.toml.

The extension is compiled at install time (``pip install -e .`` / ``scripts/install.sh``) against
the installed torch. It is optional: without a C++ compiler the install still succeeds, and the
fused tables run their eager PyTorch update instead (with a warning, once; see docs/torchrec.md).
``LIGHTNING_SGL_NO_NATIVE=1`` skips the build.
"""

import os
import platform

from setuptools import setup

ext_modules, cmdclass = [], {}
if not os.environ.get("LIGHTNING_SGL_NO_NATIVE"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch not installed in the build environment: no native kernel
        pass
    else:
        flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno"]
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-march=x86-64-v3")  # AVX2 + FMA units (FMA contraction stays off)
        ext = CppExtension("torchrec_ext._C", ["torchrec_ext/csrc/group_tbe.cpp"],
                           extra_compile_args=flags)
        ext.optional = True  # a failed compile (no compiler) leaves the eager path, not a failure
        ext_modules = [ext]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
