"""cuda-emu: run the project's CUDA kernels (kernels/*.cu) on the CPU.

The unchanged ``.cu`` source is compiled with the host C++ compiler against
``cuda_emu.h``, which supplies CUDA's built-ins; each launch then runs with
CUDA semantics: one block at a time, every CUDA thread a cooperative fiber,
``__syncthreads()`` a real block barrier, warp shuffles/votes a rendezvous of
the lanes named in the mask, per-block ``__shared__`` memory (poisoned with
0xff bytes at block start), and CUDA's launch limits. See cuda_emu.h for the
execution model and executor.py for how arguments are passed.

    from pyllm.backends.cuda_emu import Module
    mod = Module(path="kernels/rms_norm.cu", options=("-DSCALAR_T=__half",))
    mod.get_function("rms_norm")((rows,), (256,), (x, w, out, np.int32(n), np.float32(eps)))

The API mirrors ``cupy.RawModule`` / ``cupy.RawKernel`` so one backend code
path can drive either.
"""

from .errors import CompileError, CudaEmuError, KernelFault, LaunchError, RaceDetected
from .executor import Kernel, Module, Param

__all__ = [
    "CompileError",
    "CudaEmuError",
    "Kernel",
    "KernelFault",
    "LaunchError",
    "Module",
    "Param",
    "RaceDetected",
]
