"""The numerical kernels behind the layers' fast path: block products in group-Fourier
coordinates (`blocks`, `generator`), the normalised spatially varying application with its
hand-written backward pass (`normalised_apply`) and its optional fused C++ CPU kernel
(`cpu_kernel`, source `normalised_apply.cc`)."""
