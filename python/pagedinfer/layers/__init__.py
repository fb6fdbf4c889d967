"""Model building blocks over the kernels of `_ops`: linear, norm, rotary, activation, embedding."""
