"""Build fastconv's kernels: one Cython source compiled once per CPU target.

- baseline: any x86-64 (or any other architecture), always built.
- avx2 (-march=x86-64-v3) and avx512 (-march=x86-64-v4): x86-64 only, when the compiler takes the
  flag; fastconv._dispatch picks the best one the running CPU supports.
OpenMP is used when a probe program compiles and links with -fopenmp; otherwise (or with
FASTCONV_NO_OPENMP=1) the build is serial. FASTCONV_NATIVE=1 adds -march=native to the baseline
(opt-in only: such a wheel runs on this CPU alone). With JAX installed, also fastconv._xla_ffi
(C++), the convolution and its gradients as XLA custom calls; with TensorFlow, fastconv._tf_ops
(C++), the same as TensorFlow ops.
"""

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
VARIANTS = {"baseline": []}
if X86:
    VARIANTS["avx2"] = ["-march=x86-64-v3"]
    VARIANTS["avx512"] = ["-march=x86-64-v4", "-mprefer-vector-width=512"]


def _jobs():
    """Parallel jobs for the C compiler: each kernel variant takes minutes to compile, and one
    after another they were most of an install's time (6.5 -> 4 min on 2 cores)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _compiler():
    return os.environ.get("CC") or sysconfig.get_config_var("CC").split()[0] or "cc"


def _compiles(flags, source="int main(void){return 0;}\n"):
    """Does the C compiler build and link `source` with `flags`?"""
    cc = _compiler()
    if shutil.which(cc) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        result = subprocess.run(
            [cc, *flags, src, "-o", os.path.join(tmp, "probe")],
            capture_output=True,
        )
        return result.returncode == 0


def _openmp_flags():
    if os.environ.get("FASTCONV_NO_OPENMP"):
        print("fastconv: FASTCONV_NO_OPENMP set: building without OpenMP", file=sys.stderr)
        return []
    probe = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    if _compiles(["-fopenmp"], probe):
        return ["-fopenmp"]
    print(
        "\n*** fastconv: the C compiler does not support OpenMP (-fopenmp): building a SERIAL "
        "version of the kernels. It is correct but uses one core. ***\n",
        file=sys.stderr,
    )
    return []


def extensions():
    openmp = _openmp_flags()
    base = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    native = ["-march=native"] if os.environ.get("FASTCONV_NATIVE") else []
    exts = []
    for name, target in VARIANTS.items():
        target = target or native
        if target and not _compiles(target):
            print(f"fastconv: the compiler rejects {target}: skipping the {name} kernels",
                  file=sys.stderr)
            continue
        exts.append(
            Extension(
                f"fastconv._kernels_{name}",
                [f"fastconv/_kernels_{name}.pyx"],
                include_dirs=[numpy.get_include()],
                extra_compile_args=base + target + openmp,
                extra_link_args=openmp,
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
            )
        )
    exts = cythonize(exts, language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True,
        "initializedcheck": False,
    })
    return exts + _xla_ffi() + _tf_ops()


def _xla_ffi():
    """The XLA FFI custom call (fastconv/_xla_ffi.cc), built against the headers of the jaxlib
    installed at build time; without JAX, or if it does not compile, the JAX bridge uses
    jax.pure_callback alone."""
    try:
        import jax.ffi

        include = jax.ffi.include_dir()
    except Exception:  # noqa: BLE001 - no (usable) JAX: nothing to build against
        print("fastconv: JAX not found at build time: no XLA custom call", file=sys.stderr)
        return []
    if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
        return []
    return [Extension("fastconv._xla_ffi", ["fastconv/_xla_ffi.cc"], include_dirs=[include],
                      depends=["fastconv/_kernel_api.h"],
                      language="c++", extra_compile_args=["-std=c++17", "-O2"],
                      optional=True)]


def _tf_ops():
    """The TensorFlow ops (fastconv/_tf_ops.cc), built against the TensorFlow installed at build
    time; without TensorFlow, or if it does not compile, the TensorFlow bridge uses
    tf.numpy_function alone (and so it does if another TensorFlow is installed later)."""
    try:
        import tensorflow as tf

        compile_flags = tf.sysconfig.get_compile_flags()
        link_flags = tf.sysconfig.get_link_flags()
        lib_dir = tf.sysconfig.get_lib()
    except Exception:  # noqa: BLE001 - no (usable) TensorFlow: nothing to build against
        print("fastconv: TensorFlow not found at build time: no TensorFlow ops", file=sys.stderr)
        return []
    return [Extension("fastconv._tf_ops", ["fastconv/_tf_ops.cc"], language="c++",
                      depends=["fastconv/_kernel_api.h"],
                      extra_compile_args=compile_flags + ["-O2", "-w"],
                      # libtensorflow_framework is found where it was at build time
                      extra_link_args=link_flags + [f"-Wl,-rpath,{lib_dir}"],
                      optional=True)]


class ParallelBuildExt(build_ext):
    """Compiles the extensions side by side unless `-j` says otherwise."""

    def finalize_options(self):
        super().finalize_options()
        self.parallel = self.parallel or _jobs()


setup(ext_modules=extensions(), cmdclass={"build_ext": ParallelBuildExt})
