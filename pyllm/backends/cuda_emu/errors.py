"""Exceptions raised by the CUDA emulator."""


class CudaEmuError(RuntimeError):
    """Base class for every emulator failure."""


class CompileError(CudaEmuError):
    """The host compiler rejected the kernel source; the message holds its full log."""


class LaunchError(CudaEmuError, ValueError):
    """A launch that CUDA itself would reject (bad grid/block shape, too much shared memory)
    or arguments that do not fit the kernel's parameters."""


class KernelFault(CudaEmuError):
    """The kernel failed while running: deadlock, failed assert, __trap, misused warp operation."""


class RaceDetected(KernelFault):
    """Two legal CUDA schedules of the same launch produced different results."""
