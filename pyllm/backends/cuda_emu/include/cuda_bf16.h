// Host stub for <cuda_bf16.h>: cuda_emu.h (force-included) already defines everything.
#pragma once
