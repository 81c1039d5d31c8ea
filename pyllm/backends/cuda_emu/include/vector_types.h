// Host stub for <vector_types.h>: cuda_emu.h (force-included) already defines everything.
#pragma once
