// Host stub for <cuda_runtime.h>: cuda_emu.h (force-included) already defines everything.
#pragma once
