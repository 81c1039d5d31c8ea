// Host stub for <cuda_fp16.h>: cuda_emu.h (force-included) already defines everything.
#pragma once
