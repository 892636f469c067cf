"""Kernels per backend (bitsandbytes-style): each module registers its kernels of every op it
implements with dowser._registry.register(op, backend, devices). Adding a kernel for one op
touches that backend's module and the kernel's own source file."""
