// Host stub for <device_launch_parameters.h>: cuda_emu.h (force-included) already defines everything.
#pragma once
