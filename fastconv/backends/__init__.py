"""One bridge per Keras backend: each moves that backend's tensors to and from the kernels."""
